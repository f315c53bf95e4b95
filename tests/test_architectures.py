"""The exactness suite on LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense, MoE) and Qwen3.5
(dense, MoE) tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import reference_vtw_logits, visual_ids
from tiny_models import (
    BUILDERS,
    MOE_BUILDERS,
    NUM_LAYERS,
    adapter_for,
    build_tiny_llava,
    build_tiny_qwen2_vl,
    build_tiny_qwen3,
    encode,
    picture,
    with_tokens,
    withdrawal,
)
from tolerances import GUARD, SAME_ARITHMETIC, assert_close, kl_tolerance, reordering_ulps
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from vtw_eval.architecture import Architecture, layer_types
from vtw_eval.cost import DecoderGeometry
from vtw_eval.engine import VisualTokenWithdrawal, cache_in
from vtw_eval.methods import Method, RandomVisualSubset, VisualCount

QUESTION = "Is there a red square in the image ?"


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny(request, tmp_path_factory):
    path = BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return request.param, path, processor


def load(path, attn_implementation: str = "sdpa"):
    return AutoModelForImageTextToText.from_pretrained(path, attn_implementation=attn_implementation).eval()


def numbered_as_generate_does(model, inputs: dict) -> dict:
    """A left-padded batch for a plain forward, its positions counted from each row's first real
    token as ``generate`` counts them, for the families whose positions are counted (Ministral 3
    scales queries by absolute position: numbering the padding would change a row's logits)."""
    if adapter_for(model).architecture.decoding_positions != "count":
        return inputs
    positions = inputs["attention_mask"].cumsum(-1) - 1
    return {**inputs, "position_ids": positions.masked_fill(inputs["attention_mask"] == 0, 0)}


def generate(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=3, **kwargs)


def test_no_withdrawal_is_bit_identical(tiny):
    _, path, processor = tiny
    model = load(path)
    inputs = encode(processor, [(QUESTION, 1)])
    logits, tokens = model(**inputs).logits, generate(model, inputs)
    for layer in (None, NUM_LAYERS):
        vtw = withdrawal(model, layer)
        assert torch.equal(model(**inputs).logits, logits)
        assert torch.equal(generate(model, inputs), tokens)
        vtw.remove()


@pytest.mark.parametrize("num_images, attn_implementation", [(1, "sdpa"), (2, "sdpa"), (2, "eager")])
def test_every_layer_matches_naive_reference(tiny, num_images, attn_implementation):
    _, path, processor = tiny
    model = load(path, attn_implementation)
    inputs = encode(processor, [(QUESTION, num_images)])
    assert torch.isin(inputs["input_ids"], torch.tensor(visual_ids(model.config))).sum() >= 4 * num_images
    last = []
    for layer in range(NUM_LAYERS):
        expected, kept_positions = reference_vtw_logits(model, inputs, layer)
        vtw = withdrawal(model, layer)
        logits = model(**inputs).logits
        vtw.remove()
        assert vtw.plan.kept_positions[0].tolist() == kept_positions.tolist()
        assert_close(logits, expected, SAME_ARITHMETIC)
        last.append(logits[0, -1])
    for earlier, later in zip(last, last[1:]):  # the guard: every K gives other logits
        assert (earlier - later).abs().max() > GUARD


@pytest.mark.parametrize("withdraw_layer", [0, 2])
def test_cached_generation_equals_recompute(tiny, withdraw_layer):
    """Proves the cache contents and the decoding positions (3-row for Qwen2-VL)."""
    _, path, processor = tiny
    model = load(path)
    inputs = encode(processor, [(QUESTION, 2)])
    vtw = withdrawal(model, withdraw_layer)
    # A random model may pick a visual token id; recomputing would then read it as an image.
    suppress = visual_ids(model.config)
    cached = generate(model, inputs, output_logits=True, return_dict_in_generate=True, suppress_tokens=suppress)
    sequence, step_logits = inputs["input_ids"], []
    for _ in range(5):
        logits = model(**with_tokens(inputs, sequence), use_cache=False).logits[:, -1]
        step_logits.append(logits)
        allowed = logits.clone()
        allowed[:, suppress] = -float("inf")
        sequence = torch.cat([sequence, allowed.argmax(-1, keepdim=True)], dim=1)
    vtw.remove()
    assert torch.equal(cached.sequences, sequence)
    for got, want in zip(cached.logits, step_logits):
        assert_close(got, want, reordering_ulps(model))
    # What each attention layer's cache holds: every token below K, kept tokens only from K on
    # (a recurrent layer's states have no length: recomputing above proves what they saw).
    prompt_length = inputs["input_ids"].shape[1]
    visual = int(torch.isin(inputs["input_ids"], torch.tensor(suppress)).sum())
    config = model.config.get_text_config()
    producers = adapter_for(model).architecture.key_producers(config)
    for layer, kind in enumerate(layer_types(config)):
        if kind == "linear_attention" or producers[layer] is not None:  # a KV-shared layer caches nothing
            continue
        expected = (prompt_length if layer < withdraw_layer else prompt_length - visual) + 4  # last token not fed back
        if kind == "sliding_attention":  # a sliding layer keeps its last window - 1 slots
            expected = min(expected, config.sliding_window - 1)
        if kind == "chunked_attention":  # and a chunked one its last chunk - 1 (Llama 4)
            expected = min(expected, config.attention_chunk_size - 1)
        assert cache_in(cached).layers[layer].keys.shape[-2] == expected


@pytest.mark.parametrize("withdraw_layer", [0, 2])
def test_batch_equals_one_by_one(tiny, withdraw_layer):
    _, path, processor = tiny
    model = load(path)
    withdrawal(model, withdraw_layer)
    # Rows with different numbers and sizes of images keep different numbers of tokens.
    rows = [(QUESTION, 2), ("What colour is it ?", 1), ("Is it big ?", 0), ("Is there a circle ?", 1)]
    sizes = [(40, 30), (128, 128), (40, 30), (30, 60)]
    batch_inputs = encode(processor, rows, sizes=sizes)
    visual = torch.isin(batch_inputs["input_ids"], torch.tensor(visual_ids(model.config))).sum(1)
    assert len(set(visual.tolist())) >= 3 and visual[2] == 0  # rows withdraw different numbers of tokens
    batch = generate(model, batch_inputs, output_logits=True, return_dict_in_generate=True)
    for index, row in enumerate(rows):
        single_inputs = encode(processor, [row], seed=index, sizes=[sizes[index]])
        single = generate(model, single_inputs, output_logits=True, return_dict_in_generate=True)
        answer = single.sequences[0, single_inputs["input_ids"].shape[1] :].tolist()
        assert batch.sequences[index, batch_inputs["input_ids"].shape[1] :].tolist() == answer + [3] * (5 - len(answer))
        assert_close(batch.logits[0][index], single.logits[0][0], reordering_ulps(model))


def test_qwen2_vl_video_frames(tmp_path):
    """Video pad tokens are withdrawn too; kept tokens keep their 3-D positions."""
    path = build_tiny_qwen2_vl(tmp_path / "qwen2_vl", "2")
    processor = AutoProcessor.from_pretrained(path)
    model = load(path)
    frames = np.stack([np.asarray(picture(seed).resize((56, 56))) for seed in range(4)])
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True,
    )
    inputs = dict(processor(videos=[frames], text=[text], return_tensors="pt"))
    assert (inputs["input_ids"] == model.config.video_token_id).sum() > 0
    for layer in (0, 2):
        expected, _ = reference_vtw_logits(model, inputs, layer)
        vtw = withdrawal(model, layer)
        assert_close(model(**inputs).logits, expected, SAME_ARITHMETIC)
        vtw.remove()


def test_one_pass_calibration_equals_reference(tiny):
    """The one-pass per-layer KL uses the positions the model gives its layers (3-row for Qwen)."""
    from vtw_eval.calibration import layer_kl_divergences

    _, path, processor = tiny
    model = load(path)
    inputs = encode(processor, [(QUESTION, 2)])
    kl = layer_kl_divergences(withdrawal(model, None), inputs)[0]
    log_p_full = torch.log_softmax(model(**inputs).logits[0, -1], -1)
    for layer in range(NUM_LAYERS):
        logits, _ = reference_vtw_logits(model, inputs, layer)
        log_p = torch.log_softmax(logits[0, -1], -1)
        expected = float((log_p.exp() * (log_p - log_p_full)).sum().detach())
        assert kl[layer].item() == pytest.approx(expected, abs=kl_tolerance(logits, SAME_ARITHMETIC))


def test_kl_over_the_greedy_answer_equals_reference(tiny):
    """kl_tokens=3 on every architecture: the answer appended to the multimodal inputs (Qwen's
    rotary positions follow it), the KL per position against a naive withdrawn forward."""
    from vtw_eval.calibration import layer_kl_divergences, with_greedy_answer

    _, path, processor = tiny
    model = load(path)
    inputs = encode(processor, [(QUESTION, 1)])
    extended, counted = with_greedy_answer(withdrawal(model, None), inputs, 3, eos_token_id=-1)  # no EOS: all count
    assert counted.shape == (1, 3) and counted.all()
    with torch.no_grad():  # the unmodified model's own greedy answer
        answer = model.generate(
            **inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=3,
            suppress_tokens=visual_ids(model.config),
        )  # fmt: skip
    assert torch.equal(extended["input_ids"], answer)
    kl = layer_kl_divergences(withdrawal(model, None), extended, counted)[0]
    with torch.no_grad():
        log_p_full = torch.log_softmax(model(**extended).logits[0, -3:], -1)
    for layer in range(NUM_LAYERS):
        logits, _ = reference_vtw_logits(model, extended, layer)
        log_p = torch.log_softmax(logits[0, -3:], -1)
        expected = float((log_p.exp() * (log_p - log_p_full)).sum(-1).mean())
        assert kl[layer].item() == pytest.approx(expected, abs=kl_tolerance(logits, SAME_ARITHMETIC))


def test_qwen3_vl_deepstack_features_before_k_count(tmp_path):
    """DeepStack adds ViT features after decoder layers 0, 1, 2. Withdrawal at K keeps those
    before K (dropping them all would change the answer: the guard) and runs for K = 0..3."""
    path = build_tiny_qwen3(tmp_path / "qwen3_vl", "qwen3_vl")
    processor = AutoProcessor.from_pretrained(path)
    model = load(path)
    inputs = encode(processor, [(QUESTION, 2)])

    def without_deepstack(module, args, kwargs):
        return args, {**kwargs, "deepstack_visual_embeds": None}

    for layer in range(4):
        vtw = withdrawal(model, layer)
        with_features = model(**inputs).logits
        handle = model.model.language_model.register_forward_pre_hook(without_deepstack, with_kwargs=True)
        dropped = model(**inputs).logits
        handle.remove()
        vtw.remove()
        expected, _ = reference_vtw_logits(model, inputs, layer)
        assert_close(with_features, expected, SAME_ARITHMETIC)
        if layer >= 2:  # an injection before layer K-1 reaches the text through layers < K
            assert (with_features - dropped).abs().max() > GUARD, layer
        else:  # K <= 1: no injection reaches a kept token
            assert_close(with_features, dropped, SAME_ARITHMETIC)


def test_an_undeclared_layer_type_is_refused(tmp_path):
    """Layer kinds come from the adapter: Qwen3.5 without its recurrent type declared is refused
    before any forward, not masked like an attention layer."""
    model = load(build_tiny_qwen3(tmp_path / "qwen3_5", "qwen3_5"))
    with pytest.raises(
        ValueError, match=r"decoder layer 0 of Qwen3_5ForConditionalGeneration is of type 'linear_attention'"
    ):
        VisualTokenWithdrawal(model, 2, Architecture("from_attention_mask"))
    declared = Architecture("from_attention_mask", recurrent_layer_types=("linear_attention",))
    assert VisualTokenWithdrawal(model, 2, declared).num_layers == NUM_LAYERS


@pytest.mark.parametrize("family", ["mistral", "gemma3", "llama4"])
def test_sliding_window_counts_original_positions(tmp_path, family):
    """A window of 8 over a prompt whose visual tokens sit between its text: after withdrawal a
    query sees the keys within 8 original positions, not 8 kept tokens (which would reach text
    beyond the window: the guard, that the two differ here). Gemma 3: layers 0-2 slide. Llama 4:
    layers 0-2 attend within chunks of 8 original positions, and layer 3 scales its queries by
    their original position, not by their count of kept tokens."""
    if family == "mistral":
        path = build_tiny_llava(tmp_path / family, sliding_window=("mistral", 8))
    else:
        path = BUILDERS[family](tmp_path / family)
    model, processor = load(path), AutoProcessor.from_pretrained(path)
    inputs = encode(processor, [("Is there a red square in the image ? Answer yes or no .", 2)])
    # Llama 4 at K=3: only its NoPE layer runs withdrawn, so only the query scale can differ.
    for layer in (0, 2, 3) if family == "llama4" else (0, 2):
        by_position, _ = reference_vtw_logits(model, inputs, layer)
        by_slot, _ = reference_vtw_logits(model, inputs, layer, window_counts="slots")
        assert (by_position - by_slot).abs().max() > 1e-3
        vtw = withdrawal(model, layer)
        assert_close(model(**inputs).logits, by_position, SAME_ARITHMETIC)
        vtw.remove()


@pytest.mark.parametrize("keep_ratio", [0.25, 0.5])
def test_random_subsets_match_the_reference(tiny, keep_ratio):
    """method=random on every family: each row keeps its seeded share of visual tokens from
    prune_layer on; the engine equals the reference withdrawing that subset, a batch with 0, 1 and
    2 images equals one by one, and cached decoding equals recomputing."""
    _, path, processor = tiny
    model = load(path)
    selector = RandomVisualSubset(seed=0, count=VisualCount(keep_ratio))
    rows = [(QUESTION, 2), ("What colour is it ?", 1), ("Is it big ?", 0)]
    keys = [("task", doc_id) for doc_id in range(len(rows))]
    vtw = withdrawal(model, 2, keep_selector=selector)
    singles = []
    for index, row in enumerate(rows):
        inputs = encode(processor, [row], seed=index)
        selector.rows = [keys[index]]
        with torch.no_grad():
            singles.append(model(**inputs).logits[0, -1])
        if row[1]:
            visual = torch.isin(inputs["input_ids"], torch.tensor(visual_ids(model.config)))
            kept = visual & selector(visual, None, None)
            assert int(kept.sum()) == round(keep_ratio * int(visual.sum())) > 0
            vtw.remove()
            expected, _ = reference_vtw_logits(model, inputs, 2, keep=selector(visual, None, None)[0])
            vtw = withdrawal(model, 2, keep_selector=selector)
            with torch.no_grad():
                assert_close(model(**inputs).logits, expected, SAME_ARITHMETIC)
    selector.rows = keys
    with torch.no_grad():
        batch = model(**numbered_as_generate_does(model, encode(processor, rows))).logits[:, -1]
    for index, single in enumerate(singles):
        assert_close(batch[index], single, reordering_ulps(model))
    inputs = encode(processor, rows[:1])
    selector.rows = keys[:1]
    suppress = visual_ids(model.config)
    cached = generate(model, inputs, output_logits=True, return_dict_in_generate=True, suppress_tokens=suppress)
    sequence = inputs["input_ids"]
    for step in range(3):
        with torch.no_grad():
            logits = model(**with_tokens(inputs, sequence), use_cache=False).logits[:, -1]
        assert_close(cached.logits[step], logits, reordering_ulps(model))
        logits[:, suppress] = -float("inf")
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    vtw.remove()
    assert torch.equal(cached.sequences[:, : sequence.shape[1]], sequence)


def fastv_method(path, keep_ratio: float) -> Method:
    text_config = AutoConfig.from_pretrained(path).get_text_config()
    return Method.from_arguments("fastv", 2, keep_ratio, None, None, None, text_config)


def top_visual(scores: torch.Tensor, visual: torch.Tensor, count: int) -> set[int]:
    positions = visual.nonzero()[:, 0]
    return set(positions[scores[positions].argsort(descending=True, stable=True)[:count]].tolist())


@pytest.mark.parametrize("keep_ratio", [0.25, 0.5])
def test_fastv_ranks_by_eager_attention_and_matches_the_reference(tiny, keep_ratio):
    """method=fastv on every family whose layer 1 attends (Qwen3.5's is a Gated DeltaNet layer:
    refused by name): the last query's head-mean weights of layer 1, recomputed under sdpa, equal
    eager attention's; each row keeps its top visual tokens by them from layer 2 on; the engine
    equals the reference withdrawing that subset; a batch with 0, 1 and 2 images equals one by one;
    cached decoding equals recomputing with the prompt's subset."""
    family, path, processor = tiny
    if family.startswith("qwen3_5"):
        with pytest.raises(ValueError, match=r"layer 1 is linear_attention; prune_layer values .*: none in this model"):
            fastv_method(path, keep_ratio)
        return
    if family.startswith(("llama4", "gemma4")):  # their attentions are not recomputed (docs/methods)
        with pytest.raises(ValueError, match=rf"method=fastv does not know how a '{family[:6]}_text' text model"):
            fastv_method(path, keep_ratio)
        return
    model, eager = load(path), load(path, "eager")
    selector = fastv_method(path, keep_ratio).keep_selector(DecoderGeometry.from_config(model.config))
    vtw = withdrawal(model, 2, keep_selector=selector)
    rows = [(QUESTION, 2), ("What colour is it ?", 1), ("Is it big ?", 0)]
    singles = []
    for index, row in enumerate(rows):
        inputs = encode(processor, [row], seed=index)
        with torch.no_grad():
            singles.append(model(**inputs).logits[0, -1])
            expected_scores = eager(**inputs, output_attentions=True).attentions[1][0, :, -1].mean(0)
        if not row[1]:
            continue
        scores = selector.used_scores[0]
        assert_close(scores, expected_scores, reordering_ulps(model))
        visual = torch.isin(inputs["input_ids"][0], torch.tensor(visual_ids(model.config)))
        count = round(keep_ratio * int(visual.sum()))
        kept = top_visual(scores, visual, count)
        assert kept == top_visual(expected_scores, visual, count)  # eager ranks them the same
        keep = ~visual
        keep[list(kept)] = True
        vtw.remove()
        expected, _ = reference_vtw_logits(model, inputs, 2, keep=keep)
        with torch.no_grad():
            unpruned = model(**inputs).logits
        vtw = withdrawal(model, 2, keep_selector=selector)
        with torch.no_grad():
            assert_close(model(**inputs).logits, expected, SAME_ARITHMETIC)
        assert (expected[0, -1] - unpruned[0, -1]).abs().max() > GUARD  # the withdrawal changes the answer
    with torch.no_grad():
        batch = model(**numbered_as_generate_does(model, encode(processor, rows))).logits[:, -1]
    for index, single in enumerate(singles):
        assert_close(batch[index], single, reordering_ulps(model))
    # Decoding continues with the prompt's subset: each step equals the reference given that subset.
    inputs = encode(processor, rows[:1])
    suppress = visual_ids(model.config)
    cached = generate(model, inputs, output_logits=True, return_dict_in_generate=True, suppress_tokens=suppress)
    visual = torch.isin(inputs["input_ids"][0], torch.tensor(suppress))
    keep = ~visual
    keep[list(top_visual(selector.used_scores[0], visual, round(keep_ratio * int(visual.sum()))))] = True
    vtw.remove()
    sequence = inputs["input_ids"]
    for step in range(3):
        extended = torch.cat([keep, torch.ones(step, dtype=torch.bool)])
        logits, _ = reference_vtw_logits(model, with_tokens(inputs, sequence), 2, keep=extended)
        assert_close(cached.logits[step], logits[:, -1], reordering_ulps(model))
        logits = logits[:, -1].clone()
        logits[:, suppress] = -float("inf")
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached.sequences[:, : sequence.shape[1]], sequence)


def test_fastv_and_random_keep_other_tokens_and_give_other_logits(tiny):
    """The guard: at the same ratio, FastV's subset is not random's, and the logits differ."""
    family, path, processor = tiny
    if family.startswith(("qwen3_5", "llama4", "gemma4")):
        pytest.skip("FastV is refused on Qwen3.5's, Llama 4's and Gemma 4's tiny models (test above)")
    model = load(path)
    inputs = encode(processor, [(QUESTION, 2)])
    random = RandomVisualSubset(seed=0, count=VisualCount(0.25))
    random.rows = [("task", 0)]
    logits, plans = [], []
    for selector in (random, fastv_method(path, 0.25).keep_selector(DecoderGeometry.from_config(model.config))):
        vtw = withdrawal(model, 2, keep_selector=selector)
        with torch.no_grad():
            logits.append(model(**inputs).logits[0, -1])
        plans.append(vtw.plan.kept_positions.clone())
        vtw.remove()
    assert not torch.equal(plans[0], plans[1])
    assert (logits[0] - logits[1]).abs().max() > GUARD


@pytest.mark.parametrize("withdraw_layer", [1, 3])
def test_gemma4_kv_shared_layers_in_generation(tmp_path, withdraw_layer):
    """Gemma 4's layers 2 and 3 read the keys layers 0 and 1 stored. K = 1: layer 2 reads layer 0's
    keys of every token with the visual ones masked, layer 3 layer 1's kept tokens; K = 3: the first
    withdrawn layer is a KV-shared one. In generate's prefill transformers runs those layers on the
    last position only; every step's logits equal the reference's over the sequence so far."""
    path = BUILDERS["gemma4"](tmp_path / "gemma4")
    model, processor = load(path), AutoProcessor.from_pretrained(path)
    assert adapter_for(model).architecture.key_producers(model.config.get_text_config()) == [None, None, 0, 1]
    inputs = encode(processor, [(QUESTION, 2)])
    vtw = withdrawal(model, withdraw_layer)
    suppress = visual_ids(model.config)
    cached = generate(model, inputs, output_logits=True, return_dict_in_generate=True, suppress_tokens=suppress)
    vtw.remove()
    for step, logits in enumerate(cached.logits):
        sequence = cached.sequences[:, : inputs["input_ids"].shape[1] + step]
        expected, _ = reference_vtw_logits(model, with_tokens(inputs, sequence), withdraw_layer)
        assert_close(logits[0], expected[0, -1], reordering_ulps(model))


def test_gemma4_inputs_cut_to_withdrawn_positions_are_refused(tmp_path):
    """A forward that keeps the logits of the last n positions has transformers cut the KV-shared
    layers' inputs to them (under eager attention; sdpa without padding does not cut for n > 1):
    fine while they are all kept (they equal the reference's), refused by name once they reach a
    withdrawn one."""
    path = BUILDERS["gemma4"](tmp_path / "gemma4")
    model, processor = load(path, "eager"), AutoProcessor.from_pretrained(path)
    inputs = encode(processor, [(QUESTION, 1)])
    expected, _ = reference_vtw_logits(model, inputs, 1)
    withdrawal(model, 1)
    with torch.no_grad():
        assert_close(model(**inputs, logits_to_keep=3).logits, expected[:, -3:], SAME_ARITHMETIC)
        with pytest.raises(ValueError, match=r"last \d+ prompt positions, and some of them are withdrawn"):
            model(**inputs, logits_to_keep=inputs["input_ids"].shape[1] - 1)


def test_gemma4_moe_matches_the_reference(tmp_path):
    """Gemma 4's MoE variant (26B-A4B-like: experts beside the MLP, the full layers' values equal to
    their keys, image tokens attending to each other in prefill; no per-layer inputs or KV sharing):
    every K equals the reference and gives other logits than the next, and cached generation at
    K = 2 the reference over the sequence so far at every step."""
    path = MOE_BUILDERS["gemma4_moe"](tmp_path / "gemma4_moe")
    model, processor = load(path), AutoProcessor.from_pretrained(path)
    inputs = encode(processor, [(QUESTION, 2)])
    last = []
    for layer in range(NUM_LAYERS):
        expected, _ = reference_vtw_logits(model, inputs, layer)
        vtw = withdrawal(model, layer)
        with torch.no_grad():
            logits = model(**inputs).logits
        vtw.remove()
        assert_close(logits, expected, SAME_ARITHMETIC)
        last.append(logits[0, -1])
    for earlier, later in zip(last, last[1:]):
        assert (earlier - later).abs().max() > GUARD
    vtw = withdrawal(model, 2)
    suppress = visual_ids(model.config)
    cached = generate(model, inputs, output_logits=True, return_dict_in_generate=True, suppress_tokens=suppress)
    vtw.remove()
    for step, logits in enumerate(cached.logits):
        sequence = cached.sequences[:, : inputs["input_ids"].shape[1] + step]
        expected, _ = reference_vtw_logits(model, with_tokens(inputs, sequence), 2)
        assert_close(logits[0], expected[0, -1], reordering_ulps(model))
