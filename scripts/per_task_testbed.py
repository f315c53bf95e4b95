"""Per-task calibration on the testbed: each task's own K (calibrate_per_task) with the paper's
criterion (kl_tokens=1) and with the KL over the answer (kl_tokens=T), against the sweep and the
global calibrated K. Prints and writes one table (results/per_task/table.md, .json) and copies
each run's calibration plot there.

    python scripts/per_task_testbed.py      # after `make demo` and scripts/sweep_testbed.py

"Within 2 points" is the testbed's rule (vtw_eval.testbed.tasks.check_claims): |score - baseline|
at most 2% of the metric's full range; for CIDEr, which has no upper bound, 2% of the baseline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from tabulate import tabulate
from tqdm import tqdm

from vtw_eval.files import write_atomically
from vtw_eval.results import load_run
from vtw_eval.run import REPO_ROOT, run_lmms_eval
from vtw_eval.testbed.hub_cache import TASK_NAMES, hub_environment
from vtw_eval.testbed.tasks import BEST, CHANCE


def within_two_points(metric: str, score: float, baseline: float) -> bool:
    scale = BEST.get(metric, abs(baseline))
    return abs(score - baseline) <= 0.02 * scale + 1e-9  # 2 docs of 100 are 2 points, in floats too


def smallest_stable_k(metric: str, scores: list[float]) -> int:
    """The smallest K whose score, and every larger K's, is within 2 points of the baseline (K=L)."""
    k = len(scores) - 1
    while k > 0 and within_two_points(metric, scores[k - 1], scores[-1]):
        k -= 1
    return k


def saved_per_task(accounting_file: Path) -> dict[str, tuple[int, float]]:
    """Per task: the K its requests ran at, and the mean prefill FLOPs saved per request."""
    records = [json.loads(line) for line in accounting_file.read_text().splitlines()]
    figures = {}
    for task in {r["task"] for r in records}:
        mine = [r for r in records if r["task"] == task]
        figures[task] = (mine[0]["withdraw_layer"], sum(r["prefill_flops_saved"] for r in mine) / len(mine))
    return figures


def overall_saved(accounting_file: Path) -> float:
    """Mean prefill FLOPs saved per request over all tasks (the demo's ``prefill_flops_saved``)."""
    records = [json.loads(line) for line in accounting_file.read_text().splitlines()]
    return sum(r["prefill_flops_saved"] for r in records) / len(records)


def calibration_share(results: dict, accounting_file: Path) -> float:
    """The calibration's decoder FLOPs (every task's ``calibration_tflops/<task>``) over the run's
    decoder prefill FLOPs (the accounting records')."""
    throughput = results.get("throughput") or {}
    calibration = sum(v for k, v in throughput.items() if k.startswith("avg_calibration_tflops/")) * 1e12
    records = [json.loads(line) for line in accounting_file.read_text().splitlines()]
    return calibration / sum(r["prefill_flops_vtw"] for r in records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO_ROOT / "testbed" / "model"))
    parser.add_argument("--sweep", default=str(REPO_ROOT / "results" / "sweep"), help="scripts/sweep_testbed.py's")
    parser.add_argument("--out", default=str(REPO_ROOT / "results" / "per_task"))
    parser.add_argument("--kl-tokens", type=int, nargs="+", default=[1, 16], help="criteria to compare")
    parser.add_argument("--samples", type=int, default=20, help="calibrate_per_task: prompts per task")
    parser.add_argument("--hf-home", default=str(REPO_ROOT / "results" / "hf_home"), help="the testbed's cache")
    args = parser.parse_args(argv)
    sweep_dir, out = Path(args.sweep), Path(args.out)
    if not (sweep_dir / "sweep.json").is_file():
        parser.error(f"--sweep {sweep_dir}: no sweep.json there; run scripts/sweep_testbed.py first")
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    global_k = sweep["calibration"]["withdraw_layer"]
    global_accounting = sweep_dir / f"k{global_k}.jsonl"
    if not global_accounting.is_file():
        parser.error(f"--sweep {sweep_dir}: no accounting file k{global_k}.jsonl; run scripts/sweep_testbed.py")
    env = hub_environment(args.hf_home)

    runs = {}
    for kl_tokens in tqdm(args.kl_tokens, desc="kl_tokens"):
        run_dir = out / f"kl_tokens{kl_tokens}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh calibration, so that its cost is measured
        model_args = (
            f"pretrained={args.model},device=cpu,withdraw_layer=auto,calibrate_per_task={args.samples},"
            f"kl_tokens={kl_tokens},calibration_dir={run_dir / 'calibration'},"
            f"accounting_file={run_dir / 'requests.jsonl'}"
        )
        results_file = run_lmms_eval(
            "vtw_llava", model_args, ",".join(TASK_NAMES), run_dir, "--batch_size", "8", env=env
        )
        runs[kl_tokens] = (load_run(results_file), saved_per_task(run_dir / "requests.jsonl"))
        (plot,) = (run_dir / "calibration").glob("*.png")  # one curve per task, with its K
        shutil.copy(plot, out / f"calibration_kl_tokens{kl_tokens}.png")

    rows, record = [], {"global_k": global_k, "samples": args.samples, "tasks": {}}
    global_saved = saved_per_task(global_accounting)
    for task, (metric, _) in CHANCE.items():
        scores = sweep["scores"][task]
        baseline = scores[-1]
        entry = {"metric": metric, "baseline": baseline, "smallest_stable_k": smallest_stable_k(metric, scores)}
        row = [task, f"{baseline:.3g}", entry["smallest_stable_k"]]
        for kl_tokens, (run, saved) in runs.items():
            k, fraction = saved[task]
            score = run.metrics[(task, metric)]["value"]
            ok = within_two_points(metric, score, baseline)
            entry[f"kl_tokens={kl_tokens}"] = {"k": k, "score": score, "within_2_points": ok, "prefill_saved": fraction}
            row += [k, f"{score:.3g}{'' if ok else ' (!)'}", f"{fraction:.1%}"]
        score = scores[global_k]
        ok = within_two_points(metric, score, baseline)
        entry["global"] = {"k": global_k, "score": score, "within_2_points": ok, "prefill_saved": global_saved[task][1]}
        row += [global_k, f"{score:.3g}{'' if ok else ' (!)'}", f"{global_saved[task][1]:.1%}"]
        rows.append(row)
        record["tasks"][task] = entry
    means = ["mean over requests", "", ""]
    for kl_tokens in runs:
        accounting = out / f"kl_tokens{kl_tokens}" / "requests.jsonl"
        share = calibration_share(runs[kl_tokens][0].data, accounting)
        fraction = overall_saved(accounting)
        record[f"kl_tokens={kl_tokens}"] = {"prefill_saved": fraction, "calibration_share_of_prefill": share}
        means += ["", f"calibration {share:.1%} of prefill", f"{fraction:.1%}"]
    record["global"] = {"prefill_saved": overall_saved(global_accounting)}
    means += ["", "", f"{record['global']['prefill_saved']:.1%}"]
    rows.append(means)
    headers = ["task", "baseline", "smallest K within 2 pts"]
    for kl_tokens in runs:
        headers += [f"K (T={kl_tokens})", "score", "decoder prefill saved"]
    headers += [f"global K={global_k}", "score", "decoder prefill saved"]
    table = tabulate(rows, headers=headers, tablefmt="github")
    text = (
        f"Per-task calibration ({args.samples} prompts per task, threshold 0.003); (!) = more than 2 points "
        f"from the baseline.\n\n{table}\n"
    )
    print(text)
    write_atomically(out / "table.md", text.encode())
    write_atomically(out / "table.json", (json.dumps(record, indent=2) + "\n").encode())
    print(f"wrote {out / 'table.md'} and {out / 'table.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
