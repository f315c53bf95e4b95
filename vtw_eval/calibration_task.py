"""lmms-eval task hooks of the calibration groups (vtw_eval/tasks/vtw_calibration, tasks/vtw_tiny).

The vtw backends answer a calibration request with the prompt's per-layer KL as JSON
(``VTWBackend`` recognises ``generation_kwargs: {vtw_calibration: true}``); these hooks gather
the answers (lmms-eval has gathered every rank's first), choose K (``calibration.summarise``) and
write the calibration file.

The ``vtw_calibration`` metric is the whole record (the results JSON holds it); ``withdraw_layer``,
``kl_threshold`` and ``num_samples`` repeat its K, threshold and sample count as plain numbers, so
that the table lmms-eval prints shows them readably.
"""

from __future__ import annotations

import json
import os

import torch

from vtw_eval.calibration import spread_evenly, summarise
from vtw_eval.calibration_file import write_calibration

IDENTITY_KEYS = ("model", "config_hash", "weights_fingerprint", "dtype", "kl_threshold", "kl_tokens")


def calibration_docs_wanted() -> int:
    """VTW_CALIBRATION_DOCS (default 20): a positive integer, or a ValueError saying so."""
    value = os.environ.get("VTW_CALIBRATION_DOCS", "20")
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"VTW_CALIBRATION_DOCS={value!r} is not accepted; use a positive integer (default 20)")
    return int(value)


def spread_docs(dataset):
    """A deterministic subset spread over the dataset: VTW_CALIBRATION_DOCS docs (default 20)."""
    return dataset.select(spread_evenly(len(dataset), calibration_docs_wanted()))


def gqa_docs(dataset):
    """GQA's subset; its images come from a second dataset, loaded only for the chosen docs."""
    from lmms_eval.tasks.gqa.utils import gqa_process_docs

    return gqa_process_docs(spread_docs(dataset))


class ChosenLayer(int):
    """K as an int (lmms-eval prints it as one, the results JSON holds it as one), carrying the
    record it was chosen from (``.record``), so that a group can pool its subsets' curves."""

    record: dict


def _chosen_layer(record: dict) -> ChosenLayer:
    layer = ChosenLayer(record["withdraw_layer"])
    layer.record = record
    return layer


def process_results(doc, results):
    try:
        sample = json.loads(results[0])
        assert isinstance(sample["kl"], list) and all(key in sample for key in ("subset", *IDENTITY_KEYS))
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
        raise ValueError(
            f"vtw_calibration needs a vtw_* model (e.g. --model vtw_llava); got the answer {results[0][:80]!r}"
        ) from None
    return {"vtw_calibration": sample, "withdraw_layer": sample, "kl_threshold": sample, "num_samples": sample}


def _identity(records: list[dict], what: str) -> dict:
    identity = {key: records[0][key] for key in IDENTITY_KEYS}
    if any(record[key] != identity[key] for record in records for key in IDENTITY_KEYS):
        raise ValueError(f"vtw_calibration {what} disagree on model, config, weights, dtype, threshold or kl_tokens")
    return identity


def aggregate_subset(samples: list[dict]) -> dict:
    """One subset's record; lmms-eval has gathered the samples of every rank before this."""
    identity = _identity(samples, "samples of one subset")
    if any(sample["subset"] != samples[0]["subset"] for sample in samples):
        raise ValueError("vtw_calibration samples of one subset come from several tasks")
    entry = {
        "num_samples": len(samples),
        "mean_kl": torch.tensor([s["kl"] for s in samples], dtype=torch.float64).mean(0).tolist(),
    }
    record = summarise({samples[0]["subset"]: entry}, identity)
    record["calibration_file"] = samples[0]["calibration_file"]
    return record


def subset_layer(samples: list[dict]) -> ChosenLayer:
    """A subset's K (``withdraw_layer`` metric)."""
    return _chosen_layer(aggregate_subset(samples))


def threshold(samples: list[dict]) -> float:
    """The threshold K was chosen at (``kl_threshold`` metric); one per run."""
    return _identity(samples, "samples")["kl_threshold"]


def count(samples: list[dict]) -> int:
    """How many prompts were measured (``num_samples`` metric)."""
    return len(samples)


def group_layer(subset_layers: list[ChosenLayer], sizes, weight_by_size) -> ChosenLayer:
    """The group's K from its subsets' curves, as ``aggregate_group`` chooses it (nothing written)."""
    records = [layer.record for layer in subset_layers]
    identity = _identity(records, "subsets")
    per_subset = {name: entry for record in records for name, entry in record["per_subset"].items()}
    return _chosen_layer(summarise(per_subset, identity))


def group_threshold(thresholds: list[float], sizes, weight_by_size) -> float:
    if len(set(thresholds)) != 1:
        raise ValueError(f"vtw_calibration subsets disagree on kl_threshold: {sorted(set(thresholds))}")
    return thresholds[0]


def group_count(counts: list[int], sizes, weight_by_size) -> int:
    return sum(counts)


def aggregate_group(subset_records: list[dict], sizes, weight_by_size) -> dict:
    """The calibration group's record over all subsets; writes the calibration file and plot."""
    identity = _identity(subset_records, "subsets")
    per_subset = {name: entry for record in subset_records for name, entry in record["per_subset"].items()}
    record = summarise(per_subset, identity)
    json_path, plot_path = write_calibration(record, subset_records[0]["calibration_file"])
    record["calibration_file"], record["plot"] = str(json_path), str(plot_path)
    print(f"VTW calibration: {record['message']}; wrote {json_path} and {plot_path}")
    return record
