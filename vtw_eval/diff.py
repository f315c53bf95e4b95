"""`vtw-diff`: compare lmms-eval results, a baseline run against one or more candidate runs.

    vtw-diff results/baseline results/vtw_k16 [results/vtw_k12 ...] [--format markdown]
             [--fail-on-drop 1.0] [--samples] [--labels base,k16,k12] [--allow-different-models]

Each input is a ``*_results.json`` written by lmms-eval, or a directory holding them (the newest
one is used). The first input is the baseline. Rows hold one entry per run, in the order given;
labels only name the columns when a table is rendered.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys

from tabulate import tabulate

from vtw_eval.results import (
    LMMS_EVAL_KEYS,
    THROUGHPUT_KEYS,
    Run,
    docs_per_task,
    load_run,
    model_arguments,
    number,
    sample_answers,
)

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
) -> str:
    """The comparison in ``fmt``; the runs' labels name its columns (JSON lists the runs once and
    keeps every row's per-run lists in their order)."""
    if fmt == "json":
        document = {
            "runs": [{"label": r.label, "results_file": str(r.results_file)} for r in runs],
            "not_comparable": list(notes),
            "metrics": rows,
            "efficiency": efficiency,
        }
        if changes is not None:
            document["sample_changes"] = changes
        return json.dumps(document, indent=2)
    headers = ["task", "metric", "hib", runs[0].label]
    for run in runs[1:]:
        headers += [run.label, "delta", "rel"]
    headers.append("stderr")
    table = []
    for row in rows:
        line = [row["task"], row["metric"], {True: "↑", False: "↓"}.get(row["higher_is_better"], "?"), row["values"][0]]
        for index in range(1, len(runs)):
            rel = row["rel"][index]
            line += [row["values"][index], row["delta"][index], None if rel is None else f"{rel:+.1%}"]
        line.append(" / ".join("-" if s is None else f"{s:.4g}" for s in row["stderr"]))
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
    args = parser.parse_args(argv)
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
        changes = sample_changes(runs) if args.samples else None
    except ValueError as error:
        print(f"vtw-diff: {error}", file=sys.stderr)
        return 2
    print(render(runs, rows, efficiency_rows(runs), changes, args.format, notes))
    if notes and args.format == "csv":  # a header line would break the CSV
        print(comparability_header(notes), file=sys.stderr)
    if changes == []:
        print("vtw-diff --samples: no samples files to compare (run lmms-eval with --log_samples)", file=sys.stderr)
    if args.fail_on_drop is not None:
        found = drops(rows, runs, args.fail_on_drop) + fewer_docs(runs)
        for line in found:
            print(f"DROP {line}", file=sys.stderr)
        for line in not_gated(rows):
            print(f"NOT GATED {line}: its direction is unknown (no higher_is_better in the results)", file=sys.stderr)
        return 1 if found else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
