"""The calibration file: which model it belongs to, writing it with its plot, reading it back.

A file belongs to a model by content, not by the ``pretrained`` string: the hash of its config
(without dtype and paths) and a fingerprint of its weights. So a checkout that moved, or the same
model given by another path, still finds its calibration.

It holds a global record (from the ``vtw_calibration`` task group: ``withdraw_layer``, ``mean_kl``
...) and/or ``per_task`` entries (from ``calibrate_per_task``: each task's K, per-layer mean KL,
sample count, threshold and ``kl_tokens``). Each writer keeps what the other wrote.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from lmms_eval.utils import sanitize_model_name

from vtw_eval.files import exclusive_lock, write_atomically

CALIBRATION_FORMAT = 3  # 3 added per_task and kl_tokens; format 2 files (global record only) still read
READABLE_FORMATS = (2, 3)
# Config entries that do not change what the model computes at a given K.
_NOT_IDENTITY = ("dtype", "torch_dtype", "transformers_version", "_name_or_path")


def _identity_part(value):
    if isinstance(value, dict):
        return {k: _identity_part(v) for k, v in value.items() if k not in _NOT_IDENTITY}
    return value


def config_hash(config) -> str:
    """A short hash of a model config, without dtype and paths."""
    text = json.dumps(_identity_part(config.to_diff_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module, values_per_tensor: int = 8) -> str:
    """A short hash of every parameter's name, shape and first and last values (rounded to
    bfloat16, so that the same checkpoint loaded in float32 or bfloat16 gives the same print)."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        flat = parameter.detach().reshape(-1)
        ends = torch.cat([flat[:values_per_tensor], flat[-values_per_tensor:]]).to("cpu", torch.bfloat16)
        digest.update(f"{name}{tuple(parameter.shape)}".encode())
        digest.update(ends.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def model_identity(model: torch.nn.Module, pretrained: str) -> dict:
    """What a calibration record says about the model it was measured on."""
    return {
        "model": pretrained,
        "config_hash": config_hash(model.config),
        "weights_fingerprint": weights_fingerprint(model),
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def calibration_file_stem(pretrained: str, model_config_hash: str) -> str:
    """A hub id as lmms-eval names its folders (llava-hf__llava-1.5-7b-hf); a local directory by
    its name and the config hash (model_3f2a...), never by its absolute path."""
    path = Path(pretrained)
    if path.is_dir():
        return f"{path.resolve().name}_{model_config_hash}"
    return sanitize_model_name(pretrained, full_path=True)


def plot_calibration(record: dict, plot_path: Path) -> Path:
    """Mean KL per layer with the threshold: the global record's curves (per subset and over all
    samples) and one curve per task of ``per_task``, each with a marker at its K."""
    import matplotlib.ticker

    from vtw_eval.plots import plt, save_png

    figure, axes = plt.subplots(figsize=(7, 4))
    layers = range(record["num_layers"])
    for subset, entry in record.get("per_subset", {}).items():
        axes.plot(layers, entry["mean_kl"][:-1], alpha=0.5, label=f"{subset} (n={entry['num_samples']})")
    if "mean_kl" in record:
        axes.plot(layers, record["mean_kl"][:-1], color="black", linewidth=2, label="all samples")
        axes.axvline(record["withdraw_layer"], color="green", linestyle=":", label=f"K = {record['withdraw_layer']}")
    for task, entry in record.get("per_task", {}).items():
        (line,) = axes.plot(layers, entry["mean_kl"][:-1], linestyle="-.", label=(
            f"{task}: K={entry['withdraw_layer']} (n={entry['num_samples']}, "
            f"kl_tokens={entry['kl_tokens']}, threshold {entry['kl_threshold']:g})"
        ))  # fmt: skip
        k = entry["withdraw_layer"]
        if k < record["num_layers"]:
            axes.plot([k], [max(entry["mean_kl"][k], 1e-12)], marker="o", color=line.get_color())
    thresholds = {
        entry["kl_threshold"] for entry in [record, *record.get("per_task", {}).values()] if "mean_kl" in entry
    }
    for threshold in sorted(thresholds):
        axes.axhline(threshold, color="red", linestyle="--", linewidth=0.8, label=f"threshold {threshold:g}")
    axes.set_yscale("log")
    axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes.set_xlabel("withdrawal layer k")
    axes.set_ylabel("mean KL(p_k || p_full)")
    axes.set_title(f"VTW calibration: {record['model']}", fontsize=9)
    axes.legend(fontsize=6)
    return save_png(figure, plot_path)


def _same_model(record, identity: dict) -> bool:
    keys = ("config_hash", "weights_fingerprint")
    return isinstance(record, dict) and all(record.get(key) == identity[key] for key in keys)


def _update(path: Path, identity: dict, change) -> tuple[Path, Path]:
    """Read the file (if it belongs to the model of ``identity``), apply ``change`` to the record,
    write the JSON and its PNG. Under one lock, each file atomic: two calibrations writing at once
    leave a JSON and a PNG from one and the same record, and neither loses the other's part."""
    with exclusive_lock(path):
        try:
            existing = json.loads(path.read_text())
        except (OSError, ValueError):
            existing = None
        # A file of another model (or an unreadable one) is replaced, not merged.
        record = existing if _same_model(existing, identity) and existing.get("format") in READABLE_FORMATS else {}
        record = change(record)
        plot_path = plot_calibration(record, path.with_suffix(".png"))
        record = {**record, "format": CALIBRATION_FORMAT, "plot": str(plot_path)}
        write_atomically(path, (json.dumps(record, indent=2) + "\n").encode())
    return path, plot_path


def write_calibration(record: dict, path: str | Path) -> tuple[Path, Path]:
    """The global record (``calibration.summarise``) into ``path``, keeping its ``per_task``
    entries; the PNG plot beside it (same stem)."""
    return _update(Path(path), record, lambda old: {**record, "per_task": old.get("per_task", {})})


def write_task_calibration(
    path: str | Path, identity: dict, num_layers: int, task: str, entry: dict
) -> tuple[Path, Path]:
    """One task's entry (``calibration.task_entry``) into ``path``'s ``per_task``, keeping the rest."""

    def change(old: dict) -> dict:
        base = old or {key: identity[key] for key in ("model", "config_hash", "weights_fingerprint", "dtype")}
        return {**base, "num_layers": num_layers, "per_task": {**base.get("per_task", {}), task: entry}}

    return _update(Path(path), identity, change)


def matching_task_entry(record: dict | None, task: str, kl_threshold: float, kl_tokens: int) -> dict | None:
    """``task``'s per-task entry in ``record`` if it was measured with this threshold and criterion."""
    entry = (record or {}).get("per_task", {}).get(task)
    if entry is None or entry["kl_threshold"] != kl_threshold or entry.get("kl_tokens", 1) != kl_tokens:
        return None
    return entry


def _check_curve(entry: dict, num_layers: int, where: str) -> None:
    """Raise ValueError naming the field (``where`` + name) that is missing, mistyped or out of range."""

    def name(field: str) -> str:
        return f"field '{where}{field}'"

    fields = {"withdraw_layer": int, "kl_threshold": (int, float), "mean_kl": list}
    for field, kind in fields.items():
        if field not in entry:
            raise ValueError(f"{name(field)} is missing")
        if isinstance(entry[field], bool) or not isinstance(entry[field], kind):
            raise ValueError(f"{name(field)} is {entry[field]!r}, not a {getattr(kind, '__name__', 'number')}")
    if not 0 <= entry["withdraw_layer"] <= num_layers:
        raise ValueError(f"{name('withdraw_layer')} is {entry['withdraw_layer']}, not in 0..{num_layers}")
    kl = entry["mean_kl"]
    if len(kl) != num_layers + 1 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in kl
    ):
        raise ValueError(f"{name('mean_kl')} must hold {num_layers + 1} finite numbers >= 0 (one per layer 0..L)")
    tokens = entry.get("kl_tokens", 1)  # format 2 files measured at the last prompt position only
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"{name('kl_tokens')} is {tokens!r}, not a positive integer")


def _check_fields(record, num_layers: int, need_global: bool) -> None:
    """Raise ValueError naming the first field that is missing, mistyped or out of range."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if record.get("format") not in READABLE_FORMATS:
        raise ValueError(f"format {record.get('format')!r}, this version reads formats {READABLE_FORMATS}")
    if isinstance(record.get("num_layers"), bool) or not isinstance(record.get("num_layers"), int):
        raise ValueError(f"field 'num_layers' is {record.get('num_layers')!r}, not an int")
    if record["num_layers"] != num_layers:
        raise ValueError(f"field 'num_layers' is {record['num_layers']}, the model has {num_layers} decoder layers")
    if need_global and "withdraw_layer" not in record and "per_task" in record:
        raise ValueError("it holds per-task entries only, no global K (for tasks without an entry)")
    if need_global or "withdraw_layer" in record:
        _check_curve(record, num_layers, "")
    per_task = record.get("per_task", {})
    if not isinstance(per_task, dict):
        raise ValueError(f"field 'per_task' is {per_task!r}, not an object")
    for task, entry in per_task.items():
        if not isinstance(entry, dict):
            raise ValueError(f"field 'per_task.{task}' is {entry!r}, not an object")
        _check_curve(entry, num_layers, f"per_task.{task}.")


def load_calibration(
    path: str | Path, identity: dict, num_layers: int, how_to_create: str, need_global: bool = True
) -> dict:
    """The calibration record in ``path`` if it belongs to the model of ``identity``; otherwise a
    ValueError naming the file, what is wrong, and ``how_to_create`` a right one. ``need_global``:
    the file must hold the global record, not only per-task entries."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"withdraw_layer=auto: no calibration file {path}; create it with:\n  {how_to_create}")
    try:
        record = json.loads(path.read_text())
        _check_fields(record, num_layers, need_global)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
        raise ValueError(
            f"withdraw_layer=auto: calibration file {path} is unreadable ({error}); create it again with:\n"
            f"  {how_to_create}"
        ) from None
    for key in ("config_hash", "weights_fingerprint"):
        if record.get(key) != identity[key]:
            raise ValueError(
                f"withdraw_layer=auto: calibration file {path} was measured on another model "
                f"({record.get('model')!r}: {key} {record.get(key)}, this model's is {identity[key]}); "
                f"create one for this model with:\n  {how_to_create}"
            )
    return record
