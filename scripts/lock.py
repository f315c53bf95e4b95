"""Write requirements.lock: the complete package set that pip's resolver picks for pyproject.toml.

    python3 scripts/lock.py            # what `make lock` runs

One lock for Python 3.11, 3.12 and 3.13. pip resolves `.[test]` from scratch on the oldest, 3.11
(`--dry-run --ignore-installed`: nothing installed here counts), so that every version it picks
supports all three; every package of the resolution, transitive ones included, is written as
`name==version`, after pip has shown, with 3.12 and 3.13 too, that the whole set installs there
(`--dry-run --no-deps`). `make install PYTHON=...` then installs exactly that set with `--no-deps`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs before the project is installed; vtw_eval.files needs nothing else
from vtw_eval.files import write_atomically  # noqa: E402

LOCK = ROOT / "requirements.lock"
PROJECT = "vtw-eval"
PYTHONS = ("3.11", "3.12", "3.13")  # pyproject.toml's requires-python; the first is the one resolved on


def find_python(version: str) -> str | None:
    """An interpreter of ``version``: pyenv's (its shims refuse versions that are not selected),
    else ``python<version>`` on PATH."""
    candidates = []
    if shutil.which("pyenv"):
        releases = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True).stdout.split()
        for release in sorted(r for r in releases if r == version or r.startswith(f"{version}.")):
            prefix = subprocess.run(["pyenv", "prefix", release], capture_output=True, text=True).stdout.strip()
            candidates.append(f"{prefix}/bin/python{version}")
    candidates.append(shutil.which(f"python{version}") or "")
    for candidate in reversed(candidates):  # the newest release first
        probe = [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]
        if candidate and subprocess.run(probe, capture_output=True, text=True).stdout.strip() == version:
            return candidate
    return None


def installs_exactly(lock: Path, python: str) -> bool:
    """Whether every locked version has a distribution ``python`` accepts (pip's dry run)."""
    command = [python, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "-q", "-r", str(lock)]
    return subprocess.run(command, cwd=ROOT).returncode == 0


def normalise(name: str) -> str:
    """PEP 503 name: lower case, runs of '-', '_', '.' as one '-'."""
    return "-".join(part for part in name.lower().replace("_", "-").replace(".", "-").split("-") if part)


def resolve(requirements: list[str], python: str = sys.executable) -> dict[str, str]:
    """Resolve `requirements` with pip, without installing; {normalised name: version}."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [
                python,
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--ignore-installed",
                "--quiet",
                "--report",
                str(report),
                *requirements,
            ],
            cwd=ROOT,
            check=True,
        )
        installs = json.loads(report.read_text())["install"]
    return {normalise(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """{normalised name: version} of a lock file."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[normalise(name)] = version
    return pins


def pip_version(python: str = sys.executable) -> str:
    return subprocess.run(
        [python, "-m", "pip", "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[1]


def main() -> int:
    pythons = {version: find_python(version) for version in PYTHONS}
    missing = [version for version, python in pythons.items() if python is None]
    if missing:
        print(
            f"lock: no interpreter for Python {', '.join(missing)}; the lock is checked on {PYTHONS}", file=sys.stderr
        )
        return 2
    oldest = pythons[PYTHONS[0]]
    pins = resolve(["-e", ".[test]"], oldest)
    pins.pop(PROJECT, None)
    header = (
        "# requirements.lock: every package vtw_eval's suite runs on, at exact versions.\n"
        f"# Made by `make lock` (scripts/lock.py: pip {pip_version(oldest)}'s resolver on pyproject.toml with\n"
        f"# the [test] extra, on CPython {PYTHONS[0]}, the oldest supported) for CPython {', '.join(PYTHONS)} on\n"
        "# Linux x86_64. `make install` (PYTHON=...) installs exactly this set on each.\n"
        "# Do not edit by hand: change pyproject.toml and run `make lock`.\n"
    )
    body = "".join(f"{name}=={pins[name]}\n" for name in sorted(pins))
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / LOCK.name
        candidate.write_text(header + body)
        refused = [version for version in PYTHONS[1:] if not installs_exactly(candidate, pythons[version])]
    if refused:
        print(
            f"lock: the set resolved on {PYTHONS[0]} does not install on Python {', '.join(refused)}", file=sys.stderr
        )
        return 1
    write_atomically(LOCK, (header + body).encode())
    print(f"{LOCK.name}: {len(pins)} packages, installable on Python {', '.join(PYTHONS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
