"""What every VTW backend shares: loading, resolving K, and lmms-eval's three request types.

An architecture adapter (``llava.py``, ``qwen2_vl.py``) names its transformers model classes,
how its decoding positions are derived, and how a request's context and visuals become a
prompt. The withdrawal itself is ``vtw_eval.engine``; what requests cost is ``vtw_eval.accounting``.
"""

from __future__ import annotations

import atexit
import json
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from lmms_eval import utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image
from tqdm import tqdm
from transformers import AutoConfig, AutoProcessor

from vtw_eval.accounting import CallTimer, RequestAccounting, default_accounting_file
from vtw_eval.backends import arguments
from vtw_eval.calibration import DEFAULT_KL_THRESHOLD, layer_kl_divergences
from vtw_eval.calibration_file import calibration_file_stem, load_calibration, model_identity
from vtw_eval.engine import VisualTokenWithdrawal
from vtw_eval.registry import BACKENDS
from vtw_eval.run import REPO_ROOT

DTYPES = ("auto", "float32", "float16", "bfloat16")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
Visual = Image.Image | np.ndarray  # an image, or a video's frames


class VTWBackend(lmms):
    """An lmms-eval "simple" model that runs a transformers VLM with visual tokens withdrawn."""

    is_simple = True
    model_classes: dict[str, type] = {}  # config.model_type -> transformers class, set by adapters
    decoding_positions = "count"  # how the model numbers decoding tokens (VisualTokenWithdrawal)

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
        calibration_dir: str = "results/calibration",
        kl_threshold: float = DEFAULT_KL_THRESHOLD,
        accounting_file: str | None = None,
        max_batch_size: int | None = None,  # lmms-eval passes it; batches are batch_size
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"Unknown model_args for {type(self).__name__}: {sorted(kwargs)}")
        self.batch_size_per_gpu = arguments.positive_int("batch_size", batch_size)
        self.kl_threshold = arguments.non_negative_float("kl_threshold", kl_threshold)
        self.chat_template, self.use_cache, self.pretrained = chat_template, use_cache, pretrained
        self._set_up_processes(device, device_map)
        self._load(
            pretrained,
            revision,
            arguments.one_of("dtype", dtype, DTYPES),
            trust_remote_code,
            attn_implementation,
            device_map,
        )
        self.withdrawal = VisualTokenWithdrawal(self._model, None, self.decoding_positions)
        self.identity = model_identity(self._model, pretrained)
        stem = calibration_file_stem(pretrained, self.identity["config_hash"])
        self.calibration_file = Path(calibration or Path(calibration_dir) / f"{stem}.json").resolve()
        self.withdrawal.withdraw_layer = self._resolve_withdraw_layer(withdraw_layer)
        self.accounting_file = self._accounting_path(accounting_file, stem)
        logger.info(
            f"{type(self).__name__}: {pretrained} on {self._device} (rank {self._rank} of {self._world_size}), "
            f"{self.withdrawal.num_layers} decoder layers, withdraw_layer={self.withdrawal.withdraw_layer}"
        )

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "VTWBackend":
        """As lmms-eval's, except that an argument given in ``--model_args`` wins over lmms-eval's
        own value of it (``batch_size``, ``device``) instead of failing with "multiple values"."""
        model_args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in model_args}
        return cls(**model_args, **extra)

    # -- setting up ------------------------------------------------------------------------

    def _set_up_processes(self, device: str | None, device_map: str | None) -> None:
        """Rank, world size and device from accelerate (data-parallel launches set them)."""
        self.accelerator = Accelerator()
        if torch.distributed.is_initialized():
            # lmms-eval never tears the process group down; left to interpreter exit, a gloo rank
            # can abort ("terminate called without an active exception") and fail the launch.
            atexit.register(_destroy_process_group)
        if torch.distributed.is_initialized():
            # accelerate reports a single process for a multi-process launch on CPU; the process
            # group it started knows the truth.
            self._rank, self._world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        if device is not None and device_map:
            raise ValueError(f"device={device!r} and device_map={device_map!r} both place the model; give one of them")
        self._device = torch.device(device) if device is not None else self.accelerator.device

    def _load(self, pretrained, revision, dtype, trust_remote_code, attn_implementation, device_map) -> None:
        """The model (of a class this adapter serves) and its processor, left-padding batches."""
        if not Path(pretrained).expanduser().is_dir() and (
            pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1
        ):
            raise ValueError(
                f"pretrained={pretrained!r} is not accepted: no such directory, and not a hub id (org/name)"
            )
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
        if device_map:
            self._device = self._model.device  # where inputs go: the first layer's device
        else:
            self._model.to(self._device)
        self.processor = AutoProcessor.from_pretrained(
            pretrained, revision=revision, trust_remote_code=trust_remote_code
        )
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # batched generation continues every row at the right end

    def calibration_command(self) -> str:
        """The command that writes this backend's calibration file, ready to paste."""
        model = next(name for name, path in BACKENDS.items() if path.endswith(f".{type(self).__name__}"))
        return (
            f"lmms-eval --model {model} --model_args pretrained={self.pretrained},withdraw_layer=none,"
            f"calibration={self.calibration_file} --tasks vtw_calibration --include_path {REPO_ROOT / 'tasks'}"
        )

    def _resolve_withdraw_layer(self, value) -> int | None:
        """An explicit K, none, or with ``auto`` the K of this model's calibration file."""
        layer = arguments.withdraw_layer(value, self.withdrawal.num_layers)
        if layer != "auto":
            return layer
        record = load_calibration(
            self.calibration_file, self.identity, self.withdrawal.num_layers, self.calibration_command()
        )
        if record["dtype"] != self.identity["dtype"]:
            logger.warning(f"withdraw_layer=auto: calibrated in {record['dtype']}, running in {self.identity['dtype']}")
        logger.info(f"withdraw_layer=auto: K={record['withdraw_layer']} from {self.calibration_file}")
        return record["withdraw_layer"]

    def _accounting_path(self, accounting_file: str | None, stem: str) -> Path:
        path = Path(accounting_file or default_accounting_file(stem, self._rank)).resolve()
        if self._world_size > 1 and accounting_file:  # one file per process
            path = path.with_suffix(f".rank{self._rank}{path.suffix}")
        arguments.writable_dir(path.parent, "accounting_file")
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

    # -- prompts ---------------------------------------------------------------------------

    def build_prompt(self, context: str, visuals: list[Visual]) -> str:
        """The chat-formatted prompt for one request; adapters define their format."""
        raise NotImplementedError

    def _visuals(self, request_args) -> list[Visual]:
        """A request's images (PIL) and videos (frames as a uint8 array, from a video file path)."""
        doc_to_visual, doc_id, task, split = request_args[2:6]
        doc = self.task_dict[task][split][doc_id]
        visuals = []
        for visual in (doc_to_visual(doc) if doc_to_visual is not None else None) or []:
            if isinstance(visual, str) and visual.lower().endswith(VIDEO_EXTENSIONS):
                visual = self._video_frames(visual)
            elif not isinstance(visual, Image.Image) and visual is not None:
                raise ValueError(
                    f"{type(self).__name__} takes images and video files ({', '.join(VIDEO_EXTENSIONS)}); "
                    f"doc {doc_id} of task {task} gave a {type(visual).__name__}"
                )
            if visual is not None:
                visuals.append(visual)
        return visuals

    def _video_frames(self, path: str) -> np.ndarray:
        """Adapters that take videos return (frames, height, width, 3) uint8 frames."""
        raise ValueError(f"{type(self).__name__} takes images, not videos ({path})")

    def _encode(self, prompts: list[str], visuals: list[Visual]) -> dict[str, torch.Tensor]:
        images = [v for v in visuals if isinstance(v, Image.Image)]
        videos = [v for v in visuals if isinstance(v, np.ndarray)]
        kwargs = {"videos": videos} if videos else {}  # processors without video support refuse the key
        inputs = self.processor(images=images or None, text=prompts, return_tensors="pt", padding=True, **kwargs)
        return {
            key: value.to(self._device, self._model.dtype) if value.is_floating_point() else value.to(self._device)
            for key, value in inputs.items()
        }

    def _batch_inputs(self, chunk) -> dict[str, torch.Tensor]:
        visuals = [self._visuals(args) for args in chunk]
        prompts = [self.build_prompt(args[0], v) for args, v in zip(chunk, visuals)]
        return self._encode(prompts, [visual for row in visuals for visual in row])

    # -- lmms-eval's request types ---------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        # Longest prompts first so a batch pads little; grouped by generation arguments.
        collator = utils.Collator(
            [request.args for request in requests], lambda args: (-len(args[0]), args[0]), grouping=True
        )
        accounting = RequestAccounting(self._model, self.accounting_file)
        results = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="VTW generate")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            gen_kwargs, doc_ids = chunk[0][1], [(args[4], args[3]) for args in chunk]
            try:
                inputs = self._batch_inputs(chunk)
                if gen_kwargs.get("vtw_calibration"):
                    texts = self._calibration_answers(inputs, [task for task, _ in doc_ids])
                else:
                    texts = self._generate(inputs, dict(gen_kwargs), doc_ids, accounting)
            except Exception as error:
                raise RuntimeError(f"VTW generation failed for (task, doc_id) {doc_ids}: {error}") from error
            for args, text in zip(chunk, texts):
                results.append(text)
                self.cache_hook.add_partial("generate_until", (args[0], gen_kwargs), text)
            progress.update(len(chunk))
        progress.close()
        accounting.report()
        return collator.get_original(results)

    def _generate(self, inputs: dict, gen_kwargs: dict, doc_ids: list, accounting: RequestAccounting) -> list[str]:
        """Answers of one batch, cut at the task's stop strings; its cost goes to ``accounting``."""
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        do_sample = bool(gen_kwargs.pop("do_sample", False)) or temperature > 0
        pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        with CallTimer(self._model) as timer:
            output = self._model.generate(
                **inputs,
                max_new_tokens=int(gen_kwargs.pop("max_new_tokens", 1024)),
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_p=gen_kwargs.pop("top_p", None) if do_sample else None,
                num_beams=int(gen_kwargs.pop("num_beams", 1)),
                use_cache=self.use_cache,
                pad_token_id=pad_token_id,
                eos_token_id=self.eot_token_id,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for stop in until:  # lmms-eval's stop sequences: cut each answer at the first one
            texts = [text.split(stop)[0] if stop else text for text in texts]

        # Per request: its own prompt tokens (no padding), visual tokens and answer up to its EOS.
        input_ids = inputs["input_ids"]
        prompt_tokens = (
            inputs["attention_mask"].sum(1) if "attention_mask" in inputs else [input_ids.shape[1]] * len(texts)
        )
        visual = torch.isin(input_ids, torch.tensor(self.withdrawal.visual_token_ids, device=input_ids.device)).sum(1)
        finished = (new_tokens == self.eot_token_id).int().cumsum(1)
        generated = ((finished == 0) | ((finished == 1) & (new_tokens == self.eot_token_id))).sum(1)
        accounting.add_batch(
            doc_ids,
            [int(n) for n in prompt_tokens],
            visual.tolist(),
            generated.tolist(),
            self.withdrawal.withdraw_layer,
            timer,
        )
        return [text.strip() for text in texts]

    def _calibration_answers(self, inputs: dict[str, torch.Tensor], tasks: list[str]) -> list[str]:
        """A vtw_calibration request's answer: this prompt's KL per candidate layer, as JSON."""
        arguments.writable_dir(self.calibration_file.parent, "calibration_dir")
        kl = layer_kl_divergences(self.withdrawal, inputs)
        sample = {**self.identity, "kl_threshold": self.kl_threshold, "calibration_file": str(self.calibration_file)}
        return [json.dumps({"subset": task, "kl": row.tolist(), **sample}) for task, row in zip(tasks, kl)]

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Sum of the continuation's token log-probabilities and whether greedy decoding gives it."""
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="VTW loglikelihood"):
            try:
                results.append(self._loglikelihood_one(request.args))
            except Exception as error:
                raise RuntimeError(
                    f"VTW loglikelihood failed for task {request.args[4]} doc {request.args[3]}: {error}"
                ) from error
        return results

    def _loglikelihood_one(self, args) -> tuple[float, bool]:
        context, continuation = args[0], args[1]
        if not isinstance(continuation, str):  # a doc_to_target function
            doc_to_visual, doc_id, task, split = args[2:6]
            continuation = continuation(self.task_dict[task][split][doc_id])
        visuals = self._visuals(args)
        prompt = self.build_prompt(context, visuals)
        context_length = self._encode([prompt], visuals)["input_ids"].shape[1]
        inputs = self._encode([prompt + continuation], visuals)
        num_continuation = inputs["input_ids"].shape[1] - context_length
        if num_continuation < 1:
            raise ValueError(f"continuation {continuation!r} adds no token to the prompt")
        logits = self._model(**inputs, use_cache=False).logits
        # The continuation is text at the end of the sequence, so its logits are the last ones
        # whether or not visual tokens were withdrawn in between.
        log_probs = torch.log_softmax(logits[0, -num_continuation - 1 : -1].float(), dim=-1)
        targets = inputs["input_ids"][0, -num_continuation:]
        log_likelihood = log_probs.gather(1, targets[:, None]).sum().item()
        return log_likelihood, bool((log_probs.argmax(dim=-1) == targets).all())

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} does not implement multi-round generation")


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
