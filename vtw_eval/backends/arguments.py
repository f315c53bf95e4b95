"""Model arguments as they arrive from ``--model_args`` (strings, or lmms-eval's own values),
checked one by one: each refusal names the argument, what was given and what is accepted."""

from __future__ import annotations

import math
import sys
from typing import Any

from lmms_eval.utils import _smart_comma_split


def parse_model_args(arg_string: str) -> dict[str, Any]:
    """``--model_args`` as lmms-eval splits it, but a key given twice is refused, and only ASCII
    numbers become numbers (lmms-eval's parser turns '٣' into 3 and fails on '²' with int()'s
    message; here they stay strings, which the argument checks then refuse by name)."""
    model_args: dict[str, Any] = {}
    for item in _smart_comma_split(arg_string.strip()) if arg_string.strip() else []:
        if "=" not in item:
            raise ValueError(f"--model_args item {item!r} is not accepted; use key=value pairs separated by commas")
        key, value = item.split("=", 1)
        if key in model_args:
            raise ValueError(f"{key} is given twice in --model_args ({model_args[key]!r} and {value!r}); give it once")
        model_args[key] = _value(value)
    return model_args


def _value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if not text.isascii():
        return text
    if text.isdigit():
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def _integer_text(value: Any) -> str:
    """lmms-eval's argument parser turns `3` typed with a space (`withdraw_layer= 3`) into 3.0."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _is_integer_text(text: str) -> bool:
    return text.isascii() and text.isdigit()  # str.isdigit() alone takes '٣' and '²'


def integer(name: str, value: Any, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (1 unless said otherwise)."""
    if not isinstance(value, bool):
        text = _integer_text(value)
        if _is_integer_text(text) and int(text) >= minimum:
            return int(text)
    accepted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    raise ValueError(f"{name}={value!r} is not accepted; use {accepted}")


def non_negative_float(name: str, value: Any) -> float:
    try:
        number = float(value) if str(value).isascii() else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not math.isfinite(number) or number < 0:
        raise ValueError(f"{name}={value!r} is not accepted; use a finite number >= 0")
    return number


def one_of(name: str, value: Any, accepted: tuple[str, ...]) -> str:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not accepted; use one of {', '.join(accepted)}")
    return value


def non_empty(name: str, value: Any, accepted: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}={value!r} is not accepted; use {accepted}")
    return value


def withdraw_layer(value: Any, num_layers: int) -> int | None | str:
    """``withdraw_layer`` as given on the command line: an integer 0..L, none, or auto."""
    accepted = f"an integer from 0 to {num_layers} (the decoder's layer count), 'none' or 'auto'"
    if value is None:  # not given
        return None
    text = _integer_text(value).lower()
    if text in ("auto", "none"):
        return text if text == "auto" else None
    if isinstance(value, bool) or not _is_integer_text(text) or not 0 <= int(text) <= num_layers:
        raise ValueError(f"withdraw_layer={value!r} is not accepted; use {accepted}")
    return int(text)


def boolean(name: str, value: Any) -> bool | None:
    """True or False (``--model_args`` turns true/false into them), or None: not given."""
    if value is None or isinstance(value, bool):
        return value
    raise ValueError(f"{name}={value!r} is not accepted; use true or false")


def command_line_option(name: str, argv: list[str] | None = None) -> str | None:
    """The value of lmms-eval's command-line option ``name`` (``--output_path X`` or
    ``--output_path=X``), or None. lmms-eval does not tell a model its options; its command line
    is the only place that says them."""
    argv = sys.argv if argv is None else argv
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    return None


def response_cache_requested(argv: list[str] | None = None) -> bool:
    """Whether the lmms-eval command line asked for its response cache (``--use_cache PATH``)."""
    return command_line_option("--use_cache", argv) is not None
