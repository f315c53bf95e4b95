"""What every VTW backend shares, read like lm-evaluation-harness's HFLM: loading, lmms-eval's
request types over one batching loop, and the two places that call the model (``_generate`` for
answers, ``_forward`` for log-likelihoods).

An adapter (one file per model family) subclasses ``VTWBackend`` and declares:
- ``model_classes``: ``config.model_type`` -> the transformers class it loads;
- ``architecture``: what the engine must be told (``vtw_eval.architecture.Architecture``);
- ``build_prompt`` (required), and where its family differs from the defaults: ``encode``,
  ``video_frames``, ``stop_strings``, ``decode_answer``, ``finish_answer``, and the class
  attributes ``default_generation_kwargs``, ``fixed_generation_kwargs``, ``decode_kwargs``,
  ``strips_answers``.
docs/design.md ("Adding a model family") goes through it step by step.

Where K is decided is ``vtw_eval.withdraw_layer_choice``; the withdrawal itself is
``vtw_eval.engine``; what requests cost is ``vtw_eval.accounting``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from lmms_eval import utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image
from tqdm import tqdm
from transformers import StoppingCriteriaList

from vtw_eval.accounting import (
    CallTimer,
    RequestAccounting,
    default_accounting_file,
    image_token_runs,
    report_loglikelihood,
)
from vtw_eval.architecture import Architecture
from vtw_eval.backends import arguments
from vtw_eval.backends.calibrating import calibration_answers, task_kl
from vtw_eval.backends.generation import StopAtStrings, generation_settings, prompt_lengths, tokens_to_first_eos
from vtw_eval.backends.loading import load_config, load_model_and_processor
from vtw_eval.backends.processes import Processes
from vtw_eval.backends.requests import Request
from vtw_eval.backends.visuals import VIDEO_EXTENSIONS, Visual
from vtw_eval.calibration_file import calibration_file_path, calibration_file_stem, checkpoint_folder, model_identity
from vtw_eval.cost import DecoderGeometry
from vtw_eval.engine import VisualTokenWithdrawal, visual_positions, with_counted_positions
from vtw_eval.files import check_writable
from vtw_eval.methods import Method
from vtw_eval.registry import BACKENDS
from vtw_eval.withdraw_layer_choice import CalibrationSettings, CalibrationTarget, WithdrawLayerChoice

DTYPES = ("auto", "float32", "float16", "bfloat16")


class VTWBackend(lmms):
    """An lmms-eval "simple" model that runs a transformers VLM with visual tokens withdrawn."""

    is_simple = True
    model_classes: dict[str, type] = {}  # config.model_type -> transformers class, set by adapters
    architecture = Architecture()  # what the engine must be told about the family
    default_generation_kwargs: dict = {}  # under the task's generation_kwargs, as the lmms-eval backend's
    fixed_generation_kwargs: dict = {}  # over the task's: what the lmms-eval backend sets whatever it says
    decode_kwargs: dict = {}  # how the lmms-eval backend decodes answers (beyond skipping special tokens)
    strips_answers = True  # whether the lmms-eval backend strips its answers

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
        calibration: str | None = None,
        calibration_dir: str | None = None,
        kl_threshold: float | None = None,
        calibrate_per_task: int = 0,
        kl_tokens: int = 1,
        accounting_file: str | None = None,
        method: str = "vtw",
        prune_layer: int | None = None,
        keep_ratio: float | None = None,
        seed: int | None = None,
        match_withdraw_layer: int | None = None,
        max_batch_size: int | None = None,  # lmms-eval passes it; batches are batch_size
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"Unknown model_args for {type(self).__name__}: {sorted(kwargs)}")
        arguments.non_empty("pretrained", pretrained, "a hub id (org/name) or a local checkpoint directory")
        if device is not None:
            arguments.non_empty("device", device, "cpu, cuda or cuda:N (or leave it out: accelerate's device)")
        self.batch_size_per_gpu = arguments.integer("batch_size", batch_size)
        settings = CalibrationSettings.from_arguments(kl_threshold, kl_tokens, calibrate_per_task)
        self.chat_template, self.use_cache, self.pretrained = chat_template, use_cache, pretrained
        self.processes = Processes()
        self.accelerator, self._rank, self._world_size = (
            self.processes.accelerator,
            self.processes.rank,
            self.processes.world_size,
        )
        config = load_config(type(self).__name__, self.model_classes, pretrained, revision, trust_remote_code)
        self.method = Method.from_arguments(  # before the weights load: a refusal costs nothing
            method, prune_layer, keep_ratio, seed, match_withdraw_layer, withdraw_layer, config.get_text_config()
        )
        self._model, self.processor, self._device = load_model_and_processor(
            self.model_classes[config.model_type], pretrained, self.processes.device(device, device_map), revision,
            arguments.one_of("dtype", dtype, DTYPES), trust_remote_code, attn_implementation, device_map,
        )  # fmt: skip
        self.tokenizer = self.processor.tokenizer
        self.withdrawal = VisualTokenWithdrawal(self._model, None, self.architecture)
        self.geometry = DecoderGeometry.from_config(self._model.config)
        self.withdrawal.keep_selector = self.method.keep_selector(self.geometry)
        self.identity = model_identity(self._model, pretrained, checkpoint_folder(pretrained, revision))
        stem = calibration_file_stem(pretrained, self.identity)
        calibration_file = calibration_file_path(calibration, calibration_dir, stem)
        target = CalibrationTarget(
            calibration_file, self.identity, self.withdrawal.num_layers, self.backend_name(), pretrained
        )
        # The K of every request, unless withdraw_layer=auto finds a task's own K in the calibration file.
        self.withdraw_layers = WithdrawLayerChoice(
            withdraw_layer if self.method.name == "vtw" else self.method.prune_layer,
            settings, target, self.processes, arguments.response_cache_requested(),
        )  # fmt: skip
        self.withdrawal.withdraw_layer = self.withdraw_layers.default
        self.accounting_file = self._accounting_path(accounting_file, stem)
        logger.info(
            f"{type(self).__name__}: {pretrained} on {self._device} (rank {self._rank} of {self._world_size}), "
            f"{self.withdrawal.num_layers} decoder layers, withdraw_layer={self.withdrawal.withdraw_layer}"
        )

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "VTWBackend":
        """As lmms-eval's, except that an argument given in ``--model_args`` wins over lmms-eval's
        own value of it (``batch_size``, ``device``) instead of failing with "multiple values", a
        repeated key is refused, and only ASCII numbers are numbers (``arguments.parse_model_args``)."""
        model_args = arguments.parse_model_args(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in model_args}
        return cls(**model_args, **extra)

    # -- setting up ------------------------------------------------------------------------

    def backend_name(self) -> str:
        """The ``--model`` name this class is registered under."""
        return next(name for name, path in BACKENDS.items() if path.endswith(f".{type(self).__name__}"))

    @property
    def calibration_file(self) -> Path:
        return self.withdraw_layers.target.file

    def _accounting_path(self, accounting_file: str | None, stem: str) -> Path:
        default = default_accounting_file(stem, self._rank, arguments.command_line_option("--output_path"))
        path = Path(accounting_file or default).expanduser().resolve()
        if self._world_size > 1 and accounting_file:  # one file per process
            path = path.with_suffix(f".rank{self._rank}{path.suffix}")
        check_writable(path, "accounting_file")
        return path

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

    # -- the adapter's hooks: prompts, visuals, encoding, answers ---------------------------

    def build_prompt(self, context: str, visuals: list[Visual]) -> str:
        """The chat-formatted prompt for one request; adapters define their format."""
        raise NotImplementedError

    def video_frames(self, path: str) -> Visual:
        """A video file as the adapter takes it: (frames, height, width, 3) uint8 frames, or the path
        for a processor that reads it. Families without videos refuse them."""
        raise ValueError(f"{type(self).__name__} takes images, not videos ({path})")

    def encode(self, prompts: list[str], visuals: list[list[Visual]]) -> dict[str, torch.Tensor]:
        """The batch's model inputs from its prompts and each row's visuals, on the device."""
        images = [v for row in visuals for v in row if isinstance(v, Image.Image)]
        videos = [v for row in visuals for v in row if isinstance(v, np.ndarray)]
        kwargs = {"videos": videos} if videos else {}  # processors without video support refuse the key
        inputs = self.processor(
            images=images or None, text=prompts, return_tensors="pt", padding=True,
            add_special_tokens=self.adds_special_tokens(prompts), **kwargs,
        )  # fmt: skip
        return self._on_device(inputs)

    def stop_strings(self, until: list[str]) -> list[str]:
        """The task's ``until`` strings that end an answer (all of them, as lm-evaluation-harness)."""
        return until

    def decode_answer(self, tokens: torch.Tensor) -> str:
        """An answer's text from its generated tokens."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True, **self.decode_kwargs)

    def finish_answer(self, text: str) -> str:
        """What lmms-eval receives, from the decoded answer cut at the stop strings."""
        return text.strip() if self.strips_answers else text

    def _on_device(self, inputs) -> dict[str, torch.Tensor]:
        """Processor outputs on the model's device, floating-point ones (pixels) in its dtype."""
        return {
            key: value.to(self._device, self._model.dtype) if value.is_floating_point() else value.to(self._device)
            for key, value in inputs.items()
        }

    def adds_special_tokens(self, prompts: list[str]) -> bool:
        """Whether the tokenizer adds its special tokens to the prompts: not when the chat template
        already starts them with BOS (transformers' rule in ``apply_chat_template``, which
        lmms-eval's chat-template backends go through)."""
        bos = self.tokenizer.bos_token
        return not (bos and prompts[0].startswith(bos))

    def _visuals(self, request: Request) -> list[Visual]:
        """A request's images (PIL) and videos (as ``video_frames`` takes them, from a file path)."""
        visuals = []
        doc_to_visual = request.doc_to_visual
        for visual in (doc_to_visual(request.doc(self.task_dict)) if doc_to_visual is not None else None) or []:
            if isinstance(visual, str) and visual.lower().endswith(VIDEO_EXTENSIONS):
                try:
                    visual = self.video_frames(visual)
                except Exception as error:  # which doc, which file, and why (not a later, misleading error)
                    raise ValueError(
                        f"doc {request.doc_id} of task {request.task}: cannot read the video {visual}: "
                        f"{type(error).__name__}: {error}"
                    ) from error
            elif not isinstance(visual, Image.Image) and visual is not None:
                raise ValueError(
                    f"{type(self).__name__} takes images and video files ({', '.join(VIDEO_EXTENSIONS)}); "
                    f"doc {request.doc_id} of task {request.task} gave a {type(visual).__name__}"
                )
            if visual is not None:
                visuals.append(visual)
        return visuals

    def batch_inputs(self, chunk: list[Request]) -> dict[str, torch.Tensor]:
        """Model inputs for a batch of requests: each prompt with its visuals."""
        visuals = [self._visuals(request) for request in chunk]
        prompts = [self.build_prompt(request.context, v) for request, v in zip(chunk, visuals)]
        inputs = self.encode(prompts, visuals)
        self._warn_if_too_long(inputs, [request.key for request in chunk])
        return inputs

    def _warn_if_too_long(self, inputs: dict[str, torch.Tensor], doc_ids: list) -> None:
        """A warning, not an error: rotary models run past their trained positions (as lmms-eval's
        own backends let them), but the answers of such prompts mean less."""
        limit = getattr(self._model.config.get_text_config(), "max_position_embeddings", None)
        for (task, doc_id), length in zip(doc_ids, prompt_lengths(inputs)):
            if limit is not None and length > limit:
                logger.warning(
                    f"task {task} doc {doc_id}: the prompt has {length} tokens, more than the model's "
                    f"{limit} positions (max_position_embeddings)"
                )

    def visual_counts(self, inputs: dict[str, torch.Tensor]) -> list[int]:
        return visual_positions(inputs["input_ids"], self.withdrawal.visual_token_ids).sum(1).tolist()

    def removed_counts(self, inputs: dict[str, torch.Tensor]) -> list[int]:
        """What each row of the last forward withdrew (with nothing withdrawn, its visual tokens:
        what withdrawal at K would remove, for the baseline's figures)."""
        plan = self.withdrawal.plan
        return self.visual_counts(inputs) if plan is None else plan.num_removed.tolist()

    # -- lmms-eval's request types over one batching loop ------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        accounting = RequestAccounting(
            self._model.config, self._model.dtype, self.accounting_file, self.method.record()
        )
        named = [Request.of(request) for request in requests]
        if any(request.is_calibration for request in named) and self._rank == 0:
            self.withdraw_layers.check_writable()  # the calibration group writes the file
        answered = [request for request in named if not request.is_calibration]
        layers, accounting.calibration_flops = self._withdraw_layers_of(answered)
        results = self._in_batches(
            named, layers, "generation", "VTW generate",
            # Longest prompts first so a batch pads little; grouped by task (each has its K) and
            # generation arguments.
            sort_key=lambda r: (-len(r.context), r.context),
            group_key=lambda r: {**r.gen_kwargs, "vtw_task": r.task},
            answer=lambda chunk: self._answer_generation(chunk, accounting),
        )  # fmt: skip
        accounting.report()
        return results

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Per request: the sum of the continuation's token log-probabilities, and whether greedy
        decoding gives it. Batched like ``generate_until``; each prompt is encoded once."""
        named = [Request.of(request) for request in requests]
        layers, calibration_flops = self._withdraw_layers_of(named)
        prefill_flops: dict[str, int] = {}  # per task, at its K: the calibration's share is of these
        results = self._in_batches(
            named, layers, "loglikelihood", "VTW loglikelihood",
            sort_key=lambda r: (-len(r.context + str(r.continuation)), r.context),
            group_key=lambda r: {"vtw_task": r.task},  # each task at its own K
            answer=lambda chunk: self._answer_loglikelihood(chunk, prefill_flops),
        )  # fmt: skip
        num_layers = self.withdrawal.num_layers
        task_layers = {task: num_layers if k is None else k for task, k in layers.items()}
        report_loglikelihood(task_layers, calibration_flops, prefill_flops)
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} does not implement multi-round generation")

    def _in_batches(
        self, requests: list[Request], layers: dict, what: str, desc: str, sort_key, group_key, answer: Callable
    ) -> list:
        """``answer`` over batches of ``requests`` (grouped and ordered by lmms-eval's Collator),
        each at its task's K; the answers in the requests' order. A failed batch stops the run,
        naming its (task, doc_id) requests."""
        collator = utils.Collator(requests, sort_key, group_fn=group_key, grouping=True)
        results = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc=desc)
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            self.withdrawal.withdraw_layer = layers.get(chunk[0].task, self.withdraw_layers.default)
            if self.withdrawal.keep_selector is not None:  # which rows a method's subsets are for
                self.withdrawal.keep_selector.rows = [request.key for request in chunk]
            try:
                results += answer(chunk)
            except Exception as error:
                doc_ids = [request.key for request in chunk]
                raise RuntimeError(f"VTW {what} failed for (task, doc_id) {doc_ids}: {error}") from error
            progress.update(len(chunk))
        progress.close()
        self.withdrawal.withdraw_layer = self.withdraw_layers.default
        return collator.get_original(results)

    def _withdraw_layers_of(self, requests: list[Request]) -> tuple[dict[str, int | None], dict[str, int]]:
        """Each task's K, and the FLOPs spent choosing those chosen now (``withdraw_layer_choice``)."""
        docs_here: dict[str, tuple[set, int]] = {}
        for request in requests:
            docs = len(self.task_dict[request.task][request.split])
            docs_here.setdefault(request.task, (set(), docs))[0].add(request.doc_id)
        return self.withdraw_layers.for_tasks(docs_here, task_kl(self, requests))

    # -- answers ----------------------------------------------------------------------------

    def _answer_generation(self, chunk: list[Request], accounting: RequestAccounting) -> list[str]:
        gen_kwargs = chunk[0].gen_kwargs
        inputs = self.batch_inputs(chunk)
        if gen_kwargs.get("vtw_calibration"):
            texts = calibration_answers(self, inputs, [request.task for request in chunk])
        else:
            texts = self._generate(inputs, gen_kwargs, [request.key for request in chunk], accounting)
        for request, text in zip(chunk, texts):
            self.cache_hook.add_partial("generate_until", (request.context, gen_kwargs), text)
        return texts

    def _generate(self, inputs: dict, gen_kwargs: dict, doc_ids: list, accounting: RequestAccounting) -> list[str]:
        """Answers of one batch (``model.generate``), each stopped while decoding at the task's stop
        strings (where the adapter cuts answers at them); its cost goes to ``accounting``."""
        settings, until = generation_settings(
            {**self.default_generation_kwargs, **gen_kwargs, **self.fixed_generation_kwargs}
        )
        until = self.stop_strings(until)
        input_ids = inputs["input_ids"]
        pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        # Beam search reorders rows while decoding: its answers are cut at the stop strings afterwards.
        stop = StopAtStrings(self.tokenizer, input_ids.shape[1], until, self.eot_token_id, input_ids.shape[0])
        greedy_rows = settings["num_beams"] == 1
        with CallTimer(self._model) as timer:
            output = self._model.generate(
                **inputs, **settings, use_cache=self.use_cache, pad_token_id=pad_token_id,
                eos_token_id=self.eot_token_id, stopping_criteria=StoppingCriteriaList([stop] if greedy_rows else []),
            )  # fmt: skip
        new_tokens = output[:, input_ids.shape[1] :]
        if greedy_rows:
            generated = stop.generated_tokens(new_tokens.shape[1])
        else:
            generated = tokens_to_first_eos(new_tokens, self.eot_token_id)
        texts = [self.decode_answer(row[:n]) for row, n in zip(new_tokens, generated)]
        for stop_string in until:  # lmms-eval's stop sequences: cut each answer at the first one
            texts = [text.split(stop_string)[0] if stop_string else text for text in texts]
        # Per request: its own prompt tokens (no padding), visual tokens, what it withdrew, generated tokens.
        accounting.add_batch(
            doc_ids, prompt_lengths(inputs), self.visual_counts(inputs), generated, self.withdrawal.withdraw_layer,
            timer, image_token_runs(input_ids, self.withdrawal.visual_token_ids[0]), self.removed_counts(inputs),
        )  # fmt: skip
        return [self.finish_answer(text) for text in texts]

    def _forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The logits of one batch at every position that leaves the decoder."""
        return self._model(**with_counted_positions(inputs, self.architecture), use_cache=False).logits

    def _answer_loglikelihood(self, chunk: list[Request], prefill_flops: dict[str, int]) -> list[tuple[float, bool]]:
        visuals, texts, lengths = [], [], []
        for request in chunk:
            continuation = request.continuation_text(self.task_dict)
            row_visuals = self._visuals(request)
            prompt = self.build_prompt(request.context, row_visuals)
            # Continuation tokens from the text alone (the image expansion happens in the prompt).
            whole, prompt_only = (len(self.tokenizer(t)["input_ids"]) for t in (prompt + continuation, prompt))
            if whole - prompt_only < 1:
                raise ValueError(f"continuation {continuation!r} adds no token to the prompt")
            visuals.append(row_visuals)
            texts.append(prompt + continuation)
            lengths.append(whole - prompt_only)
        inputs = self.encode(texts, visuals)
        logits = self._forward(inputs)
        k = self.withdrawal.withdraw_layer
        for request, length, removed in zip(chunk, prompt_lengths(inputs), self.removed_counts(inputs)):
            prefill_flops[request.task] = prefill_flops.get(request.task, 0) + self.geometry.prefill_flops(
                length,
                removed,
                k,
                every_position=True,  # every logit is read
            )
        results = []
        for row, n in enumerate(lengths):
            # Left padding puts every continuation at the right end, where the logits are whether
            # or not visual tokens were withdrawn in between.
            log_probs = torch.log_softmax(logits[row, -n - 1 : -1].float(), dim=-1)
            targets = inputs["input_ids"][row, -n:]
            log_likelihood = log_probs.gather(1, targets[:, None]).sum().item()
            results.append((log_likelihood, bool((log_probs.argmax(dim=-1) == targets).all())))
        return results
