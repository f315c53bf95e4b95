"""What VTW saves, measured side by side with the baseline in one run and set against the
analytic limit of vtw_eval.cost.

``--architecture llava`` (the default): a randomly initialised LLaVA with LLaVA-1.5-7B's layer
count and 576 visual tokens plus a realistic prompt, width scaled to fit the machine (full width
in bf16 on a GPU). ``--architecture qwen3_5``: a random Qwen3.5-4B-like model, its 32 layers of
which every fourth attends and the others are Gated DeltaNet layers, its head sizes (attention
256, linear attention 128), one image of 576 visual tokens (768 x 768 px at 32 px per token),
width scaled the same way. Baseline and each
K are timed interleaved, after a warm-up, several times; medians and spread are printed:
prefill latency, per-token decode latency, peak memory (GPU only), KV-cache bytes measured from
the cache against the cost model. Then batch-size-8 vs batch-size-1 generation throughput on a
small model. Writes JSON and a PNG plot (speedup vs K) under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate
from tqdm import tqdm

from vtw_eval.architecture import language_model_of
from vtw_eval.cost import DecoderGeometry, analytic_prefill_speedup, whole_model_of
from vtw_eval.engine import VisualTokenWithdrawal, cache_bytes, cache_in, cache_keyword
from vtw_eval.files import write_atomically
from vtw_eval.small_llava import llava_prompt, random_llava


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def measure(model, inputs: dict, new_tokens: int, device: torch.device, continue_positions: bool = False) -> dict:
    """One prefill and ``new_tokens`` greedy decoding steps with the KV cache. With
    ``continue_positions`` each step gets the position ids after the prompt's, as generate gives
    them (multimodal rotary positions: the model does not derive them from a direct call's mask)."""
    positions = {}

    def keep_prompt_positions(module, args, kwargs):
        positions.setdefault("prompt", kwargs.get("position_ids"))

    hook = language_model_of(model).register_forward_pre_hook(keep_prompt_positions, with_kwargs=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    output = model(**inputs, use_cache=True, logits_to_keep=1)
    sync(device)
    prefill = time.perf_counter() - start
    hook.remove()
    mask, step_positions = inputs["attention_mask"], positions["prompt"]
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = output.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        if continue_positions:
            step_positions = step_positions[..., -1:] + 1
        output = model(
            input_ids=token,
            attention_mask=mask,
            **({"position_ids": step_positions} if continue_positions else {}),
            **{cache_keyword(model): cache_in(output)},
            use_cache=True,
            logits_to_keep=1,
        )
    sync(device)
    decode = (time.perf_counter() - start) / new_tokens
    kv_bytes = cache_bytes(cache_in(output))
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"prefill_s": prefill, "decode_s_per_token": decode, "kv_cache_bytes": kv_bytes, "peak_memory_bytes": peak}


@torch.inference_mode()
def timed(call, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    call()
    sync(device)
    return time.perf_counter() - start


def compare_methods(model, inputs: dict, withdrawal, geometry, layers: list[int], args, device) -> None:
    """Prefill seconds of VTW at each K and of random and FastV withdrawing from ``--prune-layer``
    with the compute of VTW at that K (interleaved, median [min, max]), each against the analytic
    limit (baseline FLOPs over the method's, FastV's ranking included); then FastV's ranking alone."""
    from vtw_eval.methods import Method, last_query_attention

    num_tokens = inputs["input_ids"].shape[1]
    num_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    text_config = model.config.get_text_config()
    configs = [("baseline", None, None, None)]  # (method, compute of K, the engine's withdraw layer, selector)
    for k in layers:
        if k < args.prune_layer:
            continue  # matching needs K >= prune_layer
        configs.append(("vtw", k, k, None))
        for name in ("random", "fastv"):
            method = Method.from_arguments(name, args.prune_layer, None, None, k, None, text_config)
            selector = method.keep_selector(geometry)
            selector.rows = [("bench", 0)]
            configs.append((name, k, args.prune_layer, selector))
    captured = {}

    def capture(module, hook_args, kwargs):
        captured.update(module=module, inputs=dict(kwargs))

    attention = language_model_of(model).layers[args.prune_layer - 1].self_attn
    handle = attention.register_forward_pre_hook(capture, with_kwargs=True)
    prefill = lambda: model(**inputs, use_cache=True, logits_to_keep=1)  # noqa: E731
    timed(prefill, device)  # warm-up, and the scoring layer's inputs
    handle.remove()
    recipe = next(selector.recipe for name, _, _, selector in configs if name == "fastv")
    score = lambda: last_query_attention(  # noqa: E731
        captured["module"], captured["inputs"]["hidden_states"], captured["inputs"]["position_embeddings"],
        captured["inputs"].get("attention_mask"), recipe,
    )  # fmt: skip
    times = {index: [] for index in range(len(configs))}
    scoring, removed = [], {}
    for _ in tqdm(range(args.repeats), desc="interleaved repeats"):
        for index, (_, _, layer, selector) in enumerate(configs):
            withdrawal.keep_selector, withdrawal.withdraw_layer = selector, layer
            times[index].append(timed(prefill, device))
            removed[index] = int(withdrawal.plan.num_removed.sum()) if withdrawal.plan is not None else 0
        withdrawal.keep_selector, withdrawal.withdraw_layer = None, None
        scoring.append(timed(score, device))
    baseline_flops = geometry.prefill_flops(num_tokens, num_visual, None)
    baseline_s = statistics.median(times[0])
    rows = []
    for index, (name, k, layer, _) in enumerate(configs):
        flops = geometry.prefill_flops(num_tokens, removed[index], layer)
        flops += geometry.last_query_scoring_flops(num_tokens) if name == "fastv" else 0
        measured, analytic = baseline_s / statistics.median(times[index]), baseline_flops / flops
        rows.append(
            [
                name,
                k,
                removed[index],
                spread(times[index]),
                f"{measured:.2f}",
                f"{analytic:.2f}",
                f"{measured / analytic:.2f}",
            ]
        )
    overhead = statistics.median(scoring) / baseline_s
    rows.append(["fastv ranking alone", "", "", spread(scoring, 4), "", "", f"{overhead:.2%} of a baseline prefill"])
    print(
        f"{args.architecture}: {device.type}, {args.dtype}; {geometry.num_layers} layers, d={geometry.hidden_size}; "
        f"{num_tokens} prompt tokens ({num_visual} visual); random and FastV from layer {args.prune_layer}; "
        f"median [min, max] of {args.repeats} interleaved repeats"
    )
    headers = ["method", "compute of K", "tokens withdrawn", "prefill s", "speedup", "analytic (decoder)", "ratio"]
    print(tabulate(rows, headers=headers, tablefmt="github"))


def spread(values: list[float], digits: int = 3) -> str:
    """Median [min, max]."""
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


@torch.inference_mode()
def batch_throughput(batch_size: int, repeats: int, new_tokens: int, device: torch.device) -> float:
    """Generated tokens per second of batch_size prompts at once over one at a time (same prompts)."""
    model = random_llava(num_layers=4, hidden_size=64, intermediate_size=128, num_heads=4, image_size=112).to(device)
    VisualTokenWithdrawal(model, withdraw_layer=2)
    inputs = {k: v.to(device) for k, v in llava_prompt(model, 35, 40, batch_size=batch_size).items()}
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(**inputs, **kwargs)  # warm-up
    ratios = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(**inputs, **kwargs)
        batched = time.perf_counter() - start
        start = time.perf_counter()
        for row in range(batch_size):
            model.generate(**{k: v[row : row + 1] for k, v in inputs.items()}, **kwargs)
        one_by_one = time.perf_counter() - start
        ratios.append(one_by_one / batched)
    return statistics.median(ratios)


def random_qwen3_5(
    num_layers: int, hidden_size: int, intermediate_size: int, heads: int, linear_value_heads: int, seed: int = 0
):
    """A random Qwen3.5 with Qwen3.5-4B's layer pattern and head sizes: attention heads of 256
    (a quarter of them key/value heads, as 16/4), linear attention heads of 128 (half as many
    key heads as value heads, as 16/32); a one-block ViT, since VTW does not change it."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(
        vocab_size=1000, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1), head_dim=256,
        linear_num_value_heads=linear_value_heads, linear_num_key_heads=linear_value_heads // 2,
        linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
        rope_parameters={"rope_type": "default", "mrope_section": [11, 11, 10], "mrope_interleaved": True,
                         "rope_theta": 1e7, "partial_rotary_factor": 0.25},
    )  # fmt: skip
    vision = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=hidden_size)
    config = Qwen3_5Config(
        text_config=text, vision_config=vision, image_token_id=999, video_token_id=998,
        vision_start_token_id=997, vision_end_token_id=996,
    )  # fmt: skip
    return Qwen3_5ForConditionalGeneration(config).eval()


def qwen3_5_prompt(model, text_before: int, text_after: int, grid: int = 48, seed: int = 0) -> dict:
    """Model inputs of a one-image prompt: ``text_before`` tokens, the image of ``grid`` x ``grid``
    16 px patches between its markers ((grid / 2)^2 visual tokens), ``text_after`` tokens."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    text = torch.randint(0, 990, (1, text_before + text_after), generator=generator)
    image = torch.full((1, (grid // 2) ** 2), config.image_token_id)
    start, end = torch.tensor([[config.vision_start_token_id]]), torch.tensor([[config.vision_end_token_id]])
    input_ids = torch.cat([text[:, :text_before], start, image, end, text[:, text_before:]], dim=1)
    patch = 3 * 2 * 16 * 16  # channels x temporal patch x 16 x 16
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == config.image_token_id).long(),
        "pixel_values": torch.randn(grid * grid, patch, generator=generator),
        "image_grid_thw": torch.tensor([[1, grid, grid]]),
    }


def prompt_batch(inputs: dict, batch_size: int) -> dict:
    """The same prompt in every row; Qwen's patches and patch grids are per image, not per row."""
    batch = {}
    for key, value in inputs.items():
        if key in ("pixel_values", "image_grid_thw") and "image_grid_thw" in inputs:
            batch[key] = value.repeat(batch_size, 1)
        else:
            batch[key] = value.expand(batch_size, *value.shape[1:])
    return batch


def plot(rows: list[dict], path: Path) -> None:
    from vtw_eval.plots import plt, save_png

    figure, axes = plt.subplots(figsize=(6, 4))
    rows = sorted(rows, key=lambda row: row["withdraw_layer"])
    layers = [row["withdraw_layer"] for row in rows]
    axes.plot(layers, [row["analytic_prefill_speedup"] for row in rows], "o-", label="analytic (FLOPs)")
    axes.plot(layers, [row["measured_prefill_speedup"] for row in rows], "s--", label="measured prefill")
    axes.plot(layers, [row["measured_decode_speedup"] for row in rows], "^:", label="measured decode step")
    axes.set_xlabel("withdrawal layer K")
    axes.set_ylabel("speedup over baseline")
    axes.set_yscale("log")
    axes.legend()
    save_png(figure, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    gpu = torch.cuda.is_available()
    parser.add_argument("--architecture", default="llava", choices=["llava", "qwen3_5"])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, help="default: LLaVA 4096 on a GPU, 1024 on CPU; Qwen3.5 2560 / 1024")
    parser.add_argument("--intermediate", type=int, help="default: LLaVA 11008 / 2752; Qwen3.5 9216 / 3584")
    parser.add_argument("--heads", type=int, help="attention heads; default: LLaVA 32 / 8; Qwen3.5 16 / 4")
    parser.add_argument("--linear-heads", type=int, help="Qwen3.5's linear attention value heads: 32 / 16")
    parser.add_argument("--dtype", default="bfloat16" if gpu else "float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--withdraw-layers", default="0,8,16,24", help="comma-separated K values")
    parser.add_argument("--text-before", type=int, default=35, help="system prompt tokens before the image")
    parser.add_argument("--text-after", type=int, default=40, help="question tokens after the image")
    parser.add_argument("--new-tokens", type=int, default=8, help="decoding steps timed per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="the larger batch whose decoding is also timed")
    parser.add_argument("--batch-repeats", type=int, default=3, help="repeats at --batch (its prefills are long)")
    parser.add_argument("--out", default="results/bench")
    parser.add_argument(
        "--method",
        action="store_true",
        help="instead: prefill of VTW, random and FastV at the compute of each K (matched per prompt), against "
        "the analytic limit, and FastV's ranking on its own line",
    )
    parser.add_argument("--prune-layer", type=int, default=2, help="with --method: where random and FastV withdraw")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if gpu else "cpu")
    dtype = getattr(torch, args.dtype)

    full_width = {  # (GPU, CPU) defaults: the real width on a GPU, scaled to fit a CPU
        "llava": {"hidden": (4096, 1024), "intermediate": (11008, 2752), "heads": (32, 8)},
        "qwen3_5": {"hidden": (2560, 1024), "intermediate": (9216, 3584), "heads": (16, 4), "linear_heads": (32, 16)},
    }[args.architecture]
    for name, defaults in full_width.items():
        if getattr(args, name) is None:
            setattr(args, name, defaults[0 if gpu else 1])
    if args.architecture == "llava":
        with device:  # initialised where it runs: a 7B model is not built on the CPU first
            model = random_llava(args.layers, args.hidden, args.intermediate, args.heads)
        inputs = llava_prompt(model, args.text_before, args.text_after)
        from vtw_eval.backends.llava import VTWLlava

        architecture = VTWLlava.architecture  # what the backend declares to the engine
    else:
        from vtw_eval.backends.qwen3_5 import VTWQwen3_5

        with device:
            model = random_qwen3_5(args.layers, args.hidden, args.intermediate, args.heads, args.linear_heads)
        inputs = qwen3_5_prompt(model, args.text_before, args.text_after)
        architecture = VTWQwen3_5.architecture
    model = model.to(device, dtype)
    inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
    withdrawal = VisualTokenWithdrawal(model, None, architecture)
    geometry = DecoderGeometry.from_config(model.config)
    whole = whole_model_of(model.config)  # the tower, projector or merger, and head around the decoder
    num_tokens = inputs["input_ids"].shape[1]
    num_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    configs = [None] + [int(k) for k in args.withdraw_layers.split(",")]
    if args.method:
        compare_methods(model, inputs, withdrawal, geometry, configs[1:], args, device)
        return

    # The parts a prefill at K is made of, timed on the unmodified model: the vision tower and
    # projector alone, and a text-only prompt of the kept tokens (every layer at the kept length).
    kept_inputs = {"input_ids": inputs["input_ids"][inputs["input_ids"] != model.config.image_token_id][None]}
    kept_inputs["attention_mask"] = torch.ones_like(kept_inputs["input_ids"])
    visual_inputs = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw")}
    parts = {
        "tower_s": lambda: model.model.get_image_features(**visual_inputs),
        "kept_only_s": lambda: model(**kept_inputs, use_cache=True, logits_to_keep=1),
    }

    withdrawal.withdraw_layer = None
    continue_positions = architecture.decoding_positions == "from_attention_mask"
    measure(model, inputs, 2, device, continue_positions)  # warm-up
    runs, part_times = {k: [] for k in configs}, {name: [] for name in parts}
    for _ in tqdm(range(args.repeats), desc="interleaved repeats"):
        for k in configs:
            withdrawal.withdraw_layer = k
            runs[k].append(measure(model, inputs, args.new_tokens, device, continue_positions))
        withdrawal.withdraw_layer = None
        for name, call in parts.items():
            part_times[name].append(timed(call, device))
    # Decoding at the larger batch: the same prompt in every row.
    batch_inputs = prompt_batch(inputs, args.batch)
    batch_runs = {k: [] for k in configs}
    for _ in tqdm(range(args.batch_repeats), desc=f"interleaved repeats at batch {args.batch}"):
        for k in configs:
            withdrawal.withdraw_layer = k
            run = measure(model, batch_inputs, args.new_tokens, device, continue_positions)
            batch_runs[k].append(run["decode_s_per_token"])
    withdrawal.withdraw_layer = None
    tower_s, kept_only_s = (statistics.median(part_times[name]) for name in parts)

    def layer_rate_limit(k) -> float:
        """The prefill time at K if VTW cost nothing beyond its layers: the tower, K/L of the
        baseline's decoder (and head) time at the full length, (L-K)/L of the kept-only forward's."""
        full_layers = geometry.num_layers if k is None else k
        fraction = full_layers / geometry.num_layers
        baseline_s = median(None, "prefill_s")
        return tower_s + fraction * (baseline_s - tower_s) + (1 - fraction) * kept_only_s

    def median(k, key):
        return statistics.median(run[key] for run in runs[k])

    def decode_bytes(k, batch_size):  # memory traffic of a decoding step halfway through the answer
        context, vocab = num_tokens + args.new_tokens // 2, model.config.text_config.vocab_size
        return geometry.decode_step_bytes(context, num_visual, k, torch.finfo(dtype).bits // 8, batch_size, vocab)

    rows, table = [], []
    cached = num_tokens + args.new_tokens
    for k in configs:
        analytic_kv = geometry.kv_cache_bytes(cached, num_visual, k, torch.finfo(dtype).bits // 8)
        measured_kv = runs[k][0]["kv_cache_bytes"]
        row = {
            "withdraw_layer": geometry.num_layers if k is None else k,
            "prefill_s": [r["prefill_s"] for r in runs[k]],
            "decode_s_per_token": [r["decode_s_per_token"] for r in runs[k]],
            "measured_prefill_speedup": median(None, "prefill_s") / median(k, "prefill_s"),
            "analytic_prefill_speedup": analytic_prefill_speedup(geometry, num_tokens, num_visual, k),
            "measured_decode_speedup": median(None, "decode_s_per_token") / median(k, "decode_s_per_token"),
            "analytic_decode_speedup": decode_bytes(None, 1) / decode_bytes(k, 1),
            "decode_s_per_token_batch": batch_runs[k],
            "measured_decode_speedup_batch": statistics.median(batch_runs[None]) / statistics.median(batch_runs[k]),
            "analytic_decode_speedup_batch": decode_bytes(None, args.batch) / decode_bytes(k, args.batch),
            "kv_cache_bytes_measured": measured_kv,
            "kv_cache_bytes_analytic": analytic_kv,
            "peak_memory_bytes": [r["peak_memory_bytes"] for r in runs[k]][0],
        }
        row["analytic_whole_model_prefill_speedup"] = whole.prefill_flops(
            num_tokens, [num_visual], None
        ) / whole.prefill_flops(num_tokens, [num_visual], k)
        row["prefill_speedup_ratio"] = row["measured_prefill_speedup"] / row["analytic_prefill_speedup"]
        row["layer_rate_limit_s"] = layer_rate_limit(k)
        row["layer_rate_ratio"] = row["layer_rate_limit_s"] / median(k, "prefill_s")
        row["whole_model_prefill_speedup_ratio"] = (
            row["measured_prefill_speedup"] / row["analytic_whole_model_prefill_speedup"]
        )
        rows.append(row)
        table.append(
            [
                "none (baseline)" if k is None else k,
                spread(row["prefill_s"]),
                f"{row['measured_prefill_speedup']:.2f}",
                f"{row['analytic_prefill_speedup']:.2f}",
                f"{row['prefill_speedup_ratio']:.2f}",
                f"{row['analytic_whole_model_prefill_speedup']:.2f}",
                f"{row['whole_model_prefill_speedup_ratio']:.2f}",
                f"{row['layer_rate_limit_s']:.3f}",
                f"{row['layer_rate_ratio']:.2f}",
                spread([1000 * d for d in row["decode_s_per_token"]]),
                f"{row['measured_decode_speedup']:.2f}",
                f"{row['analytic_decode_speedup']:.3f}",
                spread([1000 * d for d in row["decode_s_per_token_batch"]]),
                f"{row['measured_decode_speedup_batch']:.2f}",
                f"{row['analytic_decode_speedup_batch']:.3f}",
                f"{measured_kv / 2**20:.1f}",
                "yes" if measured_kv == analytic_kv else f"NO ({analytic_kv / 2**20:.1f})",
                "n/a (CPU)" if row["peak_memory_bytes"] is None else f"{row['peak_memory_bytes'] / 2**20:.0f}",
            ]
        )
    print(
        f"{args.architecture}: {device.type}, {args.dtype}; {geometry.num_layers} layers, d={geometry.hidden_size}, "
        f"m={geometry.intermediate_size}; {num_tokens} prompt tokens ({num_visual} visual), "
        f"{args.new_tokens} decoding steps; median [min, max] of {args.repeats} interleaved repeats"
    )
    print(
        tabulate(
            table,
            headers=[
                "K",
                "prefill s",
                "speedup",
                "analytic (decoder)",
                "ratio",
                "analytic (whole model)",
                "ratio",
                "layer-rate limit s",
                "ratio",
                "decode ms/token",
                "speedup",
                "analytic (bytes)",
                f"decode ms/step, batch {args.batch}",
                "speedup",
                "analytic (bytes)",
                "KV MiB",
                "KV = analytic",
                "peak MiB",
            ],
        )
    )
    print(
        f"parts (median): tower and projector {tower_s:.3f} s; text-only forward of the "
        f"{kept_inputs['input_ids'].shape[1]} kept tokens {kept_only_s:.3f} s"
    )
    listed = [row for row in rows if row["withdraw_layer"] < geometry.num_layers]
    worst_flops = min(row["whole_model_prefill_speedup_ratio"] for row in listed)
    print(
        f"goal: prefill speedup >= 0.95 x analytic (whole model) at every K: worst {worst_flops:.2f} "
        f"({'met' if worst_flops >= 0.95 else 'NOT met'})"
    )
    worst = min(row["layer_rate_ratio"] for row in listed)
    print(
        f"goal: prefill within 5% of the layer-rate limit at every K (limit / measured >= 0.95): "
        f"worst {worst:.2f} ({'met' if worst >= 0.95 else 'NOT met'})"
    )
    half = next((row for row in rows if row["withdraw_layer"] == geometry.num_layers // 2), None)
    if half:
        verdict = "met" if half["prefill_speedup_ratio"] >= 0.9 else "NOT met"
        print(f"goal: prefill speedup at K=L/2 >= 0.9 x analytic: {half['prefill_speedup_ratio']:.2f} ({verdict})")
    throughput = batch_throughput(8, args.repeats, args.new_tokens, device)
    print(
        f"goal: batch_size 8 throughput >= 3 x batch_size 1 (small model): {throughput:.2f}x "
        f"({'met' if throughput >= 3 else 'NOT met'})"
    )

    out = Path(args.out)
    summary = {
        "architecture": args.architecture,
        "device": device.type,
        "dtype": args.dtype,
        "geometry": dataclasses.asdict(geometry),
        "prompt_tokens": num_tokens,
        "visual_tokens": num_visual,
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "repeats": args.repeats,
        "tower_s": part_times["tower_s"],
        "kept_only_s": part_times["kept_only_s"],
        "rows": rows,
        "batch8_over_batch1_throughput": throughput,
    }
    stem = "speed" if args.architecture == "llava" else f"speed_{args.architecture}"
    write_atomically(out / f"{stem}.json", (json.dumps(summary, indent=2) + "\n").encode())
    plot(rows, out / f"{stem}.png")
    print(f"wrote {out / f'{stem}.json'} and {out / f'{stem}.png'}")


if __name__ == "__main__":
    main()
