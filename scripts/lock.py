"""Write requirements.lock: the complete package set that pip's resolver picks for pyproject.toml.

    python3 scripts/lock.py            # what `make lock` runs

pip resolves `.[test]` from scratch (`--dry-run --ignore-installed`: nothing installed here counts),
and every package of the resolution, transitive ones included, is written as `name==version`.
`make install` then installs exactly that set with `--no-deps`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs before the project is installed; vtw_eval.files needs nothing else
from vtw_eval.files import write_atomically  # noqa: E402

LOCK = ROOT / "requirements.lock"
PROJECT = "vtw-eval"


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


def main() -> None:
    pins = resolve(["-e", ".[test]"])
    pins.pop(PROJECT, None)
    header = (
        "# requirements.lock: every package vtw_eval's suite runs on, at exact versions.\n"
        f"# Made by `make lock` (scripts/lock.py: pip {pip_version()}'s resolver on pyproject.toml with\n"
        "# the [test] extra) for CPython 3.11 on Linux x86_64. `make install` installs exactly this set.\n"
        "# Do not edit by hand: change pyproject.toml and run `make lock`.\n"
    )
    body = "".join(f"{name}=={pins[name]}\n" for name in sorted(pins))
    write_atomically(LOCK, (header + body).encode())
    print(f"{LOCK.name}: {len(pins)} packages")


if __name__ == "__main__":
    main()
