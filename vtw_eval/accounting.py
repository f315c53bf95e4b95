"""What each request cost: token counts, FLOPs and KV-cache bytes (vtw_eval.cost) and measured
time, one JSON line per request, and the averages lmms-eval puts under ``throughput``."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import torch
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger

from vtw_eval.cost import DecoderGeometry, request_figures, whole_model_of
from vtw_eval.files import cache_dir, write_atomically


class CallTimer:
    """Times a model's forward calls during one ``generate``: the first is the prefill.

    Synchronises every CUDA device the model has parameters on, so that a model split over
    devices is timed to the end of its work, not to the last kernel launch."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.devices = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
        self.prefill_seconds = self.decode_seconds = 0.0
        self.decode_calls = 0

    def _sync(self) -> None:
        for device in self.devices:
            torch.cuda.synchronize(device)

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


def image_token_runs(input_ids: torch.Tensor, image_token_id: int) -> list[list[int]]:
    """Per row, the lengths of its runs of consecutive image tokens: one run per image in Qwen2-VL
    (its vision start and end tokens separate images); adjacent LLaVA images make one run, which
    ``cost.WholeModel`` splits by its fixed tokens per image."""
    runs = []
    for row in (input_ids == image_token_id).tolist():
        lengths, current = [], 0
        for is_image in [*row, False]:
            if is_image:
                current += 1
            elif current:
                lengths.append(current)
                current = 0
        runs.append(lengths)
    return runs


def default_accounting_file(stem: str, rank: int, output_path: str | None) -> Path:
    """Beside lmms-eval's results (``<output_path>/vtw_accounting/``) when ``--output_path`` is
    given, else in vtw_eval's cache folder (``files.cache_dir()/accounting``)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    folder = Path(output_path) / "vtw_accounting" if output_path else cache_dir() / "accounting"
    return folder / f"{stem}_{stamp}_rank{rank}.jsonl"


class RequestAccounting:
    """Owns the per-request records of one ``generate_until`` call, their file and the report."""

    def __init__(self, config, dtype: torch.dtype, path: Path, method: dict | None = None):
        """``config``: the model's transformers config; ``dtype``: what its KV cache holds."""
        self.geometry = DecoderGeometry.from_config(config)
        self.whole_model = whole_model_of(config)  # None where the tower is not modelled
        self.kv_dtype_bytes = torch.finfo(dtype).bits // 8
        self.path = path
        self.method = method or {"method": "vtw"}  # what each record says about how it withdrew
        self.records: list[dict] = []
        self.timers: list[CallTimer] = []
        self.calibration_flops: dict[str, int] = {}  # per task: decoder FLOPs spent choosing its K now

    def add_batch(
        self,
        requests: list[tuple[str, int]],
        prompt_tokens: list[int],
        visual_tokens: list[int],
        generated_tokens: list[int],
        withdraw_layer: int | None,
        timer: CallTimer,
        image_tokens: list[list[int]] | None = None,
        removed_tokens: list[int] | None = None,
        batch_size: int | None = None,
    ) -> None:
        """One generated batch: its (task, doc_id) requests, their token counts (and each request's
        visual tokens per image, for the whole-forward figures; the tokens it really withdrew, when
        not all its visual tokens) and its timer. ``batch_size``: how many requests ran together,
        when not these (vLLM's requests are recorded one by one, each with its own times)."""
        self.timers.append(timer)
        image_tokens = image_tokens or [None] * len(requests)
        removed_tokens = removed_tokens or visual_tokens
        rows = zip(requests, prompt_tokens, visual_tokens, generated_tokens, image_tokens, removed_tokens)
        for (task, doc_id), n, visual, generated, images, removed in rows:
            # FastV ranks the visual tokens by one more pass over layer prune_layer - 1's keys
            ranked = self.method["method"] == "fastv" and visual > 0
            scoring = self.geometry.last_query_scoring_flops(n) if ranked else 0
            figures = request_figures(
                self.geometry, n, visual, generated, withdraw_layer, self.kv_dtype_bytes, self.whole_model, images,
                removed, scoring,
            )  # fmt: skip
            self.records.append(
                {
                    "task": task,
                    "doc_id": doc_id,
                    **self.method,
                    **figures,
                    "batch_size": batch_size or len(requests),
                    "batch_prefill_seconds": timer.prefill_seconds,
                    "batch_decode_seconds": timer.decode_seconds,
                    "batch_decode_steps": timer.decode_calls,
                }
            )

    def task_layers(self) -> dict[str, int]:
        """The K each task's requests were answered at (one per task: batches never mix tasks)."""
        return {record["task"]: record["withdraw_layer"] for record in self.records}

    def prefill_flops_by_task(self) -> dict[str, int]:
        flops: dict[str, int] = {}
        for record in self.records:
            flops[record["task"]] = flops.get(record["task"], 0) + record["prefill_flops_vtw"]
        return flops

    def report(self) -> None:
        """Averages into lmms-eval's results (``throughput``); every request into a JSON Lines file."""
        if not self.records:
            return
        records, timers = self.records, self.timers

        def mean(key: str) -> float:
            return sum(r[key] for r in records) / len(records)

        whole = [r for r in records if "prefill_flops_whole_model_vtw" in r]  # video requests have none

        def mean_whole(key: str) -> float:
            return sum(r[key] for r in whole) / len(whole)

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
                "visual_tokens_per_layer": mean("visual_tokens_per_layer"),
                "kept_tokens": mean("kept_tokens"),
                "prefill_tflops_baseline": mean("prefill_flops_baseline") / 1e12,
                "prefill_tflops_vtw": mean("prefill_flops_vtw") / 1e12,
                "prefill_flops_saved": mean("prefill_flops_saved"),
                "kv_cache_mb_baseline": mean("kv_cache_bytes_baseline") / 2**20,
                "kv_cache_mb_vtw": mean("kv_cache_bytes_vtw") / 2**20,
                "kv_cache_saved": mean("kv_cache_saved"),
                **(
                    {
                        "prefill_tflops_whole_model_baseline": mean_whole("prefill_flops_whole_model_baseline") / 1e12,
                        "prefill_tflops_whole_model_vtw": mean_whole("prefill_flops_whole_model_vtw") / 1e12,
                        "prefill_flops_whole_model_saved": mean_whole("prefill_flops_whole_model_saved"),
                    }
                    if whole
                    else {}
                ),
                **task_figures(self.task_layers(), self.calibration_flops, self.prefill_flops_by_task()),
                **latency_figures(records),
                "prefill_seconds_per_batch": sum(t.prefill_seconds for t in timers) / len(timers),
                "decode_seconds_per_step": sum(t.decode_seconds for t in timers) / decode_steps
                if decode_steps
                else 0.0,
            },
        )
        lines = "".join(json.dumps(record) + "\n" for record in records)
        write_atomically(self.path, lines.encode())
        logger.info(f"VTW per-request figures: {self.path}")


def latency_figures(records: list[dict]) -> dict:
    """lmms-eval's names for latency (its vLLM backends log them): ``ttft``, a request's time to
    its first token (its batch's prefill), and ``tpot``, its time per output token after the first
    (its batch's decoding time per step), averaged over requests (``tpot`` over those with more
    than one token)."""
    figures = {"ttft": sum(r["batch_prefill_seconds"] for r in records) / len(records)}
    decoding = [r for r in records if r["generated_tokens"] > 1 and r["batch_decode_steps"]]
    if decoding:
        figures["tpot"] = sum(r["batch_decode_seconds"] / r["batch_decode_steps"] for r in decoding) / len(decoding)
    return figures


def task_figures(layers: dict[str, int], calibration_flops: dict[str, int], prefill_flops: dict[str, int]) -> dict:
    """Per task: its K; for a task calibrated in this run, the calibration's decoder FLOPs and
    their share of the task's prefill FLOPs. lmms-eval averages each key over the calls that log
    it, and a task is answered in one call, so each key holds that task's own figure."""
    figures = {f"withdraw_layer/{task}": layer for task, layer in layers.items()}
    for task, flops in calibration_flops.items():
        figures[f"calibration_tflops/{task}"] = flops / 1e12
        if prefill_flops.get(task):
            figures[f"calibration_share_of_prefill/{task}"] = flops / prefill_flops[task]
    return figures


def report_loglikelihood(
    layers: dict[str, int], calibration_flops: dict[str, int], prefill_flops: dict[str, int]
) -> None:
    """A loglikelihood call's per-task figures into lmms-eval's ``throughput``, like a generation
    call's. Zero generated tokens and seconds, so that lmms-eval's own totals stay the generation's."""
    log_metrics(
        total_elapsed_time=0.0,
        total_gen_tokens=0,
        avg_speed=0.0,
        additional_metrics=task_figures(layers, calibration_flops, prefill_flops),
    )
