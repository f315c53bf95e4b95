"""The benchmark scripts keep working (tiny sizes; their real figures are in README)."""

from __future__ import annotations

import json
import subprocess
import sys

from vtw_eval.run import REPO_ROOT


def run_script(*args: str) -> str:
    completed = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return completed.stdout


def test_speed_benchmark_runs_and_kv_bytes_match_the_cost_model(tmp_path):
    out = run_script(
        "scripts/bench_speed.py",
        "--layers",
        "4",
        "--hidden",
        "64",
        "--intermediate",
        "128",
        "--heads",
        "4",
        "--withdraw-layers",
        "0,2",
        "--repeats",
        "1",
        "--new-tokens",
        "2",
        "--out",
        str(tmp_path),
    )
    assert "goal: prefill speedup at K=L/2" in out
    summary = json.loads((tmp_path / "speed.json").read_text())
    assert [row["withdraw_layer"] for row in summary["rows"]] == [4, 0, 2]
    for row in summary["rows"]:
        assert row["kv_cache_bytes_measured"] == row["kv_cache_bytes_analytic"]
        # The tower, projector and head do not shrink: the whole model's limit is below the decoder's.
        assert 1 <= row["analytic_whole_model_prefill_speedup"] <= row["analytic_prefill_speedup"]
    assert (tmp_path / "speed.png").read_bytes()[:4] == b"\x89PNG"


def test_calibration_benchmark_runs():
    out = run_script(
        "scripts/bench_calibration.py", "--layers", "3", "--hidden", "64", "--intermediate", "128", "--repeats", "1"
    )
    assert "calibration / forward: median [min, max]" in out
