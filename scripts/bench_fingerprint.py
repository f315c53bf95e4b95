"""What identifying a model by all of its weights costs, beside what loading it costs.

    python scripts/bench_fingerprint.py                  # a LLaMA-7B-size checkpoint in bfloat16 (13.5 GB on disk)
    python scripts/bench_fingerprint.py --layers 4       # a quick check

Saves a decoder of LLaVA-1.5-7B's language model geometry (32 layers, d=4096, MLP 11008,
vocabulary 32064; values left uninitialised: they do not change the cost) to a temporary folder,
then times, interleaved (median [min, max] of --repeats): `from_pretrained` of it (transformers
maps the files and reads them lazily, so this alone reads little), a first read of every weight
(one value of every 4 KiB page: what the first forward or a move to the GPU pays at least), and
`calibration_file.weights_fingerprint` of the loaded model; then what a later load pays for it,
remembered per checkpoint files (`cached_weights_fingerprint`, in a temporary VTW_EVAL_CACHE).
The checkpoint is deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from vtw_eval.calibration_file import cached_weights_fingerprint, weights_fingerprint


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the temporary checkpoint goes (default: the system's)")
    args = parser.parse_args()
    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, dtype="bfloat16",
    )  # fmt: skip
    folder = Path(tempfile.mkdtemp(dir=args.dir)) / "model"
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model = model.to_empty(device="cpu").to(torch.bfloat16)  # values do not change the cost
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, {size / 1e9:.1f} GB in bfloat16")
        model.save_pretrained(folder)
        del model
        load, first_read, fingerprint = [], [], []
        for _ in tqdm(range(args.repeats), desc="load, read, fingerprint"):
            start = time.perf_counter()
            model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
            load.append(time.perf_counter() - start)
            start = time.perf_counter()
            for parameter in model.parameters():  # one value per 4 KiB page: the reading, not arithmetic
                parameter.detach().reshape(-1)[:: 4096 // parameter.element_size()].sum()
            first_read.append(time.perf_counter() - start)
            start = time.perf_counter()
            weights_fingerprint(model)
            fingerprint.append(time.perf_counter() - start)
            del model
        os.environ["VTW_EVAL_CACHE"] = str(folder.parent / "cache")
        model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        cached_weights_fingerprint(model, folder)  # hashed once, remembered
        remembered = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            cached_weights_fingerprint(model, folder)
            remembered.append(time.perf_counter() - start)
    finally:
        shutil.rmtree(folder.parent)
    rows = [
        ["from_pretrained (page cache warm)", spread(load)],
        ["first read of every weight", spread(first_read)],
        ["weights_fingerprint (every value)", spread(fingerprint)],
        ["the same, remembered (a later load of the same files)", spread(remembered)],
        [
            "fingerprint / (load + first read)",
            f"{statistics.median(fingerprint) / (statistics.median(load) + statistics.median(first_read)):.1f}",
        ],
        ["fingerprint GB/s", f"{size / 1e9 / statistics.median(fingerprint):.2f}"],
    ]
    print(tabulate(rows, headers=["seconds", "median [min, max]"], tablefmt="github"))


if __name__ == "__main__":
    main()
