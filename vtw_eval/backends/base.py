"""What every VTW backend shares: model loading, batching, generation and log-likelihoods.

An architecture adapter (see ``llava.py``) names its transformers model classes and how a
request's context and visuals become a prompt; the withdrawal itself is ``vtw_eval.engine``.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from lmms_eval import utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image
from tqdm import tqdm
from transformers import AutoConfig, AutoProcessor

from vtw_eval.engine import VisualTokenWithdrawal

DTYPES = ("auto", "float32", "float16", "bfloat16")


def parse_withdraw_layer(value: Any, num_layers: int) -> int | None:
    """``withdraw_layer`` as given on the command line: an integer 0..L, or none."""
    accepted = f"an integer from 0 to {num_layers} (the decoder's layer count), or 'none'"
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
        return None
    if isinstance(value, bool):
        raise ValueError(f"withdraw_layer={value!r} is not accepted; use {accepted}")
    try:
        layer = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"withdraw_layer={value!r} is not accepted; use {accepted}") from None
    if str(layer) != str(value).strip() or not 0 <= layer <= num_layers:
        raise ValueError(f"withdraw_layer={value!r} is not accepted; use {accepted}")
    return layer


class VTWBackend(lmms):
    """An lmms-eval "simple" model that runs a transformers VLM with visual tokens withdrawn."""

    is_simple = True
    model_classes: dict[str, type] = {}  # config.model_type -> transformers class, set by adapters

    def __init__(
        self,
        pretrained: str,
        withdraw_layer: int | str | None = None,
        revision: str = "main",
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        device_map: str | None = None,
        chat_template: str | None = None,
        use_cache: bool = True,
        max_batch_size: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"Unknown model_args for {type(self).__name__}: {sorted(kwargs)}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not accepted; use one of {DTYPES}")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size={batch_size!r} is not accepted; use a positive integer")

        self.accelerator = Accelerator()
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        if device is None:
            device = f"cuda:{self.accelerator.local_process_index}" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)

        config = AutoConfig.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code)
        model_class = self.model_classes.get(config.model_type)
        if model_class is None:
            raise ValueError(
                f"pretrained={pretrained!r} is a {config.model_type!r} model; "
                f"{type(self).__name__} serves {sorted(self.model_classes)}"
            )
        load_kwargs = dict(revision=revision, dtype=dtype, trust_remote_code=trust_remote_code)
        if attn_implementation is not None:
            load_kwargs["attn_implementation"] = attn_implementation
        if device_map:  # e.g. "auto": one process, the model split over several devices
            load_kwargs["device_map"] = device_map
        self._model = model_class.from_pretrained(pretrained, **load_kwargs).eval()
        if not device_map:
            self._model.to(self._device)
        else:
            self._device = self._model.device

        self.processor = AutoProcessor.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # batched generation continues every row at the right end
        self.chat_template = chat_template
        self.use_cache = use_cache
        self.pretrained = pretrained

        self.withdrawal = VisualTokenWithdrawal(self._model, withdraw_layer=None)
        self.withdrawal.withdraw_layer = parse_withdraw_layer(withdraw_layer, self.withdrawal.num_layers)
        logger.info(
            f"{type(self).__name__}: {pretrained} on {self._device}, {self.withdrawal.num_layers} decoder layers, "
            f"withdraw_layer={self.withdrawal.withdraw_layer}"
        )

    # lmms-eval reads these
    @property
    def model(self):
        return self._model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    # -- prompts ---------------------------------------------------------------------------

    def build_prompt(self, context: str, num_images: int) -> str:
        """The chat-formatted prompt for one request; adapters override for their format."""
        raise NotImplementedError

    def _visuals(self, request_args) -> list[Image.Image]:
        doc_to_visual, doc_id, task, split = request_args[2:6]
        doc = self.task_dict[task][split][doc_id]
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        for visual in visuals:
            if not isinstance(visual, Image.Image):
                raise ValueError(
                    f"{type(self).__name__} takes images; doc {doc_id} of task {task} gave a {type(visual).__name__}"
                )
        return visuals

    def _encode(self, prompts: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        inputs = self.processor(images=images or None, text=prompts, return_tensors="pt", padding=True)
        return {
            key: value.to(self._device, self._model.dtype) if value.is_floating_point() else value.to(self._device)
            for key, value in inputs.items()
        }

    # -- lmms-eval's request types ---------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        # Longest prompts first so a batch pads little; grouped by generation arguments.
        collator = utils.Collator(
            [request.args for request in requests], lambda args: (-len(args[0]), args[0]), grouping=True
        )
        results = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="VTW generate")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_gen_kwargs = [args[0] for args in chunk], chunk[0][1]
            doc_ids = [(args[4], args[3]) for args in chunk]
            try:
                visuals = [self._visuals(args) for args in chunk]
                prompts = [self.build_prompt(c, len(v)) for c, v in zip(contexts, visuals)]
                inputs = self._encode(prompts, [image for row in visuals for image in row])
                texts = self._generate(inputs, dict(all_gen_kwargs))
            except Exception as error:
                raise RuntimeError(f"VTW generation failed for (task, doc_id) {doc_ids}: {error}") from error
            for context, gen_kwargs, text in zip(contexts, [all_gen_kwargs] * len(chunk), texts):
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            progress.update(len(chunk))
        progress.close()
        return collator.get_original(results)

    def _generate(self, inputs: dict[str, torch.Tensor], gen_kwargs: dict) -> list[str]:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        do_sample = bool(gen_kwargs.pop("do_sample", False)) or temperature > 0
        output = self._model.generate(
            **inputs,
            max_new_tokens=int(gen_kwargs.pop("max_new_tokens", 1024)),
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=gen_kwargs.pop("top_p", None) if do_sample else None,
            num_beams=int(gen_kwargs.pop("num_beams", 1)),
            use_cache=self.use_cache,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id,
            eos_token_id=self.eot_token_id,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for stop in until:  # lmms-eval's stop sequences: cut each answer at the first one
            texts = [text.split(stop)[0] if stop else text for text in texts]
        return [text.strip() for text in texts]

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Sum of the continuation's token log-probabilities and whether greedy decoding gives it."""
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="VTW loglikelihood"):
            context, continuation = request.args[0], request.args[1]
            if not isinstance(continuation, str):  # a doc_to_target function
                doc_to_visual, doc_id, task, split = request.args[2:6]
                continuation = continuation(self.task_dict[task][split][doc_id])
            try:
                images = self._visuals(request.args)
                prompt = self.build_prompt(context, len(images))
                context_length = self._encode([prompt], images)["input_ids"].shape[1]
                inputs = self._encode([prompt + continuation], images)
                num_continuation = inputs["input_ids"].shape[1] - context_length
                if num_continuation < 1:
                    raise ValueError(f"continuation {continuation!r} adds no token to the prompt")
                logits = self._model(**inputs, use_cache=False).logits
            except Exception as error:
                raise RuntimeError(
                    f"VTW loglikelihood failed for task {request.args[4]} doc {request.args[3]}: {error}"
                ) from error
            # The continuation is text at the end of the sequence, so its logits are the last ones
            # whether or not visual tokens were withdrawn in between.
            log_probs = torch.log_softmax(logits[0, -num_continuation - 1 : -1].float(), dim=-1)
            targets = inputs["input_ids"][0, -num_continuation:]
            log_likelihood = log_probs.gather(1, targets[:, None]).sum().item()
            is_greedy = bool((log_probs.argmax(dim=-1) == targets).all())
            results.append((log_likelihood, is_greedy))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} does not implement multi-round generation")
