"""`vtw_gemma3`: Gemma 3 checkpoints (`Gemma3ForConditionalGeneration`) with VTW.

Prompts and visuals as lmms-eval 0.7.3's ``gemma3`` builds them (``models/simple/gemma3.py``): a
system turn of one text part (Gemma's template folds it into the first user turn), then the
user turn with the doc's images, and a video's frames as images, before its text (``<image>``
and ``<image N>`` removed); each image goes through a JPEG data URL (quality 85), as lmms-eval
sends it; the processor pads each batch to a multiple of 8 tokens. Answers are cut at the task's
``until`` strings except ``"\\n\\n"`` and not stripped, as lmms-eval's are.

Nothing is declared to the engine beyond the defaults: Gemma 3's image tokens attend to each other
bidirectionally in prefill (``token_type_ids``), which concerns layers < K only (layers >= K hold
no image token); five of every six layers use a sliding window, which the engine counts in
original positions; its local and global rotary embeddings are gathered per layer.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image
from transformers import Gemma3ForConditionalGeneration

from vtw_eval.backends import arguments
from vtw_eval.backends.base import VTWBackend
from vtw_eval.backends.visuals import Visual, jpeg_data_url


class VTWGemma3(VTWBackend):
    model_classes = {"gemma3": Gemma3ForConditionalGeneration}
    # lmms-eval's gemma3 generation defaults, under the task's generation_kwargs.
    default_generation_kwargs = {
        "max_new_tokens": 128,
        "temperature": 0.0,
        "top_p": None,
        "top_k": None,
        "num_beams": 1,
    }
    decode_kwargs = {"clean_up_tokenization_spaces": False}
    strips_answers = False

    def __init__(
        self,
        pretrained: str,
        min_pixels: int = 256 * 28 * 28,
        max_pixels: int = 1605632,
        max_num_frames: int = 32,
        system_prompt: str | None = "You are a helpful assistant.",
        **kwargs,
    ) -> None:
        # lmms-eval's gemma3 takes pixel budgets and hands them to a processor that resizes every
        # image to its fixed size anyway; they are accepted (and checked) for its command lines.
        arguments.integer("min_pixels", min_pixels)
        arguments.integer("max_pixels", max_pixels)
        self.max_num_frames = arguments.integer("max_num_frames", max_num_frames)
        self.system_prompt = system_prompt
        super().__init__(pretrained, **kwargs)

    def video_frames(self, path: str) -> np.ndarray:
        """``max_num_frames`` frames sampled uniformly, read as lmms-eval's gemma3 reads them."""
        from lmms_eval.models.model_utils.load_video import read_video  # needs PyAV, which images do not

        return read_video(path, num_frm=self.max_num_frames)

    def build_prompt(self, context: str, visuals: list[Visual]) -> str:
        context = re.sub(r"<image \d+>", "", context.replace("<image>", ""))
        images = sum(1 if isinstance(v, Image.Image) else len(v) for v in visuals)  # a video: its frames
        messages = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        messages.append({"role": "user", "content": [*[{"type": "image"}] * images, {"type": "text", "text": context}]})
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, prompts: list[str], visuals: list[list[Visual]]) -> dict[str, torch.Tensor]:
        """Each row's images (a video: its frames) as lmms-eval sends them (JPEG data URLs), and the
        processor's padding to a multiple of 8."""
        # The processor decodes the data URLs itself, as it does for lmms-eval's chat-template call
        # (its JPEG decoder is not PIL's: decoding here would change pixels).
        rows = [
            [
                jpeg_data_url(image)
                for visual in row
                for image in ([visual] if isinstance(visual, Image.Image) else [Image.fromarray(f) for f in visual])
            ]
            for row in visuals
        ]
        inputs = self.processor(
            text=prompts,
            images=rows if any(rows) else None,
            padding=True,
            pad_to_multiple_of=8,
            add_special_tokens=self.adds_special_tokens(prompts),
            return_tensors="pt",
        )
        return self._on_device(inputs)

    def stop_strings(self, until: list[str]) -> list[str]:
        """lmms-eval's gemma3 never stops at a blank line (it would cut answers short)."""
        return [stop for stop in until if stop != "\n\n"]
