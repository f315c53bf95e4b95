"""Run the lmms-eval CLI as a subprocess and return the results file it wrote.

lmms-eval 0.7.3 exits 0 when an evaluation fails unless ``--verbosity DEBUG`` is given, so this
always passes it, and also checks that a new ``*_results.json`` appeared.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def newest_results_file(directory: str | Path) -> Path | None:
    """The newest lmms-eval ``*_results.json`` anywhere under ``directory`` (by time, then name)."""
    files = sorted(Path(directory).rglob("*_results.json"), key=lambda p: (p.stat().st_mtime, p.name))
    return files[-1] if files else None


def run_lmms_eval(
    model: str,
    model_args: str,
    tasks: str,
    output_path: str | Path,
    *extra_args: str,
    include_path: str | Path = REPO_ROOT / "tasks",
    log_file: str | Path | None = None,
    processes: int = 1,
    env: dict[str, str] | None = None,
    module: str = "lmms_eval",
) -> Path:
    """Evaluate ``tasks`` with ``model`` from the repository root; raise if no results were written.

    ``processes`` > 1 launches data-parallel ranks with accelerate (on CPU too); ``env`` adds
    environment variables (e.g. ``vtw_eval.testbed.hub_cache.hub_environment``). The package's own
    tasks (vtw_calibration) are in ``vtw_eval.tasks.TASKS_DIR``. ``module`` is what ``python -m``
    runs: lmms-eval's CLI, or a module that calls it after registering more backends (the tests'
    ``lmms_eval_with_shims``).
    """
    before = newest_results_file(output_path)
    launcher = []
    if processes > 1:  # `--cpu --num_processes N` starts one process; this form starts N, CPU or GPU
        launcher = [
            "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        ]  # fmt: skip
    command = [
        sys.executable, *launcher, "-m", module, "--model", model, "--model_args", model_args,
        "--tasks", tasks, "--include_path", str(include_path), "--output_path", str(output_path),
        "--verbosity", "DEBUG", *extra_args,
    ]  # fmt: skip
    Path(output_path).mkdir(parents=True, exist_ok=True)
    log_file = Path(log_file or Path(output_path) / "lmms_eval.log")
    with open(log_file, "a") as log:
        completed = subprocess.run(
            command,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    after = newest_results_file(output_path)
    if completed.returncode != 0 or after is None or after == before:
        raise RuntimeError(
            f"lmms-eval failed (exit {completed.returncode}, no new results in {output_path}); "
            f"see {log_file}\ncommand: {' '.join(command)}"
        )
    return after
