"""vLLM with and without VTW beside transformers and vtw_eval's transformers engine: requests per
second, prefill and decode seconds, one run, interleaved, in vLLM's venv (`make install-vllm`).

    .venv-vllm/bin/python scripts/bench_vllm.py --out results/bench_vllm

The model is a random LLaVA-1.5-like checkpoint with a real layer count and visual token count
(default: 32 Llama layers of width 512, 8 heads of 64; a one-layer CLIP tower at 336 px, 14 px
patches: 576 visual tokens), saved with a processor in the hub's layout. Every request is one distinct
picture and ``--text-tokens`` words, answered greedily for ``--new-tokens`` tokens, float32. Each
configuration runs in a process of its own per repeat (an engine start is not timed), the
configurations interleaved within each repeat. vLLM runs eager, without prefix caching, with the
settings in VLLM_ENV. Prints medians [min, max] and writes table.md, bench_vllm.json and
bench_vllm.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_USE_V2_MODEL_RUNNER": "0",
}


def build_checkpoint(path: Path, layers: int, hidden: int, heads: int) -> Path:
    """A random LLaVA-1.5-like model with the testbed's word tokenizer, saved for vLLM."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from vtw_eval.small_llava import CHAT_TEMPLATE, build_tokenizer, random_llava, save_tower_in_hub_layout

    tokenizer = build_tokenizer()
    model = random_llava(
        num_layers=layers, hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_heads=heads,
        vocab_size=len(tokenizer),
    )  # fmt: skip
    model.config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    model.config.text_config.pad_token_id = tokenizer.pad_token_id
    size = model.config.vision_config.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer, patch_size=model.config.vision_config.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )  # fmt: skip
    model.save_pretrained(path)
    processor.save_pretrained(path)
    save_tower_in_hub_layout(path)  # vLLM 0.32 reads LLaVA's tower in the hub's layout only
    return path


def requests(path: Path, count: int, text_tokens: int) -> list[tuple[str, object]]:
    """``count`` prompts: one distinct random picture and ``text_tokens`` random words each."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    words = sorted(word for word in processor.tokenizer.get_vocab() if word.isalpha())  # the vocabulary comes unordered
    generator = np.random.default_rng(0)
    prompts = []
    for index in range(count):
        text = " ".join(generator.choice(words, text_tokens))
        content = [{"type": "image"}, {"type": "text", "text": text}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        size = processor.image_processor.crop_size["height"]
        picture = Image.fromarray(generator.integers(0, 255, (size, size, 3), dtype=np.uint8))
        prompts.append((prompt, picture))
    return prompts


def run_vllm(path: Path, withdraw_layer: int | None, args) -> dict:
    from vllm import LLM, SamplingParams

    from vtw_eval.vllm_worker import WITHDRAW_LAYER_KEY, worker_class_path

    extra = {}
    if withdraw_layer is not None:
        extra = dict(worker_cls=worker_class_path(), additional_config={WITHDRAW_LAYER_KEY: withdraw_layer})
    llm = LLM(
        model=str(path), dtype="float32", enforce_eager=True, enable_prefix_caching=False, seed=0,
        max_model_len=1024, max_num_seqs=args.batch, limit_mm_per_prompt={"image": 1}, disable_log_stats=False,
        **extra,
    )  # fmt: skip
    prompts = [
        {"prompt": text, "multi_modal_data": {"image": image}}
        for text, image in requests(path, args.requests, args.text_tokens)
    ]  # noqa: E501
    sampling = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, sampling, use_tqdm=False)
    seconds = time.perf_counter() - start
    prefill = [o.metrics.first_token_ts - o.metrics.scheduled_ts for o in outputs]
    decode = [o.metrics.last_token_ts - o.metrics.first_token_ts for o in outputs]
    config = llm.llm_engine.vllm_config.cache_config
    tokens = len(outputs[0].prompt_token_ids) + args.new_tokens
    return {
        "seconds": seconds,
        "requests_per_second": len(outputs) / seconds,
        "prefill_seconds": statistics.mean(prefill),
        "decode_seconds": statistics.mean(decode),
        "prompt_tokens": len(outputs[0].prompt_token_ids),
        "kv_blocks": config.num_gpu_blocks,
        "max_concurrent_requests": config.num_gpu_blocks * config.block_size // tokens,
        "answers": [list(o.outputs[0].token_ids) for o in outputs],
    }


def run_transformers(path: Path, withdraw_layer: int | None, args) -> dict:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vtw_eval.accounting import CallTimer
    from vtw_eval.backends.llava import VTWLlava
    from vtw_eval.engine import VisualTokenWithdrawal

    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    if withdraw_layer is not None:
        VisualTokenWithdrawal(model, withdraw_layer, VTWLlava.architecture)
    prompts = requests(path, args.requests, args.text_tokens)
    prefill = decode = 0.0
    answers = []
    start = time.perf_counter()
    for first in range(0, len(prompts), args.batch):
        batch = prompts[first : first + args.batch]
        inputs = processor(
            images=[image for _, image in batch], text=[text for text, _ in batch], return_tensors="pt", padding=True
        )
        with torch.inference_mode(), CallTimer(model) as timer:
            out = model.generate(
                **inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
            )
        prefill, decode = prefill + timer.prefill_seconds, decode + timer.decode_seconds
        answers += out[:, inputs["input_ids"].shape[1] :].tolist()
    seconds = time.perf_counter() - start
    batches = -(-len(prompts) // args.batch)
    # per request, as vLLM's figures: its batch's prefill, and its batch's decoding
    return {
        "seconds": seconds,
        "requests_per_second": len(prompts) / seconds,
        "prefill_seconds": prefill / batches,
        "decode_seconds": decode / batches,
        "answers": answers,
    }


def analytic_speedup(path: Path, withdraw_layer: int, prompt_tokens: int, visual: int, new_tokens: int) -> float:
    """Whole-request FLOPs of vLLM over vLLM + VTW: tower, projector, decoder prefill, head, and
    every decoding step (vtw_eval.cost)."""
    from transformers import AutoConfig

    from vtw_eval.cost import DecoderGeometry, whole_model_of

    config = AutoConfig.from_pretrained(path)
    geometry, whole = DecoderGeometry.from_config(config), whole_model_of(config)

    def flops(k):
        decode = sum(geometry.decode_step_flops(prompt_tokens + step, visual, k) for step in range(new_tokens - 1))
        return whole.prefill_flops(prompt_tokens, [visual], k) + decode + (new_tokens - 1) * whole.head_flops()

    return flops(None) / flops(withdraw_layer)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--text-tokens", type=int, default=50, help="words of each request's question")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="transformers' batch; vLLM's max_num_seqs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="results/bench_vllm")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # one configuration, in a child process
    args = parser.parse_args(argv)
    out = Path(args.out)
    model_path = out / "model"
    if args.run:
        backend, _, layer = args.run.partition(":")
        withdraw_layer = int(layer) if layer else None
        runner = run_vllm if backend == "vllm" else run_transformers
        print("BENCH " + json.dumps(runner(model_path, withdraw_layer, args)))
        return

    if args.repeats < 1 or args.requests < 1:
        parser.error("--repeats and --requests: give at least 1")
    out.mkdir(parents=True, exist_ok=True)
    if not (model_path / "config.json").is_file():
        build_checkpoint(model_path, args.layers, args.hidden, args.heads)
    layers = args.layers
    configurations = {
        "vllm": "vllm",
        **{f"vllm + vtw K={k}": f"vllm:{k}" for k in (layers // 4, layers // 2, 3 * layers // 4)},
        "transformers": "transformers",
        f"vtw_eval transformers K={layers // 2}": f"transformers:{layers // 2}",
    }
    from tqdm import tqdm

    runs = {name: [] for name in configurations}
    passed = [f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items() if name != "run"]
    with tqdm(total=args.repeats * len(configurations), desc="bench_vllm") as progress:
        for _ in range(args.repeats):
            for name, run in configurations.items():
                command = [sys.executable, __file__, *passed, "--run", run]
                completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **VLLM_ENV})
                lines = [line for line in completed.stdout.splitlines() if line.startswith("BENCH ")]
                if completed.returncode != 0 or not lines:
                    sys.exit(f"{name} failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
                runs[name].append(json.loads(lines[-1].removeprefix("BENCH ")))
                progress.update()
    report(runs, args, model_path, out)


def report(runs: dict, args, model_path: Path, out: Path) -> None:
    from tabulate import tabulate

    from vtw_eval.plots import plt

    def spread(values: list[float], digits: int = 3) -> str:
        return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"

    base = runs["vllm"]
    prompt_tokens = base[0]["prompt_tokens"]
    visual = (336 // 14) ** 2
    rows, summary = [], {}
    for name, results in runs.items():
        rate = [r["requests_per_second"] for r in results]
        speedup = [r["requests_per_second"] / b["requests_per_second"] for r, b in zip(results, base)]
        analytic = None
        if name.startswith("vllm + vtw"):
            k = int(name.rsplit("=", 1)[1])
            analytic = analytic_speedup(model_path, k, prompt_tokens, visual, args.new_tokens)
        summary[name] = {
            "requests_per_second": rate,
            "speedup_over_vllm": speedup,
            "prefill_seconds": [r["prefill_seconds"] for r in results],
            "decode_seconds": [r["decode_seconds"] for r in results],
            "analytic_speedup_over_vllm": analytic,
            "max_concurrent_requests": results[0].get("max_concurrent_requests"),
        }
        rows.append([
            name, spread(rate), spread(speedup, 2), spread([r["prefill_seconds"] for r in results]),
            spread([r["decode_seconds"] for r in results]),
            "" if analytic is None else f"{analytic:.2f}",
            "" if analytic is None else f"{statistics.median(speedup) / analytic:.2f}",
            results[0].get("max_concurrent_requests", ""),
        ])  # fmt: skip
    # the same greedy answers with and without vLLM, at K and without (float32, eager)
    same = {
        "vllm = transformers": base[0]["answers"] == runs["transformers"][0]["answers"],
        f"vllm + vtw K={args.layers // 2} = vtw_eval transformers K={args.layers // 2}": runs[
            f"vllm + vtw K={args.layers // 2}"
        ][0]["answers"]
        == runs[f"vtw_eval transformers K={args.layers // 2}"][0]["answers"],
    }
    headers = ["configuration", "requests/s", "x vLLM", "prefill s/request", "decode s/request", "analytic x",
               "measured/analytic", "max concurrent (KV)"]  # fmt: skip
    table = tabulate(rows, headers=headers, tablefmt="github")
    setting = (
        f"{args.layers} layers, width {args.hidden}, {args.heads} heads; {args.requests} requests of one picture "
        f"({visual} visual tokens) + {args.text_tokens} words ({prompt_tokens} prompt tokens), {args.new_tokens} new "
        f"tokens, greedy, float32; batch/max_num_seqs {args.batch}; {args.repeats} repeats, median [min, max]; "
        f"vLLM: eager, no prefix caching, {', '.join(f'{k}={v}' for k, v in VLLM_ENV.items())}"
    )
    text = f"{setting}\n\n{table}\n\nSame greedy tokens: " + ", ".join(f"{k}: {v}" for k, v in same.items()) + "\n"
    print(text)
    (out / "table.md").write_text(text)
    (out / "bench_vllm.json").write_text(json.dumps({"setting": setting, "runs": summary, "same": same}, indent=1))
    figure, axis = plt.subplots(figsize=(7, 3.5))
    names = list(summary)
    axis.barh(names, [statistics.median(summary[n]["requests_per_second"]) for n in names], color="tab:blue")
    axis.invert_yaxis()
    axis.set_xlabel("requests per second (median)")
    axis.set_title("vLLM and transformers, with and without VTW (CPU)")
    figure.tight_layout()
    figure.savefig(out / "bench_vllm.png", dpi=120)


if __name__ == "__main__":
    main()
