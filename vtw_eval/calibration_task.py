"""lmms-eval task hooks of the calibration groups (vtw_eval/tasks/vtw_calibration, tasks/vtw_tiny).

The vtw backends answer a calibration request with the prompt's per-layer KL as JSON
(``VTWBackend`` recognises ``generation_kwargs: {vtw_calibration: true}``); these hooks gather
the answers (lmms-eval has gathered every rank's first), choose K (``calibration.summarise``) and
write the calibration file.
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


def process_results(doc, results):
    try:
        sample = json.loads(results[0])
        assert isinstance(sample["kl"], list) and all(key in sample for key in ("subset", *IDENTITY_KEYS))
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
        raise ValueError(
            f"vtw_calibration needs a vtw_* model (e.g. --model vtw_llava); got the answer {results[0][:80]!r}"
        ) from None
    return {"vtw_calibration": sample}


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


def aggregate_group(subset_records: list[dict], sizes, weight_by_size) -> dict:
    """The calibration group's record over all subsets; writes the calibration file and plot."""
    identity = _identity(subset_records, "subsets")
    per_subset = {name: entry for record in subset_records for name, entry in record["per_subset"].items()}
    record = summarise(per_subset, identity)
    json_path, plot_path = write_calibration(record, subset_records[0]["calibration_file"])
    record["calibration_file"], record["plot"] = str(json_path), str(plot_path)
    print(f"VTW calibration: {record['message']}; wrote {json_path} and {plot_path}")
    return record
