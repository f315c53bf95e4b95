"""vLLM workers whose model runner withdraws visual tokens (``vtw_eval.vllm_withdrawal``).

Selected with vLLM's own extension points, nothing of vLLM copied or edited:
``LLM(..., worker_cls=worker_class_path(), additional_config={"vtw_withdraw_layer": K})``. The model
classes stay vLLM's; the runner adds, per step, the compacted attention metadata and KV slots of
layers >= K to the forward context vLLM builds, and hooks that cut and restore the hidden states.

What VTW must survive in vLLM, and what this does with it (checked before the model loads):
- continuous batching, text-only requests beside image requests, several images per request,
  chunked prefill: handled (each row's scheduled positions and visual spans, every step);
- prefix caching: refused (a cached block's layers >= K hold another request's compacted tokens);
- CUDA graphs and torch.compile: refused (``enforce_eager=True``; the compacted batch changes its
  shape every step);
- tensor parallelism, pipeline parallelism, data-parallel attention, speculative decoding,
  micro-batching, decode context parallelism: refused (not built or tested here);
- vLLM's second model runner (``VLLM_USE_V2_MODEL_RUNNER``): refused, this extends the first.
"""

from __future__ import annotations

from copy import copy
from dataclasses import dataclass

import numpy as np
import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker as GPUWorker

from vtw_eval.vllm_withdrawal import StepPlan, StepRow, attach_withdrawal, plan_step

WITHDRAW_LAYER_KEY = "vtw_withdraw_layer"


@dataclass(frozen=True)
class ServedArchitecture:
    """What differs by vLLM model class: the modalities whose placeholder tokens are visual, and
    the vision config field listing features the text model adds at the visual positions after its
    first layers (Qwen3-VL's DeepStack), which must all be added before withdrawal."""

    visual_modalities: tuple[str, ...]
    injected_features_field: str | None = None

    def smallest_withdraw_layer(self, hf_config) -> int:
        if self.injected_features_field is None:
            return 0
        return len(getattr(hf_config.vision_config, self.injected_features_field))


# vLLM's model classes VTW was checked on (tests/test_vllm.py).
SERVED_ARCHITECTURES = {
    "LlavaForConditionalGeneration": ServedArchitecture(("image",)),
    "Qwen2VLForConditionalGeneration": ServedArchitecture(("image", "video")),
    "Qwen2_5_VLForConditionalGeneration": ServedArchitecture(("image", "video")),
    "Qwen3VLForConditionalGeneration": ServedArchitecture(("image", "video"), "deepstack_visual_indexes"),
}


def served_architecture(hf_config) -> tuple[str, ServedArchitecture] | None:
    """The config's architecture VTW inside vLLM serves, if any."""
    for name in getattr(hf_config, "architectures", None) or []:
        if name in SERVED_ARCHITECTURES:
            return name, SERVED_ARCHITECTURES[name]
    return None


def withdraw_layer_problem(hf_config, withdraw_layer: int) -> str | None:
    """Why K cannot run on this model, if it cannot: too early for its injected features."""
    name, served = served_architecture(hf_config)
    smallest = served.smallest_withdraw_layer(hf_config)
    if withdraw_layer < smallest:
        return (
            f"withdraw_layer={withdraw_layer}: {name} adds visual features after decoder layers 0..{smallest - 1}, "
            f"which would have no visual tokens to go to; use withdraw_layer >= {smallest}"
        )
    return None


def worker_class_path() -> str:
    """The ``worker_cls`` for this platform."""
    from vllm.platforms import current_platform

    name = "VTWCPUWorker" if current_platform.is_cpu() else "VTWGPUWorker"
    return f"{__name__}.{name}"


def refusals(vllm_config) -> list[str]:
    """What of vLLM's configuration VTW cannot run under, each named with the setting that avoids it."""
    problems = []
    hf_config = vllm_config.model_config.hf_config
    if served_architecture(hf_config) is None:
        problems.append(
            f"architecture {hf_config.architectures}: VTW inside vLLM serves {sorted(SERVED_ARCHITECTURES)}"
        )
    elif problem := withdraw_layer_problem(hf_config, configured_withdraw_layer(vllm_config)):
        problems.append(problem)
    if vllm_config.cache_config.enable_prefix_caching:
        problems.append("prefix caching: pass enable_prefix_caching=False")
    if not vllm_config.model_config.enforce_eager:
        problems.append("CUDA graphs / torch.compile: pass enforce_eager=True")
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        problems.append("tensor or pipeline parallelism: use tensor_parallel_size=1 and pipeline_parallel_size=1")
    if getattr(parallel, "decode_context_parallel_size", 1) > 1:
        problems.append("decode context parallelism: use decode_context_parallel_size=1")
    if getattr(parallel, "use_ubatching", False):
        problems.append("micro-batching (dual batch overlap): leave it off")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding: leave speculative_config unset")
    if vllm_config.use_v2_model_runner:
        problems.append("vLLM's second model runner: set VLLM_USE_V2_MODEL_RUNNER=0")
    return problems


def configured_withdraw_layer(vllm_config) -> int | None:
    value = (vllm_config.additional_config or {}).get(WITHDRAW_LAYER_KEY)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"additional_config[{WITHDRAW_LAYER_KEY!r}]={value!r}: give a layer index >= 0")
    return value


class WithdrawingRunner:
    """Mixed into vLLM's (first) model runner: plans each step's withdrawal from the runner's own
    request state, gives layers >= K their compacted slots and metadata, and hooks the model."""

    def _init_withdrawal(self) -> None:
        self.withdraw_layer = configured_withdraw_layer(self.vllm_config)
        self._step_plan: StepPlan | None = None
        self._step_slots: dict[int, torch.Tensor] = {}  # per KV-cache group: the kept tokens' slots
        self._withdrawn_groups: dict[tuple[int, int], object] = {}
        if self.withdraw_layer is None:
            return
        problems = refusals(self.vllm_config)
        if problems:
            raise ValueError("VTW inside vLLM cannot run with: " + "; ".join(problems))
        _, served = served_architecture(self.vllm_config.model_config.hf_config)
        self._visual_modalities = served.visual_modalities

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        if self.withdraw_layer is None:
            return
        text_model = self.model.get_language_model().model
        num_layers = len(text_model.layers)
        if self.withdraw_layer > num_layers:
            raise ValueError(f"{WITHDRAW_LAYER_KEY}={self.withdraw_layer}: this model has {num_layers} decoder layers")
        if self.withdraw_layer == num_layers:  # nothing to withdraw from: plain vLLM
            self.withdraw_layer = None
            return
        attach_withdrawal(text_model, self.withdraw_layer, lambda: self._step_plan)

    def _withdrawn(self, layer_name: str) -> bool:
        return self.withdraw_layer is not None and extract_layer_index(layer_name) >= self.withdraw_layer

    def execute_model(self, *args, **kwargs):
        try:
            return super().execute_model(*args, **kwargs)
        finally:
            self._step_plan, self._step_slots = None, {}

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray):
        prepared = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        if self.withdraw_layer is not None:
            rows = range(self.input_batch.num_reqs)
            plan = plan_step([self._step_row(row, int(num_scheduled_tokens[row])) for row in rows])
            # the block table is final here (the super call commits it): slots once, for the slot
            # mappings and the attention metadata alike
            self._step_plan, self._step_slots = (
                plan,
                {
                    group_id: self._compacted_slots(plan, group_id)
                    for group_id, group in enumerate(self.kv_cache_config.kv_cache_groups)
                    if any(self._withdrawn(name) for name in group.layer_names)
                },
            )
        return prepared

    def _step_row(self, row: int, scheduled: int) -> StepRow:
        request = self.requests[self.input_batch.req_ids[row]]
        spans = []
        for feature in request.mm_features:
            if feature.modality in self._visual_modalities:
                placeholder = feature.mm_position
                spans.extend((start, end + 1) for start, end in placeholder.extract_embeds_range())
        return StepRow(
            computed=int(self.input_batch.num_computed_tokens_cpu[row]),
            scheduled=scheduled,
            visual_spans=tuple(sorted(spans)),
        )

    def _get_slot_mappings(self, *args, **kwargs):
        by_group, by_layer = super()._get_slot_mappings(*args, **kwargs)
        plan = self._step_plan
        if plan is None or by_layer is None:
            return by_group, by_layer
        by_layer = dict(by_layer)
        for group_id, slots in self._step_slots.items():
            for name in self.kv_cache_config.kv_cache_groups[group_id].layer_names:
                if self._withdrawn(name):
                    by_layer[name] = slots
        return by_group, by_layer

    def _compacted_slots(self, plan: StepPlan, group_id: int) -> torch.Tensor:
        block_table = self.input_batch.block_table[group_id]
        slots = plan.slots(block_table.get_numpy_array(), block_table.block_size)
        return torch.as_tensor(slots, dtype=torch.int64).to(self.device)

    def _build_attention_metadata(self, *args, **kwargs):
        attn_metadata, spec_metadata = super()._build_attention_metadata(*args, **kwargs)
        plan = self._step_plan
        if plan is None:
            return attn_metadata, spec_metadata
        for group_id in self._step_slots:
            common = self._compacted_common_metadata(plan, group_id)
            for attn_group_id, attn_group in enumerate(self.attn_groups[group_id]):
                names = [name for name in attn_group.layer_names if self._withdrawn(name)]
                if names:
                    metadata = self._withdrawn_group(group_id, attn_group_id).build_metadata(common)
                    for name in names:
                        attn_metadata[name] = metadata
        return attn_metadata, spec_metadata

    def _withdrawn_group(self, group_id: int, attn_group_id: int):
        """A second metadata builder for the group: some backends' builders keep buffers that one
        build per step may reuse, so the compacted batch gets its own."""
        key = (group_id, attn_group_id)
        if key not in self._withdrawn_groups:
            group = copy(self.attn_groups[group_id][attn_group_id])
            group.create_metadata_builders(self.vllm_config, self.device, group.kernel_block_size)
            self._withdrawn_groups[key] = group
        return self._withdrawn_groups[key]

    def _compacted_common_metadata(self, plan: StepPlan, group_id: int):
        from vllm.v1.attention.backend import CommonAttentionMetadata

        rows = torch.as_tensor(plan.rows)
        block_table = self.input_batch.block_table[group_id]
        query_start_loc = torch.as_tensor(plan.query_start_loc)
        seq_lens = torch.as_tensor(plan.seq_lens)
        positions = self.positions[: plan.num_tokens]
        kept = torch.as_tensor(plan.kept_token_indices)
        computed = self.input_batch.num_computed_tokens_cpu_tensor[rows]
        prompt = self.input_batch.num_prompt_tokens_cpu_tensor[rows]
        return CommonAttentionMetadata(
            query_start_loc=query_start_loc.to(self.device),
            query_start_loc_cpu=query_start_loc,
            seq_lens=seq_lens.to(self.device),
            seq_lens_cpu_upper_bound=seq_lens,
            num_reqs=len(plan.rows),
            num_actual_tokens=len(plan.kept_token_indices),
            max_query_len=int(plan.query_lens.max()),
            max_seq_len=int(plan.seq_lens.max()),
            block_table_tensor=block_table.get_device_tensor(self.input_batch.num_reqs)[rows.to(self.device)],
            slot_mapping=self._step_slots[group_id],
            causal=True,
            is_prefilling=computed < prompt,
            positions=positions.index_select(0, kept.to(positions.device)),
        )


class VTWCPUModelRunner(WithdrawingRunner, CPUModelRunner):
    def __init__(self, vllm_config, device: torch.device):
        super().__init__(vllm_config, device)
        self._init_withdrawal()


class VTWGPUModelRunner(WithdrawingRunner, GPUModelRunner):
    def __init__(self, vllm_config, device: torch.device):
        super().__init__(vllm_config, device)
        self._init_withdrawal()


class VTWCPUWorker(CPUWorker):
    """vLLM's CPU worker with the withdrawing runner. vLLM builds its runner at the end of
    ``init_device``; it is replaced there, before any model is loaded."""

    def init_device(self) -> None:
        super().init_device()
        self.model_runner = VTWCPUModelRunner(self.vllm_config, torch.device("cpu"))


class VTWGPUWorker(GPUWorker):
    """vLLM's GPU worker with the withdrawing runner (its ``_make_model_runner`` is the seam)."""

    def _make_model_runner(self):
        return VTWGPUModelRunner(self.vllm_config, self.device)
