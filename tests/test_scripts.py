"""The benchmark scripts keep working (tiny sizes; their real figures are in README). bench_speed.py
runs in tests/test_gpu_check.py, through the GPU check on CPU."""

from __future__ import annotations

import subprocess
import sys

from vtw_eval.run import REPO_ROOT


def run_script(*args: str) -> str:
    completed = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return completed.stdout


def test_calibration_benchmark_runs():
    out = run_script(
        "scripts/bench_calibration.py", "--layers", "3", "--hidden", "64", "--intermediate", "128", "--repeats", "1"
    )
    assert "calibration / forward: median [min, max]" in out


def test_per_task_table_reads_the_sweep_by_the_testbeds_two_point_rule():
    """The smallest stable K of each task, counted by hand from results/sweep/sweep.json's scores."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("per_task_testbed", REPO_ROOT / "scripts" / "per_task_testbed.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # MME: 566.8 at K=4 is 16.5 above 550.3, more than 2% of 800; 531.9 at K=5 is 18.4 below.
    mme = [210.0, 270.0, 502.8, 540.4, 566.8, 531.9, 544.0, 546.1, 550.3]
    assert script.smallest_stable_k("mme_perception_score", mme) == 6
    # GQA: 0.79 at K=5 is exactly 2 points below 0.81 (within), 0.73 at K=4 is not.
    assert script.smallest_stable_k("exact_match", [0.34, 0.33, 0.65, 0.69, 0.73, 0.79, 0.81, 0.81, 0.81]) == 5
    # CIDEr has no upper bound: 2% of the baseline 7.22 is 0.144; 6.69 at K=4 is 0.53 below.
    assert script.smallest_stable_k("coco_CIDEr", [0.37, 3.08, 4.23, 5.61, 6.69, 7.28, 7.16, 7.21, 7.22]) == 5
    assert script.smallest_stable_k("exact_match", [0.9, 0.5, 0.9]) == 2  # stable from K, not just at K
