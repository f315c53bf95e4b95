"""Write the testbed's miniature benchmarks (testbed/data) as a prepared datasets cache under the
hub ids of lmms-eval's built-in tasks, in a folder of this project's (default results/hf_home).

    python scripts/make_testbed_cache.py     # what `make testbed-cache` (and so `make demo`) runs

Then, with HF_HOME and HF_DATASETS_CACHE pointing there and HF_HUB_OFFLINE=1, the built-in task
names (mme, pope, scienceqa_img, gqa, textvqa_val, mmbench_en_dev_static, coco2017_cap_val and the
vtw_calibration group) run on the testbed. Never point it at your own Hugging Face cache.
"""

from __future__ import annotations

import argparse

from vtw_eval.run import REPO_ROOT
from vtw_eval.testbed.hub_cache import hub_environment, write_hub_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO_ROOT / "testbed" / "data"))
    parser.add_argument("--hf-home", default=str(REPO_ROOT / "results" / "hf_home"))
    args = parser.parse_args()
    write_hub_cache(args.data, args.hf_home)
    print("wrote the testbed's datasets cache; run lmms-eval with:")
    print(" ".join(f"{key}={value}" for key, value in hub_environment(args.hf_home).items()))


if __name__ == "__main__":
    main()
