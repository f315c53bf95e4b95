"""Writing result files so that an interrupted or failed run never leaves a half-written one."""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """Where vtw_eval writes by default, shared by every working directory (as Hugging Face keeps
    its caches): ``$VTW_EVAL_CACHE``, else ``$XDG_CACHE_HOME/vtw_eval``, else ``~/.cache/vtw_eval``."""
    if os.environ.get("VTW_EVAL_CACHE"):
        return Path(os.environ["VTW_EVAL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "vtw_eval"


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename: an old file is never half-replaced."""
    write_together({path: data})


def write_together(files: dict[Path, bytes]) -> None:
    """Write several files that belong together (a record and its plot) as one: every one, or
    none of them changed. Each goes to a temporary file first; the renames come last, and if one
    fails, the files already renamed get their old contents back."""
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
    old = {path: path.read_bytes() if path.is_file() else None for path in files}
    renamed: list[Path] = []
    try:
        for path, data in files.items():
            _temporary(path).write_bytes(data)
        for path in files:
            os.replace(_temporary(path), path)
            renamed.append(path)
    except BaseException:
        for path in renamed:  # undo: the pair stays as it was
            if old[path] is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(old[path])
        raise
    finally:
        for path in files:
            _temporary(path).unlink(missing_ok=True)


def check_writable(path: Path, argument: str) -> None:
    """Fail before any expensive work, not after it, when ``path`` could not be written: a
    ValueError naming ``argument`` and the reason. Creates missing directories; leaves no file."""
    if path.is_dir():
        raise ValueError(f"{argument}: {path} is a directory, not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{argument}: cannot create directory {path.parent} ({error.strerror})") from None
    try:
        # A temporary file in the directory (writes and renames happen there), then the file
        # itself opened for appending without changing it (an immutable or read-only file).
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".check"):
            pass
        if path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
    except OSError as error:
        raise ValueError(f"{argument}: cannot write {path} ({error.strerror})") from None


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``.<name>.lock`` beside ``path`` (POSIX ``flock``), so that writers
    of files that belong together (a record and its plot) do not interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
