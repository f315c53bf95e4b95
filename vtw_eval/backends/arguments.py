"""Model arguments as they arrive from ``--model_args`` (strings, or lmms-eval's own values),
checked one by one: each refusal names the argument, what was given and what is accepted."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any


def _integer_text(value: Any) -> str:
    """lmms-eval's argument parser turns `3` typed with a space (`withdraw_layer= 3`) into 3.0."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def integer(name: str, value: Any, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (1 unless said otherwise)."""
    if not isinstance(value, bool):
        text = _integer_text(value)
        if text.isdigit() and int(text) >= minimum:
            return int(text)
    accepted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    raise ValueError(f"{name}={value!r} is not accepted; use {accepted}")


def non_negative_float(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not math.isfinite(number) or number < 0:
        raise ValueError(f"{name}={value!r} is not accepted; use a finite number >= 0")
    return number


def one_of(name: str, value: Any, accepted: tuple[str, ...]) -> str:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not accepted; use one of {', '.join(accepted)}")
    return value


def withdraw_layer(value: Any, num_layers: int) -> int | None | str:
    """``withdraw_layer`` as given on the command line: an integer 0..L, none, or auto."""
    accepted = f"an integer from 0 to {num_layers} (the decoder's layer count), 'none' or 'auto'"
    text = "" if value is None else _integer_text(value).lower()
    if text == "auto":
        return "auto"
    if text in ("none", ""):
        return None
    if isinstance(value, bool) or not text.isdigit() or not 0 <= int(text) <= num_layers:
        raise ValueError(f"withdraw_layer={value!r} is not accepted; use {accepted}")
    return int(text)


def writable_dir(directory: Path, argument: str) -> None:
    """Fail before the evaluation, not after it, when a file could not be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{argument}: cannot create directory {directory} ({error})") from None
    if not os.access(directory, os.W_OK):
        raise ValueError(f"{argument}: directory {directory} is not writable")
