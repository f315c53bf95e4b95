"""Drift check (`make check-latest`): the newest versions pyproject.toml's ranges allow, on each
supported Python (3.11, 3.12, 3.13), in a throwaway venv per version, against requirements.lock.

For each interpreter: installs `.[test]` fresh (pip picks the newest allowed versions), prints
every package whose version differs from the lock, then runs a smoke subset there (the engine
exactness tests and an lmms-eval CLI run of a vtw backend); exits non-zero when any fails or an
interpreter is missing. Not part of `make test`: it reports what the outside world did, which the
locked suite cannot see.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lock import LOCK, PROJECT, PYTHONS, ROOT, find_python, normalise, read_lock

SMOKE_TESTS = ["tests/test_engine.py", "tests/test_cli.py"]


def installed_versions(python: Path) -> dict[str, str]:
    listing = subprocess.run(
        [python, "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, check=True
    ).stdout
    return {normalise(p["name"]): p["version"] for p in json.loads(listing)}


def drift_rows(locked: dict[str, str], latest: dict[str, str]) -> list[tuple[str, str, str]]:
    """(package, locked version, newest version) for every package that differs; '-' where absent."""
    names = sorted((set(locked) | set(latest)) - {PROJECT, "pip", "setuptools", "wheel"})
    return [(n, locked.get(n, "-"), latest.get(n, "-")) for n in names if locked.get(n) != latest.get(n)]


def check(version: str, interpreter: str, keep: bool) -> bool:
    """One Python version: install the newest allowed set, print what moved, run the smoke tests."""
    from tabulate import tabulate

    venv = Path(tempfile.mkdtemp(prefix=f"vtw-latest-{version}-"))
    python = venv / "bin" / "python"
    start = time.monotonic()
    subprocess.run([interpreter, "-m", "venv", venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "-e", ".[test]"], cwd=ROOT, check=True)
    install_seconds = time.monotonic() - start
    rows = drift_rows(read_lock(LOCK), installed_versions(python))
    smoke = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SMOKE_TESTS], cwd=ROOT)
    print(f"\nPython {version}: newest versions allowed by pyproject.toml vs {LOCK.name} (installed in "
          f"{install_seconds:.0f} s):")  # fmt: skip
    print(tabulate(rows, headers=["package", "lock", "latest"]) if rows else "nothing moved")
    print(f"Python {version}: smoke tests on the latest set ({', '.join(SMOKE_TESTS)}): "
          f"{'PASS' if smoke.returncode == 0 else 'FAIL'}")  # fmt: skip
    if keep:
        print(f"venv kept: {venv}")
    else:
        subprocess.run(["rm", "-rf", str(venv)], check=True)
    return smoke.returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the throwaway venvs and print their paths")
    parser.add_argument("--python", nargs="+", default=list(PYTHONS), help="versions to check (default: all)")
    args = parser.parse_args()
    passed = {}
    for version in args.python:
        interpreter = find_python(version)
        if interpreter is None:
            print(f"Python {version}: no interpreter found", file=sys.stderr)
            passed[version] = False
            continue
        passed[version] = check(version, interpreter, args.keep)
    print("\n" + ", ".join(f"Python {v}: {'PASS' if ok else 'FAIL'}" for v, ok in passed.items()))
    return 0 if all(passed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
