"""``vtw_vllm``: lmms-eval's own ``vllm`` chat backend with visual tokens withdrawn inside vLLM's
decoder (``vtw_eval.vllm_worker``).

Its prompts, sampling parameters and arguments are lmms-eval 0.7.3's ``vllm`` backend's (this is
a subclass: the messages and sampling parameters come from its ``make_one_request``); added are
``withdraw_layer`` (an integer, ``none``, or ``auto``: the global K of this model's calibration
file, made by the model's transformers backend), ``accounting_file`` and the calibration file's
arguments. With a K it starts vLLM with the withdrawing worker, in eager mode and without prefix
caching (given otherwise, they are refused here, before the engine starts). With
``withdraw_layer=none`` (the default) it is plain vLLM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.models.chat.vllm import VLLM
from loguru import logger
from tqdm import tqdm
from transformers import AutoConfig

from vtw_eval.accounting import RequestAccounting, default_accounting_file, image_token_runs
from vtw_eval.architecture import Architecture
from vtw_eval.backends import arguments
from vtw_eval.backends.processes import Processes
from vtw_eval.backends.requests import Request
from vtw_eval.calibration_file import (
    calibration_file_path,
    calibration_file_stem,
    checkpoint_files_key,
    checkpoint_folder,
    config_hash,
    load_calibration,
    model_name,
    remembered_weights_fingerprint,
)
from vtw_eval.files import check_writable
from vtw_eval.tasks import TASKS_DIR
from vtw_eval.vllm_worker import (
    SERVED_ARCHITECTURES,
    WITHDRAW_LAYER_KEY,
    served_architecture,
    withdraw_layer_problem,
    worker_class_path,
)

# What withdrawal needs of vLLM's settings, and why.
REQUIRED_SETTINGS = {
    "enforce_eager": (True, "the compacted batch of layers >= K changes shape every step (no CUDA graphs or compile)"),
    "enable_prefix_caching": (False, "a cached block's layers >= K hold another request's compacted tokens"),
}
REFUSED_SETTINGS = {
    "tensor_parallel_size": 1,
    "pipeline_parallel_size": 1,
    "data_parallel_size": 1,
    "speculative_config": None,
}
# Arguments of vtw_eval's transformers backends that vtw_vllm does not take (vLLM would get them).
NOT_TAKEN = {
    "pretrained": "lmms-eval's vllm backend names the checkpoint model=",
    "calibrate_per_task": "the engine runs one K; calibrate per task with the transformers backend",
    "kl_threshold": "auto reads the calibration file's global K",
    "kl_tokens": "auto reads the calibration file's global K",
    "method": "only VTW is built inside vLLM",
}
# The transformers backend that calibrates each served architecture (withdraw_layer=auto).
CALIBRATING_BACKENDS = {
    "LlavaForConditionalGeneration": "vtw_llava",
    "Qwen2VLForConditionalGeneration": "vtw_qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "vtw_qwen2_5_vl",
    "Qwen3VLForConditionalGeneration": "vtw_qwen3_vl",
}


@dataclass(frozen=True)
class RequestTimes:
    """One request's times as vLLM's engine stamped them (``RequestOutput.metrics``): prefill from
    its scheduling to its first token, decoding from there to its last."""

    prefill_seconds: float
    decode_seconds: float
    decode_calls: int

    @classmethod
    def of(cls, output) -> RequestTimes:
        stats = output.metrics
        if stats is None:
            return cls(0.0, 0.0, 0)
        return cls(
            max(stats.first_token_ts - stats.scheduled_ts, 0.0),
            max(stats.last_token_ts - stats.first_token_ts, 0.0),
            max(stats.num_generation_tokens - 1, 0),
        )


class VTWVLLM(VLLM):
    """lmms-eval's ``vllm`` (chat) backend, with ``withdraw_layer``."""

    is_simple = False

    def __init__(
        self,
        model: str = "Qwen/Qwen2.5-VL-3B-Instruct",
        withdraw_layer: int | str | None = None,
        accounting_file: str | None = None,
        calibration: str | None = None,
        calibration_dir: str | None = None,
        trust_remote_code: bool = True,
        **kwargs,
    ) -> None:
        arguments.non_empty("model", model, "a hub id (org/name) or a local checkpoint directory")
        for name in sorted(set(kwargs) & set(NOT_TAKEN)):
            raise ValueError(f"vtw_vllm does not take {name}=: {NOT_TAKEN[name]}")
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        served = served_architecture(config)
        layer = arguments.withdraw_layer(withdraw_layer, config.get_text_config().num_hidden_layers)
        if layer is not None and served is None:
            raise ValueError(
                f"model={model} is a {config.architectures}; vtw_vllm withdraws inside {sorted(SERVED_ARCHITECTURES)}"
            )
        if layer == "auto":
            layer = calibrated_withdraw_layer(model, config, served[0], calibration, calibration_dir)
        if layer is not None:
            if problem := withdraw_layer_problem(config, layer):
                raise ValueError(problem)
            kwargs = withdrawing_engine_arguments(kwargs, layer)
        self.withdraw_layer, self.hf_config = layer, config
        self.visual_token_ids = Architecture().visual_token_ids(config)
        stem = f"{model_name(model)}_{config_hash(config)[:8]}"
        path = accounting_file or default_accounting_file(
            stem, Processes().rank, arguments.command_line_option("--output_path")
        )
        self.accounting_file = Path(path).expanduser().resolve()
        check_writable(self.accounting_file, "accounting_file")
        super().__init__(model=model, trust_remote_code=trust_remote_code, **kwargs)
        layers = config.get_text_config().num_hidden_layers
        logger.info(f"vtw_vllm: {model}, {layers} decoder layers, withdraw_layer={layer}")

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """lmms-eval's ``vllm`` answers, batch by batch as it sends them, with each request's cost
        recorded (``vtw_eval.accounting``: the same records and throughput keys as the other backends)."""
        from vllm import SamplingParams

        dtype = self.client.llm_engine.model_config.dtype
        accounting = RequestAccounting(self.hf_config, dtype, self.accounting_file, {"method": "vtw"})
        results = []
        size = self.batch_size_per_gpu
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="vtw_vllm responding")
        for start in range(0, len(requests), size):
            batch = requests[start : start + size]
            built = [self.make_one_request(request) for request in batch]
            outputs = self.client.chat(
                messages=[messages for messages, _ in built],
                sampling_params=[SamplingParams(**params) for _, params in built],
                chat_template=self.chat_template,
                use_tqdm=False,
            )
            for request, output in zip(batch, outputs):
                self._account(accounting, Request.of(request), output, len(batch))
            results.extend(GenerationResult(text=output.outputs[0].text) for output in outputs)
            progress.update(len(batch))
        progress.close()
        accounting.report()
        return results

    def _account(self, accounting: RequestAccounting, request: Request, output, batch_size: int) -> None:
        prompt = torch.tensor([output.prompt_token_ids])
        visual = int(sum((prompt == token).sum() for token in self.visual_token_ids))
        images = image_token_runs(prompt, self.visual_token_ids[0])[0]
        accounting.add_batch(
            [request.key], [prompt.shape[1]], [visual], [len(output.outputs[0].token_ids)], self.withdraw_layer,
            RequestTimes.of(output), image_tokens=[images], batch_size=batch_size,
        )  # fmt: skip

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("vtw_vllm answers generation tasks only, as lmms-eval's vllm backend does")


def withdrawing_engine_arguments(kwargs: dict, layer: int) -> dict:
    """``vllm.LLM``'s arguments for withdrawal at ``layer``: the settings it needs (a contrary one
    refused by name) and the worker that withdraws."""
    kwargs = dict(kwargs)
    for name, (required, why) in REQUIRED_SETTINGS.items():
        given = arguments.boolean(name, kwargs.get(name))
        if given is not None and given != required:
            raise ValueError(f"{name}={given} cannot run with withdraw_layer={layer}: {why}; use {name}={required}")
        kwargs[name] = required
    for name, allowed in REFUSED_SETTINGS.items():
        given = kwargs.get(name)
        if given is not None and str(given) != str(allowed):
            raise ValueError(
                f"{name}={given} is not supported with withdraw_layer={layer} (not built or tested); "
                f"use {name}={allowed} or withdraw_layer=none"
            )
    runner = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if runner not in (None, "0", "false", "False"):
        raise ValueError(f"VLLM_USE_V2_MODEL_RUNNER={runner}: VTW extends vLLM's first model runner; set it to 0")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # inherited by the engine's processes
    kwargs["worker_cls"] = worker_class_path()
    kwargs["additional_config"] = {**(kwargs.get("additional_config") or {}), WITHDRAW_LAYER_KEY: layer}
    return kwargs


def calibrated_withdraw_layer(model: str, config, architecture: str, calibration, calibration_dir) -> int:
    """``auto``: the global K of this checkpoint's calibration file, which its transformers backend
    wrote. vLLM loads no transformers model here, so the weights fingerprint is the one that backend
    remembered for these weight files (``cached_weights_fingerprint``); a checkpoint it never
    loaded is refused with the command that calibrates it."""
    command = (
        f"lmms-eval --model {CALIBRATING_BACKENDS[architecture]} --model_args pretrained={model},withdraw_layer=none "
        f"--tasks vtw_calibration --include_path {TASKS_DIR}"
    )
    folder = checkpoint_folder(model)
    fingerprint = remembered_weights_fingerprint(checkpoint_files_key(folder)) if folder is not None else None
    if fingerprint is None:
        raise ValueError(
            f"withdraw_layer=auto: vtw_eval has not calibrated {model} (these weight files); calibrate it with its "
            f"transformers backend first:\n  {command}"
        )
    # A calibration record's dtype is not part of the match (a K holds across dtypes).
    identity = {"model": model_name(model), "config_hash": config_hash(config), "weights_fingerprint": fingerprint}
    file = calibration_file_path(calibration, calibration_dir, calibration_file_stem(model, identity))
    record, _ = load_calibration(file, identity, config.get_text_config().num_hidden_layers, command)
    logger.info(f"withdraw_layer=auto: K={record['withdraw_layer']} from {file} (calibrated in {record['dtype']})")
    return int(record["withdraw_layer"])
