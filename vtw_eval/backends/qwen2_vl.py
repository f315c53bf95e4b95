"""`vtw_qwen2_vl` and `vtw_qwen2_5_vl`: Qwen2-VL and Qwen2.5-VL checkpoints with VTW.

Prompts as lmms-eval's built-in qwen2_vl builds them: a system prompt, then the visuals (images,
video frames) before the question, through the processor's chat template. Visual tokens are the
image and video pad tokens; the vision start/end markers stay (see README).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from vtw_eval.architecture import Architecture
from vtw_eval.backends import arguments
from vtw_eval.backends.base import VTWBackend
from vtw_eval.backends.visuals import Visual, video_length


class VTWQwen2VL(VTWBackend):
    model_classes = {"qwen2_vl": Qwen2VLForConditionalGeneration}
    # Multimodal rotary positions: decoding continues them from the 2D mask.
    architecture = Architecture(decoding_positions="from_attention_mask")

    def __init__(
        self,
        pretrained: str,
        min_pixels: int = 3136,
        max_pixels: int = 602112,
        system_prompt: str | None = "You are a helpful assistant.",
        max_num_frames: int = 32,
        **kwargs,
    ) -> None:
        super().__init__(pretrained, **kwargs)
        self.max_num_frames = arguments.integer("max_num_frames", max_num_frames)
        for processor in (self.processor.image_processor, getattr(self.processor, "video_processor", None)):
            if processor is not None:  # the pixel budget decides how many visual tokens an image gets
                processor.size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
        self.system_prompt = system_prompt

    def video_frames(self, path: str) -> np.ndarray:
        """``max_num_frames`` frames spread evenly over the video (all of them when it has fewer:
        no frame twice), read as lmms-eval reads them."""
        # Imported here: lmms-eval's video module needs PyAV, which image tasks do not.
        from lmms_eval.models.model_utils.load_video import load_video_decord

        return load_video_decord(path, min(self.max_num_frames, video_length(path)))

    def build_prompt(self, context: str, visuals: list[Visual]) -> str:
        parts = [{"type": "image" if isinstance(v, Image.Image) else "video"} for v in visuals]
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": [*parts, {"type": "text", "text": context.replace("<image>", "")}]})
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class VTWQwen2_5VL(VTWQwen2VL):
    model_classes = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
