"""Visual Tokens Withdrawal inside vLLM's decoder: which tokens of a step go, and where the rest go.

vLLM runs a step over the scheduled tokens of many requests at once (prefills, chunks of prefills
and decoding steps side by side) and its attention layers read their metadata and KV-cache slots
from the step's forward context. Withdrawal at layer K therefore means, per step:

- layers < K run on every token, as vLLM plans them;
- before layer K the step's visual tokens are cut from the hidden states, the residual stream and
  the positions (kept tokens keep their original positions, so rotary and M-RoPE are unchanged);
- layers >= K see a compacted batch: each request's kept tokens numbered 0, 1, ... in order
  (``compacted position`` = original position minus the visual tokens before it), stored at those
  compacted positions inside the request's own KV blocks, and attended to with the compacted
  sequence lengths. Blocks are allocated for the full length, so this saves compute, not KV memory.
- after the last layer the kept rows go back to their original places in the step (withdrawn rows
  hold zeros: vLLM reads logits only at a request's last scheduled token, which is text when a
  prompt ends in text; a chunk that ends inside an image has its logits discarded by vLLM).

This module is the arithmetic (``plan_step``, numpy only) and the hooks on vLLM's decoder layers
(``attach_withdrawal``, torch only); ``vtw_eval.vllm_worker`` holds the vLLM classes that feed them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class StepRow:
    """One request's part of a step: the positions it runs (``computed`` ... ``computed +
    scheduled - 1``) and the visual spans of its prompt, as ``(start, end)`` half-open ranges in
    original positions, sorted and disjoint."""

    computed: int
    scheduled: int
    visual_spans: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class StepPlan:
    """What layers >= K see in one step.

    ``kept_token_indices``: indices into the step's token order of the tokens layers >= K run on.
    ``rows``: the step's request rows that keep at least one token (rows whose every scheduled token
    is visual, a chunk inside an image, drop out of layers >= K this step).
    ``query_lens`` / ``seq_lens``: per kept row, its kept tokens in this step and its compacted
    length after it. ``compacted_positions``: each kept token's position in its request's
    compacted sequence, where its keys and values are stored.
    """

    num_tokens: int
    kept_token_indices: np.ndarray
    rows: np.ndarray
    query_lens: np.ndarray
    seq_lens: np.ndarray
    compacted_positions: np.ndarray

    @property
    def withdraws(self) -> bool:
        return len(self.kept_token_indices) < self.num_tokens

    @property
    def query_start_loc(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.query_lens)]).astype(np.int32)

    def slots(self, block_table: np.ndarray, block_size: int) -> np.ndarray:
        """KV-cache slots of the kept tokens: block ``p // block_size`` of the request's block table,
        offset ``p % block_size``, at compacted position p (vLLM's own slot rule)."""
        row_of_token = np.repeat(self.rows, self.query_lens)
        blocks = block_table[row_of_token, self.compacted_positions // block_size].astype(np.int64)
        return blocks * block_size + self.compacted_positions % block_size


def visual_count_before(spans: Sequence[tuple[int, int]], position: int) -> int:
    """How many visual positions lie before ``position``."""
    return sum(max(0, min(end, position) - start) for start, end in spans)


def plan_step(rows: Sequence[StepRow]) -> StepPlan:
    """The compacted batch for layers >= K, from each row's scheduled positions and visual spans."""
    kept_indices, kept_rows, query_lens, seq_lens, compacted = [], [], [], [], []
    offset = 0
    for row_index, row in enumerate(rows):
        positions = np.arange(row.computed, row.computed + row.scheduled)
        visual = np.zeros(row.scheduled, dtype=bool)
        for start, end in row.visual_spans:
            visual |= (positions >= start) & (positions < end)
        kept = np.flatnonzero(~visual)
        if len(kept):
            kept_before = row.computed - visual_count_before(row.visual_spans, row.computed)
            kept_indices.append(offset + kept)
            kept_rows.append(row_index)
            query_lens.append(len(kept))
            seq_lens.append(kept_before + len(kept))
            compacted.append(kept_before + np.arange(len(kept)))
        offset += row.scheduled

    def joined(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    return StepPlan(
        num_tokens=offset,
        kept_token_indices=joined(kept_indices),
        rows=np.asarray(kept_rows, dtype=np.int64),
        query_lens=np.asarray(query_lens, dtype=np.int32),
        seq_lens=np.asarray(seq_lens, dtype=np.int32),
        compacted_positions=joined(compacted),
    )


def attach_withdrawal(
    text_model: nn.Module, withdraw_layer: int, current_plan: Callable[[], StepPlan | None]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks on a vLLM text model (``model.layers`` called as ``layer(positions, hidden_states,
    residual)``, then ``model.norm(hidden_states, residual)``) that cut the step's withdrawn tokens
    before layer ``withdraw_layer`` and put the kept rows back in place after the final norm (the
    text model itself is no hook point: vLLM's compile decorator replaces its ``__call__``).

    ``current_plan`` returns the running step's plan, or None when nothing is withdrawn (dummy and
    profiling runs, steps without visual tokens)."""
    handles = []
    step: dict[str, object] = {}  # the plan being run and its kept indices as a tensor, made once a step

    def kept_indices(plan: StepPlan, device: torch.device) -> torch.Tensor:
        if step.get("plan") is not plan:
            step["plan"], step["kept"] = plan, torch.as_tensor(plan.kept_token_indices, device=device)
        return step["kept"]

    def make_cut(first: bool):
        def cut_inputs(module, args):
            plan = current_plan()
            if plan is None or not plan.withdraws:
                return None
            positions, hidden_states, residual, *rest = args
            kept = kept_indices(plan, hidden_states.device)
            # every layer gets the step's full positions from vLLM's loop; only the first withdrawn
            # layer gets the full hidden states and residual
            if first:
                hidden_states = hidden_states.index_select(0, kept)
                residual = None if residual is None else residual.index_select(0, kept)
            return (positions.index_select(-1, kept), hidden_states, residual, *rest)

        return cut_inputs

    def restore_rows(module, args, output):
        plan = current_plan()
        if plan is None or not plan.withdraws:
            return None
        hidden_states, *rest = output if isinstance(output, tuple) else (output,)
        full = hidden_states.new_zeros((plan.num_tokens, *hidden_states.shape[1:]))
        full.index_copy_(0, kept_indices(plan, hidden_states.device), hidden_states)
        return (full, *rest) if isinstance(output, tuple) else full

    for index, layer in enumerate(text_model.layers[withdraw_layer:]):
        handles.append(layer.register_forward_pre_hook(make_cut(first=index == 0)))
    handles.append(text_model.norm.register_forward_hook(restore_rows))
    return handles
