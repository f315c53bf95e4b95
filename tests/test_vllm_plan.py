"""The compacted batch of layers >= K inside vLLM (vtw_eval.vllm_withdrawal.plan_step) against a
token-by-token count, on steps that mix decoding, whole prefills, and chunks that start, end or lie
inside images. numpy only: it runs in the main suite (the engine runs in tests/test_vllm.py)."""

from __future__ import annotations

import numpy as np
import pytest

from vtw_eval.vllm_withdrawal import StepRow, plan_step


def brute_force(rows: list[StepRow]):
    kept_indices, kept_rows, compacted, seq_lens, query_lens = [], [], [], [], []
    index = 0
    for row_number, row in enumerate(rows):

        def visual(position):
            return any(start <= position < end for start, end in row.visual_spans)

        kept_here = 0
        for position in range(row.computed, row.computed + row.scheduled):
            if not visual(position):
                kept_indices.append(index)
                compacted.append(sum(not visual(p) for p in range(position)))
                kept_here += 1
            index += 1
        if kept_here:
            kept_rows.append(row_number)
            query_lens.append(kept_here)
            end = row.computed + row.scheduled
            seq_lens.append(sum(not visual(p) for p in range(end)))
    return kept_indices, kept_rows, compacted, seq_lens, query_lens


STEPS = {
    "decoding beside a whole prefill": [StepRow(30, 1, ((3, 19),)), StepRow(0, 24, ((5, 21),)), StepRow(7, 1)],
    "chunks cutting images": [
        StepRow(0, 10, ((4, 20),)),
        StepRow(16, 16, ((4, 20), (22, 38))),
        StepRow(8, 4, ((2, 30),)),
    ],
    "a chunk inside an image only": [StepRow(10, 8, ((2, 40),)), StepRow(3, 1)],
    "text only": [StepRow(0, 6), StepRow(6, 1)],
}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_plan_equals_a_token_by_token_count(step):
    rows = STEPS[step]
    plan = plan_step(rows)
    kept_indices, kept_rows, compacted, seq_lens, query_lens = brute_force(rows)
    assert plan.num_tokens == sum(row.scheduled for row in rows)
    assert plan.kept_token_indices.tolist() == kept_indices
    assert plan.rows.tolist() == kept_rows
    assert plan.compacted_positions.tolist() == compacted
    assert plan.seq_lens.tolist() == seq_lens and plan.query_lens.tolist() == query_lens
    assert plan.query_start_loc.tolist() == [0, *np.cumsum(query_lens).tolist()]
    assert plan.withdraws == (len(kept_indices) < plan.num_tokens)


def test_slots_follow_the_block_table_at_compacted_positions():
    rows = [StepRow(0, 12, ((2, 10),)), StepRow(5, 3)]
    plan = plan_step(rows)
    block_size = 4
    block_table = np.array([[7, 3, 9, 0], [5, 1, 2, 0]])
    # row 0 keeps positions 0, 1, 10, 11 -> compacted 0..3 -> block 7, offsets 0..3;
    # row 1 keeps 5, 6, 7 -> compacted 5, 6, 7 -> block 1, offsets 1..3
    assert plan.slots(block_table, block_size).tolist() == [28, 29, 30, 31, 5, 6, 7]
    # guard: the slots of another table differ
    assert plan.slots(block_table[::-1].copy(), block_size).tolist() != [28, 29, 30, 31, 5, 6, 7]
