"""What vtw-diff's paired tests cost: the bootstrap of a per-doc mean (vectorised) against a plain
Python loop over the same draws, and one resample of an aggregate that calls the task's own
function (POPE's F1; with --coco-samples FILE, COCO's CIDEr from a real samples file).

    python scripts/bench_significance.py [--docs 5000] [--resamples 1000] [--repeats 5]
                                         [--coco-samples results/demo/baseline/.../*_samples_coco2017_cap_val.jsonl]

Prints medians and [min, max] over the repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from tabulate import tabulate

from vtw_eval.significance import MEAN, Aggregations, paired_bootstrap, resample_draws


def timed(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def plain_loop(base: list, candidate: list, resamples: int) -> None:
    for draw in resample_draws(len(base), resamples, 0):
        sum(candidate[i] for i in draw) / len(draw) - sum(base[i] for i in draw) / len(draw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=5000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--coco-samples", help="a coco2017_cap_val samples file: time one CIDEr aggregate")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    base = list(rng.integers(0, 2, args.docs).astype(float))
    candidate = list(np.where(rng.uniform(size=args.docs) < 0.05, 1 - np.array(base), base))
    rows = []

    def add(what: str, times: list[float], per: str = "") -> None:
        median = statistics.median(times)
        rows.append([what, f"{median:.3f}", f"[{min(times):.3f}, {max(times):.3f}]", per])

    size = f"{args.docs} docs x {args.resamples} resamples"
    add(
        f"mean metric, vectorised ({size})",
        timed(lambda: paired_bootstrap(base, candidate, MEAN, None, args.resamples, 0, 0.05), args.repeats),
    )
    add(f"mean metric, plain Python loop ({size})", timed(lambda: plain_loop(base, candidate, args.resamples), 1))
    aggregations = Aggregations()
    pope_run = _PopeRun()
    pope_f1 = aggregations.of(pope_run, "pope", "pope_f1_score")
    items = [
        {"question_id": str(i), "score": 1.0, "prediction": "yes" if b else "no", "ground_truth": "yes"}
        for i, b in enumerate(base)
    ]
    times = timed(lambda: pope_f1(items), args.repeats)
    add(f"POPE F1, one aggregate of {args.docs} docs", times, f"x {2 * args.resamples} for a bootstrap")
    if args.coco_samples:
        samples = [json.loads(line) for line in open(args.coco_samples)]
        cider = aggregations.of(_CocoRun(), "coco2017_cap_val", "coco_CIDEr")
        coco_items = [sample["coco_CIDEr"] for sample in samples]
        times = timed(lambda: cider(coco_items), min(args.repeats, 3))
        add(f"COCO CIDEr, one aggregate of {len(coco_items)} docs", times, f"x {2 * args.resamples} for a bootstrap")
    print(tabulate(rows, headers=["what", "median s", "[min, max]", "a bootstrap needs"], tablefmt="github"))
    return 0


class _PopeRun:
    """Just enough of a results file for Aggregations to look POPE's function up by task name."""

    data = {"configs": {"pope": {"metric_list": [{"metric": "pope_f1_score", "aggregation": "<function>"}]}}}


class _CocoRun:
    data = {"configs": {"coco2017_cap_val": {"metric_list": [{"metric": "coco_CIDEr", "aggregation": "<function>"}]}}}


if __name__ == "__main__":
    raise SystemExit(main())
