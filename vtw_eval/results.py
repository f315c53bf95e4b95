"""What an lmms-eval run left behind: its results file (metrics, ``config``, ``n-samples``,
``throughput``) and, with ``--log_samples``, its answers doc by doc. Read by ``vtw-diff``, the demo
and the GPU check."""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from vtw_eval.run import newest_results_file

# What the vtw backends log per run under lmms-eval's ``throughput`` (as ``avg_<key>``;
# vtw_eval.accounting writes them), in the order vtw-diff shows them. Each task's K and
# calibration cost come as ``<key>/<task>``.
THROUGHPUT_KEYS = (
    "withdraw_layer",
    "visual_tokens",
    "visual_tokens_per_layer",
    "kept_tokens",
    "prefill_tflops_baseline",
    "prefill_tflops_vtw",
    "prefill_flops_saved",
    "prefill_tflops_whole_model_baseline",
    "prefill_tflops_whole_model_vtw",
    "prefill_flops_whole_model_saved",
    "kv_cache_mb_baseline",
    "kv_cache_mb_vtw",
    "kv_cache_saved",
    "ttft",
    "tpot",
    "prefill_seconds_per_batch",
    "decode_seconds_per_step",
)
# lmms-eval's own figures in ``throughput`` (no ``avg_`` prefix added).
LMMS_EVAL_KEYS = ("total_gen_tokens", "total_elapsed_time", "avg_speed")


@dataclass
class Run:
    label: str
    results_file: Path
    data: dict
    metrics: dict[tuple[str, str], dict] = field(default_factory=dict)  # (task, metric) -> value, stderr, hib
    paired: dict[str, dict] = field(default_factory=dict)  # task -> lmms-eval's paired_* fields (--baseline)


def find_results_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        newest = newest_results_file(path)
        if newest is None:
            raise ValueError(f"{path}: no lmms-eval *_results.json file in this directory")
        return newest
    raise ValueError(f"{path}: no such file or directory")


def number(value) -> float | None:
    """A value as a float (numbers and numeric strings); None for "N/A", NaN and anything else."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def load_run(path: str | Path, label: str | None = None) -> Run:
    results_file = find_results_file(Path(path))
    try:
        data = json.loads(results_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{results_file}: not a readable JSON file ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(f"{results_file}: not an lmms-eval results file (no 'results' section)")
    config = data.get("config") or {}
    run = Run(label, results_file, data)
    if label is None:
        run.label = default_label(run, config.get("model", results_file.parent.name))
    higher_is_better = data.get("higher_is_better") or {}
    for task, entries in data["results"].items():
        for key, value in entries.items():
            if "," not in key or "_stderr" in key:
                continue
            metric, filter_name = key.split(",", 1)
            name = metric if filter_name == "none" else key
            stderr = number(entries.get(f"{metric}_stderr,{filter_name}"))
            # lmms-eval's CLT error (of the per-doc scores' mean) where its bootstrap one is N/A
            clt = None if stderr is not None else number(entries.get(f"{metric}_stderr_clt,{filter_name}"))
            run.metrics[(task, name)] = {
                "value": number(value),
                "stderr": stderr if clt is None else clt,
                "stderr_kind": "clt" if clt is not None else None,
                "higher_is_better": (higher_is_better.get(task) or {}).get(metric),
            }
        # lmms-eval's own paired test against its --baseline samples file, as it wrote it
        paired = {key: value for key, value in entries.items() if key.startswith("paired_")}
        if paired:
            run.paired[task] = paired
    return run


def default_label(run: Run, model: str) -> str:
    """The backend, and how it withdrew: ``K=16`` (VTW), ``random p=2 keep=0.25 seed=0``, or
    ``fastv p=2 matched K=8``."""
    args = model_arguments(run)
    method = args.get("method", "vtw")
    if method != "vtw":
        share = (
            f"matched K={args['match_withdraw_layer']}"
            if "match_withdraw_layer" in args
            else f"keep={args.get('keep_ratio')}"
        )
        seed = f" seed={args.get('seed', 0)}" if method == "random" else ""
        return f"{model} {method} p={args.get('prune_layer', 2)} {share}{seed}"
    return model + (f" K={args['withdraw_layer']}" if "withdraw_layer" in args else "")


def model_arguments(run: Run) -> dict[str, str]:
    """The run's ``--model_args`` as name -> value (lmms-eval stores the string as typed, or a dict)."""
    given = (run.data.get("config") or {}).get("model_args") or {}
    if isinstance(given, dict):
        return {str(name): str(value) for name, value in given.items()}
    pairs = (item.split("=", 1) for item in str(given).split(",") if "=" in item)
    return {name.strip(): value.strip() for name, value in pairs}


def docs_per_task(run: Run) -> dict[str, int]:
    """task -> number of docs evaluated (lmms-eval's ``n-samples``, after ``--limit``)."""
    counts = run.data.get("n-samples") or {}
    return {
        task: int(entry["effective"])
        for task, entry in counts.items()
        if isinstance(entry, dict) and "effective" in entry
    }


def samples_file(run: Run, task: str) -> Path:
    """Where lmms-eval's --log_samples writes a task's samples, beside the results file."""
    prefix = run.results_file.name.removesuffix("_results.json")
    return run.results_file.parent / f"{prefix}_samples_{task}.jsonl"


def read_samples(run: Run, task: str) -> list[dict] | None:
    """The task's logged samples (each with doc_id, filtered_resps, doc_hash and the per-doc
    metric values), or None when the run was not made with --log_samples."""
    path = samples_file(run, task)
    if not path.exists():
        return None
    samples = []
    for line_number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            sample = json.loads(line)
            if not isinstance(sample, dict) or "doc_id" not in sample or "filtered_resps" not in sample:
                raise KeyError("doc_id or filtered_resps")
        except (json.JSONDecodeError, KeyError) as error:
            raise ValueError(f"{path}:{line_number}: not an lmms-eval sample ({error})") from None
        samples.append(sample)
    return samples


def sample_answers(run: Run, task: str) -> dict | None:
    """doc_id -> filtered answer, from the --log_samples file written beside the results file."""
    samples = read_samples(run, task)
    if samples is None:
        return None
    return {sample["doc_id"]: _answer(sample["filtered_resps"]) for sample in samples}


def loglikelihood_pairs(responses: list) -> list[tuple[float, bool]] | None:
    """A multiple-choice sample's (log-likelihood, is_greedy) per option, or None if it is not
    one. lmms-eval 0.7.3 turns these responses into their string form before scoring and logging."""
    try:
        pairs = [ast.literal_eval(r) if isinstance(r, str) else r for r in responses]
        return [(float(pair[0]), bool(pair[1])) for pair in pairs]
    except (ValueError, SyntaxError, TypeError, IndexError):
        return None


def _answer(response) -> str:
    """A sample's answer: the generated text, or for multiple choice the chosen option's index.
    Comparing raw log-likelihoods would call every multiple-choice answer changed."""
    if isinstance(response, list) and response:
        pairs = loglikelihood_pairs(response)
        if pairs is None:
            return json.dumps(response)
        log_likelihoods = [value for value, _ in pairs]
        return f"option {log_likelihoods.index(max(log_likelihoods))}"
    return response if isinstance(response, str) else json.dumps(response)
