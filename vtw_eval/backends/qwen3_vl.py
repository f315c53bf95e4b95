"""`vtw_qwen3_vl`: Qwen3-VL checkpoints (dense and MoE) with VTW; the base of `vtw_qwen3_5`.

Prompts and visuals as lmms-eval 0.7.3's ``qwen3_vl`` builds them (``--model qwen3_vl`` runs its
chat class, ``models/chat/qwen3_vl.py``): a system turn of one text part, then
the user turn with the visuals before the task's text; images and videos resized by
``qwen_vl_utils`` on a 32 px grid (16 px patches merged 2x2) and given to the processor with
``do_resize=False``; answers decoded as they are (no cut at the task's ``until`` strings, no
stripping) and, with ``enable_thinking``, what follows ``</think>``. The defaults are theirs,
including the questionable ones (docs/backends.md says what to set).

What the architecture declares to the engine: DeepStack, the vision tower also returns features
of early ViT blocks, which the decoder adds at the visual positions after its first layers
(``deepstack_visual_embeds``; the engine keeps those of the layers before K only); decoding
positions numbered from the 2D attention mask (multimodal rotary positions).
"""

from __future__ import annotations

import torch
from PIL import Image
from qwen_vl_utils import process_vision_info
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

from vtw_eval.architecture import Architecture
from vtw_eval.backends import arguments
from vtw_eval.backends.base import VTWBackend
from vtw_eval.backends.visuals import Visual, video_length

IMAGE_PATCH_SIZE = 16  # Qwen3-VL's and Qwen3.5's ViT patch; qwen_vl_utils resizes to multiples of twice it


class VideoFile(str):
    """A video's path, with its number of frames."""

    def __new__(cls, path: str, frames: int) -> VideoFile:
        video = super().__new__(cls, path)
        video.frames = frames
        return video


class VTWQwen3VL(VTWBackend):
    model_classes = {"qwen3_vl": Qwen3VLForConditionalGeneration, "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration}
    architecture = Architecture(
        decoding_positions="from_attention_mask",  # multimodal rotary positions follow the 2D mask
        injected_visual_features="deepstack_visual_embeds",  # DeepStack, added after the first decoder layers
    )
    # lmms-eval's Qwen3_VL.DEFAULT_GEN_KWARGS, under the task's generation_kwargs.
    default_generation_kwargs = {"max_new_tokens": 128, "temperature": 0.0, "top_p": None, "num_beams": 1}
    decode_kwargs = {"clean_up_tokenization_spaces": False}
    strips_answers = False

    def __init__(
        self,
        pretrained: str,
        min_pixels: int = 256 * 28 * 28,
        max_pixels: int = 1605632,
        total_pixels: int | None = None,
        max_num_frames: int = 32,
        fps: float | None = None,
        image_min_pixels: int | None = None,
        image_max_pixels: int | None = None,
        system_prompt: str | None = "You are a helpful assistant.",
        enable_thinking: bool | None = None,
        **kwargs,
    ) -> None:
        # Video frame budgets, as lmms-eval's backend gives them to qwen_vl_utils (its chat class
        # gives images none: qwen_vl_utils' own 4 to 16384 visual tokens, unless image_*_pixels).
        self.video_kwargs = {"min_pixels": arguments.integer("min_pixels", min_pixels)}
        max_num_frames = arguments.integer("max_num_frames", max_num_frames)
        if fps is not None:
            self.video_kwargs.update(fps=arguments.non_negative_float("fps", fps), max_frames=max_num_frames)
        elif total_pixels is not None:
            self.video_kwargs["max_frames"] = max_num_frames
        else:
            self.video_kwargs["nframes"] = max_num_frames
        if total_pixels is not None:
            self.video_kwargs["total_pixels"] = arguments.integer("total_pixels", total_pixels)
        else:
            self.video_kwargs["max_pixels"] = arguments.integer("max_pixels", max_pixels)
        self.image_kwargs = {
            name: arguments.integer(name, value)
            for name, value in (("min_pixels", image_min_pixels), ("max_pixels", image_max_pixels))
            if value is not None
        }
        self.system_prompt = system_prompt
        self.enable_thinking = arguments.boolean("enable_thinking", enable_thinking)
        super().__init__(pretrained, **kwargs)

    def video_frames(self, path: str) -> VideoFile:
        """Videos stay paths: qwen_vl_utils reads and samples them, as in lmms-eval's backend. The
        frame count is read here, once, so that an unreadable file stops with its own error."""
        return VideoFile(path, video_length(path))

    def _video_element(self, video: VideoFile) -> dict:
        """qwen_vl_utils' element for a video: a fixed frame count (``nframes``) is capped at the
        video's length, rounded down to the even count it takes (it pairs frames; 2 at least)."""
        element = {"type": "video", "video": str(video), **self.video_kwargs}
        if "nframes" in element:
            if video.frames < 2:
                raise ValueError(f"the video {video} has {video.frames} frame; Qwen3-VL's video input needs 2 or more")
            element["nframes"] = min(element["nframes"], video.frames - video.frames % 2)
        return element

    def build_prompt(self, context: str, visuals: list[Visual]) -> str:
        parts = [{"type": "image" if isinstance(v, Image.Image) else "video"} for v in visuals]
        messages = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        messages.append({"role": "user", "content": [*parts, {"type": "text", "text": context}]})
        thinking = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **thinking)

    def encode(self, prompts: list[str], visuals: list[list[Visual]]) -> dict[str, torch.Tensor]:
        """Visuals resized (and videos read and sampled) by qwen_vl_utils, then the processor."""
        elements = [
            {"type": "image", "image": v, **self.image_kwargs} if isinstance(v, Image.Image) else self._video_element(v)
            for row in visuals
            for v in row
        ]
        images, videos, video_kwargs = None, None, {}
        if elements:
            images, videos, video_kwargs = process_vision_info(
                [{"role": "user", "content": elements}],
                return_video_kwargs=True,
                image_patch_size=IMAGE_PATCH_SIZE,
                return_video_metadata=True,
            )
        metadata = None
        if videos is not None:
            videos, metadata = (list(column) for column in zip(*videos))
        inputs = self.processor(
            text=prompts,
            images=images,
            videos=videos,
            video_metadata=metadata,
            **{**self.video_kwargs, **video_kwargs},
            do_resize=False,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        return self._on_device(inputs)

    def stop_strings(self, until: list[str]) -> list[str]:
        """None: lmms-eval's chat qwen3_vl answers run to EOS or max_new_tokens."""
        return []

    def finish_answer(self, text: str) -> str:
        """With thinking on, the answer is what follows ``</think>`` (nothing when it never ends)."""
        if self.enable_thinking:
            return text.partition("</think>")[2].strip()
        return super().finish_answer(text)
