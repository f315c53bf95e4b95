"""The main job on the embedded default, offline, through the lmms-eval CLI: the testbed LLaVA
(testbed/model) on the miniature benchmarks (tasks/vtw_testbed).

1. calibrate K (vtw_calibration_testbed);
2. evaluate the baseline (withdraw_layer=none), VTW at the calibrated K (withdraw_layer=auto) and
   K=0 (no decoder layer sees the image);
3. print one table (vtw-diff: task, metric, baseline, VTW, delta; then the compute saved) with
   each task's chance level, and check the testbed's claims: (a) baseline far above chance,
   (b) near chance at K=0 on the vision-dependent tasks, (c) VTW within 2 points of baseline.
Everything is written under results/demo/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tabulate import tabulate
from tqdm import tqdm

from vtw_eval.diff import efficiency_rows, load_run, metric_rows, render
from vtw_eval.files import write_atomically
from vtw_eval.run import REPO_ROOT, run_lmms_eval
from vtw_eval.testbed.tasks import CHANCE, check_claims


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO_ROOT / "testbed" / "model"))
    parser.add_argument("--out", default=str(REPO_ROOT / "results" / "demo"))
    parser.add_argument("--limit", type=int, help="docs per task (a quick check); default all")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out = Path(args.out)
    common = f"pretrained={args.model},device=cpu,calibration_dir={out / 'calibration'}"
    limit = ["--limit", str(args.limit)] if args.limit else []
    steps = [  # (name, withdraw_layer, tasks)
        ("calibration", "none", "vtw_calibration_testbed"),
        ("baseline", "none", "vtw_testbed"),
        ("vtw", "auto", "vtw_testbed"),
        ("k0", "0", "vtw_testbed"),
    ]
    results_files = {}
    for name, layer, tasks in tqdm(steps, desc="lmms-eval runs"):
        model_args = f"{common},withdraw_layer={layer},accounting_file={out / name / 'requests.jsonl'}"
        results_files[name] = run_lmms_eval(
            "vtw_llava", model_args, tasks, out / name, "--batch_size", "8", "--log_samples", *limit
        )
    record = json.loads(results_files["calibration"].read_text())["results"]["vtw_calibration_testbed"]
    record = record["vtw_calibration,none"]
    print(f"calibration: {record['message']} ({record['num_samples']} samples); plot {record['plot']}")

    k = record["withdraw_layer"]
    labels = {"baseline": "baseline", "vtw": f"VTW K={k}", "k0": "K=0"}
    runs = [load_run(results_files[name], label) for name, label in labels.items()]
    rows = metric_rows(runs)
    summary = render(runs, rows, efficiency_rows(runs), None, "markdown")
    chance = tabulate(
        [[task, metric, value] for task, (metric, value) in CHANCE.items()],
        headers=["task", "metric", "chance"],
        tablefmt="github",
    )
    claims = check_claims(rows, *labels.values(), withdraw_layer=k, num_layers=record["num_layers"])
    verdicts = "\n".join(f"- {claim}: {'met' if ok else 'NOT met'} ({detail})" for claim, ok, detail in claims)
    text = f"{summary}\n\nChance levels:\n\n{chance}\n\nClaims:\n{verdicts}\n"
    print(text)
    write_atomically(out / "summary.md", text.encode())
    claims_record = {"withdraw_layer": k, "claims": [{"claim": c, "met": ok, "detail": d} for c, ok, d in claims]}
    write_atomically(out / "claims.json", (json.dumps(claims_record, indent=2) + "\n").encode())
    print(f"wrote {out / 'summary.md'} and {out / 'claims.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
