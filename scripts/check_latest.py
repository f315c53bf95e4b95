"""Drift check (`make check-latest`): the newest versions pyproject.toml's ranges allow, in a
throwaway venv, against requirements.lock.

Installs `.[test]` fresh (pip picks the newest allowed versions), prints every package whose
version differs from the lock, then runs a smoke subset there (the engine exactness tests and an
lmms-eval CLI run of a vtw backend) and exits non-zero when it fails. Not part of `make test`:
it reports what the outside world did, which the locked suite cannot see.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lock import LOCK, PROJECT, ROOT, normalise, read_lock

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


def main() -> int:
    from tabulate import tabulate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the throwaway venv and print its path")
    args = parser.parse_args()

    venv = Path(tempfile.mkdtemp(prefix="vtw-latest-"))
    python = venv / "bin" / "python"
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "-e", ".[test]"], cwd=ROOT, check=True)
    install_seconds = time.monotonic() - start

    rows = drift_rows(read_lock(LOCK), installed_versions(python))
    smoke = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SMOKE_TESTS], cwd=ROOT)
    print(f"\nNewest versions allowed by pyproject.toml vs {LOCK.name} (installed in {install_seconds:.0f} s):")
    print(tabulate(rows, headers=["package", "lock", "latest"]) if rows else "nothing moved")
    verdict = "PASS" if smoke.returncode == 0 else "FAIL"
    print(f"\nsmoke tests on the latest set ({', '.join(SMOKE_TESTS)}): {verdict}")
    if args.keep:
        print(f"venv kept: {venv}")
    else:
        subprocess.run(["rm", "-rf", str(venv)], check=True)
    return smoke.returncode


if __name__ == "__main__":
    sys.exit(main())
