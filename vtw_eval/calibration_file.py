"""The calibration file: which model it belongs to, writing it with its plot, reading it back.

A file belongs to a model by content, not by the ``pretrained`` string: the hash of its config
(without dtype and paths) and a fingerprint of its weights. So a checkout that moved, or the same
model given by another path, still finds its calibration.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from lmms_eval.utils import sanitize_model_name

from vtw_eval.files import exclusive_lock, write_atomically

CALIBRATION_FORMAT = 2
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
    """Mean KL per layer, per subset and over all samples, with the threshold and the chosen K."""
    import matplotlib.ticker

    from vtw_eval.plots import plt, save_png

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
    return save_png(figure, plot_path)


def write_calibration(record: dict, path: str | Path) -> tuple[Path, Path]:
    """The calibration JSON and its PNG plot beside it (same stem), each written atomically and
    both under one lock, so that two calibrations writing the same file leave a pair from one run."""
    path = Path(path)
    with exclusive_lock(path):
        plot_path = plot_calibration(record, path.with_suffix(".png"))
        record = {"format": CALIBRATION_FORMAT, **record, "plot": str(plot_path)}
        write_atomically(path, (json.dumps(record, indent=2) + "\n").encode())
    return path, plot_path


def _check_fields(record, num_layers: int) -> None:
    """Raise ValueError naming the first field that is missing, mistyped or out of range."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if record.get("format") != CALIBRATION_FORMAT:
        raise ValueError(f"format {record.get('format')!r}, this version reads format {CALIBRATION_FORMAT}")
    fields = {"withdraw_layer": int, "num_layers": int, "kl_threshold": (int, float), "mean_kl": list}
    for field, kind in fields.items():
        if field not in record:
            raise ValueError(f"field {field!r} is missing")
        if isinstance(record[field], bool) or not isinstance(record[field], kind):
            raise ValueError(f"field {field!r} is {record[field]!r}, not a {getattr(kind, '__name__', 'number')}")
    if record["num_layers"] != num_layers:
        raise ValueError(f"field 'num_layers' is {record['num_layers']}, the model has {num_layers} decoder layers")
    if not 0 <= record["withdraw_layer"] <= num_layers:
        raise ValueError(f"field 'withdraw_layer' is {record['withdraw_layer']}, not in 0..{num_layers}")
    kl = record["mean_kl"]
    if len(kl) != num_layers + 1 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in kl
    ):
        raise ValueError(f"field 'mean_kl' must hold {num_layers + 1} finite numbers >= 0 (one per layer 0..L)")


def load_calibration(path: str | Path, identity: dict, num_layers: int, how_to_create: str) -> dict:
    """The calibration record in ``path`` if it belongs to the model of ``identity``; otherwise a
    ValueError naming the file, what is wrong, and ``how_to_create`` a right one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"withdraw_layer=auto: no calibration file {path}; create it with:\n  {how_to_create}")
    try:
        record = json.loads(path.read_text())
        _check_fields(record, num_layers)
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
