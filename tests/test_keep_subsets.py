"""The engine's seam for which positions stay: a plan from any keep mask, chosen from the prompt or
during the forward, against the naive reference withdrawing the same subset (LLaVA, Qwen2-VL,
Qwen3-VL with DeepStack, Qwen3.5 with Gated DeltaNet layers)."""

from __future__ import annotations

import pytest
import torch
from reference import reference_vtw_logits, unmodified_forward, visual_ids
from tiny_models import BUILDERS, NUM_LAYERS, build_tiny_llava, encode, with_tokens, withdrawal
from tolerances import GUARD, SAME_ARITHMETIC, assert_close, reordering_ulps
from transformers import AutoModelForImageTextToText, AutoProcessor

from vtw_eval.engine import plan_from_keep_mask

QUESTION = "Is there a red square in the image ?"
FAMILIES = ["llava", "qwen2_vl", "qwen3_vl", "qwen3_5"]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    path = build_tiny_llava(folder) if request.param == "llava" else BUILDERS[request.param](folder)
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return AutoModelForImageTextToText.from_pretrained(path).eval(), processor


def every_other_visual(visual_mask: torch.Tensor, attention_mask, hidden_states) -> torch.Tensor:
    """A subset decided from the prompt: the text, and every second visual position of each row."""
    rank = visual_mask.long().cumsum(1)
    return ~visual_mask | (visual_mask & (rank % 2 == 0))


def largest_hidden_norms(visual_mask: torch.Tensor, attention_mask, hidden_states) -> torch.Tensor:
    """A subset decided during the forward: the text, and the third of each row's visual positions
    whose input to the first withdrawn layer has the largest norm."""
    norms = hidden_states.float().norm(dim=-1).masked_fill(~visual_mask, -1.0)
    keep = ~visual_mask
    for row in range(visual_mask.shape[0]):
        count = int(visual_mask[row].sum()) // 3
        keep[row, norms[row].topk(count).indices] = True
    return keep


def test_plan_keeps_any_ordered_subset_and_counts_what_it_removed():
    visual = torch.tensor([[False, True, True, True, False], [False, False, True, False, False]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    keep = torch.tensor([[True, False, True, False, True], [True, True, False, True, True]])
    plan = plan_from_keep_mask(keep, attention, visual)
    # In order, right-aligned in 4 slots (row 1 keeps its padding's slot, masked); row 0's spare
    # slot on the left points at a withdrawn position, masked like padding.
    assert plan.kept_positions.tolist() == [[3, 0, 2, 4], [0, 1, 3, 4]]
    assert plan.kept_attention_mask.tolist() == [[False, True, True, True], [False, True, True, True]]
    assert plan.num_removed.tolist() == [2, 1]  # row 1's padding (position 0) is no withdrawn token
    with pytest.raises(ValueError, match="withdraws the last prompt position"):
        plan_from_keep_mask(torch.tensor([[True, False]]), None, torch.tensor([[False, True]]))


@pytest.mark.parametrize("selector", [every_other_visual, largest_hidden_norms])
def test_every_layer_with_a_subset_matches_the_reference(tiny, selector):
    model, processor = tiny
    inputs = encode(processor, [(QUESTION, 2)])
    visual_mask = torch.isin(inputs["input_ids"], torch.tensor(visual_ids(model.config)))
    hidden_states = unmodified_forward(model, inputs)[1]  # each layer's input
    last = []
    for layer in range(NUM_LAYERS):
        keep = selector(visual_mask, inputs["attention_mask"], hidden_states[layer])
        assert visual_mask[keep].any() and (visual_mask & ~keep).any()  # some visual positions stay, some go
        expected, kept_positions = reference_vtw_logits(model, inputs, layer, keep=keep[0])
        vtw = withdrawal(model, layer, keep_selector=selector)
        with torch.no_grad():
            logits = model(**inputs).logits
        vtw.remove()
        assert vtw.plan.kept_positions[0].tolist() == kept_positions.tolist()
        assert vtw.plan.num_removed.tolist() == [int((visual_mask & ~keep).sum())]
        assert_close(logits, expected, SAME_ARITHMETIC)
        vtw_logits, _ = reference_vtw_logits(model, inputs, layer)
        assert (vtw_logits[0, -1] - expected[0, -1]).abs().max() > GUARD  # the kept visual tokens mattered
        last.append(logits[0, -1])
    for earlier, later in zip(last, last[1:]):
        assert (earlier - later).abs().max() > GUARD


@pytest.mark.parametrize("withdraw_layer", [0, 2])
def test_cached_generation_with_a_subset_equals_recompute(tiny, withdraw_layer):
    """The caches, recurrent states and decoding positions of a subset that keeps visual tokens."""
    model, processor = tiny
    inputs = encode(processor, [(QUESTION, 2)])
    vtw = withdrawal(model, withdraw_layer, keep_selector=every_other_visual)
    suppress = visual_ids(model.config)
    with torch.no_grad():
        cached = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, pad_token_id=3, suppress_tokens=suppress,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        sequence = inputs["input_ids"]
        for step in range(4):
            logits = model(**with_tokens(inputs, sequence), use_cache=False).logits[:, -1]
            assert_close(cached.logits[step], logits, reordering_ulps(model))
            logits[:, suppress] = -float("inf")
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    vtw.remove()
    assert torch.equal(cached.sequences, sequence)


def test_a_batch_with_subsets_equals_one_by_one(tiny):
    """Rows keep different numbers of positions (0, 1, 2 images): each as if alone."""
    model, processor = tiny
    rows = [(QUESTION, 2), ("What colour is it ?", 1), ("Is it big ?", 0)]
    vtw = withdrawal(model, 1, keep_selector=every_other_visual)
    with torch.no_grad():
        batch = model(**encode(processor, rows)).logits[:, -1]
        singles = [model(**encode(processor, [row], seed=index)).logits[0, -1] for index, row in enumerate(rows)]
    vtw.remove()
    for index, single in enumerate(singles):
        assert_close(batch[index], single, reordering_ulps(model))
