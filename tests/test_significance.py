"""vtw-diff's paired tests against independent computations: scipy.stats on hand-made per-doc data,
a plain-loop bootstrap, MME's and POPE's aggregates by hand on resamples, and the CLI on results
and samples files in lmms-eval's layout."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
from lmms_eval.tasks.mme.utils import mme_aggregate_results
from lmms_eval.tasks.pope.utils import pope_aggregate_f1_score
from scipy import stats

from vtw_eval.diff import main
from vtw_eval.significance import (
    MEAN,
    _clusters,
    _resample,
    holm,
    mcnemar_p,
    paired_bootstrap,
    paired_mean_test,
    resample_draws,
)

pytestmark = pytest.mark.smoke
# Sums of a few hundred float64 terms in another order (numpy's pairwise sums against a Python
# loop): rounding of order 1e-16 per term, so 1e-12 is far above it and far below any real effect.
SUMMATION = 1e-12


def binary_pair(n: int, worse: int, better: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """0/1 scores of a baseline and a candidate with ``worse`` right->wrong and ``better`` wrong->right docs."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2, n).astype(float)
    candidate = base.copy()
    right, wrong = np.flatnonzero(base == 1), np.flatnonzero(base == 0)
    candidate[right[:worse]] = 0
    candidate[wrong[:better]] = 1
    return base, candidate


@pytest.mark.parametrize("worse, better", [(0, 0), (3, 1), (12, 2), (40, 35), (1, 30)])
def test_mcnemar_is_scipy_binomtest_and_the_interval_is_ttest_rel(worse, better):
    base, candidate = binary_pair(200, worse, better)
    outcome = paired_mean_test(base, candidate, 0.05)
    assert outcome.test == "McNemar exact"
    expected = 1.0 if worse + better == 0 else stats.binomtest(better, worse + better, 0.5).pvalue
    assert outcome.p_value == pytest.approx(expected, rel=1e-12)
    assert outcome.difference == pytest.approx((better - worse) / 200, abs=SUMMATION)
    if worse + better:
        low, high = stats.ttest_rel(candidate, base).confidence_interval(0.95)
        assert outcome.interval == pytest.approx((low, high), abs=SUMMATION)


def test_paired_t_is_scipy_ttest_rel():
    rng = np.random.default_rng(3)
    base = rng.uniform(0, 1, 150)
    candidate = base + rng.normal(-0.05, 0.2, 150)
    outcome = paired_mean_test(base, candidate, 0.05)
    reference = stats.ttest_rel(candidate, base)
    assert outcome.test == "paired t"
    assert outcome.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    assert outcome.interval == pytest.approx(tuple(reference.confidence_interval(0.95)), abs=SUMMATION)
    # a permutation test (random sign flips of the differences) agrees within its Monte Carlo error
    permuted = stats.permutation_test(
        (candidate - base,), np.mean, permutation_type="samples", n_resamples=20000, random_state=0
    )
    assert abs(permuted.pvalue - outcome.p_value) < 0.01
    # 80% power: (z_0.975 + z_0.8) standard errors of the mean difference, by hand
    se = np.std(candidate - base, ddof=1) / math.sqrt(150)
    assert outcome.detectable == pytest.approx((1.959963984540054 + 0.8416212335729143) * se, rel=1e-9)


def test_identical_runs_give_p_one_and_a_zero_interval_and_a_worse_run_a_small_p():
    base, _ = binary_pair(100, 0, 0)
    same = paired_mean_test(base, base.copy(), 0.05)
    assert same.p_value == 1.0 and same.interval == (0.0, 0.0) and same.difference == 0
    assert same.detectable > 0  # no doc changed: bounded by the runs' own variances, not 0
    worse = paired_mean_test(*binary_pair(100, 15, 0), 0.05)
    assert worse.p_value < 1e-3 and worse.interval[1] < 0
    same_boot = paired_bootstrap(list(base), list(base), MEAN, None, 300, 0, 0.05)
    assert same_boot.p_value == 1.0 and same_boot.interval == (0.0, 0.0)
    worse_boot = paired_bootstrap(*map(list, binary_pair(100, 15, 0)), MEAN, None, 300, 0, 0.05)
    assert worse_boot.p_value < 0.01 and worse_boot.interval[1] < 0


def brute_force_bootstrap(base, candidate, aggregate, cluster_ids, resamples, seed, alpha):
    """The paired bootstrap as a plain loop: the same draws, each resample's docs listed one by one."""
    members = {}
    for index, cluster in enumerate(cluster_ids if cluster_ids is not None else range(len(base))):
        members.setdefault(cluster, []).append(index)
    groups = list(members.values())
    draws = resample_draws(len(groups), resamples, seed)
    observed = aggregate(candidate) - aggregate(base)
    differences = []
    for draw in draws:
        docs = [index for cluster in draw for index in groups[cluster]]
        differences.append(aggregate([candidate[i] for i in docs]) - aggregate([base[i] for i in docs]))
    extreme = sum(abs(d - observed) >= abs(observed) for d in differences)
    ordered = sorted(differences)
    return observed, (1 + extreme) / (1 + resamples), ordered


def plain_mean(values):
    return sum(values) / len(values)


@pytest.mark.parametrize("clustered", [False, True])
def test_vectorised_mean_bootstrap_equals_the_plain_loop(clustered):
    base, candidate = binary_pair(300, 20, 8, seed=5)
    clusters = [i // 3 for i in range(300)] if clustered else None
    outcome = paired_bootstrap(list(base), list(candidate), MEAN, clusters, 500, 7, 0.05)
    observed, p_value, ordered = brute_force_bootstrap(list(base), list(candidate), plain_mean, clusters, 500, 7, 0.05)
    assert outcome.difference == pytest.approx(observed, abs=SUMMATION)
    assert outcome.p_value == p_value
    assert outcome.interval == pytest.approx(tuple(np.percentile(ordered, [2.5, 97.5])), abs=SUMMATION)
    assert outcome.test == ("cluster bootstrap (100 clusters)" if clustered else "bootstrap")


def pope_items(n: int, seed: int, flips: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    truth = rng.choice(["yes", "no"], n)
    predictions = np.where(rng.uniform(size=n) < 0.8, truth, np.where(truth == "yes", "no", "yes"))
    predictions[:flips] = "yes"
    return [
        {"question_id": str(i), "score": float(p == t), "prediction": str(p), "ground_truth": str(t)}
        for i, (p, t) in enumerate(zip(predictions, truth))
    ]


def test_custom_aggregate_bootstrap_equals_the_plain_loop_and_pope_f1_by_hand():
    base, candidate = pope_items(80, 1), pope_items(80, 1, flips=20)
    outcome = paired_bootstrap(base, candidate, pope_aggregate_f1_score, None, 200, 3, 0.05)
    observed, p_value, ordered = brute_force_bootstrap(base, candidate, pope_aggregate_f1_score, None, 200, 3, 0.05)
    assert outcome.difference == observed and outcome.p_value == p_value
    assert outcome.interval == pytest.approx(tuple(np.percentile(ordered, [2.5, 97.5])), abs=SUMMATION)
    # One resample through the module's path (docs drawn twice included) = F1 by hand from counts.
    draw = resample_draws(80, 1, 11)[0]
    assert len(set(draw)) < len(draw)
    items = _resample(candidate, _clusters(None, 80), draw)
    tp = sum(candidate[i]["prediction"] == "yes" == candidate[i]["ground_truth"] for i in draw)
    fp = sum(candidate[i]["prediction"] == "yes" != candidate[i]["ground_truth"] for i in draw)
    fn = sum(candidate[i]["prediction"] == "no" and candidate[i]["ground_truth"] == "yes" for i in draw)
    assert pope_aggregate_f1_score(items) == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=SUMMATION)


def mme_items(images: int, seed: int) -> list[dict]:
    """Two questions per image, as MME asks them; a score of 0 or 1 each."""
    rng = np.random.default_rng(seed)
    categories = ["count", "color", "position"]
    return [
        {"question_id": f"img{i}", "category": categories[i % 3], "score": float(rng.uniform() < 0.75)}
        for i in range(images)
        for _ in range(2)
    ]


def test_mme_resample_keeps_question_pairs_and_counts_a_pair_drawn_twice_twice():
    items = mme_items(30, 2)
    ids = [item["question_id"] for item in items]
    groups = _clusters(ids, len(items))
    assert len(groups) == 30 and all(len(g) == 2 for g in groups)
    draw = resample_draws(30, 1, 4)[0]
    assert len(set(draw)) < len(draw)
    resampled = _resample(items, groups, draw)
    # By hand: per category, acc = mean of question scores, acc+ = share of pairs with both right,
    # each drawn pair a separate image; MME's score is the sum over categories of (acc + acc+) x 100.
    by_category = {}
    for cluster in draw:
        first, second = (items[i] for i in groups[cluster])
        by_category.setdefault(first["category"], []).append((first["score"], second["score"]))
    expected = sum(
        100 * (sum(a + b for a, b in pairs) / (2 * len(pairs)) + sum(a + b == 2 for a, b in pairs) / len(pairs))
        for pairs in by_category.values()
    )
    assert mme_aggregate_results(resampled) == pytest.approx(expected, abs=SUMMATION)
    outcome = paired_bootstrap(items, mme_items(30, 9), mme_aggregate_results, ids, 100, 0, 0.05)
    assert outcome.test == "cluster bootstrap (30 clusters)"


def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([0.3, 0.2]) == pytest.approx([0.4, 0.4])  # monotone: 0.3 x 1 < 0.2 x 2, so 0.4


@pytest.mark.parametrize("worse, better", [(0, 0), (2, 0), (7, 3)])
def test_mcnemar_p_by_hand(worse, better):
    n, k = worse + better, min(worse, better)
    expected = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    assert mcnemar_p(worse, better) == expected


# --- the CLI on files in lmms-eval's layout -------------------------------------------------------


def write_run(folder, scores: dict[str, list], *, extra_results=None, doc_ids=None, hashes=None, samples=True):
    """A results file and per-task samples files: ``scores`` maps task -> per-doc values of its one
    metric (``acc``, aggregated by lmms-eval's mean; ``pope`` tasks use POPE's own functions)."""
    folder.mkdir(parents=True)
    results, configs, higher = {}, {}, {}
    for task, values in scores.items():
        ids = doc_ids or list(range(len(values)))
        if task == "pope":
            metric = "pope_f1_score"
            value = pope_aggregate_f1_score(values)
            configs[task] = {"metric_list": [{"metric": metric, "aggregation": "<function pope_aggregate_f1_score>"}]}
        else:
            metric = "acc"
            value = float(np.mean(values))
            configs[task] = {"metric_list": [{"metric": metric, "aggregation": "mean"}]}
        results[task] = {f"{metric},none": value, f"{metric}_stderr,none": "N/A", f"{metric}_stderr_clt,none": 0.05}
        results[task].update((extra_results or {}).get(task, {}))
        higher[task] = {metric: True}
        if samples:
            lines = [
                json.dumps({"doc_id": i, "doc_hash": (hashes or {}).get(i, f"h{i}"), "filtered_resps": "x", metric: v})
                for i, v in zip(ids, values)
            ]
            (folder / f"t_samples_{task}.jsonl").write_text("\n".join(lines))
    data = {
        "results": results,
        "configs": configs,
        "higher_is_better": higher,
        "config": {"model": "vtw_llava", "model_args": "pretrained=m"},
        "throughput": {"avg_prefill_tflops_baseline": 2.0, "avg_prefill_tflops_vtw": 1.0},
    }
    (folder / "t_results.json").write_text(json.dumps(data))
    return folder / "t_results.json"


def run_diff(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_json_csv_gate_and_lmms_eval_fields(tmp_path, capsys):
    base_scores, worse_scores = binary_pair(120, 18, 1)
    base = write_run(tmp_path / "base", {"qa": list(base_scores), "other": list(base_scores)})
    worse = write_run(
        tmp_path / "worse",
        {"qa": list(worse_scores), "other": list(base_scores)},
        extra_results={"qa": {"paired_baseline": "base", "paired_pvalue": 0.001}},
    )
    code, out, err = run_diff(capsys, base, worse, "--significance", "--format", "json")
    assert code == 0, err
    rows = {row["task"]: row for row in json.loads(out)["metrics"]}
    expected = stats.binomtest(1, 19, 0.5).pvalue
    assert rows["qa"]["p_value"][1] == pytest.approx(expected)
    assert rows["qa"]["p_holm"][1] == pytest.approx(min(1, 2 * expected))  # two gated metrics
    assert rows["other"]["p_value"][1] == 1.0 and rows["other"]["interval"][1] == [0.0, 0.0]
    assert rows["qa"]["test"][1] == "McNemar exact" and rows["qa"]["detectable"][1] > 0
    assert rows["qa"]["stderr_kind"] == ["clt", "clt"] and rows["qa"]["stderr"] == [0.05, 0.05]
    assert json.loads(out)["lmms_eval_paired"] == [{}, {"qa": {"paired_baseline": "base", "paired_pvalue": 0.001}}]

    code, out, _ = run_diff(capsys, base, worse, "--significance", "--format", "csv")
    table = list(csv.reader(io.StringIO(out)))
    for column in ("CI low", "CI high", "p", "p Holm", "test", "detectable"):
        assert column in table[0]
    code, out, _ = run_diff(capsys, base, worse, "--significance")
    assert "McNemar exact" in out and "0.05 clt" in out and "paired_pvalue=0.001" in out

    code, _, err = run_diff(capsys, base, worse, "--fail-on-significant-drop")
    assert code == 1 and "DROP qa acc" in err and "after Holm" in err
    code, _, err = run_diff(capsys, base, worse, "--fail-on-significant-drop", "--fail-on-drop", "0.5")
    assert code == 0, err  # significant, but not larger than 0.5
    same = write_run(tmp_path / "same", {"qa": list(base_scores), "other": list(base_scores)})
    code, _, err = run_diff(capsys, base, same, "--fail-on-significant-drop")
    assert code == 0, err


def test_cli_pope_bootstrap_with_lmms_evals_own_function_and_the_plot(tmp_path, capsys):
    base = write_run(tmp_path / "base", {"pope": pope_items(60, 1)})
    worse = write_run(tmp_path / "worse", {"pope": pope_items(60, 1, flips=25)})
    plot = tmp_path / "plots" / "tradeoff.png"
    code, out, err = run_diff(
        capsys, base, worse, "--significance", "--bootstrap", "200", "--format", "json", "--plot", plot
    )
    assert code == 0, err
    row = json.loads(out)["metrics"][0]
    expected, p_value, _ = brute_force_bootstrap(
        pope_items(60, 1), pope_items(60, 1, flips=25), pope_aggregate_f1_score, None, 200, 0, 0.05
    )
    assert row["test"][1] == "bootstrap" and row["p_value"][1] == p_value
    assert row["values"][1] - row["values"][0] == pytest.approx(expected)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors_name_the_file_and_the_flag(tmp_path, capsys):
    base = write_run(tmp_path / "base", {"qa": [1.0, 0.0, 1.0]})
    same = write_run(tmp_path / "same", {"qa": [1.0, 0.0, 1.0]})
    bare = write_run(tmp_path / "bare", {"qa": [1.0, 1.0, 1.0]}, samples=False)
    code, out, err = run_diff(capsys, base, bare, "--significance")
    assert code == 2 and str(tmp_path / "bare" / "t_samples_qa.jsonl") in err and "--log_samples" in err
    assert out == ""
    for flag, value, words in [
        ("--alpha", "2", "between 0 and 1"),
        ("--alpha", "0", "between 0 and 1"),
        ("--bootstrap", "-1", "integer >= 0"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([str(base), str(same), flag, value])
        assert exit_info.value.code == 2 and flag in capsys.readouterr().err
    code, _, err = run_diff(capsys, base, same, "--tasks", "nope")
    assert code == 2 and "--tasks" in err and "they have qa" in err
    other = write_run(tmp_path / "hash", {"qa": [1.0, 0.0, 1.0]}, hashes={1: "changed"})
    code, _, err = run_diff(capsys, base, other, "--significance")
    assert code == 2 and "doc_hash" in err and "doc 1" in err
    fewer = write_run(tmp_path / "fewer", {"qa": [1.0, 0.0]}, doc_ids=[0, 2])
    code, out, err = run_diff(capsys, base, fewer, "--significance", "--format", "json")
    notes = " ".join(json.loads(out)["test_notes"])
    assert code == 0 and "1 docs only in vtw_llava (doc_id 1)" in notes
