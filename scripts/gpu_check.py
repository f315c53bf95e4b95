"""Every check that needs a GPU, as one prepared run, writing one JSON and printing one table.

    make gpu-check                            # in the project's venv (a GPU machine of your own)
    bash scripts/gpu_check_image.sh DIR       # a lent GPU machine's own Python and torch, with the
                                              # wheels `make gpu-wheels` prepared in .whl/
    python scripts/gpu_check.py --out DIR     # what both run

- speed: scripts/bench_speed.py at its defaults for ``--architecture llava`` and ``qwen3_5`` (on
  a GPU: LLaVA-1.5-7B and Qwen3.5-4B width, bf16, random weights, 576 visual tokens): prefill
  measured/analytic against the decoder-only, whole-model and layer-rate limits at K = 0, 8, 16,
  24; decoding per token at batch 1 and 8 against the bytes model; peak memory. These are figures;
  the check is that the measured KV cache equals the cost model's at every K.
- exactness: the tiny models of tests/tiny_models.py in float32 with eager and sdpa attention.
  On the device and on the CPU, at every K: the last position's logits and 5 greedy tokens of a
  left-padded batch (one and two images). Passes when the logits agree within ``TOLERANCE`` and
  the tokens are equal (a token may differ only where the CPU's two best logits are within the
  tolerance: a tie, counted). Where flash_attn is installed, flash_attention_2 the same way against
  sdpa, both in bfloat16 on the device (it has no float32 kernels). Also the device's logits at
  every K against the naive reference forward of tests/reference.py computed on the CPU, and
  bfloat16's greedy agreement with float32 (reported).
- split: the testbed LLaVA with half its decoder on the GPU and half on the CPU (``device_map``),
  K before and after the split and no withdrawal: greedy answers to 8 GQA questions equal the
  unsplit model's on the device.
- testbed: one lmms-eval CLI run of the testbed on the device at batch 8, at the demo's K: every
  answer equals results/testbed_answers_cpu.json, the demo's answers on a CPU (``--record-answers``
  writes that file from a finished ``make demo``).

Without CUDA the same checks run on the CPU at a small size (bench_speed at 4 layers of width 64;
the testbed run on the first 8 docs of each task); the comparison of the device with the CPU is
skipped (it would compare the CPU with itself), and the split puts half the decoder on disk
instead of a second device (accelerate's hooks load it layer by layer). Exit status 1 when a check
failed, 2 for bad arguments. Under DIR: gpu_check.json, bench.log, testbed.log (lmms-eval's log)
and bench/ (each architecture's speed JSON and PNG): seven files, few enough for a lent machine to
send back.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the tiny models and the naive reference live there

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402
from tqdm import tqdm  # noqa: E402

SECTIONS = ("speed", "exactness", "split", "testbed")
# Max |logit difference| from the CPU's. float32: other kernels (cuBLAS, cuDNN attention vs MKL,
# oneDNN) sum in other orders, which on the CPU alone moves these logits (|x| < 7) by at most 50
# float32 ulps (tests/tolerances.py: 4e-5 at 7); TF32 is off. bfloat16 keeps 8 mantissa bits, so a
# logit of 7 is rounded by up to 0.03 at each of the last layers' outputs: 5e-2 is about two such.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
ANSWERS_FILE = REPO_ROOT / "results" / "testbed_answers_cpu.json"
QUESTIONS = [("Is there a red square in the image ?", 1), ("What colour is the left box ?", 2)]
NEW_TOKENS = 5
SMALL_BENCH = {  # the CPU's geometry: real layer pattern, tiny width
    "llava": "--layers 4 --hidden 64 --intermediate 128 --heads 4".split(),
    "qwen3_5": "--layers 4 --hidden 64 --intermediate 128 --heads 1 --linear-heads 2".split(),
}
SMALL_BENCH_RUN = "--withdraw-layers 0,2 --repeats 1 --new-tokens 2 --batch 2 --batch-repeats 1".split()


@dataclasses.dataclass
class Check:
    section: str
    name: str
    status: str  # "pass", "FAIL", "skipped" (with why) or "reported" (figures, no verdict)
    detail: str = ""
    figures: dict = dataclasses.field(default_factory=dict)


# -- speed ------------------------------------------------------------------------------------


def speed_checks(device: torch.device, out: Path) -> list[Check]:
    checks = []
    for architecture in ("llava", "qwen3_5"):
        size = [] if device.type == "cuda" else SMALL_BENCH[architecture] + SMALL_BENCH_RUN
        command = [sys.executable, str(REPO_ROOT / "scripts" / "bench_speed.py"), "--architecture", architecture]
        command += ["--out", str(out / "bench"), *size]
        completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
        with open(out / "bench.log", "a") as log:
            log.write(f"$ {' '.join(command)}\n{completed.stdout}{completed.stderr}\n")
        if completed.returncode != 0:
            detail = f"bench_speed.py exit {completed.returncode}: {completed.stderr.strip()[-300:]}"
            checks.append(Check("speed", architecture, "FAIL", detail))
            continue
        stem = "speed" if architecture == "llava" else f"speed_{architecture}"
        summary = json.loads((out / "bench" / f"{stem}.json").read_text())
        for row in summary["rows"]:
            checks.append(speed_row(architecture, summary, row))
        unequal = [
            row["withdraw_layer"]
            for row in summary["rows"]
            if row["kv_cache_bytes_measured"] != row["kv_cache_bytes_analytic"]
        ]
        status, detail = ("FAIL", f"differs at K = {unequal}") if unequal else ("pass", "at every K")
        geometry = summary["geometry"]
        name = f"{architecture}: KV cache = cost model"
        detail += f" ({summary['dtype']}, {geometry['num_layers']} layers, d={geometry['hidden_size']}, "
        detail += f"{summary['prompt_tokens']} tokens of which {summary['visual_tokens']} visual)"
        checks.append(Check("speed", name, status, detail))
    return checks


def speed_row(architecture: str, summary: dict, row: dict) -> Check:
    """One K's figures: prefill against the three limits, decoding against the bytes model."""
    k = row["withdraw_layer"]
    prefill = statistics.median(row["prefill_s"])
    peak = row["peak_memory_bytes"]
    detail = (
        f"prefill {1000 * prefill:.1f} ms, {row['measured_prefill_speedup']:.2f}x; measured/analytic: "
        f"decoder {row['prefill_speedup_ratio']:.2f}, whole model {row['whole_model_prefill_speedup_ratio']:.2f}, "
        f"layer-rate {row['layer_rate_ratio']:.2f}; decode {row['measured_decode_speedup']:.2f}x at batch 1 "
        f"(bytes {row['analytic_decode_speedup']:.2f}), {row['measured_decode_speedup_batch']:.2f}x at batch "
        f"{summary['batch']} (bytes {row['analytic_decode_speedup_batch']:.2f}); peak "
        + ("n/a (CPU)" if peak is None else f"{peak / 2**20:.0f} MiB")
    )
    keys = (
        "measured_prefill_speedup", "analytic_prefill_speedup", "analytic_whole_model_prefill_speedup",
        "prefill_speedup_ratio", "whole_model_prefill_speedup_ratio", "layer_rate_ratio", "measured_decode_speedup",
        "analytic_decode_speedup", "measured_decode_speedup_batch", "analytic_decode_speedup_batch",
        "peak_memory_bytes",
    )  # fmt: skip
    figures = {"prefill_s_median": prefill, **{key: row[key] for key in keys}}
    return Check("speed", f"{architecture} K={k}", "reported", detail, figures)


# -- exactness --------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """What a model gives at one K: the last position's logits, greedy tokens and their scores."""

    logits: torch.Tensor  # (batch, vocab), float32 on the CPU
    tokens: torch.Tensor  # (batch, NEW_TOKENS)
    scores: torch.Tensor  # (batch, NEW_TOKENS, vocab)


def to_device(inputs: dict, device: torch.device, dtype: torch.dtype) -> dict:
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


@torch.inference_mode()
def outcomes(model, inputs: dict, pad_token_id: int) -> dict:
    """K -> Outcome for K = 0..L-1 and None (no withdrawal), the engine set up as the backend does."""
    from tiny_models import withdrawal

    from vtw_eval.architecture import language_model_of

    results = {}
    engine = withdrawal(model, None)
    prompt_length = inputs["input_ids"].shape[1]
    for k in [*range(len(language_model_of(model).layers)), None]:
        engine.withdraw_layer = k
        logits = model(**inputs).logits[:, -1].float().cpu()
        generated = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
            pad_token_id=pad_token_id, output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
        scores = torch.stack(generated.scores, dim=1).float().cpu()
        results[k] = Outcome(logits, generated.sequences[:, prompt_length:].cpu(), scores)
    engine.remove()
    return results


def agreement(expected: dict, actual: dict, tolerance: float) -> tuple[bool, dict]:
    """Logits within ``tolerance`` and greedy tokens equal at every K, but where the expected
    run's two candidates for a differing token are within ``tolerance`` (a tie)."""
    worst, ties, diverged = 0.0, 0, []
    for k, want in expected.items():
        got = actual[k]
        worst = max(worst, float((want.logits - got.logits).abs().max()))
        for row in range(want.tokens.shape[0]):
            differing = (want.tokens[row] != got.tokens[row]).nonzero()
            if len(differing) == 0:
                continue
            step = int(differing[0])
            scores = want.scores[row, step]
            margin = float(scores[want.tokens[row, step]] - scores[got.tokens[row, step]])
            if margin <= tolerance:
                ties += 1
            else:
                diverged.append(f"K={k} row {row} step {step}")
    ok = worst <= tolerance and not diverged
    return ok, {"max_logit_difference": worst, "ties": ties, "diverged": diverged}


@torch.inference_mode()
def reference_difference(model, cpu_model, processor, device: torch.device) -> float:
    """Max |logit difference| of the device's engine from the naive reference forward (on the
    CPU, float32) over every K, on one unpadded prompt."""
    from reference import reference_vtw_logits
    from tiny_models import encode, withdrawal

    from vtw_eval.architecture import language_model_of

    inputs = encode(processor, QUESTIONS[:1])
    worst, last = 0.0, []
    for k in range(len(language_model_of(model).layers)):
        expected, _ = reference_vtw_logits(cpu_model, inputs, k)
        engine = withdrawal(model, k)
        logits = model(**to_device(inputs, device, torch.float32)).logits.float().cpu()
        engine.remove()
        worst = max(worst, float((logits - expected).abs().max()))
        last.append(expected[0, -1])
    if any((a - b).abs().max() <= TOLERANCE[torch.float32] for a, b in zip(last, last[1:])):
        raise AssertionError("two consecutive K gave the same reference logits: the comparison would prove nothing")
    return worst


def exactness_checks(device: torch.device, work: Path, families: list[str] | None) -> list[Check]:
    from tiny_models import BUILDERS, build_tiny_llava, encode
    from transformers import AutoModelForImageTextToText, AutoProcessor

    builders = {"llava": build_tiny_llava, **BUILDERS}
    implementations = ["eager", "sdpa"]
    if device.type == "cuda" and importlib.util.find_spec("flash_attn"):
        implementations.append("flash_attention_2")
    checks = []
    for family in tqdm(families or list(builders), desc="exactness: tiny models"):
        path = builders[family](work / family)
        processor = AutoProcessor.from_pretrained(path)
        processor.tokenizer.padding_side = "left"
        inputs = encode(processor, QUESTIONS, sizes=[(40, 30), (36, 44)])
        pad = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0

        def load(attn_implementation, where, dtype):
            model = AutoModelForImageTextToText.from_pretrained(
                path, attn_implementation=attn_implementation, dtype=dtype
            )
            return model.to(where).eval()

        failures, parts, figures = [], [], {}
        float32_on_device = {}  # implementation -> the device's outcomes, computed once
        for implementation in implementations:
            if implementation == "flash_attention_2":  # no float32 kernels: against sdpa in bfloat16, same device
                dtype, against = torch.bfloat16, "sdpa bf16"
                expected_model, model = load("sdpa", device, dtype), load(implementation, device, dtype)
            else:
                dtype, against = torch.float32, "CPU"
                expected_model = load(implementation, "cpu", dtype)
                model = expected_model if device.type == "cpu" else load(implementation, device, dtype)
            if model is not expected_model:
                got = outcomes(model, to_device(inputs, device, dtype), pad)
                if dtype == torch.float32:
                    float32_on_device[implementation] = got
                expected = outcomes(expected_model, to_device(inputs, expected_model.device, dtype), pad)
                ok, found = agreement(expected, got, TOLERANCE[dtype])
                figures[f"{implementation}_vs_{against.replace(' ', '_')}"] = found
                parts.append(
                    f"{implementation} = {against}: max |d| {found['max_logit_difference']:.1e}, {found['ties']} ties"
                )
                if not ok:
                    failures.append(f"{implementation} vs {against} {found}")
            if dtype == torch.float32:  # expected_model is the CPU's
                difference = reference_difference(model, expected_model, processor, device)
                figures[f"{implementation}_vs_reference"] = difference
                parts.append(f"{implementation} = reference: {difference:.1e}")
                if difference > TOLERANCE[torch.float32]:
                    failures.append(f"{implementation} vs reference {difference:.2e}")
        full = float32_on_device.get("sdpa") or outcomes(
            load("sdpa", device, torch.float32), to_device(inputs, device, torch.float32), pad
        )
        half = outcomes(load("sdpa", device, torch.bfloat16), to_device(inputs, device, torch.bfloat16), pad)
        same = sum(torch.equal(full[k].tokens[row], half[k].tokens[row]) for k in full for row in range(len(QUESTIONS)))
        total = len(full) * len(QUESTIONS)
        figures["bfloat16_greedy_equal_float32"] = [same, total]
        parts.append(f"bf16 greedy = fp32 in {same}/{total}")
        answers = {tuple(full[k].tokens[row].tolist()) for k in full for row in range(len(QUESTIONS))}
        if len(answers) < 2:  # the guard: the compared answers must differ across prompts and K
            failures.append("every prompt and K gave the same tokens: the comparison would prove nothing")
        detail = "; ".join(parts) + (f"; FAILED: {failures}" if failures else "")
        checks.append(Check("exactness", family, "FAIL" if failures else "pass", detail, figures))
    if device.type != "cuda":
        reason = "no CUDA: the device is the CPU, comparing it with the CPU would prove nothing"
        checks.append(Check("exactness", "device = CPU (logits, greedy tokens)", "skipped", reason))
    if "flash_attention_2" not in implementations:
        why = "no CUDA" if device.type != "cuda" else "flash_attn is not installed"
        checks.append(Check("exactness", "flash_attention_2", "skipped", why))
    return checks


# -- split ------------------------------------------------------------------------------------


def split_device_map(model, boundary: int, first, second) -> dict:
    """Decoder layers from ``boundary`` on, the final norm and the LM head on ``second``;
    everything else (vision tower, projector, embeddings, earlier layers) on ``first``."""
    from vtw_eval.architecture import language_model_of

    language_model = language_model_of(model)
    later = [*language_model.layers[boundary:], language_model.norm, model.get_output_embeddings()]
    later_ids = {id(module) for module in later}
    device_map = {}

    def place(module, name: str) -> None:
        if id(module) in later_ids:
            device_map[name] = second
        elif not any(id(m) in later_ids for m in module.modules()):
            device_map[name] = first
        elif any(True for _ in module.parameters(recurse=False)):
            raise ValueError(f"{name}: holds parameters of its own and split children")
        else:
            for child_name, child in module.named_children():
                place(child, f"{name}.{child_name}" if name else child_name)

    place(model, "")
    return device_map


def testbed_questions(count: int) -> tuple[list[str], list]:
    from datasets import load_from_disk

    docs = load_from_disk(str(REPO_ROOT / "testbed" / "data" / "gqa"))["test"].select(range(count))
    questions = [f"{doc['question']}\nAnswer the question using a single word or phrase." for doc in docs]
    return questions, [doc["image"].convert("RGB") for doc in docs]


@torch.inference_mode()
def greedy_answers(model, processor, questions, images, withdraw_layer, device) -> list[str]:
    from tiny_models import prompt, withdrawal

    texts = [prompt(processor, question, 1) for question in questions]
    inputs = to_device(
        dict(processor(images=images, text=texts, return_tensors="pt", padding=True)), device, torch.float32
    )
    engine = withdrawal(model, withdraw_layer)
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    engine.remove()
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def split_checks(device: torch.device, work: Path) -> list[Check]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = REPO_ROOT / "testbed" / "model"
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    unsplit = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).to(device).eval()
    num_layers = unsplit.config.text_config.num_hidden_layers
    boundary = num_layers // 2
    first, second = (device.index or 0, "cpu") if device.type == "cuda" else ("cpu", "disk")
    device_map = split_device_map(unsplit, boundary, first, second)
    split = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, device_map=device_map, offload_folder=str(work / "offload")
    ).eval()
    placed = {str(d) for d in device_map.values()}
    questions, images = testbed_questions(8)
    checks = []
    for k in (boundary // 2, boundary + boundary // 2, None):
        expected = greedy_answers(unsplit, processor, questions, images, k, device)
        got = greedy_answers(split, processor, questions, images, k, split.device)
        differing = [i for i, (a, b) in enumerate(zip(expected, got)) if a != b]
        where = (
            "no withdrawal"
            if k is None
            else ("before" if k < boundary else "after") + f" the split at layer {boundary}"
        )
        name = f"K={k if k is not None else 'none'} ({where}; {'/'.join(sorted(placed))})"
        detail = f"{len(expected) - len(differing)}/{len(expected)} answers equal the unsplit model's on {device}"
        if differing:
            detail += f"; first differing: {expected[differing[0]]!r} vs {got[differing[0]]!r}"
        proves_nothing = len(set(expected)) < 2  # the guard: the questions must get different answers
        if proves_nothing:
            detail += "; every question got the same answer: proves nothing"
        figures = {"equal": len(expected) - len(differing), "answers": got}
        checks.append(Check("split", name, "FAIL" if differing or proves_nothing else "pass", detail, figures))
    return checks


# -- the testbed through the lmms-eval CLI ----------------------------------------------------


def run_answers(results_file: Path) -> dict[str, dict[str, str]]:
    """task -> doc_id -> answer, from a run's --log_samples files."""
    from vtw_eval.results import load_run, sample_answers

    run = load_run(results_file)
    answers = {}
    for task in run.data["results"]:
        found = sample_answers(run, task)
        if found is not None:
            answers[task] = {str(doc): answer for doc, answer in found.items()}
    return answers


def record_answers(demo: Path, answers_file: Path) -> None:
    """``answers_file`` from a finished ``make demo``: its VTW run's answers."""
    from vtw_eval.run import newest_results_file

    claims = json.loads((demo / "claims.json").read_text())
    results_file = newest_results_file(demo / "vtw")
    config = json.loads(results_file.read_text())["config"]
    record = {
        "made_by": f"make demo ({demo.name}/vtw: withdraw_layer=auto, batch 8) on CPU",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "transformers": importlib.import_module("transformers").__version__,
        "withdraw_layer": claims["withdraw_layer"],
        "batch_size": config.get("batch_size"),
        "answers": run_answers(results_file),
    }
    answers_file.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"wrote {answers_file}: {sum(map(len, record['answers'].values()))} answers at K={record['withdraw_layer']}")


def testbed_checks(device: torch.device, out: Path, work: Path, limit: int | None, answers_file: Path) -> list[Check]:
    from vtw_eval.run import run_lmms_eval
    from vtw_eval.tasks import TASKS_DIR
    from vtw_eval.testbed.hub_cache import hub_environment, write_hub_cache

    committed = json.loads(answers_file.read_text())
    tasks = sorted(committed["answers"])
    checks = []
    # COCO's metrics need pycocoevalcap (a 100 MB wheel, too big to carry to a lent GPU) and Java.
    missing = [
        name
        for name, found in (
            ("java", shutil.which("java")),
            ("pycocoevalcap", importlib.util.find_spec("pycocoevalcap")),
        )
        if not found
    ]
    if missing and "coco2017_cap_val" in tasks:
        tasks.remove("coco2017_cap_val")
        checks.append(
            Check("testbed", "coco2017_cap_val", "skipped", f"{' and '.join(missing)} missing (its metric needs them)")
        )
    hf_home = work / "hf_home"
    write_hub_cache(REPO_ROOT / "testbed" / "data", hf_home)
    env = {**hub_environment(hf_home), "NVIDIA_TF32_OVERRIDE": "0"}  # float32 as on the CPU
    k = committed["withdraw_layer"]
    model_args = f"pretrained={REPO_ROOT / 'testbed' / 'model'},device={device},withdraw_layer={k}"
    model_args += f",accounting_file={work / 'testbed' / 'requests.jsonl'}"
    extra = ["--batch_size", "8", "--log_samples", *(["--limit", str(limit)] if limit else [])]
    # A lent machine sends back a few files only: the run stays in the work folder, its log comes out.
    results_file = run_lmms_eval(
        "vtw_llava", model_args, ",".join(tasks), work / "testbed", *extra, include_path=TASKS_DIR, env=env,
        log_file=out / "testbed.log",
    )  # fmt: skip
    answers = run_answers(results_file)
    for task in tasks:
        checks.append(compare_answers(task, answers.get(task, {}), committed["answers"][task], f"K={k}, batch 8"))
    return checks


def compare_answers(task: str, got: dict[str, str], want: dict[str, str], setting: str) -> Check:
    """Every answer ``got`` (doc id -> answer) equals the committed one; none logged fails."""
    differing = [doc for doc in got if got[doc] != want.get(doc)]
    detail = f"{len(got) - len(differing)}/{len(got)} answers equal the CPU's ({setting})"
    if differing:
        doc = differing[0]
        detail += f"; doc {doc}: CPU {want.get(doc)!r}, here {got[doc]!r}"
    status = "FAIL" if differing or not got else "pass"
    return Check(
        "testbed",
        task,
        status,
        detail if got else "no answers logged",
        {"compared": len(got), "differing": differing[:20]},
    )


# -- the run ----------------------------------------------------------------------------------


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"CPU only ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def positive_int(text: str) -> int:
    """``--limit``: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted; use an integer >= 1 (docs per task)")
    return value


def names(text: str) -> list[str]:
    """A comma-separated list with at least one name (``--sections``, ``--families``)."""
    found = [name for name in text.split(",") if name]
    if not found or len(found) != len(text.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted; give one or more names separated by commas")
    return found


def check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace, sections: list[str]) -> None:
    """Every path the run will write, before the first section (a lent GPU's time is not spent on
    a run whose results cannot be kept): exit 2 naming the argument."""
    from vtw_eval.files import check_writable

    out = Path(args.out)
    writes = {out / "gpu_check.json": "--out"}
    if "speed" in sections:
        writes |= {out / "bench.log": "--out", out / "bench" / "speed.json": "--out"}
    if "testbed" in sections:
        writes[out / "testbed.log"] = "--out"
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out: {out} is a file, not a folder")
        for path, argument in writes.items():
            check_writable(path, argument)
        check_writable(Path(tempfile.gettempdir()) / "vtw_gpu_check", "the work folder (TMPDIR)")
    except ValueError as error:
        parser.error(str(error))


def save(out: Path, record: dict) -> str | None:
    """Write gpu_check.json (after every section, so a later failure keeps what was measured);
    the reason when it could not be written."""
    from vtw_eval.files import write_atomically

    try:
        write_atomically(out / "gpu_check.json", (json.dumps(record, indent=1) + "\n").encode())
    except OSError as error:
        return f"could not write {out / 'gpu_check.json'}: {error}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "results" / "gpu_check"))
    parser.add_argument(
        "--sections", type=names, default=list(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}"
    )
    parser.add_argument(
        "--families", type=names, help="exactness: these tiny models only (comma-separated); default all"
    )
    parser.add_argument(
        "--limit", type=positive_int, help="testbed: docs per task (>= 1); default all on a GPU, 8 on CPU"
    )
    parser.add_argument(
        "--record-answers", metavar="DEMO_DIR", help="write --answers from make demo's output (DEMO_DIR)"
    )
    parser.add_argument("--answers", default=str(ANSWERS_FILE), help="testbed: the CPU answers to compare with")
    args = parser.parse_args(argv)
    answers_file = Path(args.answers)
    if args.record_answers:
        from vtw_eval.files import check_writable

        demo = Path(args.record_answers)
        if not (demo / "claims.json").is_file():
            parser.error(
                f"--record-answers {demo}: no claims.json there; give the folder `make demo` wrote (results/demo)"
            )
        try:
            check_writable(answers_file, "--answers")
        except ValueError as error:
            parser.error(str(error))
        record_answers(demo, answers_file)
        return 0
    sections = args.sections
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections {','.join(sections)}: unknown {unknown}; accepted: {', '.join(SECTIONS)}")
    from tiny_models import BUILDERS

    families = args.families
    accepted = ["llava", *BUILDERS]
    if families and set(families) - set(accepted):
        parser.error(
            f"--families {','.join(families)}: unknown {sorted(set(families) - set(accepted))}; accepted: {accepted}"
        )
    if "testbed" in sections and not answers_file.is_file():
        parser.error(f"--answers {answers_file}: no such file; run `make demo`, then --record-answers results/demo")
    check_paths(parser, args, sections)

    gpu = torch.cuda.is_available()
    device = torch.device("cuda:0" if gpu else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 comparisons in full float32
    torch.backends.cudnn.allow_tf32 = False
    out = Path(args.out)
    limit = args.limit if args.limit is not None else (None if gpu else 8)
    started = time.perf_counter()
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": importlib.import_module("transformers").__version__,
        "seconds": {},
        "tolerance": {str(dtype).removeprefix("torch."): value for dtype, value in TOLERANCE.items()},
        "checks": [],
    }
    checks, unsaved = [], None
    with tempfile.TemporaryDirectory(prefix="vtw_gpu_check_") as work:
        runners = {
            "speed": lambda: speed_checks(device, out),
            "exactness": lambda: exactness_checks(device, Path(work), families),
            "split": lambda: split_checks(device, Path(work)),
            "testbed": lambda: testbed_checks(device, out, Path(work), limit, answers_file),
        }
        for section in tqdm(sections, desc="gpu check"):
            start = time.perf_counter()
            try:
                checks += runners[section]()
            except Exception as error:  # the section fails, with its traceback; the others still run
                traceback.print_exc()
                checks.append(Check(section, "(the section stopped)", "FAIL", f"{type(error).__name__}: {error}"))
            record["seconds"][section] = round(time.perf_counter() - start, 1)
            record["seconds"]["total"] = round(time.perf_counter() - started, 1)
            record["checks"] = [dataclasses.asdict(check) for check in checks]
            unsaved = save(out, record)
    rows = [[c.section, c.name, c.status, c.detail.splitlines()[0] if c.detail else ""] for c in checks]
    print(tabulate(rows, headers=["section", "check", "status", "detail"]))
    failed = [c for c in checks if c.status == "FAIL"]
    print(
        f"{record['machine']}; torch {record['torch']}, transformers {record['transformers']}; "
        f"{record['seconds']['total']:.0f} s; {len(failed)} failed of {sum(c.status != 'reported' for c in checks)} "
        f"checks; " + (unsaved or f"wrote {out / 'gpu_check.json'}")
    )
    if unsaved:
        print(f"gpu_check: {unsaved}", file=sys.stderr)
    return 1 if failed or unsaved else 0


if __name__ == "__main__":
    sys.exit(main())
