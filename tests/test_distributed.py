"""Data-parallel runs with accelerate on CPU: the same numbers as one process."""

from __future__ import annotations

import json

import pytest

from vtw_eval.run import run_lmms_eval

pytestmark = pytest.mark.cli


def answers(results_file, task):
    samples = next(results_file.parent.glob(f"*_samples_{task}.jsonl")).read_text().splitlines()
    return {json.loads(s)["doc_id"]: json.loads(s)["filtered_resps"] for s in samples}


def test_two_processes_equal_one(tiny_llava_path, tmp_path):
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        model_args = (
            f"pretrained={tiny_llava_path},withdraw_layer=2,device=cpu,"
            f"calibration_dir={out}/calibration,accounting_file={out}/requests.jsonl"
        )
        runs[processes] = run_lmms_eval(
            "vtw_llava",
            model_args,
            "vtw_tiny_mme,vtw_calibration_tiny",
            out,
            "--batch_size",
            "2",
            "--log_samples",
            processes=processes,
        )
    one, two = (json.loads(runs[p].read_text()) for p in (1, 2))
    assert one["results"]["vtw_tiny_mme"] == two["results"]["vtw_tiny_mme"]
    assert answers(runs[1], "vtw_tiny_mme") == answers(runs[2], "vtw_tiny_mme")
    # Calibration: every rank's per-layer KL reaches the choice of K.
    record_one = one["results"]["vtw_calibration_tiny"]["vtw_calibration,none"]
    record_two = two["results"]["vtw_calibration_tiny"]["vtw_calibration,none"]
    assert record_two["num_samples"] == record_one["num_samples"] == 16
    assert record_two["withdraw_layer"] == record_one["withdraw_layer"]
    # The same per-prompt KLs, averaged in another order (gathered over two ranks): a few float32
    # roundings of the mean, relative to it.
    for a, b in zip(record_one["mean_kl"], record_two["mean_kl"]):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(a))
    # One accounting file per process, together covering every request once.
    files = sorted((tmp_path / "p2").glob("requests.rank*.jsonl"))
    assert [f.name for f in files] == ["requests.rank0.jsonl", "requests.rank1.jsonl"]
    docs = [json.loads(line)["doc_id"] for f in files for line in f.read_text().splitlines()]
    assert sorted(docs) == list(range(16))


def per_task_runs(tmp_path, backend: str, model_args, batch_size: int) -> tuple[dict, tuple[dict, dict]]:
    """vtw_tiny_mme in one and in two processes with ``model_args(out)`` (a per-task calibration);
    the results files by process count, and the task's calibration entries of one and of two."""
    runs, entries = {}, {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        runs[processes] = run_lmms_eval(
            backend, model_args(out), "vtw_tiny_mme", out, "--batch_size", str(batch_size), "--log_samples",
            processes=processes,
        )  # fmt: skip
        entries[processes] = json.loads(next((out / "calibration").glob("*.json")).read_text())["per_task"][
            "vtw_tiny_mme"
        ]
    return runs, (entries[1], entries[2])


def assert_same_calibration(one: dict, two: dict, num_samples: int) -> None:
    assert one["num_samples"] == two["num_samples"] == num_samples
    assert one["withdraw_layer"] == two["withdraw_layer"] < 4  # withdrawal on: the answers compared have teeth
    for a, b in zip(one["mean_kl"], two["mean_kl"]):  # averaged in another order: relative float32 roundings
        assert abs(a - b) <= 1e-6 * max(1.0, abs(a))


def test_per_task_calibration_two_processes_equal_one(tiny_llava_path, tmp_path):
    """Each rank holds half the docs: the calibration prompts are chosen over all of them and their
    KL gathered before K is chosen, so both ranks use the K one process chooses."""
    runs, (one, two) = per_task_runs(
        tmp_path, "vtw_llava", lambda out: (
            f"pretrained={tiny_llava_path},withdraw_layer=auto,calibrate_per_task=8,kl_tokens=2,device=cpu,"
            f"calibration_dir={out}/calibration,accounting_file={out}/requests.jsonl"
        ), batch_size=2,
    )  # fmt: skip
    assert_same_calibration(one, two, 8)
    assert answers(runs[1], "vtw_tiny_mme") == answers(runs[2], "vtw_tiny_mme")
    records = [
        json.loads(line) for f in (tmp_path / "p2").glob("requests.rank*.jsonl") for line in f.read_text().splitlines()
    ]
    assert len(records) == 16 and {r["withdraw_layer"] for r in records} == {one["withdraw_layer"]}


def test_qwen3_5_per_task_calibration_two_processes_equal_one(tmp_path):
    """Qwen3.5 (Gated DeltaNet layers) with withdraw_layer=auto, its task's K calibrated on the
    greedy answer over both ranks' docs: the K and the answers of one process."""
    from tiny_models import build_tiny_qwen3

    path = build_tiny_qwen3(tmp_path / "model", "qwen3_5")
    runs, (one, two) = per_task_runs(
        tmp_path, "vtw_qwen3_5", lambda out: (
            f"pretrained={path},withdraw_layer=auto,calibrate_per_task=6,kl_tokens=2,kl_threshold=0.5,"
            f"enable_thinking=False,device=cpu,calibration_dir={out}/calibration"
        ), batch_size=3,
    )  # fmt: skip
    assert_same_calibration(one, two, 6)
    assert answers(runs[1], "vtw_tiny_mme") == answers(runs[2], "vtw_tiny_mme")
    assert len(set(map(str, answers(runs[1], "vtw_tiny_mme").values()))) > 2
