"""The main job on the embedded default, offline, through the lmms-eval CLI: the testbed LLaVA
(testbed/model) on the miniature benchmarks (testbed/data), run as lmms-eval's built-in tasks
(mme, pope, scienceqa_img, gqa, textvqa_val, mmbench_en_dev_static, coco2017_cap_val) from a
datasets cache of this project's (`make testbed-cache` writes it to results/hf_home).

1. calibrate K (the vtw_calibration group: 20 docs each of ScienceQA-IMG, MME and GQA);
2. evaluate the baseline (withdraw_layer=none), VTW at the calibrated K (withdraw_layer=auto) and
   K=0 (no decoder layer sees the image);
3. print one table (vtw-diff: task, metric, baseline, VTW, delta with its paired test; then the
   compute saved) with each task's chance level, draw score against compute saved
   (tradeoff.png), and check the testbed's claims: (a) baseline far above chance, (b) near chance
   at K=0 on the vision-dependent tasks, (c) VTW within 2 points of baseline.
Everything is written under results/demo/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tabulate import tabulate
from tqdm import tqdm

from vtw_eval.diff import TRADEOFF_RECT, add_significance, efficiency_rows, metric_rows, render, tradeoff_figure
from vtw_eval.files import write_atomically
from vtw_eval.plots import save_png
from vtw_eval.results import load_run
from vtw_eval.run import REPO_ROOT, run_lmms_eval
from vtw_eval.tasks import TASKS_DIR
from vtw_eval.testbed.hub_cache import TASK_NAMES, written_hub_environment
from vtw_eval.testbed.tasks import CHANCE, check_claims

UNTESTED_IN_DEMO = ("coco2017_cap_val",)
DEMO_RESAMPLES = 200  # MMBench's aggregate runs pandas per call: 1000 resamples would add minutes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO_ROOT / "testbed" / "model"))
    parser.add_argument("--out", default=str(REPO_ROOT / "results" / "demo"))
    parser.add_argument("--limit", type=int, help="docs per task (a quick check); default all")
    parser.add_argument("--hf-home", default=str(REPO_ROOT / "results" / "hf_home"), help="the testbed's cache")
    args = parser.parse_args(argv)
    try:
        env = written_hub_environment(args.hf_home)
    except ValueError as error:
        parser.error(str(error))
    out = Path(args.out)
    tasks = ",".join(TASK_NAMES)
    common = f"pretrained={args.model},device=cpu,calibration_dir={out / 'calibration'}"
    limit = ["--limit", str(args.limit)] if args.limit else []
    steps = [  # (name, withdraw_layer, tasks)
        ("calibration", "none", "vtw_calibration"),
        ("baseline", "none", tasks),
        ("vtw", "auto", tasks),
        ("k0", "0", tasks),
    ]
    results_files = {}
    for name, layer, run_tasks in tqdm(steps, desc="lmms-eval runs"):
        model_args = f"{common},withdraw_layer={layer},accounting_file={out / name / 'requests.jsonl'}"
        results_files[name] = run_lmms_eval(
            "vtw_llava", model_args, run_tasks, out / name, "--batch_size", "8", "--log_samples", *limit,
            include_path=TASKS_DIR, env=env,
        )  # fmt: skip
    record = json.loads(results_files["calibration"].read_text())["results"]["vtw_calibration"]
    record = record["vtw_calibration,none"]
    print(f"calibration: {record['message']} ({record['num_samples']} samples); plot {record['plot']}")

    k = record["withdraw_layer"]
    labels = {"baseline": "baseline", "vtw": f"VTW K={k}", "k0": "K=0"}
    runs = [load_run(results_files[name], label) for name, label in labels.items()]
    rows = metric_rows(runs)
    # Paired tests of every task but COCO: one CIDEr aggregate costs about 1 s here (a Java
    # tokenizer per call), so its bootstrap would take half an hour (docs/comparing-runs.md).
    tested = [row for row in rows if row["task"] not in UNTESTED_IN_DEMO]
    test_notes = add_significance(runs, tested, resamples=DEMO_RESAMPLES, alpha=0.05)
    test_notes.append(f"not tested here (cost): {', '.join(UNTESTED_IN_DEMO)}")
    summary = render(runs, rows, efficiency_rows(runs), None, "markdown", test_notes=test_notes)
    save_png(tradeoff_figure(runs, rows), out / "tradeoff.png", tight_rect=TRADEOFF_RECT)
    chance = tabulate(
        [[task, metric, value] for task, (metric, value) in CHANCE.items()],
        headers=["task", "metric", "chance"],
        tablefmt="github",
    )
    claims = check_claims(rows, withdraw_layer=k, num_layers=record["num_layers"])  # runs in that order
    verdicts = "\n".join(f"- {claim}: {'met' if ok else 'NOT met'} ({detail})" for claim, ok, detail in claims)
    text = f"{summary}\n\nChance levels:\n\n{chance}\n\nClaims:\n{verdicts}\n"
    print(text)
    write_atomically(out / "summary.md", text.encode())
    claims_record = {"withdraw_layer": k, "claims": [{"claim": c, "met": ok, "detail": d} for c, ok, d in claims]}
    write_atomically(out / "claims.json", (json.dumps(claims_record, indent=2) + "\n").encode())
    print(f"wrote {out / 'summary.md'}, {out / 'claims.json'} and {out / 'tradeoff.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
