"""Per-task calibration through the lmms-eval CLI: each task at its own K, the file reused, and
recalibration when the threshold or the criterion changes."""

from __future__ import annotations

import json
import shutil

import pytest
from tiny_models import NUM_LAYERS

from vtw_eval import diff
from vtw_eval.calibration import choose_withdraw_layer
from vtw_eval.results import load_run
from vtw_eval.run import REPO_ROOT, run_lmms_eval

# The tiny MME questions without their images: a task whose KL is 0 at every layer, so its own K
# is 0, while the questions with images need a later layer.
BLIND_TASK = """\
include: vtw_tiny_mme.yaml
task: vtw_tiny_mme_blind
doc_to_visual: !function blind.no_visuals
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """tasks/vtw_tiny (its data stays where it is, relative to the repository root) plus the blind task."""
    directory = tmp_path_factory.mktemp("tasks")
    for path in (REPO_ROOT / "tasks" / "vtw_tiny").glob("*.*"):
        shutil.copy(path, directory)
    (directory / "vtw_tiny_mme_blind.yaml").write_text(BLIND_TASK)
    (directory / "blind.py").write_text("def no_visuals(doc):\n    return []\n")
    return directory


def run(
    tiny_llava_path, out, task_dir, extra: str = "", tasks: str = "vtw_tiny_mme,vtw_tiny_mme_blind,vtw_tiny_mme_choice"
):
    model_args = (
        f"pretrained={tiny_llava_path},device=cpu,withdraw_layer=auto,calibrate_per_task=8,"
        f"calibration_dir={out.parent}/calibration,accounting_file={out}/requests.jsonl{extra}"
    )
    results_file = run_lmms_eval(
        "vtw_llava", model_args, tasks, out, "--batch_size", "4", "--log_samples", include_path=task_dir
    )
    calibration = json.loads(next((out.parent / "calibration").glob("*.json")).read_text())
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    return json.loads(results_file.read_text()), calibration, records, (out / "lmms_eval.log").read_text()


def answers(out, task):
    samples = next(out.glob(f"*/*_samples_{task}.jsonl")).read_text().splitlines()
    return {json.loads(s)["doc_id"]: json.loads(s)["filtered_resps"] for s in samples}


@pytest.mark.cli
def test_each_task_at_its_own_k_reused_then_recalibrated(tiny_llava_path, tmp_path, task_dir):
    results, calibration, records, log = run(tiny_llava_path, tmp_path / "first", task_dir)
    entries = calibration["per_task"]
    assert sorted(entries) == ["vtw_tiny_mme", "vtw_tiny_mme_blind", "vtw_tiny_mme_choice"]  # choice: loglikelihood
    for task, entry in entries.items():
        assert (entry["num_samples"], entry["kl_tokens"], entry["kl_threshold"]) == (8, 1, 0.003)
        assert len(entry["mean_kl"]) == NUM_LAYERS + 1
        assert (entry["withdraw_layer"], entry["threshold_met"]) == choose_withdraw_layer(entry["mean_kl"], 0.003)
    assert entries["vtw_tiny_mme_blind"]["withdraw_layer"] == 0 and max(entries["vtw_tiny_mme_blind"]["mean_kl"]) == 0
    k_mme = entries["vtw_tiny_mme"]["withdraw_layer"]
    assert k_mme > 0  # the two tasks' calibrations differ
    assert "withdraw_layer" not in calibration  # no global K was needed or invented
    # Every request was answered at its task's K: accounting, results JSON.
    for record in records:
        assert record["withdraw_layer"] == entries[record["task"]]["withdraw_layer"], record
    assert {r["task"] for r in records} == {"vtw_tiny_mme", "vtw_tiny_mme_blind"} and len(records) == 32
    throughput = results["throughput"]
    assert throughput["avg_withdraw_layer/vtw_tiny_mme"] == k_mme
    assert throughput["avg_withdraw_layer/vtw_tiny_mme_blind"] == 0
    # Every task calibrated, generation and loglikelihood alike, carries its K and calibration cost.
    k_choice = entries["vtw_tiny_mme_choice"]["withdraw_layer"]
    assert throughput["avg_withdraw_layer/vtw_tiny_mme_choice"] == k_choice
    for task in entries:
        assert 0 < throughput[f"avg_calibration_share_of_prefill/{task}"]
        assert throughput[f"avg_calibration_tflops/{task}"] > 0
    # vtw-diff shows them (its efficiency rows), the loglikelihood task's among them.
    results_path = next((tmp_path / "first").glob("*/*_results.json"))
    figures = {row["figure"]: row["values"][0] for row in diff.efficiency_rows([load_run(results_path, "a")])}
    assert figures["withdraw_layer/vtw_tiny_mme_choice"] == k_choice
    assert figures["calibration_tflops (all tasks)"] == pytest.approx(
        sum(throughput[f"avg_calibration_tflops/{task}"] for task in entries)
    )
    assert "VTW calibration of vtw_tiny_mme:" in log and "VTW calibration of vtw_tiny_mme_blind:" in log
    assert f"task vtw_tiny_mme_choice at K={entries['vtw_tiny_mme_choice']['withdraw_layer']} (its own" in log

    # The answers at the task's own K are those of a plain run at that K.
    plain = tmp_path / "plain"
    run_lmms_eval(
        "vtw_llava", f"pretrained={tiny_llava_path},device=cpu,withdraw_layer={k_mme},accounting_file={plain}/a.jsonl",
        "vtw_tiny_mme", plain, "--batch_size", "4", "--log_samples", include_path=task_dir,
    )  # fmt: skip
    assert answers(tmp_path / "first", "vtw_tiny_mme") == answers(plain, "vtw_tiny_mme")

    # A second run reuses the file: nothing recalibrated, nothing rewritten.
    _, again, records_again, log = run(tiny_llava_path, tmp_path / "second", task_dir)
    assert again == calibration
    assert "VTW calibration of" not in log and "task vtw_tiny_mme at K=" in log
    assert [r["withdraw_layer"] for r in records_again] == [r["withdraw_layer"] for r in records]

    # Another threshold, then another criterion: recalibrated, each entry replaced.
    _, changed, _, log = run(tiny_llava_path, tmp_path / "threshold", task_dir, ",kl_threshold=0.0005", "vtw_tiny_mme")
    assert "VTW calibration of vtw_tiny_mme:" in log
    assert changed["per_task"]["vtw_tiny_mme"]["kl_threshold"] == 0.0005
    # The same prompts and criterion on the same machine: the same arithmetic, the same curve,
    # chosen at another threshold.
    assert changed["per_task"]["vtw_tiny_mme"]["mean_kl"] == entries["vtw_tiny_mme"]["mean_kl"]
    _, changed, _, log = run(tiny_llava_path, tmp_path / "criterion", task_dir, ",kl_tokens=3", "vtw_tiny_mme")
    assert "VTW calibration of vtw_tiny_mme:" in log
    assert changed["per_task"]["vtw_tiny_mme"]["kl_tokens"] == 3
    assert changed["per_task"]["vtw_tiny_mme"]["mean_kl"] != entries["vtw_tiny_mme"]["mean_kl"]


@pytest.mark.cli
def test_without_calibrate_per_task_auto_uses_a_tasks_entry_else_the_global_k(tiny_llava_path, tmp_path, task_dir):
    calibration_dir = tmp_path / "calibration"
    common = f"pretrained={tiny_llava_path},device=cpu,calibration_dir={calibration_dir}"
    run(tiny_llava_path, tmp_path / "per_task", task_dir, tasks="vtw_tiny_mme_blind")
    with pytest.raises(RuntimeError, match="lmms-eval failed"):  # per-task entries only: no global K
        run_lmms_eval(
            "vtw_llava", f"{common},withdraw_layer=auto", "vtw_tiny_mme", tmp_path / "refused", include_path=task_dir
        )
    assert "holds per-task entries only, no global K" in (tmp_path / "refused" / "lmms_eval.log").read_text()
    run_lmms_eval(  # the global K from the calibration group (criterion kl_tokens=3), beside the per-task entry
        "vtw_llava", f"{common},withdraw_layer=none,kl_tokens=3", "vtw_calibration_tiny", tmp_path / "global",
        "--batch_size", "4", include_path=task_dir,
    )  # fmt: skip
    file = json.loads(next(calibration_dir.glob("*.json")).read_text())
    assert "vtw_tiny_mme_blind" in file["per_task"] and file["kl_tokens"] == 3
    out = tmp_path / "mixed"
    run_lmms_eval(
        "vtw_llava",
        f"{common},withdraw_layer=auto,accounting_file={out}/requests.jsonl",
        "vtw_tiny_mme,vtw_tiny_mme_blind", out, "--batch_size", "4", include_path=task_dir,
    )  # fmt: skip
    layers = {json.loads(line)["task"]: json.loads(line)["withdraw_layer"] for line in open(out / "requests.jsonl")}
    assert layers == {"vtw_tiny_mme": file["withdraw_layer"], "vtw_tiny_mme_blind": 0}
    assert (
        "the global K was calibrated with kl_tokens=3, this run asks for kl_tokens=1"
        in (out / "lmms_eval.log").read_text()
    )


def test_calibrate_per_task_needs_auto(tiny_llava_path):
    from vtw_eval.backends.llava import VTWLlava

    with pytest.raises(ValueError, match=r"calibrate_per_task=4 chooses each task's K, so it needs withdraw_layer="):
        VTWLlava(pretrained=str(tiny_llava_path), withdraw_layer=2, calibrate_per_task=4, device="cpu")
    with pytest.raises(ValueError, match=r"kl_tokens='0' is not accepted; use a positive integer"):
        VTWLlava(pretrained=str(tiny_llava_path), withdraw_layer=2, kl_tokens="0", device="cpu")
    with pytest.raises(ValueError, match=r"calibrate_per_task=-1 is not accepted; use an integer >= 0"):
        VTWLlava(pretrained=str(tiny_llava_path), withdraw_layer="auto", calibrate_per_task=-1, device="cpu")


def test_a_calibration_file_of_another_model_is_never_written_over(tiny_llava_path, tmp_path):
    from vtw_eval.backends.llava import VTWLlava

    path = tmp_path / "tiny.json"
    for other in (
        {"format": 4, "model": "other", "config_hash": "0000", "weights_fingerprint": "0000", "dtype": "float32"},
        {"format": 3, "model": "older", "config_hash": "0000", "weights_fingerprint": "0000", "num_layers": 4},
    ):
        path.write_text(json.dumps({**other, "num_layers": 4}))
        before = path.read_bytes()
        with pytest.raises(ValueError, match=rf"calibration file {path} was .*: it is not written over"):
            VTWLlava(
                pretrained=str(tiny_llava_path), withdraw_layer="auto", calibrate_per_task=3, calibration=str(path),
                device="cpu", accounting_file=str(tmp_path / "a.jsonl"),
            )  # fmt: skip
        assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["tiny.json"]


def test_a_failing_calibration_prompt_names_the_task_and_doc(tiny_llava_path, tmp_path):
    from backend_requests import docs, request

    from vtw_eval.backends.llava import VTWLlava

    def broken_visual(doc):
        raise OSError("cannot identify image file")

    lm = VTWLlava(
        pretrained=str(tiny_llava_path), withdraw_layer="auto", calibrate_per_task=2, device="cpu",
        calibration_dir=str(tmp_path), accounting_file=str(tmp_path / "a.jsonl"),
    )  # fmt: skip
    lm.task_dict = {"tiny": {"test": docs()}}
    requests = [request("generate_until", ("Is it red ?", {"max_new_tokens": 2}, broken_visual, 0, "tiny", "test"))]
    with pytest.raises(RuntimeError, match=r"VTW calibration of task tiny failed for doc_ids \[0\]: cannot identify"):
        lm.generate_until(requests)
    assert not list(tmp_path.glob("*.json"))  # nothing half-written


@pytest.mark.cli
@pytest.mark.parametrize("backend", ["vtw_smolvlm", "vtw_mistral3", "vtw_llama4", "vtw_gemma4"])
def test_each_task_at_its_own_k_on_the_newer_families(backend, tmp_path, task_dir):
    """The same per-task calibration on the families added after LLaVA's tests were written: the
    blind task's K is 0, the image task's is chosen from its own curve, every request runs at its
    task's K."""
    from tiny_models import BUILDERS

    path = BUILDERS[backend.removeprefix("vtw_")](tmp_path / "model")
    model_args = (
        f"pretrained={path},device=cpu,withdraw_layer=auto,calibrate_per_task=8,"
        f"calibration_dir={tmp_path}/calibration,accounting_file={tmp_path}/requests.jsonl"
    )
    run_lmms_eval(backend, model_args, "vtw_tiny_mme,vtw_tiny_mme_blind", tmp_path / "out", include_path=task_dir)
    entries = json.loads(next((tmp_path / "calibration").glob("*.json")).read_text())["per_task"]
    assert sorted(entries) == ["vtw_tiny_mme", "vtw_tiny_mme_blind"]
    # Without images every candidate K runs the same tokens: KL 0 up to the LM head's rounding (the
    # calibration applies it to the last position, the model's own logits to every position, and
    # the two matrix shapes round differently: 6e-8 on Llama 4's tiny model, 0 on the others).
    assert entries["vtw_tiny_mme_blind"]["withdraw_layer"] == 0 and max(entries["vtw_tiny_mme_blind"]["mean_kl"]) < 1e-6
    mme = entries["vtw_tiny_mme"]
    assert max(mme["mean_kl"]) > 0 and (mme["withdraw_layer"], mme["threshold_met"]) == choose_withdraw_layer(
        mme["mean_kl"], 0.003
    )
    records = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert len(records) == 32 and all(r["withdraw_layer"] == entries[r["task"]]["withdraw_layer"] for r in records)
