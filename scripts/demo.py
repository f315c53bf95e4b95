"""The main job on the embedded default: baseline vs VTW through the lmms-eval CLI, offline.

Until the trained testbed lands, the model is a tiny random LLaVA (built here from configs) and
the task is the tiny local MME-format task in tasks/vtw_tiny; its scores mean nothing beyond
"the whole pipeline runs". Everything is written under results/demo/.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tqdm import tqdm

from vtw_eval.diff import efficiency_rows, load_run, metric_rows, render, sample_changes
from vtw_eval.run import REPO_ROOT, run_lmms_eval
from vtw_eval.tiny_models import build_tiny_llava


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "results" / "demo"))
    parser.add_argument("--withdraw-layer", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out = Path(args.out)
    model_path = build_tiny_llava(out / "tiny_llava", num_layers=4, seed=0)

    runs = {"baseline": "none", f"vtw_k{args.withdraw_layer}": str(args.withdraw_layer)}
    results_files = []
    for name, layer in tqdm(runs.items(), desc="lmms-eval runs"):
        results_files.append(
            run_lmms_eval(
                "vtw_llava",
                f"pretrained={model_path},withdraw_layer={layer},device=cpu",
                "vtw_tiny_mme,vtw_tiny_mme_choice",
                out / name,
                "--batch_size", "4",
                "--log_samples",
            )
        )
    loaded = [load_run(path, label) for path, label in zip(results_files, runs)]
    summary = render(loaded, metric_rows(loaded), efficiency_rows(loaded), sample_changes(loaded), "markdown")
    print(summary)
    summary_file = out / "summary.md"
    tmp = summary_file.with_suffix(".md.tmp")
    tmp.write_text(summary + "\n")
    tmp.replace(summary_file)  # atomic: never a half-written summary
    print(f"\nwrote {summary_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
