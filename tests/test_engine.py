"""The withdrawal engine against the unmodified model and a naive reference forward."""

from __future__ import annotations

import pytest
import torch
from reference import reference_vtw_logits
from tiny_models import NUM_LAYERS, encode, load_model
from tolerances import GUARD, REORDERED, SAME_ARITHMETIC, assert_close

from vtw_eval.engine import VisualTokenWithdrawal, cache_in, plan_withdrawal

pytestmark = pytest.mark.smoke

QUESTION = "Is there a red square in the image ?"


def generate(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=3, **kwargs)


def test_plan_of_a_ragged_batch_by_hand():
    V = 9  # visual token id
    input_ids = torch.tensor(
        [
            [0, 5, V, V, 6, 7],  # 4 kept
            [5, V, V, V, V, 7],  # 2 kept
            [0, 0, 5, 6, 7, 8],  # left padding, no visual token: 6 slots
        ]
    )
    attention_mask = torch.tensor([[1] * 6, [1] * 6, [0, 0, 1, 1, 1, 1]])
    plan = plan_withdrawal(input_ids, attention_mask, [V])
    # Kept positions right-aligned in 6 slots; spare slots on the left are masked like padding.
    assert plan.kept_positions[:, 2:].tolist() == [[0, 1, 4, 5], [3, 4, 0, 5], [2, 3, 4, 5]]
    assert plan.kept_attention_mask.tolist() == [
        [False, False, True, True, True, True],
        [False, False, False, False, True, True],
        [False, False, True, True, True, True],
    ]
    assert plan.visual_mask.sum(dim=1).tolist() == [2, 4, 0]


def test_prompt_ending_with_a_visual_token_is_refused():
    with pytest.raises(ValueError, match="ends with a visual token"):
        plan_withdrawal(torch.tensor([[1, 2, 9]]), None, [9])


@pytest.mark.parametrize("layer", [-1, NUM_LAYERS + 1, "3", 1.5, True])
def test_withdraw_layer_out_of_range_is_refused(tiny_llava_path, layer):
    model = load_model(tiny_llava_path)
    with pytest.raises(ValueError, match=f"withdraw_layer must be an integer in 0..{NUM_LAYERS}"):
        VisualTokenWithdrawal(model, withdraw_layer=layer)


def test_reference_without_withdrawal_reproduces_the_model(model, processor):
    """Sanity check of the reference itself: keeping every token gives the model's logits."""
    inputs = encode(processor, [(QUESTION, 1)])
    full = model(**inputs, use_cache=False).logits
    for layer in range(NUM_LAYERS):
        keep = torch.ones_like(inputs["input_ids"][0], dtype=torch.bool)
        logits, _ = reference_vtw_logits(model, inputs, layer, keep=keep)
        assert_close(logits, full, SAME_ARITHMETIC)


@pytest.mark.parametrize("withdraw_layer", [NUM_LAYERS, None])
def test_no_withdrawal_is_bit_identical(model, processor, withdraw_layer):
    inputs = encode(processor, [(QUESTION, 1)])
    logits = model(**inputs).logits
    tokens = generate(model, inputs)
    vtw = VisualTokenWithdrawal(model, withdraw_layer=withdraw_layer)
    assert torch.equal(model(**inputs).logits, logits)
    assert torch.equal(generate(model, inputs), tokens)
    vtw.remove()


@pytest.mark.parametrize("num_images", [1, 2])
@pytest.mark.parametrize("withdraw_layer", range(NUM_LAYERS))  # K = L: test_no_withdrawal_is_bit_identical
def test_prefill_matches_naive_reference(model, processor, withdraw_layer, num_images):
    inputs = encode(processor, [(QUESTION, num_images)])
    expected, kept_positions = reference_vtw_logits(model, inputs, withdraw_layer)
    vtw = VisualTokenWithdrawal(model, withdraw_layer=withdraw_layer)
    logits = model(**inputs).logits
    vtw.remove()
    assert len(kept_positions) == inputs["input_ids"].shape[1] - 16 * num_images
    if withdraw_layer < NUM_LAYERS:
        assert logits.shape == expected.shape  # only kept positions leave the decoder
        assert vtw.plan.kept_positions[0].tolist() == kept_positions.tolist()
    else:  # no withdrawal: every position leaves the decoder
        logits = logits[:, kept_positions]
    assert_close(logits, expected, SAME_ARITHMETIC)


def test_withdrawal_changes_the_output(model, processor):
    """The reference test above could pass vacuously if the images did not matter."""
    inputs = encode(processor, [(QUESTION, 1)])
    full = model(**inputs).logits[:, -1]
    vtw = VisualTokenWithdrawal(model, withdraw_layer=0)
    assert not torch.allclose(model(**inputs).logits[:, -1], full, atol=GUARD)
    vtw.remove()


@pytest.mark.parametrize("withdraw_layer", [0, 1, 3])
def test_cached_generation_equals_recompute_from_scratch(model, processor, withdraw_layer):
    inputs = encode(processor, [(QUESTION, 2)])
    vtw = VisualTokenWithdrawal(model, withdraw_layer=withdraw_layer)
    cached = generate(model, inputs, use_cache=True, output_logits=True, return_dict_in_generate=True)

    sequence, step_logits = inputs["input_ids"], []
    for _ in range(6):  # a whole VTW forward over prompt + generated tokens, no cache
        mask = torch.ones_like(sequence)
        logits = model(
            input_ids=sequence, pixel_values=inputs["pixel_values"], attention_mask=mask, use_cache=False
        ).logits
        step_logits.append(logits[:, -1])
        sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    vtw.remove()

    assert torch.equal(cached.sequences, sequence)
    for got, want in zip(cached.logits, step_logits):
        assert_close(got, want, REORDERED)
    # What each layer's cache holds: every token below K, kept tokens only from K on.
    prompt_length, generated = inputs["input_ids"].shape[1], 5  # the last token is never fed back
    kept = prompt_length - 2 * 16
    for layer in range(NUM_LAYERS):
        expected = (prompt_length if layer < withdraw_layer else kept) + generated
        assert cache_in(cached).layers[layer].keys.shape[-2] == expected


def test_distinct_generations_across_layers(tiny_llava_path, processor):
    """Generation tests are only meaningful if K changes what is generated."""
    model = load_model(tiny_llava_path)
    inputs = encode(processor, [(QUESTION, 2)])
    vtw = VisualTokenWithdrawal(model, withdraw_layer=None)
    outputs = set()
    for layer in [None, 0, 1, 2, 3]:
        vtw.withdraw_layer = layer
        outputs.add(tuple(generate(model, inputs)[0].tolist()))
    assert len(outputs) > 1


@pytest.mark.parametrize("withdraw_layer", [0, 2, NUM_LAYERS])
def test_batch_equals_one_by_one(model, processor, withdraw_layer):
    """Rows of different lengths and image counts (left padding, spare slots) in one batch."""
    rows = [(QUESTION, 2), ("What colour is the square ?", 1), ("Is it big ?", 0), (QUESTION + " Answer yes or no", 1)]
    vtw = VisualTokenWithdrawal(model, withdraw_layer=withdraw_layer)
    batch_inputs = encode(processor, rows)
    batch = generate(model, batch_inputs, output_logits=True, return_dict_in_generate=True)
    prompt_length = batch_inputs["input_ids"].shape[1]
    for index, row in enumerate(rows):
        single_inputs = encode(processor, [row], seed=index)  # the same pictures as in the batch
        single = generate(model, single_inputs, output_logits=True, return_dict_in_generate=True)
        answer = single.sequences[0, single_inputs["input_ids"].shape[1] :].tolist()
        # A batch row that ended early is filled with the pad token (3).
        assert batch.sequences[index, prompt_length:].tolist() == answer + [3] * (6 - len(answer))
        assert_close(batch.logits[0][index], single.logits[0][0], REORDERED)
    vtw.remove()


def test_text_only_prompt_runs_unmodified(model, processor):
    inputs = encode(processor, [(QUESTION, 0)])
    logits = model(**inputs).logits
    tokens = generate(model, inputs)
    vtw = VisualTokenWithdrawal(model, withdraw_layer=1)
    assert torch.equal(model(**inputs).logits, logits)
    assert torch.equal(generate(model, inputs), tokens)
    vtw.remove()


@pytest.mark.parametrize("withdraw_layer", [0, 2])
def test_eager_and_sdpa_agree(tiny_llava_path, processor, withdraw_layer):
    inputs = encode(processor, [(QUESTION, 1), ("Is it big ?", 2)])
    results = []
    for implementation in ("eager", "sdpa"):
        model = load_model(tiny_llava_path, implementation)
        VisualTokenWithdrawal(model, withdraw_layer=withdraw_layer)
        results.append(generate(model, inputs, output_logits=True, return_dict_in_generate=True))
    assert torch.equal(results[0].sequences, results[1].sequences)
    for eager, sdpa in zip(results[0].logits, results[1].logits):
        assert_close(eager, sdpa, REORDERED)


@pytest.fixture(scope="module")
def tiny_llava_next(tmp_path_factory):
    from tiny_models import build_tiny_llava
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    path = build_tiny_llava(tmp_path_factory.mktemp("tiny_llava_next"), num_layers=NUM_LAYERS, any_resolution=True)
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return LlavaNextForConditionalGeneration.from_pretrained(path).eval(), processor


@pytest.mark.parametrize("withdraw_layer", range(NUM_LAYERS + 1))
def test_llava_next_any_resolution_matches_reference(tiny_llava_next, withdraw_layer):
    """LLaVA-NeXT: tiles of several sizes plus image-newline embeddings, all at image-token positions."""
    model, processor = tiny_llava_next
    inputs = encode(processor, [(QUESTION, 1)])  # a 40x30 picture: a 2x1 tile grid
    expected, kept_positions = reference_vtw_logits(model, inputs, withdraw_layer)
    vtw = VisualTokenWithdrawal(model, withdraw_layer=withdraw_layer)
    logits = model(**inputs).logits
    vtw.remove()
    assert (inputs["input_ids"] == model.config.image_token_id).sum() > 16  # more than one tile
    if withdraw_layer == NUM_LAYERS:
        logits = logits[:, kept_positions]
    assert_close(logits, expected, SAME_ARITHMETIC)
