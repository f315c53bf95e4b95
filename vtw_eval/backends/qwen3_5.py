"""`vtw_qwen3_5`: Qwen3.5 checkpoints (dense and MoE) with VTW.

Prompts, visuals and answers as for Qwen3-VL (``qwen3_vl.py``), with lmms-eval 0.7.3's ``qwen3_5``
defaults: 32 px pixel budgets, long videos, thinking on, sampling.

What the architecture declares to the engine: three of every four decoder layers are Gated
DeltaNet (``linear_attention``) layers with a convolution and a recurrent state instead of keys and
values; from K on they run over the kept tokens. No DeepStack.
"""

from __future__ import annotations

from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

from vtw_eval.architecture import Architecture
from vtw_eval.backends.qwen3_vl import VTWQwen3VL


class VTWQwen3_5(VTWQwen3VL):
    model_classes = {"qwen3_5": Qwen3_5ForConditionalGeneration, "qwen3_5_moe": Qwen3_5MoeForConditionalGeneration}
    architecture = Architecture(
        decoding_positions="from_attention_mask",  # multimodal rotary positions follow the 2D mask
        recurrent_layer_types=("linear_attention",),  # Gated DeltaNet: conv + recurrent state, no KV cache
    )  # no DeepStack in Qwen3.5
    default_generation_kwargs = {"max_new_tokens": 1024, "temperature": 0.7, "top_p": 0.8, "top_k": 20}

    def __init__(
        self,
        pretrained: str,
        min_pixels: int = 64 * 32 * 32,
        max_pixels: int = 128 * 32 * 32,
        total_pixels: int | None = 224 * 1024 * 32 * 32,
        max_num_frames: int = 768,
        enable_thinking: bool | None = True,
        **kwargs,
    ) -> None:
        super().__init__(
            pretrained,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            total_pixels=total_pixels,
            max_num_frames=max_num_frames,
            enable_thinking=enable_thinking,
            **kwargs,
        )
