"""vtw-diff on result files from real lmms-eval runs and on hand-made edge cases."""

from __future__ import annotations

import csv
import io
import json

import pytest

from vtw_eval.diff import main
from vtw_eval.run import run_lmms_eval

pytestmark = pytest.mark.smoke


@pytest.fixture(scope="module")
def real_runs(tiny_llava_path, tmp_path_factory):
    """Baseline and K=1 runs of the tiny tasks through the lmms-eval CLI, with samples; K=1 again
    on 4 docs a task (``--limit``; MME scores question pairs)."""
    out = tmp_path_factory.mktemp("diff_runs")
    files = {}
    for name, layer, limit in [("baseline", "none", []), ("k1", "1", []), ("k1_limit", "1", ["--limit", "4"])]:
        files[name] = run_lmms_eval(
            "vtw_llava",
            f"pretrained={tiny_llava_path},withdraw_layer={layer},device=cpu,accounting_file={out}/{name}.jsonl",
            "vtw_tiny_mme,vtw_tiny_mme_choice",
            out / name,
            "--batch_size",
            "4",
            "--log_samples",
            *limit,
        )
    return files


def run_diff(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def results_file(path, results, higher_is_better=None, **extra):
    """A minimal results JSON in lmms-eval's layout."""
    data = {"results": results, "higher_is_better": higher_is_better or {}, "config": {"model": "m"}, **extra}
    path.write_text(json.dumps(data))
    return path


@pytest.mark.cli
def test_real_runs_json_deltas_and_samples(real_runs, capsys):
    code, out, _ = run_diff(
        capsys, real_runs["baseline"].parent.parent, real_runs["k1"], "--format", "json", "--samples"
    )
    assert code == 0
    document = json.loads(out)
    base = json.loads(real_runs["baseline"].read_text())["results"]
    cand = json.loads(real_runs["k1"].read_text())["results"]
    labels = [run["label"] for run in document["runs"]]
    assert labels == ["vtw_llava K=none", "vtw_llava K=1"]
    rows = {(row["task"], row["metric"]): row for row in document["metrics"]}
    for task, metric in [("vtw_tiny_mme", "mme_perception_score"), ("vtw_tiny_mme_choice", "acc")]:
        row = rows[(task, metric)]
        expected = cand[task][f"{metric},none"] - base[task][f"{metric},none"]
        assert row["delta"][1] == pytest.approx(expected) and row["delta"][0] is None
        assert row["higher_is_better"] is True

    # Changed answers, counted from the samples files by hand.
    def answers(results_path, task):
        samples = next(results_path.parent.glob(f"*_samples_{task}.jsonl")).read_text().splitlines()
        return {json.loads(s)["doc_id"]: json.loads(s)["filtered_resps"] for s in samples}

    before, after = answers(real_runs["baseline"], "vtw_tiny_mme"), answers(real_runs["k1"], "vtw_tiny_mme")
    change = next(c for c in document["sample_changes"] if c["task"] == "vtw_tiny_mme")
    assert change["changed"] == sum(before[d] != after[d] for d in before)
    assert change["compared"] == 16
    labels_in_table = run_diff(capsys, real_runs["baseline"], real_runs["k1"])[1]
    assert "vtw_tiny_mme" in labels_in_table and "prefill_flops_saved" in labels_in_table
    # Each generated task's K, as the accounting logged it: 4 (all layers) against 1.
    efficiency = {row["figure"]: row for row in document["efficiency"]}
    assert efficiency["withdraw_layer/vtw_tiny_mme"]["values"] == [4, 1]


@pytest.mark.cli
def test_csv_parses_back_and_markdown_renders(real_runs, capsys):
    code, out, _ = run_diff(capsys, real_runs["baseline"], real_runs["k1"], "--format", "csv", "--labels", "base,vtw")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and {r["task"] for r in rows} == {"vtw_tiny_mme", "vtw_tiny_mme_choice"}
    assert {"base", "vtw", "delta", "rel"} <= set(rows[0])
    code, out, _ = run_diff(capsys, real_runs["baseline"], real_runs["k1"], "--format", "markdown")
    assert out.startswith("| task")


def test_fail_on_drop(tmp_path, capsys):
    hib = {"t": {"acc": True, "loss": False}}
    base = results_file(tmp_path / "a_results.json", {"t": {"acc,none": 60.0, "loss,none": 1.0}}, hib)
    worse = results_file(tmp_path / "b_results.json", {"t": {"acc,none": 55.0, "loss,none": 1.2}}, hib)
    better = results_file(tmp_path / "c_results.json", {"t": {"acc,none": 61.0, "loss,none": 0.5}}, hib)
    code, _, err = run_diff(capsys, base, worse, "--fail-on-drop", "1")
    assert code == 1 and "t acc" in err and "worse by 5" in err and "loss" not in err  # loss rose by 0.2 only
    assert run_diff(capsys, base, worse, "--fail-on-drop", "10")[0] == 0
    code, _, err = run_diff(capsys, base, worse, "--fail-on-drop", "0.1")
    assert code == 1 and "t loss" in err  # lower is better: a rise is a drop
    assert run_diff(capsys, base, better, "--fail-on-drop", "0")[0] == 0


def test_missing_metrics_na_and_nan(tmp_path, capsys):
    base = results_file(
        tmp_path / "a_results.json",
        {"t": {"acc,none": 0.5, "acc_stderr,none": "N/A"}, "only_a": {"x,none": 1.0}},
        {"t": {"acc": True}},
        lmms_eval_version="0.3.0",
    )
    cand = results_file(tmp_path / "b_results.json", {"t": {"acc,none": float("nan")}, "only_b": {"y,none": 2.0}})
    code, out, _ = run_diff(capsys, base, cand, "--format", "json")
    rows = {(r["task"], r["metric"]): r for r in json.loads(out)["metrics"]}
    assert code == 0 and set(rows) == {("t", "acc"), ("only_a", "x"), ("only_b", "y")}
    assert rows[("t", "acc")]["values"] == [0.5, None] and rows[("t", "acc")]["delta"] == [None, None]
    assert rows[("only_b", "y")]["present_in"] == 1
    code, out, _ = run_diff(capsys, base, cand)
    assert "Only in some runs: only_a x, only_b y" in out and "N/A" in out


@pytest.mark.parametrize(
    "content, message", [("{not json", "not a readable JSON file"), ('{"a": 1}', "not an lmms-eval results file")]
)
def test_bad_files_name_the_file(tmp_path, capsys, content, message):
    good = results_file(tmp_path / "good_results.json", {"t": {"acc,none": 1.0}})
    bad = tmp_path / "bad_results.json"
    bad.write_text(content)
    code, _, err = run_diff(capsys, good, bad)
    assert code == 2 and str(bad) in err and message in err
    code, _, err = run_diff(capsys, good, tmp_path / "nowhere")
    assert code == 2 and "nowhere: no such file or directory" in err


def test_multiple_choice_answers_compare_the_chosen_option(tmp_path, capsys):
    def run(name, pairs_per_doc):
        folder = tmp_path / name
        folder.mkdir()
        results_file(folder / "x_results.json", {"mc": {"acc,none": 0.5}})
        lines = [
            json.dumps({"doc_id": i, "filtered_resps": [str(p) for p in pairs]})
            for i, pairs in enumerate(pairs_per_doc)
        ]
        (folder / "x_samples_mc.jsonl").write_text("\n".join(lines))
        return folder / "x_results.json"

    base = run("a", [[(-1.0, True), (-2.0, False)], [(-3.0, False), (-0.5, True)]])
    cand = run("b", [[(-1.1, True), (-2.2, False)], [(-0.4, True), (-0.6, False)]])  # doc 1 flips to option 0
    code, out, _ = run_diff(capsys, base, cand, "--samples", "--format", "json")
    (change,) = json.loads(out)["sample_changes"]
    assert (change["changed"], change["compared"]) == (1, 2)
    assert change["examples"] == [[1, "option 1", "option 0"]]


def test_gate_fails_on_missing_tasks_metrics_and_nan(tmp_path, capsys):
    hib = {"t": {"acc": True}, "u": {"acc": True}}
    base = results_file(
        tmp_path / "a_results.json", {"t": {"acc,none": 0.6, "f1,none": 0.5}, "u": {"acc,none": 0.4}}, hib
    )
    lost_task = results_file(tmp_path / "b_results.json", {"t": {"acc,none": 0.6, "f1,none": 0.5}}, hib)
    lost_metric = results_file(tmp_path / "c_results.json", {"t": {"acc,none": 0.6}, "u": {"acc,none": 0.4}}, hib)
    nan = results_file(
        tmp_path / "d_results.json", {"t": {"acc,none": float("nan"), "f1,none": 0.5}, "u": {"acc,none": 0.4}}, hib
    )
    same = results_file(
        tmp_path / "e_results.json", {"t": {"acc,none": 0.6, "f1,none": 0.5}, "u": {"acc,none": 0.4}}, hib
    )
    code, _, err = run_diff(capsys, base, lost_task, "--fail-on-drop", "0")
    assert code == 1 and "u acc: missing in" in err
    code, _, err = run_diff(capsys, base, lost_metric, "--fail-on-drop", "0")
    assert code == 1 and "t f1: missing in" in err  # no higher_is_better known, still a loss
    code, _, err = run_diff(capsys, base, nan, "--fail-on-drop", "0")
    assert code == 1 and "t acc: N/A or NaN in" in err
    assert run_diff(capsys, base, same, "--fail-on-drop", "0")[0] == 0  # identical runs pass at 0
    assert run_diff(capsys, base, lost_task)[0] == 0  # without the gate, only listed


@pytest.mark.parametrize("threshold", ["-1", "nan", "inf", "abc"])
def test_gate_threshold_must_be_a_finite_number(tmp_path, capsys, threshold):
    base = results_file(tmp_path / "a_results.json", {"t": {"acc,none": 0.6}})
    other = results_file(tmp_path / "b_results.json", {"t": {"acc,none": 0.6}})
    with pytest.raises(SystemExit) as exit_info:
        main([str(base), str(other), "--fail-on-drop", threshold])
    assert exit_info.value.code == 2
    assert f"--fail-on-drop: {threshold!r} is not accepted; use a finite number >= 0" in capsys.readouterr().err


def test_same_file_twice_and_samples_without_files(tmp_path, capsys):
    base = results_file(tmp_path / "a_results.json", {"t": {"acc,none": 0.6}})
    other = results_file(tmp_path / "b_results.json", {"t": {"acc,none": 0.6}})
    code, _, err = run_diff(capsys, base, tmp_path / "." / "a_results.json")
    assert code == 2 and "the same results file is given more than once" in err
    code, _, err = run_diff(capsys, base, other, "--samples")
    assert code == 0 and "no samples files to compare" in err


@pytest.mark.cli
def test_a_run_on_fewer_docs_is_named_and_fails_the_gate(real_runs, capsys):
    """A candidate run with --limit: the header says so, and the gate calls it a drop even where
    its scores on those docs are no worse."""
    code, out, err = run_diff(capsys, real_runs["baseline"], real_runs["k1_limit"], "--fail-on-drop", "1000")
    header = out.split("\n\n")[0]
    assert header.startswith("NOT COMPARABLE")
    assert "other numbers of docs: vtw_tiny_mme 4 (baseline 16), vtw_tiny_mme_choice 4 (baseline 16)" in header
    assert code == 1
    assert "DROP vtw_tiny_mme: vtw_llava K=1 evaluated 4 of the baseline's 16 docs (fewer docs)" in err
    code, out, _ = run_diff(capsys, real_runs["baseline"], real_runs["k1"], "--fail-on-drop", "1000")
    assert code == 0 and "NOT COMPARABLE" not in out  # the same docs, model and arguments but K


def run_of(path, pretrained, model_args="", docs=11, model="vtw_qwen3_vl"):
    """A results file of ``model`` on ``pretrained`` with ``model_args`` and ``docs`` docs."""
    args = f"pretrained={pretrained},withdraw_layer=4{model_args}"
    return results_file(
        path,
        {"t": {"acc,none": 0.5}},
        {"t": {"acc": True}},
        config={"model": model, "model_args": args},
        **{"n-samples": {"t": {"original": 11, "effective": docs}}},
    )


def test_different_models_are_refused_unless_asked_for(tmp_path, capsys):
    base = run_of(tmp_path / "a_results.json", "Qwen/Qwen3-VL-2B-Instruct")
    other = run_of(tmp_path / "b_results.json", "google/gemma-3-4b-it", model="vtw_gemma3")
    code, _, err = run_diff(capsys, base, other, "--fail-on-drop", "1")
    assert code == 2 and "not the same model, so not a baseline and its candidate" in err
    assert "pretrained=google/gemma-3-4b-it (baseline" in err and "--allow-different-models" in err
    code, out, _ = run_diff(capsys, base, other, "--allow-different-models")
    assert code == 0
    assert "different model: vtw_gemma3 K=4: pretrained=google/gemma-3-4b-it" in out
    assert "backend vtw_gemma3, baseline vtw_qwen3_vl" in out


def test_other_model_arguments_are_named_above_the_table(tmp_path, capsys):
    base = run_of(tmp_path / "a_results.json", "m", ",dtype=float32,accounting_file=a.jsonl")
    other = run_of(tmp_path / "b_results.json", "m", ",dtype=bfloat16,max_pixels=64,accounting_file=b.jsonl")
    code, out, _ = run_diff(capsys, base, other, "--fail-on-drop", "1")
    assert code == 0  # named, not a drop: the scores are equal
    assert out.startswith("NOT COMPARABLE") and out.index("NOT COMPARABLE") < out.index("task")
    assert "other model arguments: dtype=bfloat16 (baseline float32), max_pixels=64 (baseline (default))" in out
    assert "accounting_file" not in out  # where a file goes is no difference
    code, out, _ = run_diff(capsys, base, other, "--format", "json")
    (note,) = json.loads(out)["not_comparable"]
    assert "dtype=bfloat16 (baseline float32)" in note
    code, out, err = run_diff(capsys, base, other, "--format", "csv")
    assert out.startswith("task,") and "dtype=bfloat16" in err  # the CSV stays parseable
