"""`vtw_mistral3`: Mistral 3 checkpoints (`Mistral3ForConditionalGeneration`: Ministral 3, Mistral
Small 3.1 / 3.2) with VTW.

Prompts and answers as lmms-eval 0.7.3's ``mistral3_vl`` builds them (``models/simple/mistral3_vl.py``):
the prompt string written by hand, ``<s>[INST]`` + the images (one ``[IMG]``, or ``Image i: [IMG]``
lines for several) + a newline + the text + ``[/INST]``, given to the processor as text (whose
tokenizer adds its special tokens as usual); a prompt without images goes through the chat template
instead; with ``disable_thinking`` the text gets ``no_think_prompt`` appended. Generation:
``max_new_tokens=512`` and temperature 0.6 unless the task says otherwise, ``top_p=0.9`` when
sampling and ``repetition_penalty=1.2`` whatever the task says; answers decoded with special tokens
skipped, reasoning removed (``<think>`` blocks, then ``<answer>`` or ``\\boxed{}`` contents) and
stripped; no cut at ``until``.

What is withdrawn: every ``[IMG]`` token (the positions holding visual embeddings); the
``[IMG_BREAK]`` / ``[IMG_END]`` tokens that end each row of an image are text tokens and stay. Kept
tokens keep their original positions, so Ministral 3's queries, scaled by their position (Llama 4's
scaling), are scaled as in the unmodified model; nothing else is declared.
"""

from __future__ import annotations

import torch
from lmms_eval.models.model_utils.reasoning_model_utils import parse_reasoning_model_answer
from transformers import Mistral3ForConditionalGeneration

from vtw_eval.backends import arguments
from vtw_eval.backends.base import VTWBackend
from vtw_eval.backends.visuals import Visual

NO_THINK_PROMPT = " Respond with the final answer only. Do not output any reasoning, explanation, or <think> tags."


class VTWMistral3(VTWBackend):
    model_classes = {"mistral3": Mistral3ForConditionalGeneration}
    # lmms-eval's mistral3_vl generation defaults, under the task's generation_kwargs ...
    default_generation_kwargs = {"max_new_tokens": 512, "temperature": 0.6}
    # ... and what it sets whatever the task says (top_p applies when sampling only).
    fixed_generation_kwargs = {"top_p": 0.9, "repetition_penalty": 1.2}

    def __init__(
        self,
        pretrained: str,
        max_num_frames: int = 32,
        system_prompt: str | None = None,
        temperature: float = 0.6,
        disable_thinking: bool = False,
        no_think_prompt: str | None = None,
        **kwargs,
    ) -> None:
        # lmms-eval's mistral3_vl takes these and never uses max_num_frames or system_prompt.
        arguments.integer("max_num_frames", max_num_frames)
        self.default_generation_kwargs = {
            **self.default_generation_kwargs,
            "temperature": arguments.non_negative_float("temperature", temperature),
        }
        self.disable_thinking = arguments.boolean("disable_thinking", disable_thinking)
        self.no_think_prompt = no_think_prompt or NO_THINK_PROMPT
        super().__init__(pretrained, **kwargs)
        self.special_tokens_prefix = special_tokens_prefix(self.tokenizer)

    def build_prompt(self, context: str, visuals: list[Visual]) -> str:
        if self.disable_thinking:
            context = context.rstrip() + self.no_think_prompt
        if not visuals:
            messages = [{"role": "user", "content": context}]
            return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        image_token = self.processor.image_token
        if len(visuals) == 1:
            images = image_token
        else:
            images = "".join(f"Image {index + 1}: {image_token}\n" for index in range(len(visuals)))
        # The tokenizer adds its special tokens to this text as well, as it does in lmms-eval.
        return self.special_tokens_prefix + f"<s>[INST]{images}\n{context}[/INST]"

    def encode(self, prompts: list[str], visuals: list[list[Visual]]) -> dict[str, torch.Tensor]:
        """Every prompt already holds its special tokens (image prompts: written out; the others:
        from the chat template)."""
        images = [image for row in visuals for image in row]
        inputs = self.processor(
            text=prompts, images=images or None, padding=True, add_special_tokens=False, return_tensors="pt"
        )
        inputs.pop("token_type_ids", None)  # lmms-eval's mistral3_vl drops them too
        return self._on_device(inputs)

    def stop_strings(self, until: list[str]) -> list[str]:
        """None: lmms-eval's mistral3_vl answers run to EOS or max_new_tokens."""
        return []

    def finish_answer(self, text: str) -> str:
        text = parse_reasoning_model_answer(text)
        return text.split("</think>")[-1].strip()


def special_tokens_prefix(tokenizer) -> str:
    """What ``tokenizer`` puts before a text when it adds its special tokens (a BOS, for Mistral's
    tokenizers), written out so that every prompt of a batch is encoded alike."""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    return tokenizer.decode(with_special[: len(with_special) - len(plain)]) if with_special != plain else ""
