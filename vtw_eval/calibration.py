"""Choosing the withdrawal layer K the way the VTW paper does, and the calibration file.

For each calibration prompt and each candidate layer k in 0..L: the next-token distribution at
the last prompt position of the unmodified model (p_full) and with withdrawal before layer k
(p_k), and KL(p_k || p_full). K is the smallest k whose mean KL over the samples is at most the
threshold (0.003 by default, the paper's LLaVA-1.5-7B setting).

All k come from one full forward per batch that keeps every layer's input hidden states, then
for each k only layers k..L-1 over the kept tokens (the reference implementation runs a whole
forward per candidate layer).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path

import torch

from vtw_eval.engine import VisualTokenWithdrawal
from vtw_eval.files import write_atomically

DEFAULT_KL_THRESHOLD = 0.003
CALIBRATION_FORMAT = 1


@torch.inference_mode()
def layer_kl_divergences(withdrawal: VisualTokenWithdrawal, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(p_k || p_full) at the last prompt position, shape (batch, L + 1); column L is 0."""
    full_logits, last_hidden = withdrawal.every_layer_last_hidden(inputs)
    log_p_full = torch.log_softmax(full_logits.float(), dim=-1)
    log_p = torch.log_softmax(
        withdrawal.model.get_output_embeddings()(last_hidden).float(), dim=-1
    )  # (L, batch, vocab)
    kl = (log_p.exp() * (log_p - log_p_full)).sum(-1).T  # (batch, L)
    return torch.cat([kl, torch.zeros(kl.shape[0], 1, device=kl.device)], dim=1).cpu()


def choose_withdraw_layer(mean_kl: list[float], threshold: float) -> tuple[int, bool]:
    """The first layer whose mean KL is at most ``threshold``; whether a layer before L met it."""
    num_layers = len(mean_kl) - 1
    for layer, value in enumerate(mean_kl[:num_layers]):
        if value <= threshold:
            return layer, True
    return num_layers, False


def config_hash(config) -> str:
    """A short hash of a model config, to tell whether a calibration file belongs to a model."""
    text = json.dumps(config.to_diff_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_file_stem(name_or_path: str) -> str:
    """llava-hf/llava-1.5-7b-hf -> llava-hf__llava-1.5-7b-hf (as lmms-eval names its folders)."""
    return str(name_or_path).strip("/").replace("/", "__")


def summarise(per_subset: dict[str, dict], identity: dict) -> dict:
    """The calibration record from each subset's sample count and per-layer mean KL.

    ``identity`` holds the model, config_hash and kl_threshold the samples were measured with.
    """
    if not per_subset:
        raise ValueError("No calibration samples: nothing to choose K from.")
    counts = torch.tensor([entry["num_samples"] for entry in per_subset.values()], dtype=torch.float64)
    means = torch.tensor([entry["mean_kl"] for entry in per_subset.values()], dtype=torch.float64)
    mean_kl = ((counts[:, None] * means).sum(0) / counts.sum()).tolist()
    threshold = identity["kl_threshold"]
    layer, met = choose_withdraw_layer(mean_kl, threshold)
    return {
        "format": CALIBRATION_FORMAT,
        "model": identity["model"],
        "config_hash": identity["config_hash"],
        "num_layers": len(mean_kl) - 1,
        "kl_threshold": threshold,
        "withdraw_layer": layer,
        "threshold_met": met,
        "message": (
            f"K={layer}: the first layer with mean KL <= {threshold}"
            if met
            else f"No layer before {layer} met mean KL <= {threshold}; K={layer} (no withdrawal)"
        ),
        "num_samples": int(counts.sum()),
        "mean_kl": mean_kl,
        "per_subset": dict(sorted(per_subset.items())),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# -- lmms-eval task functions of the vtw_calibration tasks (tasks/vtw_calibration) -------------

IDENTITY_KEYS = ("model", "config_hash", "kl_threshold")


def spread_docs(dataset):
    """A deterministic subset spread over the dataset: VTW_CALIBRATION_DOCS docs (default 20)."""
    wanted = int(os.environ.get("VTW_CALIBRATION_DOCS", "20"))
    step = max(len(dataset) // wanted, 1)
    return dataset.select(range(0, len(dataset), step)[:wanted])


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


def aggregate_subset(samples: list[dict]) -> dict:
    """One subset's record; lmms-eval has gathered the samples of every rank before this."""
    identity = {key: samples[0][key] for key in IDENTITY_KEYS}
    for sample in samples:
        if any(sample[key] != identity[key] for key in IDENTITY_KEYS) or sample["subset"] != samples[0]["subset"]:
            raise ValueError("vtw_calibration samples of one subset disagree on model, config or threshold")
    entry = {
        "num_samples": len(samples),
        "mean_kl": torch.tensor([s["kl"] for s in samples], dtype=torch.float64).mean(0).tolist(),
    }
    record = summarise({samples[0]["subset"]: entry}, identity)
    record["calibration_file"] = samples[0]["calibration_file"]
    return record


def aggregate_group(subset_records: list[dict], sizes, weight_by_size) -> dict:
    """The vtw_calibration group's record over all subsets; writes the calibration file and plot."""
    identity = {key: subset_records[0][key] for key in IDENTITY_KEYS}
    if any(record[key] != identity[key] for record in subset_records for key in IDENTITY_KEYS):
        raise ValueError("vtw_calibration subsets disagree on model, config or threshold")
    per_subset = {name: entry for record in subset_records for name, entry in record["per_subset"].items()}
    record = summarise(per_subset, identity)
    json_path, plot_path = write_calibration(record, subset_records[0]["calibration_file"])
    record["calibration_file"], record["plot"] = str(json_path), str(plot_path)
    print(f"VTW calibration: {record['message']}; wrote {json_path} and {plot_path}")
    return record


def write_calibration(record: dict, path: str | Path) -> tuple[Path, Path]:
    """The calibration JSON and a PNG plot of mean KL per layer beside it (same stem)."""
    import io

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    figure, axes = plt.subplots(figsize=(7, 4))
    layers = range(record["num_layers"])
    for subset, entry in record["per_subset"].items():
        axes.plot(layers, entry["mean_kl"][:-1], alpha=0.5, label=f"{subset} (n={entry['num_samples']})")
    axes.plot(layers, record["mean_kl"][:-1], color="black", linewidth=2, label="all samples")
    axes.axhline(record["kl_threshold"], color="red", linestyle="--", label=f"threshold {record['kl_threshold']:g}")
    axes.axvline(record["withdraw_layer"], color="green", linestyle=":", label=f"chosen K = {record['withdraw_layer']}")
    axes.set_yscale("log")
    axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes.set_xlabel("withdrawal layer k")
    axes.set_ylabel("mean KL(p_k || p_full)")
    axes.set_title(f"VTW calibration: {record['model']}", fontsize=9)
    axes.legend(fontsize=7)
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    plt.close(figure)
    plot_path = path.with_suffix(".png")
    write_atomically(plot_path, png.getvalue())
    write_atomically(path, (json.dumps(record, indent=2) + "\n").encode())
    return path, plot_path


def load_calibration(path: str | Path, model_name: str, model_config_hash: str) -> dict:
    """A calibration record for this model, or a ValueError saying what is wrong and what to do."""
    path = Path(path)
    how = (
        f"create it with: lmms-eval --model vtw_llava --model_args pretrained={model_name} "
        "--tasks vtw_calibration (or pass calibration=PATH)"
    )
    if not path.is_file():
        raise ValueError(f"withdraw_layer=auto: no calibration file {path}; {how}")
    try:
        record = json.loads(path.read_text())
        layer, num_layers = record["withdraw_layer"], record["num_layers"]
        if not (isinstance(layer, int) and isinstance(num_layers, int) and 0 <= layer <= num_layers):
            raise ValueError(f"withdraw_layer {layer!r} not in 0..{num_layers!r}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"withdraw_layer=auto: calibration file {path} is unreadable ({error}); {how}") from None
    if record.get("config_hash") != model_config_hash or record.get("model") != model_name:
        raise ValueError(
            f"withdraw_layer=auto: calibration file {path} is for model {record.get('model')!r} "
            f"(config {record.get('config_hash')}), not {model_name!r} (config {model_config_hash}); {how}"
        )
    return record
