"""Was VTW the right way to save it? On a testbed, each task's score for VTW, a random subset of the
visual tokens (3 seeds) and FastV's attention ranking, at the decoder prefill compute of VTW at
several K (matched per prompt, ``match_withdraw_layer``), through the lmms-eval CLI; also the
model's per-layer KL curve (the calibration group) and the last prompt token's attention mass on
the visual tokens per layer.

    python scripts/methods_testbed.py --model testbed/model --out results/methods/trained
    python scripts/methods_testbed.py --model testbed/model_method_blind --out results/methods/method_blind

Writes ``methods.json``, ``table.md`` and ``methods.png`` (score against decoder prefill FLOPs
saved, a panel per task) under --out. The controls withdraw from ``--prune-layer`` (default 1: the
testbed has 8 layers, and FastV prunes after layer 2 of LLaVA's 32).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from datasets import load_from_disk
from tabulate import tabulate
from tqdm import tqdm
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vtw_eval.files import write_atomically
from vtw_eval.results import load_run, number
from vtw_eval.run import REPO_ROOT, run_lmms_eval
from vtw_eval.tasks import TASKS_DIR
from vtw_eval.testbed.hub_cache import TASK_NAMES, written_hub_environment
from vtw_eval.testbed.tasks import CHANCE, TASKS, built_in_prompts

SEEDS = (0, 1, 2)


def runs_to_make(layers: list[int], prune_layer: int) -> list[tuple[str, str, int | None, int | None]]:
    """(name, model arguments, K, seed) of every run: the baseline, then per K VTW, random per seed, FastV."""
    runs = [("baseline", "withdraw_layer=none", None, None)]
    for k in layers:
        runs.append((f"vtw_k{k}", f"withdraw_layer={k}", k, None))
        matched = f"prune_layer={prune_layer},match_withdraw_layer={k}"
        runs += [(f"random_k{k}_s{seed}", f"method=random,{matched},seed={seed}", k, seed) for seed in SEEDS]
        runs.append((f"fastv_k{k}", f"method=fastv,{matched}", k, None))
    return runs


def attention_mass(model_path: str, prompts_per_task: int = 8) -> list[float]:
    """Per decoder layer: the share of the last prompt token's attention (head mean) that lands on
    visual tokens, averaged over the first prompts of each testbed task (eager attention)."""
    model = LlavaForConditionalGeneration.from_pretrained(model_path, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(model_path)
    prompts = built_in_prompts()
    shares = []
    for folder in TASKS:
        docs = load_from_disk(str(REPO_ROOT / "testbed" / "data" / folder))
        split = docs[next(iter(docs))] if hasattr(docs, "keys") else docs
        for doc in split.select(range(prompts_per_task)):
            image = doc.get("image") or (doc.get("images") or [None])[0]
            conversation = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompts[folder](doc)}]}
            ]
            text = processor.apply_chat_template(conversation, add_generation_prompt=True)
            inputs = processor(images=image.convert("RGB"), text=text, return_tensors="pt")
            visual = inputs["input_ids"][0] == model.config.image_token_id
            with torch.no_grad():
                attentions = model(**inputs, output_attentions=True).attentions
            shares.append([float(layer[0, :, -1, visual].sum(-1).mean()) for layer in attentions])
    return [statistics.mean(layer) for layer in zip(*shares)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO_ROOT / "testbed" / "model"))
    parser.add_argument("--out", default=str(REPO_ROOT / "results" / "methods" / "trained"))
    parser.add_argument("--layers", default="7,4,2", help="the K whose compute the controls match")
    parser.add_argument("--prune-layer", type=int, default=1)
    parser.add_argument("--limit", type=int, help="docs per task (a quick check); default all")
    parser.add_argument("--hf-home", default=str(REPO_ROOT / "results" / "hf_home"), help="the testbed's cache")
    parser.add_argument("--replot", action="store_true", help="only redraw table and plot from --out's methods.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        record = json.loads((out / "methods.json").read_text())
        write_atomically(out / "table.md", (comparison_table(record) + "\n").encode())
        draw(record, out / "methods.png")
        return 0
    try:
        env = written_hub_environment(args.hf_home)
    except ValueError as error:
        parser.error(str(error))
    layers = [int(k) for k in args.layers.split(",")]
    out = Path(args.out)
    options = ["--batch_size", "8", *(["--limit", str(args.limit)] if args.limit else [])]
    common = f"pretrained={args.model},device=cpu"

    run_lmms_eval(
        "vtw_llava", f"{common},withdraw_layer=none,calibration_dir={out / 'calibration'}", "vtw_calibration",
        out / "calibration", "--batch_size", "8", include_path=TASKS_DIR, env=env,
    )  # fmt: skip
    (calibration_file,) = (out / "calibration").glob("*.json")  # the calibration file of this model
    calibration = json.loads(calibration_file.read_text())
    scores, saved = {}, {}
    for name, model_args, _, _ in tqdm(runs_to_make(layers, args.prune_layer), desc="lmms-eval runs"):
        results_file = run_lmms_eval(
            "vtw_llava", f"{common},{model_args},accounting_file={out / name / 'requests.jsonl'}",
            ",".join(TASK_NAMES), out / name, *options, env=env,
        )  # fmt: skip
        run = load_run(results_file)
        scores[name] = {task: run.metrics[(task, metric)]["value"] for task, (metric, _) in CHANCE.items()}
        saved[name] = number((run.data.get("throughput") or {}).get("avg_prefill_flops_saved"))
    mass = attention_mass(args.model)
    record = {
        "model": args.model,
        "prune_layer": args.prune_layer,
        "layers": layers,
        "seeds": list(SEEDS),
        "calibrated_withdraw_layer": calibration["withdraw_layer"],
        "mean_kl": calibration["mean_kl"],
        "kl_threshold": calibration["kl_threshold"],
        "attention_mass_on_visual": mass,
        "scores": scores,
        "prefill_flops_saved": saved,
    }
    write_atomically(out / "methods.json", (json.dumps(record, indent=2) + "\n").encode())
    table = comparison_table(record)
    write_atomically(out / "table.md", (table + "\n").encode())
    draw(record, out / "methods.png")
    print(table)
    print(f"wrote {out / 'methods.json'}, {out / 'table.md'} and {out / 'methods.png'}")
    return 0


def comparison_table(record: dict) -> str:
    """Per task and K: VTW, random (mean [min, max] over the seeds), FastV, and which is best."""
    scores, lines = record["scores"], []
    for task in CHANCE:
        for k in record["layers"]:
            vtw, fastv = scores[f"vtw_k{k}"][task], scores[f"fastv_k{k}"][task]
            randoms = [scores[f"random_k{k}_s{seed}"][task] for seed in record["seeds"]]
            mean = statistics.mean(randoms)
            best = max(("VTW", vtw), ("random (mean)", mean), ("FastV", fastv), key=lambda pair: pair[1])
            tie = sum(abs(value - best[1]) < 1e-9 for value in (vtw, mean, fastv)) > 1
            saved = record["prefill_flops_saved"][f"vtw_k{k}"]
            random_cell = f"{mean:.4g} [{min(randoms):.4g}, {max(randoms):.4g}]"
            verdict = "tie" if tie else best[0]
            lines.append([task, k, f"{saved:.0%}", scores["baseline"][task], vtw, random_cell, fastv, verdict])
    return tabulate(
        lines,
        headers=["task", "compute of K", "prefill saved", "baseline", "VTW", "random (3 seeds)", "FastV", "best"],
        tablefmt="github",
        floatfmt=".4g",
    )


def draw(record: dict, path: Path) -> None:
    from vtw_eval.plots import plt, save_png

    scores, saved, layers = record["scores"], record["prefill_flops_saved"], record["layers"]
    figure, axes = plt.subplots(2, 4, figsize=(16, 7))
    for axis, task in zip(axes.flat, CHANCE):
        metric, chance = CHANCE[task]
        x = [saved[f"vtw_k{k}"] for k in layers]
        axis.plot(x, [scores[f"vtw_k{k}"][task] for k in layers], marker="o", label="VTW")
        means = [statistics.mean(scores[f"random_k{k}_s{s}"][task] for s in record["seeds"]) for k in layers]
        spread = [
            [m - min(scores[f"random_k{k}_s{s}"][task] for s in record["seeds"]) for m, k in zip(means, layers)],
            [max(scores[f"random_k{k}_s{s}"][task] for s in record["seeds"]) - m for m, k in zip(means, layers)],
        ]
        axis.errorbar(x, means, yerr=spread, marker="s", capsize=3, label="random (3 seeds, range)")
        axis.plot(x, [scores[f"fastv_k{k}"][task] for k in layers], marker="^", label="FastV")
        axis.axhline(scores["baseline"][task], color="grey", linestyle="--", linewidth=0.8, label="baseline")
        if chance is not None:
            axis.axhline(chance, color="red", linestyle=":", linewidth=0.8, label="chance")
        axis.set_title(f"{task}: {metric}", fontsize=9)
        axis.set_xlabel("decoder prefill FLOPs saved", fontsize=8)
        axis.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
    kl_axis = axes.flat[7]
    kl_axis.plot(range(len(record["mean_kl"]) - 1), record["mean_kl"][:-1], marker="o", color="black", label="mean KL")
    kl_axis.set_yscale("log")
    kl_axis.set_xlabel("withdrawal layer K", fontsize=8)
    kl_axis.set_title(f"KL curve (calibrated K={record['calibrated_withdraw_layer']}); attention mass", fontsize=9)
    mass_axis = kl_axis.twinx()
    mass_axis.plot(record["attention_mass_on_visual"], marker="x", color="purple", label="attention on visual")
    mass_axis.set_ylim(0, 1)
    kl_axis.set_ylabel("mean KL at K (black)", fontsize=8)
    mass_axis.set_ylabel("last token's attention on visual tokens,\nper layer (purple)", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=5, fontsize=8)
    save_png(figure, path, tight_rect=(0, 0.05, 1, 1))


if __name__ == "__main__":
    raise SystemExit(main())
