"""The main job on the embedded default, offline, through the lmms-eval CLI: calibrate K, then
evaluate the baseline and VTW at that K, and compare them with vtw-diff.

Until the trained testbed lands, the model is a tiny random LLaVA (built here from configs) and
the tasks are the tiny local MME-format tasks in tasks/vtw_tiny; their scores mean nothing beyond
"the whole pipeline runs". Everything is written under results/demo/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from vtw_eval.diff import efficiency_rows, load_run, metric_rows, render, sample_changes
from vtw_eval.files import write_atomically
from vtw_eval.run import REPO_ROOT, run_lmms_eval
from vtw_eval.tiny_models import build_tiny_llava


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "results" / "demo"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out = Path(args.out)
    model_path = build_tiny_llava(out / "tiny_llava", num_layers=4, seed=0)

    common = f"pretrained={model_path},device=cpu,calibration_dir={out / 'calibration'}"
    steps = [  # (name, model args, tasks)
        ("calibration", common, "vtw_calibration_tiny"),
        ("baseline", common + ",withdraw_layer=none", "vtw_tiny_mme,vtw_tiny_mme_choice"),
        ("vtw", common + ",withdraw_layer=auto", "vtw_tiny_mme,vtw_tiny_mme_choice"),
    ]
    results_files = {}
    for name, model_args, tasks in tqdm(steps, desc="lmms-eval runs"):
        model_args += f",accounting_file={out / name / 'requests.jsonl'}"
        results_files[name] = run_lmms_eval(
            "vtw_llava", model_args, tasks, out / name, "--batch_size", "4", "--log_samples"
        )
    record = json.loads(results_files["calibration"].read_text())["results"]["vtw_calibration_tiny"]
    record = record["vtw_calibration,none"]
    print(f"calibration: {record['message']} ({record['num_samples']} samples); plot {record['plot']}")
    runs = {"baseline": results_files["baseline"], f"vtw K={record['withdraw_layer']}": results_files["vtw"]}
    loaded = [load_run(path, label) for label, path in runs.items()]
    summary = render(loaded, metric_rows(loaded), efficiency_rows(loaded), sample_changes(loaded), "markdown")
    print(summary)
    summary_file = out / "summary.md"
    write_atomically(summary_file, (summary + "\n").encode())
    print(f"\nwrote {summary_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
