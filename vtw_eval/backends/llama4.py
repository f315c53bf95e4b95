"""`vtw_llama4`: Llama 4 checkpoints (`Llama4ForConditionalGeneration`: Scout, Maverick) with VTW.

Prompts and answers as lmms-eval 0.7.3's ``llama4_scout`` builds them (``models/simple/llama4_scout.py``):
an optional system turn (the text itself), then the user turn with the doc's images before its text
(``<image>`` removed), through the processor's chat template; each image goes through a JPEG data URL
(quality 85), as lmms-eval sends it; greedy with ``max_new_tokens`` (4096) unless the task says
otherwise; answers decoded with special tokens skipped, cut at the task's ``until`` strings (the
end-of-turn token's text when the task gives none), not stripped.

What is withdrawn: every ``<|patch|>`` token of every tile and of the global image; the
``<|image_start|>``, ``<|image|>``, tile separator and ``<|image_end|>`` tokens stay. Declared to
the engine: the decoder gives its layers one complex tensor of rotations; its NoPE layers (every
fourth) scale their queries by positions they count themselves (attention temperature tuning:
``1 + attn_scale * log(1 + floor((position + 1) / floor_scale))``), which the engine rescales to
each kept token's own position, counted from its row's first real token. The RoPE layers attend
within chunks (``attention_chunk_size``), which the engine counts in those positions too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import Llama4ForConditionalGeneration

from vtw_eval.architecture import Architecture
from vtw_eval.backends import arguments
from vtw_eval.backends.base import VTWBackend
from vtw_eval.backends.chat_prompts import SystemThenImagesThenText


def temperature_tuning(attention: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A Llama 4 attention layer's query scale as a function of position, as the layer computes it
    (``Llama4TextAttention.forward``); None for a layer that does not scale (its RoPE layers)."""
    if not attention.attn_temperature_tuning or attention.use_rope:
        return None
    floor_scale, attn_scale = attention.floor_scale, attention.attn_scale
    return lambda positions: torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0


class VTWLlama4(SystemThenImagesThenText, VTWBackend):
    model_classes = {"llama4": Llama4ForConditionalGeneration}
    architecture = Architecture(complex_rotary=True, query_position_scale=temperature_tuning)
    decode_kwargs = {"clean_up_tokenization_spaces": False}
    strips_answers = False

    def __init__(
        self,
        pretrained: str,
        max_new_tokens: int = 4096,
        system_prompt: str | None = None,
        max_frames_num: int = 32,
        **kwargs,
    ) -> None:
        # lmms-eval's llama4_scout generation defaults, under the task's generation_kwargs.
        self.default_generation_kwargs = {
            "max_new_tokens": arguments.integer("max_new_tokens", max_new_tokens),
            "temperature": 0.0,
            "top_p": None,
            "num_beams": 1,
        }
        arguments.integer("max_frames_num", max_frames_num)  # for its videos, which this backend refuses
        self.system_prompt = system_prompt
        super().__init__(pretrained, **kwargs)

    def stop_strings(self, until: list[str]) -> list[str]:
        """The task's, else the end-of-turn token's text, as lmms-eval's llama4_scout."""
        return until or [self.tokenizer.decode(self.eot_token_id)]
