"""A request's visuals: images, and videos read from a file path."""

from __future__ import annotations

import numpy as np
from lmms_eval.models.model_utils.media_encoder import encode_image_to_data_url
from PIL import Image

Visual = Image.Image | np.ndarray  # an image, or a video's frames (or its path, for adapters that read it later)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")


def video_length(path: str) -> int:
    """A video file's number of frames, read with decord as lmms-eval's backends read videos. decord
    logs why a file cannot be read and raises "Error reading <path>": the error raised here is
    PyAV's (ffmpeg's) reason instead."""
    import decord  # only video tasks need these

    try:
        return len(decord.VideoReader(path))
    except Exception as error:
        import av

        try:
            av.open(path).close()
        except Exception as cause:
            raise ValueError(f"{type(cause).__name__}: {cause}") from error
        raise


def per_row(items: list, counts: list[int]) -> list[list]:
    """A batch's visuals, listed in order, split into each row's own list (``counts`` per row),
    as processors that take a list of images per row want them (Gemma 3)."""
    rows, start = [], 0
    for count in counts:
        rows.append(items[start : start + count])
        start += count
    return rows


def jpeg_data_url(image: Image.Image) -> str:
    """An image as lmms-eval's chat-template backends send it (gemma3, glm4v): a JPEG data URL,
    quality 85, which the processor decodes again (so the pixels are JPEG's)."""
    return encode_image_to_data_url(image, image_format="JPEG", mime_type="image/jpeg", convert_rgb=True, quality=85)
