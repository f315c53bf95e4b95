"""Calibration cost: time per sample of the one-pass per-layer KL divided by one baseline forward.

On LLaVA-1.5's geometry (32 layers, 576 visual tokens, a realistic prompt) with the width scaled
to fit the machine. Goal: at most 3 (the reference implementation runs about L-5 forwards).
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_speed import spread  # scripts/ is on the path when a script runs

from vtw_eval.calibration import layer_kl_divergences
from vtw_eval.engine import VisualTokenWithdrawal
from vtw_eval.small_llava import llava_prompt, random_llava


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2752)
    parser.add_argument("--text-before", type=int, default=35, help="system prompt tokens before the image")
    parser.add_argument("--text-after", type=int, default=40, help="question tokens after the image")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    model = random_llava(args.layers, args.hidden, args.intermediate)
    inputs = llava_prompt(model, args.text_before, args.text_after)
    withdrawal = VisualTokenWithdrawal(model, withdraw_layer=None)
    forward_times, calibration_times = [], []
    with torch.inference_mode():
        model(**inputs, use_cache=False)  # warm-up
        for _ in range(args.repeats):  # interleaved, so drifts hit both alike
            start = time.perf_counter()
            model(**inputs, use_cache=False)
            forward_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            layer_kl_divergences(withdrawal, inputs)
            calibration_times.append(time.perf_counter() - start)
    ratios = [c / f for c, f in zip(calibration_times, forward_times)]
    tokens = inputs["input_ids"].shape[1]
    visual = tokens - args.text_before - args.text_after
    print(f"geometry: {args.layers} layers, d={args.hidden}, {tokens} prompt tokens ({visual} visual)")
    print(f"baseline forward s: {spread(forward_times)}")
    print(f"calibration s, all {args.layers + 1} candidate layers: {spread(calibration_times)}")
    print(
        f"calibration / forward: median [min, max] {spread(ratios, digits=2)}; goal <= 3; "
        f"the reference's per-layer forwards would be about {args.layers - 5}"
    )


if __name__ == "__main__":
    main()
