"""The calibration file: which model it belongs to, writing it with its plot, reading it back.

A file belongs to a model by content, not by the ``pretrained`` string: the hash of its config
(without dtype and paths) and a hash of all of its weights. So a checkout that moved, or the same
model given by another path, still finds its calibration, and no other model ever does.

It holds a global record (from the ``vtw_calibration`` task group: ``withdraw_layer``, ``mean_kl``
...) and/or ``per_task`` entries (from ``calibrate_per_task``: each task's K, per-layer mean KL and
how it was made). Each writer keeps what the other wrote; neither ever writes over another
model's file; a part that fails validation is dropped (and so replaced), never kept.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
from lmms_eval.utils import sanitize_model_name
from loguru import logger

from vtw_eval.calibration import choose_withdraw_layer
from vtw_eval.files import cache_dir, check_writable, exclusive_lock, write_atomically, write_together

# 4: the weights fingerprint hashes every value (format 3 sampled 16 values per tensor, so its
# files cannot be matched to a model); per-task entries say how they were made.
CALIBRATION_FORMAT = 4
# Config entries that do not change what the model computes at a given K.
_NOT_IDENTITY = ("dtype", "torch_dtype", "transformers_version", "_name_or_path")
IDENTITY_FIELDS = ("model", "config_hash", "weights_fingerprint", "dtype")


class ForeignCalibration(ValueError):
    """The file is well-formed but cannot be shown to belong to this model: never used, never written over."""


def _identity_part(value):
    if isinstance(value, dict):
        return {k: _identity_part(v) for k, v in value.items() if k not in _NOT_IDENTITY}
    return value


def config_hash(config) -> str:
    """A short hash of a model config, without dtype and paths."""
    text = json.dumps(_identity_part(config.to_diff_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short SHA-256 of every parameter's name, shape and values, all of them, rounded to
    bfloat16 (the same checkpoint loaded in float32 or bfloat16 gives the same print). Tensors
    are hashed in threads (hashlib releases the GIL); scripts/bench_fingerprint.py measures it."""

    def tensor_digest(item: tuple[str, torch.nn.Parameter]) -> bytes:
        name, parameter = item
        values = parameter.detach().to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy()
        digest = hashlib.sha256(f"{name}{tuple(parameter.shape)}".encode())
        digest.update(values)
        return digest.digest()

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(tensor_digest, sorted(model.named_parameters())))
    return hashlib.sha256(b"".join(digests)).hexdigest()[:16]


def model_name(pretrained: str) -> str:
    """How figures and logs name a model: its hub id, or a local directory's name (never an absolute path)."""
    path = Path(pretrained).expanduser()
    return path.resolve().name if path.is_dir() else pretrained


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def checkpoint_folder(pretrained: str, revision: str = "main") -> Path | None:
    """The local folder a model was loaded from: a directory as given, or a hub id's snapshot in
    the Hugging Face cache (found without the network); None if there is none."""
    path = Path(pretrained).expanduser()
    if path.is_dir():
        return path.resolve()
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(pretrained, "config.json", revision=revision)
    return Path(config).parent.resolve() if isinstance(config, str) else None


def checkpoint_files_key(folder: Path) -> str | None:
    """A key of a checkpoint's weight files as they are on disk: each file's name, size and
    modification time (symbolic links followed, as the hub cache uses them); None without any."""
    files = sorted({file for pattern in WEIGHT_FILES for file in folder.glob(pattern)})
    if not files:
        return None
    stats = [(file.name, file.stat().st_size, file.stat().st_mtime_ns) for file in files]
    return hashlib.sha256(json.dumps([str(folder), stats]).encode()).hexdigest()


def remembered_weights_fingerprint(key: str | None) -> str | None:
    """The weights fingerprint ``cached_weights_fingerprint`` remembered for the weight files of
    ``key`` (``checkpoint_files_key``), or None (never hashed, or rewritten since)."""
    try:
        fingerprint = json.loads((cache_dir() / "fingerprints.json").read_text())[key]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return fingerprint if isinstance(fingerprint, str) else None


def calibration_file_path(calibration: str | None, calibration_dir: str | None, stem: str) -> Path:
    """Where a model's calibration file is: ``calibration`` as given, else ``<stem>.json`` in
    ``calibration_dir`` or in vtw_eval's cache folder."""
    folder = Path(calibration_dir) if calibration_dir else cache_dir() / "calibration"
    return Path(calibration or folder / f"{stem}.json").expanduser().resolve()


def cached_weights_fingerprint(model: torch.nn.Module, folder: Path | None) -> str:
    """``weights_fingerprint(model)``, remembered per checkpoint (``checkpoint_files_key``) in
    ``files.cache_dir()/fingerprints.json``: hashing every weight of a 7B model takes seconds,
    loading it again from the page cache a fraction of one. A weight file rewritten (another size
    or modification time) is hashed again. Only for a model just loaded from ``folder``."""
    key = checkpoint_files_key(folder) if folder is not None else None
    if key is None:
        return weights_fingerprint(model)
    remembered = remembered_weights_fingerprint(key)
    if remembered is not None:
        return remembered
    store = cache_dir() / "fingerprints.json"
    fingerprint = weights_fingerprint(model)
    try:
        with exclusive_lock(store):
            try:
                known = json.loads(store.read_text())
                known = known if isinstance(known, dict) else {}
            except (OSError, ValueError):
                known = {}
            known[key] = fingerprint
            write_atomically(store, (json.dumps(known, indent=1) + "\n").encode())
    except OSError as error:  # a cache that cannot be written only costs time
        logger.warning(f"cannot remember the weights fingerprint in {store} ({error.strerror})")
    return fingerprint


def model_identity(model: torch.nn.Module, pretrained: str, folder: Path | None = None) -> dict:
    """What a calibration record says about the model it was measured on. ``folder``: the
    checkpoint the model was just loaded from, whose fingerprint may then be remembered."""
    return {
        "model": model_name(pretrained),
        "config_hash": config_hash(model.config),
        "weights_fingerprint": cached_weights_fingerprint(model, folder),
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def calibration_file_stem(pretrained: str, identity: dict) -> str:
    """Unique per model: a hub id as lmms-eval names its folders (llava-hf__llava-1.5-7b-hf) or a
    local directory's name, then 8 characters each of the config hash and the weights fingerprint
    (model_7103562b5aebf797).
    Two fine-tunes saved in folders of the same name get two files."""
    path = Path(pretrained).expanduser()
    name = path.resolve().name if path.is_dir() else sanitize_model_name(pretrained, full_path=True)
    return f"{name}_{identity['config_hash'][:8]}{identity['weights_fingerprint'][:8]}"


def _plot(record: dict):
    """Mean KL per layer with the threshold: the global record's curves (per subset and over all
    samples) and one curve per task of ``per_task``, each with a marker at its K."""
    import matplotlib.ticker

    from vtw_eval.plots import plt

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
    axes.set_title(f"VTW calibration: {model_name(record['model'])}", fontsize=9)
    axes.legend(fontsize=6)
    return figure


# -- validation: every field the code reads, named with the file ------------------------------


def _require(
    entry: dict, field: str, where: str, kind, accepted: str, ok: Callable[[Any], bool] = lambda v: True
) -> Any:
    """``entry[field]`` if it is of ``kind`` (bool only when asked for) and ``ok``; else ValueError."""
    if field not in entry:
        raise ValueError(f"field '{where}{field}' is missing")
    value = entry[field]
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind) or not ok(value):
        raise ValueError(f"field '{where}{field}' is {value!r}, not {accepted}")
    return value


def _finite_curve(values, length: int) -> bool:
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return len(values) == length == len(numbers) and all(math.isfinite(v) and v >= 0 for v in numbers)


def _check_curve(entry: dict, num_layers: int, where: str) -> None:
    """A record's or entry's K, threshold, curve and sample count, and that its K is the one its
    own curve and threshold give (an edited K is refused)."""
    positive = "a positive integer"
    layer = _require(
        entry, "withdraw_layer", where, int, f"an integer in 0..{num_layers}", lambda v: 0 <= v <= num_layers
    )
    threshold = _require(
        entry, "kl_threshold", where, (int, float), "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0
    )
    mean_kl = _require(
        entry, "mean_kl", where, list, f"a list of {num_layers + 1} finite numbers >= 0 (one per layer 0..L)",
        lambda v: _finite_curve(v, num_layers + 1),
    )  # fmt: skip
    met = _require(entry, "threshold_met", where, bool, "true or false")
    _require(entry, "kl_tokens", where, int, positive, lambda v: v >= 1)
    _require(entry, "num_samples", where, int, positive, lambda v: v >= 1)
    expected = choose_withdraw_layer(mean_kl, threshold)
    if (layer, met) != expected:
        raise ValueError(
            f"field '{where}withdraw_layer' is {layer} (threshold_met {met}), but its own mean_kl at kl_threshold "
            f"{threshold:g} gives K={expected[0]} (threshold_met {expected[1]}): the record was edited or damaged"
        )


def _check_global(record: dict, num_layers: int) -> None:
    _check_curve(record, num_layers, "")
    subsets = _require(record, "per_subset", "", dict, "an object")
    for subset, entry in subsets.items():
        where = f"per_subset.{subset}."
        if not isinstance(entry, dict):
            raise ValueError(f"field 'per_subset.{subset}' is {entry!r}, not an object")
        _require(entry, "num_samples", where, int, "a positive integer", lambda v: v >= 1)
        _require(
            entry,
            "mean_kl",
            where,
            list,
            f"{num_layers + 1} finite numbers",
            lambda v: _finite_curve(v, num_layers + 1),
        )


def _check_task_entry(entry, num_layers: int, where: str) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"field '{where[:-1]}' is {entry!r}, not an object")
    _check_curve(entry, num_layers, where)
    _require(entry, "task_docs", where, int, "a positive integer", lambda v: v >= 1)
    _require(entry, "limited", where, bool, "true or false")


def read_calibration(path: Path, identity: dict, num_layers: int) -> tuple[dict, dict[str, str]]:
    """The record in ``path`` holding only its valid parts, and what is wrong with each invalid
    part (key ``""``: the global record; else the task). Raises ForeignCalibration for a file of
    another model (or of an old format, which cannot be matched), ValueError for an unreadable one."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not readable JSON ({error})") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if record.get("format") != CALIBRATION_FORMAT:
        raise ForeignCalibration(
            f"format {record.get('format')!r}; this version reads format {CALIBRATION_FORMAT} (earlier formats "
            "identified a model by a sample of its weights, so they cannot be matched to one)"
        )
    for field in IDENTITY_FIELDS:
        _require(record, field, "", str, "a string")
    for key in ("config_hash", "weights_fingerprint"):
        if record[key] != identity[key]:
            raise ForeignCalibration(
                f"measured on another model ({record['model']!r}: {key} {record[key]}, this model's is {identity[key]})"
            )
    _require(record, "num_layers", "", int, f"{num_layers}, the model's decoder layers", lambda v: v == num_layers)
    per_task = _require(record, "per_task", "", dict, "an object") if "per_task" in record else {}
    problems, valid = {}, dict(record)
    if "withdraw_layer" in record:
        try:
            _check_global(record, num_layers)
        except ValueError as error:
            problems[""] = str(error)
            valid = {key: record[key] for key in ("format", "num_layers", *IDENTITY_FIELDS)}
    valid["per_task"] = {}
    for task, entry in per_task.items():
        try:
            _check_task_entry(entry, num_layers, f"per_task.{task}.")
            valid["per_task"][task] = entry
        except ValueError as error:
            problems[task] = str(error)
    return valid, problems


def load_calibration(
    path: str | Path, identity: dict, num_layers: int, how_to_create: str, need_global: bool = True
) -> tuple[dict, dict[str, str]]:
    """What ``withdraw_layer=auto`` reads: the record in ``path`` (valid parts only) and the
    problems of its invalid per-task entries; a ValueError naming the file, what is wrong, and
    ``how_to_create`` a right one. ``need_global``: the file must hold a valid global record."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"withdraw_layer=auto: no calibration file {path}; create it with:\n  {how_to_create}")
    try:
        record, problems = read_calibration(path, identity, num_layers)
        if need_global and "" in problems:
            raise ValueError(problems[""])
        if need_global and "withdraw_layer" not in record:
            raise ValueError("it holds per-task entries only, no global K (for tasks without an entry)")
    except ForeignCalibration as error:
        raise ValueError(
            f"withdraw_layer=auto: calibration file {path} was {error}; create one for this model with:\n"
            f"  {how_to_create}"
        ) from None
    except ValueError as error:
        raise ValueError(
            f"withdraw_layer=auto: calibration file {path} is unreadable ({error}); create it again with:\n"
            f"  {how_to_create}"
        ) from None
    return record, problems


def _parts_to_keep(path: Path, identity: dict, num_layers: int) -> dict:
    """The valid parts of this model's file at ``path`` (nothing if there is none or it is
    unreadable); a ValueError if the file is another model's."""
    if not path.exists():
        return {}
    try:
        record, problems = read_calibration(path, identity, num_layers)
    except ForeignCalibration as error:
        raise ValueError(
            f"calibration file {path} was {error}: it is not written over; remove it, or give this model "
            "another file (calibration=PATH, or calibration_dir=DIR for its default name)"
        ) from None
    except ValueError as error:
        logger.warning(f"calibration file {path} is unreadable ({error}); it is replaced")
        return {}
    for part, problem in problems.items():
        logger.warning(f"calibration file {path}: {part or 'the global record'} is dropped and replaced ({problem})")
    return record


def check_calibration_writable(path: Path, identity: dict, num_layers: int) -> None:
    """Before any calibration work: the JSON and its PNG can be written, and the file there (if
    any) is this model's. A ValueError naming the argument and the reason otherwise."""
    for target in (path, path.with_suffix(".png")):
        check_writable(target, "calibration (or calibration_dir)")
    _parts_to_keep(path, identity, num_layers)


def _update(path: Path, identity: dict, num_layers: int, change: Callable[[dict], dict]) -> tuple[Path, Path]:
    """Read this model's file, apply ``change`` to its valid parts, and write the JSON and its
    PNG together (both or neither), under one lock: two calibrations writing at once leave a
    pair from one record, and neither loses the other's part."""
    from vtw_eval.plots import png_bytes

    plot_path = path.with_suffix(".png")
    with exclusive_lock(path):
        record = change(_parts_to_keep(path, identity, num_layers))
        record = {**record, "format": CALIBRATION_FORMAT, "plot": str(plot_path)}
        write_together({plot_path: png_bytes(_plot(record)), path: (json.dumps(record, indent=2) + "\n").encode()})
    return path, plot_path


def write_calibration(record: dict, path: str | Path) -> tuple[Path, Path]:
    """The global record (``calibration.summarise``) into ``path``, keeping its ``per_task``
    entries; the PNG plot beside it (same stem)."""
    return _update(
        Path(path), record, record["num_layers"], lambda old: {**record, "per_task": old.get("per_task", {})}
    )


def write_task_calibration(
    path: str | Path, identity: dict, num_layers: int, task: str, entry: dict
) -> tuple[Path, Path]:
    """One task's entry (``calibration.task_entry``) into ``path``'s ``per_task``, keeping the rest."""

    def change(old: dict) -> dict:
        base = old or {key: identity[key] for key in IDENTITY_FIELDS}
        return {**base, "num_layers": num_layers, "per_task": {**base.get("per_task", {}), task: entry}}

    return _update(Path(path), identity, num_layers, change)


def matching_task_entry(record: dict | None, task: str, kl_threshold: float, kl_tokens: int) -> dict | None:
    """``task``'s per-task entry in ``record`` if it was measured with this threshold and criterion."""
    entry = (record or {}).get("per_task", {}).get(task)
    if entry is None or entry["kl_threshold"] != kl_threshold or entry["kl_tokens"] != kl_tokens:
        return None
    return entry


def stale_reason(entry: dict, task_docs: int, wanted: int) -> str | None:
    """Why a task's entry should not serve a run over ``task_docs`` docs asking for ``wanted``
    prompts (0: none asked), or None when it may."""
    if entry["limited"]:
        return f"it was made under --limit, on {entry['num_samples']} prompts from part of the task's docs"
    if entry["task_docs"] != task_docs:
        return f"it was made when the task had {entry['task_docs']} docs; it has {task_docs} now"
    if entry["num_samples"] < min(wanted, task_docs):
        return f"it was made on {entry['num_samples']} prompts; this run asks for {min(wanted, task_docs)}"
    return None
