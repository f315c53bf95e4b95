"""Write the testbed's miniature benchmarks (tasks/vtw_testbed/data), held out from its training set.

python scripts/make_testbed_data.py
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from vtw_eval.run import REPO_ROOT
from vtw_eval.testbed.tasks import write_datasets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "tasks" / "vtw_testbed" / "data"))
    parser.add_argument("--scenes", type=int, default=100, help="scenes per task (MME asks two questions each)")
    parser.add_argument("--seed", type=int, default=1_000_000)
    parser.add_argument(
        "--manifest",
        default=str(REPO_ROOT / "testbed" / "model" / "manifest.json"),
        help="the testbed's training manifest: its training set is held out",
    )
    args = parser.parse_args()
    manifest = json.loads(Path(args.manifest).read_text())
    shutil.rmtree(args.out, ignore_errors=True)
    sizes = write_datasets(args.out, args.scenes, args.seed, manifest["examples_per_task"], manifest["seed"])
    print(json.dumps(sizes))


if __name__ == "__main__":
    main()
