"""Train the testbed LLaVA on CPU (seeded, reproducible) and save it with its manifest.

python scripts/train_testbed.py --out testbed/model
python scripts/train_testbed.py --out testbed/model_method_blind --method-blind   # never trained under withdrawal
"""

from __future__ import annotations

import argparse
import json

import torch

from vtw_eval.testbed.train import train_and_save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="testbed/model")
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--examples-per-task", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--method-blind",
        action="store_true",
        help="no step withdraws visual tokens (and so no withdrawal loss): the same recipe, blind to VTW",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    share = 0.0 if args.method_blind else 0.5
    manifest = train_and_save(args.out, args.steps, args.examples_per_task, args.seed, withdrawal_share=share)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
