"""`vtw_internvl`: InternVL3 and InternVL3.5 "-hf" checkpoints (`InternVLForConditionalGeneration`) with VTW.

Prompts and visuals as lmms-eval 0.7.3's ``internvl_hf`` builds them (a chat backend,
``models/chat/internvl_hf.py``): no system turn; the user turn with the doc's visuals before its
text, through the processor's chat template; each image tiled into ``min_patches`` to
``max_patches`` tiles plus a thumbnail by the processor, a video's ``num_frames`` frames sampled by
it. Answers as decoded, to EOS or ``max_new_tokens`` (the chat class does not cut at the task's
``until`` strings), not stripped.

Nothing is declared to the engine beyond the defaults: every tile's context tokens are image
tokens, withdrawn together; the ``<img>`` / ``</img>`` markers stay; positions are counted.
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import InternVLForConditionalGeneration

from vtw_eval.backends import arguments
from vtw_eval.backends.base import VTWBackend
from vtw_eval.backends.visuals import Visual


class VTWInternVL(VTWBackend):
    model_classes = {"internvl": InternVLForConditionalGeneration}
    # lmms-eval's internvl_hf generation defaults, under the task's generation_kwargs.
    default_generation_kwargs = {"max_new_tokens": 1024, "temperature": 0, "top_p": None, "num_beams": 1}
    decode_kwargs = {"clean_up_tokenization_spaces": False}
    strips_answers = False

    def __init__(
        self, pretrained: str, min_patches: int = 1, max_patches: int = 12, num_frames: int = 32, **kwargs
    ) -> None:
        self.image_kwargs = {
            "min_patches": arguments.integer("min_patches", min_patches),
            "max_patches": arguments.integer("max_patches", max_patches),
        }
        self.video_kwargs = {"do_sample_frames": True, "num_frames": arguments.integer("num_frames", num_frames)}
        super().__init__(pretrained, **kwargs)

    def video_frames(self, path: str) -> str:
        """Videos stay paths: the processor reads and samples them, as in lmms-eval's backend."""
        return path

    def build_prompt(self, context: str, visuals: list[Visual]) -> str:
        parts = [{"type": "image" if isinstance(v, Image.Image) else "video"} for v in visuals]
        messages = [{"role": "user", "content": [*parts, {"type": "text", "text": context}]}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, prompts: list[str], visuals: list[list[Visual]]) -> dict[str, torch.Tensor]:
        images = [v for row in visuals for v in row if isinstance(v, Image.Image)]
        videos = [v for row in visuals for v in row if not isinstance(v, Image.Image)]
        inputs = self.processor(
            images=images or None,
            videos=videos or None,
            text=prompts,
            padding=True,
            add_special_tokens=self.adds_special_tokens(prompts),
            return_tensors="pt",
            **self.image_kwargs,
            **self.video_kwargs,
        )
        return self._on_device(inputs)

    def stop_strings(self, until: list[str]) -> list[str]:
        """None: lmms-eval's chat internvl_hf answers run to EOS or max_new_tokens."""
        return []
