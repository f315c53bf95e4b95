"""Evaluate the testbed at every withdrawal layer K = 0..L through the lmms-eval CLI and plot each
task's score against K, next to the calibration's mean KL per layer.

    python scripts/sweep_testbed.py      # after `make demo`: it writes the calibration file and the cache
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from vtw_eval.files import write_atomically
from vtw_eval.results import load_run
from vtw_eval.run import REPO_ROOT, run_lmms_eval
from vtw_eval.testbed.hub_cache import TASK_NAMES, hub_environment
from vtw_eval.testbed.tasks import BEST, CHANCE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO_ROOT / "testbed" / "model"))
    parser.add_argument("--calibration-dir", default=str(REPO_ROOT / "results" / "demo" / "calibration"))
    parser.add_argument("--out", default=str(REPO_ROOT / "results" / "sweep"))
    parser.add_argument("--limit", type=int, help="docs per task (a quick check); default all")
    parser.add_argument("--hf-home", default=str(REPO_ROOT / "results" / "hf_home"), help="the testbed's cache")
    args = parser.parse_args()
    env = hub_environment(args.hf_home)  # written by `make testbed-cache`
    (calibration_file,) = Path(args.calibration_dir).glob("*.json")  # the demo calibrates one model there
    calibration = json.loads(calibration_file.read_text())
    num_layers = calibration["num_layers"]
    out = Path(args.out)

    scores = {task: [] for task in CHANCE}
    options = ["--batch_size", "8", *(["--limit", str(args.limit)] if args.limit else [])]
    for layer in tqdm(range(num_layers + 1), desc="withdraw_layer"):
        model_args = f"pretrained={args.model},device=cpu,withdraw_layer={layer},accounting_file={out}/k{layer}.jsonl"
        results_file = run_lmms_eval(
            "vtw_llava", model_args, ",".join(TASK_NAMES), out / f"k{layer}", *options, env=env
        )
        run = load_run(results_file)
        for task, (metric, _) in CHANCE.items():
            scores[task].append(run.metrics[(task, metric)]["value"])
    write_atomically(
        out / "sweep.json", (json.dumps({"scores": scores, "calibration": calibration}, indent=2) + "\n").encode()
    )

    from vtw_eval.plots import plt, save_png

    figure, (scores_axes, kl_axes) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    layers = range(num_layers + 1)
    for task, (metric, chance) in CHANCE.items():
        best = BEST.get(metric) or max(v for v in scores[task] if v is not None) or 1.0
        scores_axes.plot(layers, [v / best for v in scores[task]], marker="o", label=f"{task} ({metric})")
    scores_axes.axvline(
        calibration["withdraw_layer"],
        color="green",
        linestyle=":",
        label=f"calibrated K={calibration['withdraw_layer']}",
    )
    scores_axes.set_ylabel("score / best (CIDEr / its max)")
    scores_axes.legend(fontsize=7)
    kl_axes.plot(
        range(num_layers), calibration["mean_kl"][:-1], color="black", marker="o", label="mean KL(p_k || p_full)"
    )
    kl_axes.axhline(
        calibration["kl_threshold"], color="red", linestyle="--", label=f"threshold {calibration['kl_threshold']}"
    )
    kl_axes.set_yscale("log")
    kl_axes.set_xlabel("withdrawal layer K (K = L: no withdrawal)")
    kl_axes.legend(fontsize=7)
    save_png(figure, out / "sweep.png")
    print(json.dumps(scores, indent=1))
    print(f"wrote {out / 'sweep.json'} and {out / 'sweep.png'}")


if __name__ == "__main__":
    main()
