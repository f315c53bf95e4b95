"""`vtw-diff`: compare lmms-eval results, a baseline run against one or more candidate runs.

    vtw-diff results/baseline results/vtw_k16 [results/vtw_k12 ...] [--format markdown]
             [--fail-on-drop 1.0] [--samples] [--labels base,k16,k12] [--allow-different-models]
             [--significance] [--fail-on-significant-drop] [--alpha 0.05] [--bootstrap 1000]
             [--tasks mme,pope] [--plot tradeoff.png]

Each input is a ``*_results.json`` written by lmms-eval, or a directory holding them (the newest
one is used). The first input is the baseline. Rows hold one entry per run, in the order given;
labels only name the columns when a table is rendered. With ``--significance`` each candidate's
difference gets a paired test on the docs both runs answered (vtw_eval.significance; the runs need
lmms-eval's ``--log_samples`` files).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path

from tabulate import tabulate
from tqdm import tqdm

from vtw_eval.files import check_writable
from vtw_eval.plots import save_png
from vtw_eval.results import (
    LMMS_EVAL_KEYS,
    THROUGHPUT_KEYS,
    Run,
    docs_per_task,
    load_run,
    model_arguments,
    number,
    sample_answers,
    samples_file,
)
from vtw_eval.significance import Aggregations, compare_task, holm

FORMATS = ("table", "markdown", "csv", "json")
# Model arguments that choose K or only say where files go: what a diff compares, not a difference
# that makes two runs incomparable (any other, dtype included, is named in the header).
WITHDRAWAL_ARGUMENTS = (
    "withdraw_layer", "calibrate_per_task", "kl_tokens", "kl_threshold", "calibration", "calibration_dir",
    "accounting_file",
)  # fmt: skip


def different_models(runs: list[Run]) -> list[str]:
    """Candidates whose weights (``pretrained``) are not the baseline's: not a baseline and its
    candidate at all, unless the user compares two models on purpose."""
    base = model_arguments(runs[0]).get("pretrained")
    found = []
    for run in runs[1:]:
        other = model_arguments(run).get("pretrained")
        if other != base:
            found.append(f"{run.label}: pretrained={other} (baseline {runs[0].label}: pretrained={base})")
    return found


def comparability_notes(runs: list[Run]) -> list[str]:
    """What else makes a candidate differ from the baseline beyond withdrawal: the backend, model
    arguments other than those choosing K (dtype, pixel budgets, ...), docs per task (``--limit``)."""
    base = runs[0]
    base_model = (base.data.get("config") or {}).get("model")
    base_args, base_docs = model_arguments(base), docs_per_task(base)
    notes = []
    for run in runs[1:]:
        model = (run.data.get("config") or {}).get("model")
        if model != base_model:
            notes.append(f"{run.label}: backend {model}, baseline {base_model}")
        args = model_arguments(run)
        changed = [
            f"{name}={args.get(name, '(default)')} (baseline {base_args.get(name, '(default)')})"
            for name in sorted(set(args) | set(base_args))
            if name not in (*WITHDRAWAL_ARGUMENTS, "pretrained") and args.get(name) != base_args.get(name)
        ]
        if changed:
            notes.append(f"{run.label}: other model arguments: {', '.join(changed)}")
        docs = docs_per_task(run)
        counts = [
            f"{task} {docs[task]} (baseline {base_docs[task]})"
            for task in sorted(base_docs)
            if task in docs and docs[task] != base_docs[task]
        ]
        if counts:
            notes.append(f"{run.label}: other numbers of docs: {', '.join(counts)}")
    return notes


def fewer_docs(runs: list[Run]) -> list[str]:
    """Tasks a candidate evaluated on fewer docs than the baseline (a gate must not pass a run
    that looked at less)."""
    base_docs = docs_per_task(runs[0])
    found = []
    for run in runs[1:]:
        docs = docs_per_task(run)
        for task, count in sorted(base_docs.items()):
            if task in docs and docs[task] < count:
                found.append(f"{task}: {run.label} evaluated {docs[task]} of the baseline's {count} docs (fewer docs)")
    return found


def metric_rows(runs: list[Run]) -> list[dict]:
    """One row per (task, metric) found in any run: per run (in order) its value and stderr, and
    for the candidates the absolute and relative delta to the baseline (the baseline's: None);
    missing ones are None."""
    keys = list(dict.fromkeys(key for run in runs for key in run.metrics))
    rows = []
    for task, metric in keys:
        entries = [run.metrics.get((task, metric)) for run in runs]
        values = [entry["value"] if entry else None for entry in entries]
        base = values[0]
        deltas = [None] + [None if value is None or base is None else value - base for value in values[1:]]
        rows.append(
            {
                "task": task,
                "metric": metric,
                "higher_is_better": next(
                    (e["higher_is_better"] for e in entries if e and e["higher_is_better"] is not None), None
                ),
                "values": values,
                "stderr": [entry["stderr"] if entry else None for entry in entries],
                # "clt": lmms-eval's CLT error of the per-doc scores, where its own stderr is N/A
                "stderr_kind": [entry["stderr_kind"] if entry else None for entry in entries],
                "delta": deltas,
                "rel": [None if delta is None or base == 0 else delta / abs(base) for delta in deltas],
                "present_in": sum(entry is not None for entry in entries),
            }
        )
    return rows


def efficiency_rows(runs: list[Run]) -> list[dict]:
    """Wall time and, when the backend logged them, the VTW figures under ``throughput``: per
    figure, one value per run."""
    rows = []
    wall = [number(run.data.get("total_evaluation_time_seconds")) for run in runs]
    if any(v is not None for v in wall):
        rows.append({"figure": "wall time (s)", "values": wall})
    # Each task's own K (withdraw_layer/<task>) and the calibration cost, when calibrate_per_task ran.
    per_task = sorted(
        {
            key.removeprefix("avg_")
            for run in runs
            for key in run.data.get("throughput") or {}
            if key.startswith(("avg_withdraw_layer/", "avg_calibration_"))
        }
    )
    named = [(key, key) for key in LMMS_EVAL_KEYS] + [(key, f"avg_{key}") for key in (*THROUGHPUT_KEYS, *per_task)]
    for key, stored in named:
        values = [number((run.data.get("throughput") or {}).get(stored)) for run in runs]
        if any(v is not None for v in values):
            rows.append({"figure": key, "values": values})
    totals = [_calibration_total(run) for run in runs]  # each task's calibration is its own key
    if any(v is not None for v in totals):
        rows.append({"figure": "calibration_tflops (all tasks)", "values": totals})
    return rows


def _calibration_total(run: Run) -> float | None:
    values = [
        number(value)
        for key, value in (run.data.get("throughput") or {}).items()
        if key.startswith("avg_calibration_tflops/")
    ]
    return sum(v for v in values if v is not None) if values else None


def sample_changes(runs: list[Run], show: int = 3) -> list[dict]:
    """Per task and candidate: how many answers differ from the baseline's, and the first few."""
    changes = []
    baseline = runs[0]
    for task in baseline.data["results"]:
        base_answers = sample_answers(baseline, task)
        if base_answers is None:
            continue
        for index, run in enumerate(runs[1:], 1):
            answers = sample_answers(run, task)
            if answers is None:
                continue
            common = sorted(set(base_answers) & set(answers))
            changed = [doc for doc in common if answers[doc] != base_answers[doc]]
            changes.append(
                {
                    "task": task,
                    "run": index,
                    "candidate": run.label,
                    "compared": len(common),
                    "changed": len(changed),
                    "examples": [(doc, base_answers[doc], answers[doc]) for doc in changed[:show]],
                }
            )
    return changes


def add_significance(
    runs: list[Run], rows: list[dict], resamples: int, alpha: float, seed: int = 0, include_path: str | None = None
) -> list[str]:
    """Each candidate's paired test against the baseline, per row (metrics with filter ``none`` and a
    number in both runs): ``test``, ``interval``, ``p_value``, ``p_holm``, ``detectable`` and each
    run's ``score_interval``, one entry per run (the baseline's None, save its score interval).
    Holm's correction runs over each candidate's gated rows. Returns notes (docs only in one run,
    rows not tested and why)."""
    tasks = list(dict.fromkeys(row["task"] for row in rows))
    files = [(samples_file(run, task), run.label) for task in tasks for run in runs]
    missing = [f"{path} ({label})" for path, label in files if not path.exists()]
    if missing:  # before any test: a partial table would pass for a whole one
        raise ValueError(
            "--significance needs lmms-eval's samples files (run lmms-eval with --log_samples); missing: "
            + ", ".join(missing)
        )
    for row in rows:
        for key in ("test", "interval", "p_value", "p_holm", "detectable", "score_interval"):
            row[key] = [None] * len(runs)
    notes, aggregations = [], Aggregations(include_path)
    by_key = {(row["task"], row["metric"]): row for row in rows}
    for index, run in enumerate(runs[1:], 1):
        for task in tqdm(tasks, desc=f"paired tests, {run.label}", disable=len(tasks) < 2):
            metrics = [
                row["metric"] for row in rows
                if row["task"] == task and row["values"][0] is not None and row["values"][index] is not None
            ]  # fmt: skip
            if not metrics:
                continue
            found, task_notes = compare_task(runs[0], run, task, metrics, resamples, seed, alpha, aggregations)
            notes += task_notes
            for metric, outcome in found.items():
                row = by_key[(task, metric)]
                if isinstance(outcome, str):
                    notes.append(f"{task} {metric} ({run.label}): not tested, {outcome}")
                    continue
                row["test"][index] = outcome.test
                row["interval"][index] = list(outcome.interval)
                row["p_value"][index] = outcome.p_value
                row["detectable"][index] = outcome.detectable
                row["score_interval"][0] = list(outcome.base_interval)
                row["score_interval"][index] = list(outcome.candidate_interval)
        gated = [row for row in rows if row["p_value"][index] is not None and row["higher_is_better"] is not None]
        for row, adjusted in zip(gated, holm([row["p_value"][index] for row in gated])):
            row["p_holm"][index] = adjusted
    return notes


def significant_drops(rows: list[dict], runs: list[Run], alpha: float, threshold: float | None) -> list[str]:
    """Gated metrics a candidate made worse with Holm-adjusted p < alpha (and, with ``threshold``,
    worse by more than it)."""
    found = []
    for row in rows:
        for index, run in enumerate(runs[1:], 1):
            p_holm = row["p_holm"][index]
            if p_holm is None or p_holm >= alpha:
                continue
            worse_by = -row["delta"][index] if row["higher_is_better"] else row["delta"][index]
            if worse_by > 0 and (threshold is None or worse_by > threshold):
                found.append(
                    f"{row['task']} {row['metric']}: {run.label} worse by {worse_by:.4g}, "
                    f"p = {p_holm:.3g} after Holm ({row['test'][index]}) < alpha {alpha:g}"
                )
    return found


def paired_fields(runs: list[Run]) -> list[str]:
    """lmms-eval's own paired test (its ``--baseline``), shown as it wrote it."""
    return [
        f"{run.label} {task}: " + ", ".join(f"{key}={value}" for key, value in fields.items())
        for run in runs
        for task, fields in run.paired.items()
    ]


def tradeoff_figure(runs: list[Run], rows: list[dict]):
    """One panel per task: each run's score (first metric with a value; its interval when tested)
    against the decoder prefill TFLOPs it saved per request (the baseline at 0)."""
    from vtw_eval.plots import plt

    saved = [_tflops_saved(run) for run in runs]
    saved[0] = 0.0 if saved[0] is None else saved[0]  # a baseline from a backend that logs no FLOPs
    shown = {}
    for row in rows:  # a task's first metric with a number in the baseline
        if row["task"] not in shown and row["values"][0] is not None:
            shown[row["task"]] = row
    columns = min(4, max(1, len(shown)))
    lines = max(1, math.ceil(len(shown) / columns))
    figure, axes = plt.subplots(lines, columns, figsize=(4 * columns, 3.2 * lines), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (task, row) in zip(axes.flat, shown.items()):
        for index, run in enumerate(runs):
            value = row["values"][index]
            if value is None or saved[index] is None:
                continue
            interval = (row.get("score_interval") or [None] * len(runs))[index]
            error = None if interval is None else [[max(0.0, value - interval[0])], [max(0.0, interval[1] - value)]]
            axis.errorbar(
                saved[index], value, yerr=error, fmt="*" if index == 0 else "o", capsize=3,
                color=colours[index % len(colours)], markersize=10 if index == 0 else 6, label=_plot_label(run),
            )  # fmt: skip
        axis.axhline(row["values"][0], color="grey", linewidth=0.8, linestyle="--")
        axis.set_title(f"{task}: {row['metric']}", fontsize=9)
        axis.set_xlabel("decoder prefill TFLOPs saved per request", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    for axis in list(axes.flat)[len(shown) :]:
        axis.set_visible(False)
    figure.suptitle("score (interval: 1 - alpha) against compute saved; dashed: the baseline (*)", fontsize=9)
    return figure


TRADEOFF_RECT = (0, 0.08, 1, 1)  # the legend below the panels


def _plot_label(run: Run) -> str:
    """The run's label, with the K that ``auto`` chose."""
    chosen = number((run.data.get("throughput") or {}).get("avg_withdraw_layer"))
    return run.label.replace("K=auto", f"K=auto ({chosen:g})") if chosen is not None else run.label


def _tflops_saved(run: Run) -> float | None:
    throughput = run.data.get("throughput") or {}
    baseline, kept = (
        number(throughput.get("avg_prefill_tflops_baseline")),
        number(throughput.get("avg_prefill_tflops_vtw")),
    )
    return None if baseline is None or kept is None else baseline - kept


def not_gated(rows: list[dict]) -> list[str]:
    """Metrics whose direction is unknown (no ``higher_is_better`` in any run's results): a gate
    cannot tell a drop from a gain there, so they are listed, never silently passed."""
    return [f"{row['task']} {row['metric']}" for row in rows if row["higher_is_better"] is None]


def drops(rows: list[dict], runs: list[Run], threshold: float) -> list[str]:
    """What fails a regression gate: every metric worse than the baseline by more than
    ``threshold`` (in metric units), and every metric the baseline has a number for that a
    candidate lacks or reports as N/A or NaN (a gate must not pass on missing results).
    Metrics of unknown direction are ``not_gated``."""
    found = []
    for row in rows:
        if row["values"][0] is None:
            continue
        for index, run in enumerate(runs[1:], 1):
            if row["values"][index] is None:
                what = "missing" if (row["task"], row["metric"]) not in run.metrics else "N/A or NaN"
                found.append(f"{row['task']} {row['metric']}: {what} in {run.label}, the baseline has a number")
                continue
            if row["higher_is_better"] is None:
                continue
            delta = row["delta"][index]
            worse_by = -delta if row["higher_is_better"] else delta
            if worse_by > threshold:
                found.append(f"{row['task']} {row['metric']}: {run.label} worse by {worse_by:.4g} (> {threshold:g})")
    return found


def drop_threshold(text: str) -> float:
    """``--fail-on-drop``: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted; use a finite number >= 0 (metric units)")
    return value


def render(
    runs: list[Run],
    rows: list[dict],
    efficiency: list[dict],
    changes: list[dict] | None,
    fmt: str,
    notes: list[str] = (),
    test_notes: list[str] = (),
) -> str:
    """The comparison in ``fmt``; the runs' labels name its columns (JSON lists the runs once and
    keeps every row's per-run lists in their order)."""
    if fmt == "json":
        document = {
            "runs": [{"label": r.label, "results_file": str(r.results_file)} for r in runs],
            "not_comparable": list(notes),
            "metrics": rows,
            "efficiency": efficiency,
            "test_notes": list(test_notes),
            "lmms_eval_paired": [run.paired for run in runs],  # per run, in order
        }
        if changes is not None:
            document["sample_changes"] = changes
        return json.dumps(document, indent=2)
    tested = any("p_value" in row for row in rows)
    headers = ["task", "metric", "hib", runs[0].label]
    for run in runs[1:]:
        headers += [run.label, "delta", "rel"]
        if tested:
            headers += ["CI low", "CI high", "p", "p Holm", "test", "detectable"]
    headers.append("stderr")
    table = []
    for row in rows:
        line = [row["task"], row["metric"], {True: "↑", False: "↓"}.get(row["higher_is_better"], "?"), row["values"][0]]
        for index in range(1, len(runs)):
            rel = row["rel"][index]
            line += [row["values"][index], row["delta"][index], None if rel is None else f"{rel:+.1%}"]
            if tested:  # rows of tasks left untested (vtw_eval's demo leaves COCO out) show N/A
                untested = [None] * len(runs)
                interval = row.get("interval", untested)[index] or (None, None)
                keys = ("p_value", "p_holm", "test", "detectable")
                line += [*interval, *(row.get(key, untested)[index] for key in keys)]
        line.append(
            " / ".join(
                "-" if s is None else f"{s:.4g}" + (f" {kind}" if kind else "")
                for s, kind in zip(row["stderr"], row["stderr_kind"])
            )
        )
        table.append(line)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(headers)
        writer.writerows([["" if v is None else v for v in line] for line in table])
        return buffer.getvalue()
    style = "github" if fmt == "markdown" else "simple"
    parts = [comparability_header(notes)] if notes else []
    parts.append(tabulate(table, headers=headers, tablefmt=style, floatfmt=".4g", missingval="N/A"))
    if efficiency:
        parts.append(
            tabulate(
                [[e["figure"], *e["values"]] for e in efficiency],
                headers=["efficiency", *[run.label for run in runs]],
                tablefmt=style,
                floatfmt=".4g",
                missingval="N/A",
            )
        )
    missing = [f"{row['task']} {row['metric']}" for row in rows if row["present_in"] < len(runs)]
    if missing:
        parts.append("Only in some runs: " + ", ".join(missing))
    unknown = not_gated(rows)
    if unknown:
        parts.append("Direction unknown (?), so not gated by --fail-on-drop: " + ", ".join(unknown))
    if tested:
        parts.append(
            "Paired tests on the docs both runs answered: CI = the difference's interval, p Holm = corrected "
            "over each candidate's gated metrics, detectable = the smallest difference found at 80% power"
        )
    parts += [f"{line}" for line in test_notes]
    paired = paired_fields(runs)
    if paired:
        parts.append("lmms-eval's own paired test (--baseline):\n" + "\n".join(f"  {line}" for line in paired))
    for change in changes or []:
        lines = [
            f"{change['task']}: {change['changed']} of {change['compared']} answers changed ({change['candidate']})"
        ]
        lines += [f"  doc {doc}: {old} -> {new}" for doc, old, new in change["examples"]]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def comparability_header(notes: list[str]) -> str:
    return "NOT COMPARABLE as they stand (differences beyond withdrawal):\n" + "\n".join(f"  {n}" for n in notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtw-diff", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="results files or output directories; the first is the baseline")
    parser.add_argument("--labels", help="comma-separated labels, one per path")
    parser.add_argument("--format", default="table", choices=FORMATS)
    parser.add_argument(
        "--fail-on-drop",
        type=drop_threshold,
        metavar="X",
        help="exit 1 when a metric gets worse than the baseline by more than X (metric units, >= 0), "
        "or when a candidate lacks a metric the baseline has",
    )
    parser.add_argument("--samples", action="store_true", help="compare --log_samples answers doc by doc")
    parser.add_argument(
        "--allow-different-models",
        action="store_true",
        help="compare runs of different checkpoints (pretrained=...) on purpose; refused otherwise",
    )
    tests = parser.add_argument_group("paired tests (need lmms-eval's --log_samples files)")
    tests.add_argument(
        "--significance",
        action="store_true",
        help="per candidate and metric: the paired difference's interval, p-value (Holm-corrected), test "
        "and smallest detectable difference",
    )
    tests.add_argument(
        "--fail-on-significant-drop",
        action="store_true",
        help="exit 1 when a metric is significantly worse after Holm's correction (implies --significance); "
        "with --fail-on-drop X, only drops larger than X count",
    )
    tests.add_argument("--alpha", type=probability, default=0.05, help="significance level (default 0.05)")
    tests.add_argument(
        "--bootstrap",
        type=resample_count,
        default=1000,
        metavar="N",
        help="resamples for metrics whose aggregate is not a per-doc mean (default 1000; 0: leave them untested)",
    )
    tests.add_argument("--seed", type=int, default=0, help="the bootstrap's seed (default 0)")
    tests.add_argument("--include_path", help="as lmms-eval's: a folder of task YAMLs of your own")
    parser.add_argument("--tasks", help="comma-separated tasks to compare (default: all in the baseline)")
    parser.add_argument(
        "--plot",
        metavar="PATH",
        help="PNG: per task, each run's score (with its interval under --significance) against the decoder "
        "prefill TFLOPs it saved",
    )
    args = parser.parse_args(argv)
    args.significance = args.significance or args.fail_on_significant_drop
    if len(args.paths) < 2:
        parser.error("give a baseline and at least one candidate")
    labels = args.labels.split(",") if args.labels else [None] * len(args.paths)
    if len(labels) != len(args.paths):
        parser.error(f"--labels has {len(labels)} labels for {len(args.paths)} paths")
    try:
        runs = [load_run(path, label) for path, label in zip(args.paths, labels)]
        files = [run.results_file.resolve() for run in runs]
        twice = sorted({str(f) for f in files if files.count(f) > 1})
        if twice:
            raise ValueError(f"the same results file is given more than once: {', '.join(twice)}")
        different = different_models(runs)
        if different and not args.allow_different_models:
            raise ValueError(
                "not the same model, so not a baseline and its candidate: "
                + "; ".join(different)
                + ". Pass --allow-different-models to compare them on purpose"
            )
        notes = [f"different model: {line}" for line in different] + comparability_notes(runs)
        rows = metric_rows(runs)
        if args.tasks:
            rows = only_tasks(rows, args.tasks)
        if args.plot:
            check_writable(Path(args.plot), "--plot")
        changes = sample_changes(runs) if args.samples else None
        test_notes = (
            add_significance(runs, rows, args.bootstrap, args.alpha, args.seed, args.include_path)
            if args.significance
            else []
        )
    except ValueError as error:
        print(f"vtw-diff: {error}", file=sys.stderr)
        return 2
    print(render(runs, rows, efficiency_rows(runs), changes, args.format, notes, test_notes))
    if args.format == "csv":  # lines above or below would break the CSV
        for line in ([comparability_header(notes)] if notes else []) + test_notes:
            print(line, file=sys.stderr)
    if changes == []:
        print("vtw-diff --samples: no samples files to compare (run lmms-eval with --log_samples)", file=sys.stderr)
    if args.plot:
        save_png(tradeoff_figure(runs, rows), args.plot, tight_rect=TRADEOFF_RECT)
        print(f"vtw-diff: wrote {args.plot}", file=sys.stderr)
    if args.fail_on_drop is None and not args.fail_on_significant_drop:
        return 0
    if args.fail_on_significant_drop:  # missing metrics and fewer docs fail either gate
        found = drops(rows, runs, math.inf) + significant_drops(rows, runs, args.alpha, args.fail_on_drop)
    else:
        found = drops(rows, runs, args.fail_on_drop)
    found += fewer_docs(runs)
    for line in found:
        print(f"DROP {line}", file=sys.stderr)
    for line in not_gated(rows):
        print(f"NOT GATED {line}: its direction is unknown (no higher_is_better in the results)", file=sys.stderr)
    return 1 if found else 0


def only_tasks(rows: list[dict], tasks: str) -> list[dict]:
    wanted = [task.strip() for task in tasks.split(",") if task.strip()]
    known = list(dict.fromkeys(row["task"] for row in rows))
    unknown = [task for task in wanted if task not in known]
    if unknown or not wanted:
        raise ValueError(
            f"--tasks {tasks!r}: {', '.join(unknown) or 'no task'} not in the runs; they have {', '.join(known)}"
        )
    return [row for row in rows if row["task"] in wanted]


def probability(text: str) -> float:
    """``--alpha``: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted; use a number between 0 and 1, e.g. 0.05")
    return value


def resample_count(text: str) -> int:
    """``--bootstrap``: an integer >= 0."""
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted; use an integer >= 0 (0 leaves them untested)")
    return int(text)


if __name__ == "__main__":
    sys.exit(main())
