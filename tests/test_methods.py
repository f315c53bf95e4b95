"""method=random, the control for VTW: arguments, the same subset for a doc in any batch and rerun,
other seeds other subsets, and what the records and vtw-diff say about it."""

from __future__ import annotations

import json

import pytest
import torch
from backend_requests import docs, generation_requests
from reference import visual_ids

from vtw_eval.backends.llava import VTWLlava
from vtw_eval.backends.requests import Request
from vtw_eval.methods import RandomVisualSubset, VisualCount, subset_seed
from vtw_eval.results import load_run
from vtw_eval.run import run_lmms_eval


def random_backend(path, batch_size=1, seed=0, tmp=None, **kwargs):
    """``method=random`` on the tiny LLaVA, keeping half of each row's visual tokens unless told."""
    kwargs = ({} if "match_withdraw_layer" in kwargs else {"keep_ratio": 0.5}) | kwargs
    lm = VTWLlava(
        pretrained=str(path), device="cpu", batch_size=batch_size, method="random", seed=seed,
        accounting_file=f"{tmp or path}/accounting_{batch_size}_{seed}.jsonl", **kwargs,
    )  # fmt: skip
    lm.task_dict = {"tiny": {"test": docs()}}
    return lm


@pytest.mark.parametrize(
    "model_args, message",
    [
        ("method=fast", r"method='fast' is not accepted; use one of vtw, random, fastv"),
        ("method=fastv", r"method=fastv needs one of keep_ratio .* and match_withdraw_layer"),
        ("method=fastv,keep_ratio=0.5,seed=1", r"seed=1 with method=fastv: its subset is ranked by attention"),
        ("method=fastv,keep_ratio=0.5,prune_layer=0", r"there is no layer before it; prune_layer .*: \[1, 2, 3\]"),
        ("method=fastv,keep_ratio=0.5,withdraw_layer=2", r"withdraw_layer=2 with method=fastv"),
        ("method=random", r"method=random needs one of keep_ratio .* and match_withdraw_layer"),
        ("method=random,keep_ratio=0.5,match_withdraw_layer=3", r"method=random needs one of keep_ratio"),
        ("method=random,match_withdraw_layer=1", r"match_withdraw_layer=1 is not accepted; use an integer from 2"),
        ("method=random,keep_ratio=1", r"keep_ratio=1 is not accepted; use a number between 0 and 1"),
        ("method=random,keep_ratio=0.5,prune_layer=4", r"prune_layer=4 is not accepted; use an integer from 0 to 3"),
        ("method=random,keep_ratio=0.5,withdraw_layer=auto", r"withdraw_layer='auto' with method=random"),
        ("method=random,keep_ratio=0.5,withdraw_layer=2", r"withdraw_layer=2 with method=random"),
        ("keep_ratio=0.5", r"keep_ratio choose the subset of method=random or fastv; with method=vtw"),
        ("withdraw_layer=2,seed=3", r"seed choose the subset of method=random or fastv"),
        ("match_withdraw_layer=2", r"match_withdraw_layer choose the subset of method=random or fastv"),
    ],
)
def test_arguments_are_checked_together(tiny_llava_path, model_args, message):
    with pytest.raises(ValueError, match=message):
        VTWLlava.create_from_arg_string(f"pretrained={tiny_llava_path},device=cpu,{model_args}")


def test_a_docs_subset_is_its_own_in_any_batch_and_rerun(tiny_llava_path, tmp_path):
    one = random_backend(tiny_llava_path, tmp=tmp_path).generate_until(generation_requests())
    assert random_backend(tiny_llava_path, batch_size=3, tmp=tmp_path).generate_until(generation_requests()) == one
    assert random_backend(tiny_llava_path, tmp=tmp_path).generate_until(generation_requests()) == one
    records = [json.loads(line) for line in (tmp_path / "accounting_1_0.jsonl").read_text().splitlines()]
    by_doc = {record["doc_id"]: record for record in records}
    assert {record["method"] for record in records} == {"random"}
    assert {(record["keep_ratio"], record["seed"], record["withdraw_layer"]) for record in records} == {(0.5, 0, 2)}
    # Doc 3 has two images of 16 tokens each: it keeps 16 of 32 from layer 2 of 4 on.
    assert by_doc[3]["visual_tokens"] == 32 and by_doc[3]["kept_tokens"] == by_doc[3]["prompt_tokens"] - 16
    assert by_doc[3]["visual_tokens_per_layer"] == (2 * 32 + 2 * 16) / 4
    assert by_doc[2]["visual_tokens"] == 0 and by_doc[2]["kept_tokens"] == by_doc[2]["prompt_tokens"]  # text only


def test_other_seeds_keep_other_tokens_and_give_other_logits(tiny_llava_path):
    visual_mask = torch.zeros(1, 40, dtype=torch.bool)
    visual_mask[0, 5:37] = True
    subsets = []
    for seed in (0, 1):
        selector = RandomVisualSubset(seed, VisualCount(0.5))
        selector.rows = [("tiny", 3)]
        subsets.append(selector(visual_mask, None, None))
        assert int((subsets[-1] & visual_mask).sum()) == 16 and subsets[-1][~visual_mask].all()
    assert not torch.equal(subsets[0], subsets[1])
    assert subset_seed(0, "tiny", 3) != subset_seed(0, "tiny", 4)  # and other docs too
    logits = []
    for seed in (0, 1):
        lm = random_backend(tiny_llava_path, seed=seed)
        inputs = lm.batch_inputs([Request.of(generation_requests()[3])])  # doc 3: two images
        lm.withdrawal.keep_selector.rows = [("tiny", 3)]
        with torch.no_grad():
            logits.append(lm.model(**inputs).logits[0, -1])
        assert int(torch.isin(inputs["input_ids"], torch.tensor(visual_ids(lm.model.config))).sum()) == 32
    assert (logits[0] - logits[1]).abs().max() > 1e-4  # the guard: the kept tokens matter


@pytest.mark.cli
def test_through_the_cli_records_and_label_say_random(tiny_llava_path, tmp_path):
    accounting = tmp_path / "requests.jsonl"
    results_file = run_lmms_eval(
        "vtw_llava",
        f"pretrained={tiny_llava_path},device=cpu,method=random,keep_ratio=0.25,prune_layer=1,seed=7,"
        f"accounting_file={accounting}",
        "vtw_tiny_mme", tmp_path, "--batch_size", "4",
    )  # fmt: skip
    records = [json.loads(line) for line in accounting.read_text().splitlines()]
    assert len(records) == 16 and {(r["method"], r["keep_ratio"], r["seed"], r["withdraw_layer"]) for r in records} == {
        ("random", 0.25, 7, 1)
    }
    assert all(r["kept_tokens"] == r["prompt_tokens"] - 12 for r in records)  # 12 of each image's 16 tokens go
    throughput = json.loads(results_file.read_text())["throughput"]
    assert throughput["avg_visual_tokens_per_layer"] == pytest.approx((1 * 16 + 3 * 4) / 4)
    assert load_run(results_file).label == "vtw_llava random p=1 keep=0.25 seed=7"


def test_matched_compute_by_hand():
    """LLaVA-1.5-7B, 651 tokens of which 576 visual: random at prune_layer 2 keeps the count whose
    decoder prefill is nearest VTW's at K=16 (the layer count of tests/test_cost.py by hand)."""
    from vtw_eval.cost import DecoderGeometry
    from vtw_eval.methods import MatchedCompute

    def layer(n):
        return 8 * n * 4096**2 + 6 * n * 4096 * 11008 + 4 * n * n * 4096

    geometry = DecoderGeometry(32, 4096, 11008, 32, 32, 128)
    target = 16 * layer(651) + 16 * layer(75)
    flops = [2 * layer(651) + 30 * layer(75 + kept) for kept in range(577)]
    best = min(range(577), key=lambda kept: abs(flops[kept] - target))
    assert MatchedCompute(geometry, 2, 16).kept(651, 576) == best
    assert flops[best] <= target <= flops[best + 1] or flops[best - 1] <= target <= flops[best]  # within a token
    assert 200 < best < 576 * 16 / 30  # keeps fewer than K's share of layer passes, as the quadratic term costs
    assert MatchedCompute(geometry, 2, 32).kept(651, 576) == 576 and MatchedCompute(geometry, 2, 2).kept(651, 576) == 0


def test_matched_compute_records_vtws_flops_and_the_real_cache(tiny_llava_path, tmp_path):
    """Through the backend: each request's prefill FLOPs within one token of VTW's at the matched
    K for that prompt; the decoder's FLOPs as torch counts them; its cache bytes the real cache's."""
    import re

    from torch.utils.flop_counter import FlopCounterMode

    from vtw_eval.engine import cache_bytes, cache_in

    # eager attention: torch's counter sees its matrix products (sdpa's it does not count)
    lm = random_backend(
        tiny_llava_path, tmp=tmp_path, match_withdraw_layer=3, prune_layer=1, attn_implementation="eager"
    )
    caches = []
    lm.model.register_forward_pre_hook(lambda m, a, kw: caches.append(cache_in(kw)), with_kwargs=True)
    geometry, kept_counts = lm.geometry, []
    for request in [generation_requests()[doc] for doc in (0, 1, 3)]:  # one image, another, two
        lm.generate_until([request])
        (record,) = [json.loads(line) for line in (tmp_path / "accounting_1_0.jsonl").read_text().splitlines()]
        assert record["kv_cache_bytes_vtw"] == cache_bytes(caches[-1])  # after the last step's input
        n, visual = record["prompt_tokens"], record["visual_tokens"]
        removed = n - record["kept_tokens"]
        kept_counts.append(visual - removed)
        assert record["match_withdraw_layer"] == 3 and record["withdraw_layer"] == 1
        target = geometry.prefill_flops(n, visual, 3)
        one_token = geometry.prefill_flops(n, removed - 1, 1) - geometry.prefill_flops(n, removed, 1)
        assert abs(record["prefill_flops_vtw"] - target) <= one_token
        lm.withdrawal.keep_selector.rows = [(request.args[4], request.args[3])]
        with FlopCounterMode(display=False, depth=10) as counter, torch.no_grad():
            lm.model(**lm.batch_inputs([Request.of(request)]), use_cache=False, logits_to_keep=1)
        flops = counter.get_flop_counts()
        decoder = sum(sum(flops[name].values()) for name in flops if re.search(r"language_model\.layers\.\d+$", name))
        assert decoder == geometry.prefill_flops(n, removed, 1) == record["prefill_flops_vtw"]
    assert 0 < kept_counts[0] < 16 and kept_counts[2] > kept_counts[0]  # a share of the visual tokens stays


def fastv_backend(path, tmp, **kwargs):
    lm = VTWLlava(pretrained=str(path), device="cpu", method="fastv", accounting_file=f"{tmp}/fastv.jsonl", **kwargs)
    lm.task_dict = {"tiny": {"test": docs()}}
    return lm


def test_fastv_records_its_flops_with_the_ranking_and_the_real_cache(tiny_llava_path, tmp_path):
    """Through the backend (eager attention, so that torch's counter sees every product): each
    request's decoder prefill FLOPs, the ranking's extra pass over layer prune_layer - 1 included,
    equal torch's count; its cache bytes the real cache's; it keeps round(keep_ratio * n) tokens."""
    import re

    from torch.utils.flop_counter import FlopCounterMode

    from vtw_eval.engine import cache_bytes, cache_in

    lm = fastv_backend(tiny_llava_path, tmp_path, keep_ratio=0.25, prune_layer=2, attn_implementation="eager")
    caches = []
    lm.model.register_forward_pre_hook(lambda m, a, kw: caches.append(cache_in(kw)), with_kwargs=True)
    for request in [generation_requests()[doc] for doc in (0, 3)]:  # one image (16 tokens), two
        lm.generate_until([request])
        record = json.loads((tmp_path / "fastv.jsonl").read_text().splitlines()[-1])
        assert (record["method"], record["prune_layer"], record["keep_ratio"]) == ("fastv", 2, 0.25)
        assert "seed" not in record and record["kv_cache_bytes_vtw"] == cache_bytes(caches[-1])
        n, visual = record["prompt_tokens"], record["visual_tokens"]
        assert record["kept_tokens"] == n - (visual - round(0.25 * visual))
        assert record["prefill_flops_scoring"] == lm.geometry.last_query_scoring_flops(n) > 0
        with FlopCounterMode(display=False, depth=10) as counter, torch.no_grad():
            lm.model(**lm.batch_inputs([Request.of(request)]), use_cache=False, logits_to_keep=1)
        flops = counter.get_flop_counts()
        decoder = sum(sum(flops[name].values()) for name in flops if re.search(r"language_model\.layers\.\d+$", name))
        assert decoder == record["prefill_flops_vtw"]
        assert record["prefill_flops_scoring"] < 0.05 * record["prefill_flops_vtw"]  # the ranking is cheap


@pytest.mark.cli
def test_fastv_through_the_cli_records_and_label(tiny_llava_path, tmp_path):
    accounting = tmp_path / "requests.jsonl"
    results_file = run_lmms_eval(
        "vtw_llava",
        f"pretrained={tiny_llava_path},device=cpu,method=fastv,match_withdraw_layer=3,prune_layer=1,"
        f"accounting_file={accounting}",
        "vtw_tiny_mme", tmp_path, "--batch_size", "4",
    )  # fmt: skip
    records = [json.loads(line) for line in accounting.read_text().splitlines()]
    assert len(records) == 16 and {(r["method"], r["match_withdraw_layer"], r["withdraw_layer"]) for r in records} == {
        ("fastv", 3, 1)
    }
    assert load_run(results_file).label == "vtw_llava fastv p=1 matched K=3"
