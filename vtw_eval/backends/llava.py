"""`vtw_llava`: LLaVA-1.5 and LLaVA-NeXT checkpoints in the llava-hf layout, with VTW.

Prompts are built as lmms-eval's built-in ``llava_hf`` builds them, so a run with
``withdraw_layer=none`` is the baseline that a VTW run is compared against.
"""

from __future__ import annotations

from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
)

from vtw_eval.backends.base import VTWBackend
from vtw_eval.backends.visuals import Visual

IMAGE_TOKEN = "<image>"
# The Vicuna-v1 conversation format of LLaVA-1.5, for tokenizers that ship no chat template.
VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}A chat between a curious user and an artificial "
    "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: {{ message['content'] }} {% elif message['role'] == 'user' %}USER: {{ message['content'] }} "
    "{% else %} ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


class VTWLlava(VTWBackend):
    model_classes = {
        "llava": LlavaForConditionalGeneration,
        "llava_next": LlavaNextForConditionalGeneration,
    }

    def build_prompt(self, context: str, visuals: list[Visual]) -> str:
        if visuals and IMAGE_TOKEN not in context:
            context = " ".join([IMAGE_TOKEN] * len(visuals)) + "\n" + context
        template = self.chat_template or self.tokenizer.chat_template or VICUNA_CHAT_TEMPLATE
        messages = [{"role": "user", "content": context}]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )


class VTWLlavaOnevision(VTWLlava):
    """`vtw_llava_onevision`: LLaVA-OneVision checkpoints (llava-hf layout), prompts as llava_hf builds them."""

    model_classes = {"llava_onevision": LlavaOnevisionForConditionalGeneration}
