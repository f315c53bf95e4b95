"""What every VTW backend shares: model loading, batching, generation and log-likelihoods.

An architecture adapter (see ``llava.py``) names its transformers model classes and how a
request's context and visuals become a prompt; the withdrawal itself is ``vtw_eval.engine``.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from lmms_eval import utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger
from PIL import Image
from tqdm import tqdm
from transformers import AutoConfig, AutoProcessor

from vtw_eval.calibration import (
    DEFAULT_KL_THRESHOLD,
    config_hash,
    layer_kl_divergences,
    load_calibration,
    model_file_stem,
)
from vtw_eval.cost import DecoderGeometry, request_figures
from vtw_eval.engine import VisualTokenWithdrawal
from vtw_eval.files import write_atomically

DTYPES = ("auto", "float32", "float16", "bfloat16")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
Visual = Image.Image | np.ndarray  # an image, or a video's frames


class CallTimer:
    """Times a model's forward calls during one ``generate``: the first is the prefill."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.prefill_seconds = self.decode_seconds = 0.0
        self.decode_calls = 0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _before(self, module, args, kwargs):
        self._sync()
        self._start = time.perf_counter()

    def _after(self, module, args, kwargs, output):
        self._sync()
        elapsed = time.perf_counter() - self._start
        if self._calls == 0:
            self.prefill_seconds += elapsed
        else:
            self.decode_seconds += elapsed
            self.decode_calls += 1
        self._calls += 1

    def __enter__(self) -> "CallTimer":
        self._calls = 0
        self._handles = [
            self.model.register_forward_pre_hook(self._before, with_kwargs=True),
            self.model.register_forward_hook(self._after, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


def require_writable_dir(directory: Path, argument: str) -> None:
    """Fail before the evaluation, not after it, when a file could not be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{argument}: cannot create directory {directory} ({error})") from None
    if not os.access(directory, os.W_OK):
        raise ValueError(f"{argument}: directory {directory} is not writable")


def parse_withdraw_layer(value: Any, num_layers: int) -> int | None | str:
    """``withdraw_layer`` as given on the command line: an integer 0..L, none, or auto."""
    accepted = f"an integer from 0 to {num_layers} (the decoder's layer count), 'none' or 'auto'"
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
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
        calibration: str | None = None,
        calibration_dir: str = "results/calibration",
        kl_threshold: float = DEFAULT_KL_THRESHOLD,
        accounting_file: str | None = None,
        max_num_frames: int = 32,
        max_batch_size: int | None = None,  # lmms-eval passes it; batches are batch_size
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

        # Data-parallel runs (accelerate launch, torchrun) set these; lmms-eval stripes docs by them.
        self.accelerator = Accelerator()
        if torch.distributed.is_initialized():
            # lmms-eval never tears the process group down; left to interpreter exit, a gloo rank
            # can abort ("terminate called without an active exception") and fail the launch.
            atexit.register(_destroy_process_group)
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        if device is None:
            device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
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

        self.processor = AutoProcessor.from_pretrained(
            pretrained, revision=revision, trust_remote_code=trust_remote_code
        )
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # batched generation continues every row at the right end
        self.chat_template = chat_template
        self.use_cache = use_cache
        self.max_num_frames = int(max_num_frames)
        self.pretrained = pretrained

        self.withdrawal = VisualTokenWithdrawal(self._model, withdraw_layer=None)
        self.config_hash = config_hash(self._model.config)
        try:
            self.kl_threshold = float(kl_threshold)
        except (TypeError, ValueError):
            self.kl_threshold = float("nan")
        if not self.kl_threshold >= 0:  # also refuses NaN
            raise ValueError(f"kl_threshold={kl_threshold!r} is not accepted; use a number >= 0")
        # Where `withdraw_layer=auto` reads the chosen K and where a vtw_calibration run writes it.
        default_file = Path(calibration_dir) / f"{model_file_stem(pretrained)}.json"
        self.calibration_file = Path(calibration or default_file).resolve()
        layer = parse_withdraw_layer(withdraw_layer, self.withdrawal.num_layers)
        if layer == "auto":
            record = load_calibration(self.calibration_file, pretrained, self.config_hash)
            layer = record["withdraw_layer"]
            logger.info(f"withdraw_layer=auto: K={layer} from {self.calibration_file}")
        self.withdrawal.withdraw_layer = layer

        self.geometry = DecoderGeometry.from_config(self._model.config)
        self.kv_dtype_bytes = torch.finfo(self._model.dtype).bits // 8
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        default_accounting = (
            Path("results/accounting") / f"{model_file_stem(pretrained)}_{stamp}_rank{self._rank}.jsonl"
        )
        self.accounting_file = Path(accounting_file or default_accounting).resolve()
        if self._world_size > 1 and accounting_file:  # one file per process
            self.accounting_file = self.accounting_file.with_suffix(f".rank{self._rank}{self.accounting_file.suffix}")
        require_writable_dir(self.accounting_file.parent, "accounting_file")
        logger.info(
            f"{type(self).__name__}: {pretrained} on {self._device} (rank {self._rank} of {self._world_size}), "
            f"{self.withdrawal.num_layers} decoder layers, "
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
        """``max_num_frames`` frames spread evenly over the video, (frames, height, width, 3)."""
        from decord import VideoReader, cpu

        reader = VideoReader(path, ctx=cpu(0))
        indices = np.linspace(0, len(reader) - 1, min(self.max_num_frames, len(reader))).round().astype(int)
        return reader.get_batch(indices.tolist()).asnumpy()

    def _encode(self, prompts: list[str], visuals: list[Visual]) -> dict[str, torch.Tensor]:
        images = [v for v in visuals if isinstance(v, Image.Image)]
        videos = [v for v in visuals if isinstance(v, np.ndarray)]
        kwargs = {"videos": videos} if videos else {}  # processors without video support refuse the key
        inputs = self.processor(images=images or None, text=prompts, return_tensors="pt", padding=True, **kwargs)
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
        results, records, timers = [], [], []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="VTW generate")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_gen_kwargs = [args[0] for args in chunk], chunk[0][1]
            doc_ids = [(args[4], args[3]) for args in chunk]
            try:
                visuals = [self._visuals(args) for args in chunk]
                prompts = [self.build_prompt(c, v) for c, v in zip(contexts, visuals)]
                inputs = self._encode(prompts, [visual for row in visuals for visual in row])
                if all_gen_kwargs.get("vtw_calibration"):
                    texts = self._calibrate(inputs, [args[4] for args in chunk])
                else:
                    texts, batch_records, timer = self._generate(inputs, dict(all_gen_kwargs))
                    records += [{"task": task, "doc_id": doc, **r} for (task, doc), r in zip(doc_ids, batch_records)]
                    timers.append(timer)
            except Exception as error:
                raise RuntimeError(f"VTW generation failed for (task, doc_id) {doc_ids}: {error}") from error
            for context, text in zip(contexts, texts):
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_gen_kwargs), text)
            progress.update(len(chunk))
        progress.close()
        if records:
            self._report(records, timers)
        return collator.get_original(results)

    def _generate(self, inputs: dict[str, torch.Tensor], gen_kwargs: dict) -> tuple[list[str], list[dict], "CallTimer"]:
        """Answers of one batch, each request's cost figures (vtw_eval.cost) and the batch's timings."""
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

        # Per request: its own prompt tokens (no padding) and generated tokens (up to its EOS).
        prompt_tokens = inputs["attention_mask"].sum(1) if "attention_mask" in inputs else None
        visual = torch.isin(inputs["input_ids"], torch.tensor(self.withdrawal.visual_token_ids, device=self._device))
        finished = (new_tokens == self.eot_token_id).int().cumsum(1)
        generated = ((finished == 0) | ((finished == 1) & (new_tokens == self.eot_token_id))).sum(1)
        records = []
        for row in range(new_tokens.shape[0]):
            n = int(prompt_tokens[row]) if prompt_tokens is not None else inputs["input_ids"].shape[1]
            figures = request_figures(
                self.geometry,
                n,
                int(visual[row].sum()),
                int(generated[row]),
                self.withdrawal.withdraw_layer,
                self.kv_dtype_bytes,
            )
            records.append(
                {
                    **figures,
                    "batch_size": new_tokens.shape[0],
                    "batch_prefill_seconds": timer.prefill_seconds,
                    "batch_decode_seconds": timer.decode_seconds,
                    "batch_decode_steps": timer.decode_calls,
                }
            )
        return [text.strip() for text in texts], records, timer

    def _report(self, records: list[dict], timers: list["CallTimer"]) -> None:
        """Aggregates into lmms-eval's results (``throughput``); every request into a JSON Lines file."""

        def mean(key: str) -> float:
            return sum(r[key] for r in records) / len(records)

        total_seconds = sum(t.prefill_seconds + t.decode_seconds for t in timers)
        total_generated = sum(r["generated_tokens"] for r in records)
        decode_steps = sum(t.decode_calls for t in timers)
        log_metrics(
            total_elapsed_time=total_seconds,
            total_gen_tokens=total_generated,
            avg_speed=total_generated / total_seconds if total_seconds > 0 else 0.0,
            additional_metrics={
                "withdraw_layer": mean("withdraw_layer"),
                "visual_tokens": mean("visual_tokens"),
                "kept_tokens": mean("kept_tokens"),
                "prefill_tflops_baseline": mean("prefill_flops_baseline") / 1e12,
                "prefill_tflops_vtw": mean("prefill_flops_vtw") / 1e12,
                "prefill_flops_saved": mean("prefill_flops_saved"),
                "kv_cache_mb_baseline": mean("kv_cache_bytes_baseline") / 2**20,
                "kv_cache_mb_vtw": mean("kv_cache_bytes_vtw") / 2**20,
                "kv_cache_saved": mean("kv_cache_saved"),
                "prefill_seconds_per_batch": sum(t.prefill_seconds for t in timers) / len(timers),
                "decode_seconds_per_step": sum(t.decode_seconds for t in timers) / decode_steps
                if decode_steps
                else 0.0,
            },
        )
        lines = "".join(json.dumps(record) + "\n" for record in records)
        write_atomically(self.accounting_file, lines.encode())
        logger.info(f"VTW per-request figures: {self.accounting_file}")

    def _calibrate(self, inputs: dict[str, torch.Tensor], tasks: list[str]) -> list[str]:
        """A vtw_calibration request's answer: this prompt's KL per candidate layer, as JSON."""
        require_writable_dir(self.calibration_file.parent, "calibration_dir")
        kl = layer_kl_divergences(self.withdrawal, inputs)
        return [
            json.dumps(
                {
                    "subset": task,
                    "kl": row.tolist(),
                    "model": self.pretrained,
                    "config_hash": self.config_hash,
                    "kl_threshold": self.kl_threshold,
                    "calibration_file": str(self.calibration_file),
                }
            )
            for task, row in zip(tasks, kl)
        ]

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
                visuals = self._visuals(request.args)
                prompt = self.build_prompt(context, visuals)
                context_length = self._encode([prompt], visuals)["input_ids"].shape[1]
                inputs = self._encode([prompt + continuation], visuals)
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


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
