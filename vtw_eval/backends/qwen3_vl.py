"""Qwen3-VL (dense and MoE) with VTW: what the architecture declares to the engine.

Its difference from Qwen2-VL is DeepStack: the vision tower also returns features of early ViT
blocks, which the decoder adds at the visual positions after its first layers
(``deepstack_visual_embeds``); the engine keeps those of the layers before K only.

Not registered with lmms-eval yet: lmms-eval 0.7.3's ``qwen3_vl`` is a chat backend (messages,
``qwen_vl_utils`` resizing, its own pixel budgets), and a ``vtw_qwen3_vl`` must build its prompts
exactly so before it is offered (issue 26).
"""

from __future__ import annotations

from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

from vtw_eval.backends.qwen2_vl import VTWQwen2VL


class VTWQwen3VL(VTWQwen2VL):
    model_classes = {"qwen3_vl": Qwen3VLForConditionalGeneration, "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration}
    injected_visual_features = "deepstack_visual_embeds"  # DeepStack, added after the first decoder layers
