"""`vtw_huggingface` and `vtw_smolvlm`: prompts, defaults and arguments of lmms-eval 0.7.3's generic
chat ``huggingface`` backend (``models/chat/huggingface.py``), with VTW.

As lmms-eval's backend builds them: an optional system turn (``system_prompt``, or
``reasoning_prompt`` which wins; a path to a file is read, ``\\n`` written in the argument is a
newline), then the user turn with the doc's images before its text, through the processor's chat
template; answers decoded with special tokens skipped, run to EOS or ``max_new_tokens`` (4096 by
default; the chat class does not cut at the task's ``until`` strings), not stripped.

Where lmms-eval's backend cannot run as shipped, these do it right (docs/backends.md):
- the model class is the family adapter's (lmms-eval's test compares a ``model_type`` string with
  mappings keyed by config classes, so it always loads ``AutoModel``, which has no ``generate``;
  and "llama4" is in the causal-LM mapping, whose class is text-only);
- no empty ``audios`` / ``videos`` lists go to the processor (transformers refuses the first, and
  SmolVLM's processor fails on the second);
- each row's images go to the processor as that row's own list (lmms-eval flattens the batch's,
  which SmolVLM's processor refuses at batch > 1).

``vtw_huggingface`` serves every model type an adapter of vtw_eval serves, with that adapter's
model class and engine declaration (``Architecture``); a type none serves is refused before
loading, naming the served ones. ``vtw_smolvlm`` is the same backend for SmolVLM checkpoints only
(lmms-eval has no SmolVLM backend of its own). Images only: a video is refused by name.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
from transformers import SmolVLMForConditionalGeneration

from vtw_eval.backends import arguments
from vtw_eval.backends.base import VTWBackend
from vtw_eval.backends.loading import load_config
from vtw_eval.backends.visuals import Visual
from vtw_eval.registry import BACKENDS


class VTWHuggingface(VTWBackend):
    # lmms-eval's huggingface generation defaults, under the task's generation_kwargs.
    default_generation_kwargs = {"max_new_tokens": 4096, "temperature": 0.0, "top_p": None, "num_beams": 1}
    decode_kwargs = {"clean_up_tokenization_spaces": False}
    strips_answers = False

    def __init__(
        self,
        pretrained: str,
        system_prompt: str | None = None,
        reasoning_prompt: str | None = None,
        max_num_frames: int = 32,
        use_custom_video_loader: bool = False,
        fps: float | None = None,
        max_image_size: int | None = None,
        interleave_visuals: bool = False,
        revision: str = "main",
        trust_remote_code: bool = False,
        **kwargs,
    ) -> None:
        # Accepted for lmms-eval's command lines; they concern videos, which this backend refuses,
        # or nothing (lmms-eval's backend stores interleave_visuals and never reads it).
        arguments.integer("max_num_frames", max_num_frames)
        arguments.boolean("use_custom_video_loader", use_custom_video_loader)
        arguments.boolean("interleave_visuals", interleave_visuals)
        if fps is not None:
            arguments.non_negative_float("fps", fps)
        if max_image_size is not None:
            arguments.integer("max_image_size", max_image_size)
        self.system_prompt = system_turn(reasoning_prompt or system_prompt)
        served = served_model_classes(type(self))
        config = load_config(type(self).__name__, served, pretrained, revision, trust_remote_code)
        family = served[config.model_type]
        # The family's model class and engine declaration, this backend's prompts.
        self.model_classes = {config.model_type: family.model_classes[config.model_type]}
        self.architecture = family.architecture
        super().__init__(pretrained, revision=revision, trust_remote_code=trust_remote_code, **kwargs)

    def build_prompt(self, context: str, visuals: list[Visual]) -> str:
        messages = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        messages.append(
            {"role": "user", "content": [*[{"type": "image"}] * len(visuals), {"type": "text", "text": context}]}
        )
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, prompts: list[str], visuals: list[list[Visual]]) -> dict[str, torch.Tensor]:
        """Each row's images as its own list; no empty audio or video lists."""
        inputs = self.processor(
            text=prompts,
            images=visuals if any(visuals) else None,
            padding=True,
            add_special_tokens=self.adds_special_tokens(prompts),
            return_tensors="pt",
        )
        return self._on_device(inputs)

    def stop_strings(self, until: list[str]) -> list[str]:
        """None: lmms-eval's chat huggingface answers run to EOS or max_new_tokens."""
        return []


class VTWSmolVLM(VTWHuggingface):
    model_classes = {"smolvlm": SmolVLMForConditionalGeneration}


def system_turn(prompt: str | None) -> str | None:
    """The system prompt as lmms-eval's backend reads it: ``\\n`` as a newline, a file's text if it
    names a file."""
    if not prompt:
        return None
    prompt = prompt.replace("\\n", "\n")
    # os.path.isfile, not Path.is_file: a long prompt is a name too long for the file system,
    # which Path.is_file raises on and isfile answers False to (as lmms-eval's check does).
    return Path(prompt).read_text().strip() if os.path.isfile(prompt) else prompt


def served_model_classes(backend: type) -> dict[str, type]:
    """``model_type`` -> the adapter whose model class and engine declaration serve it: for a
    backend of one family (``vtw_smolvlm``) its own types, for ``vtw_huggingface`` every type a
    registered transformers backend declares."""
    if backend.model_classes:
        return dict.fromkeys(backend.model_classes, backend)
    served = {}
    for path in BACKENDS.values():
        module, name = path.rsplit(".", 1)
        adapter = getattr(importlib.import_module(module), name)
        for model_type in adapter.model_classes:
            served.setdefault(model_type, adapter)
    return served
