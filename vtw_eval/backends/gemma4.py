"""`vtw_gemma4`: Gemma 4 checkpoints (`Gemma4ForConditionalGeneration`: E2B, E4B, 26B-A4B, 31B) with VTW.

Prompts and answers as lmms-eval 0.7.3's ``gemma4`` builds them (``models/simple/gemma4.py``): a
system turn (``system_prompt``, "You are a helpful assistant." by default), then the user turn with
the doc's images before its text (``<image>`` and ``<image N>`` removed); ``reasoning_prompt`` is
appended to the stripped text; each image goes through a JPEG data URL (quality 85), as lmms-eval
sends it, at most ``max_soft_tokens`` soft tokens per image; the processor pads each batch to a
multiple of 8 tokens. Greedy, ``max_new_tokens`` 128 unless the task says otherwise; answers decoded with
special tokens skipped, cut at the task's ``until`` strings except ``"\\n\\n"`` (the end-of-turn
token's text when the task gives none), not stripped. Images only: a video is refused by name, and
so is ``interleave_visuals=True`` (lmms-eval's places the images at their ``<image N>`` marks, and
only those).

Declared to the engine (docs/design.md, "Gemma 4"): every decoder layer takes a per-layer input
(a per-token tensor built from the token ids, the pad id at image positions), gathered at the kept
positions with the hidden states; the last ``num_kv_shared_layers`` layers read the keys and values
of the last earlier layer of their kind (``shared_kv_states``), which the engine masks to the kept
tokens when that layer is before K. Sliding and full layers alternate; the engine counts windows in
original positions and gathers each kind's rotary embeddings. Image tokens attend to each other
bidirectionally in prefill in the larger models, which concerns layers < K only.
"""

from __future__ import annotations

import re

import torch
from transformers import Gemma4ForConditionalGeneration

from vtw_eval.architecture import Architecture, KeySharing, gemma4_key_producers
from vtw_eval.backends import arguments
from vtw_eval.backends.base import VTWBackend
from vtw_eval.backends.gemma3 import VTWGemma3
from vtw_eval.backends.visuals import Visual, jpeg_data_url

MAX_SOFT_TOKENS = ("70", "140", "280", "560", "1120")  # the image budgets Gemma 4's processor accepts


class VTWGemma4(VTWBackend):
    model_classes = {"gemma4": Gemma4ForConditionalGeneration}
    architecture = Architecture(
        per_layer_input="per_layer_input",
        key_sharing=KeySharing(argument="shared_kv_states", producers=gemma4_key_producers),
    )
    # lmms-eval's gemma4 generates and decodes as its gemma3 does.
    default_generation_kwargs = VTWGemma3.default_generation_kwargs
    decode_kwargs = VTWGemma3.decode_kwargs
    strips_answers = False

    def __init__(
        self,
        pretrained: str,
        max_soft_tokens: int = 280,
        max_num_frames: int = 32,
        interleave_visuals: bool = False,
        system_prompt: str | None = "You are a helpful assistant.",
        reasoning_prompt: str | None = None,
        **kwargs,
    ) -> None:
        budget = str(arguments.integer("max_soft_tokens", max_soft_tokens))
        self.max_soft_tokens = int(arguments.one_of("max_soft_tokens", budget, MAX_SOFT_TOKENS))
        arguments.integer("max_num_frames", max_num_frames)  # for its videos, which this backend refuses
        if arguments.boolean("interleave_visuals", interleave_visuals):
            raise ValueError("interleave_visuals=True is not supported by vtw_gemma4; accepted: False (images first)")
        self.system_prompt = system_prompt
        self.reasoning_prompt = reasoning_prompt.replace("\\n", "\n") if reasoning_prompt else None
        super().__init__(pretrained, **kwargs)

    def build_prompt(self, context: str, visuals: list[Visual]) -> str:
        context = context.replace("<image>", "")
        if self.reasoning_prompt:
            context = context.strip() + self.reasoning_prompt
        content = [*[{"type": "image"}] * len(visuals), {"type": "text", "text": re.sub(r"<image \d+>", "", context)}]
        messages = [
            {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]},
            {"role": "user", "content": content},
        ]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, prompts: list[str], visuals: list[list[Visual]]) -> dict[str, torch.Tensor]:
        """Each row's images as lmms-eval sends them (JPEG data URLs, which the processor decodes),
        at most ``max_soft_tokens`` soft tokens each, and the padding to a multiple of 8."""
        rows = [[jpeg_data_url(image) for image in row] for row in visuals]
        inputs = self.processor(
            text=prompts,
            images=rows if any(rows) else None,
            padding=True,
            pad_to_multiple_of=8,
            max_soft_tokens=self.max_soft_tokens,
            add_special_tokens=self.adds_special_tokens(prompts),
            return_tensors="pt",
        )
        return self._on_device(inputs)

    def stop_strings(self, until: list[str]) -> list[str]:
        """The task's except a blank line (lmms-eval's gemma4 never stops there), else the
        end-of-turn token's text."""
        return [stop for stop in until if stop != "\n\n"] if until else [self.tokenizer.decode(self.eot_token_id)]
