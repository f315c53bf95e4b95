"""The testbed: generator, training, the committed model, the miniature benchmarks, the demo's claims."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vtw_eval.engine import VisualTokenWithdrawal
from vtw_eval.run import REPO_ROOT, run_lmms_eval
from vtw_eval.testbed.hub_cache import TASK_NAMES, hub_environment, write_hub_cache
from vtw_eval.testbed.tasks import (
    CHANCE,
    TASKS,
    built_in_prompts,
    check_claims,
    gqa_training_docs,
    image_key,
    make_docs,
    training_examples,
)
from vtw_eval.testbed.train import build_testbed, train, withdrawn_kl

MODEL = REPO_ROOT / "testbed" / "model"
DATA = REPO_ROOT / "testbed" / "data"


@pytest.mark.parametrize("task, builder", [(task, None) for task in TASKS] + [("gqa", gqa_training_docs)])
def test_generator_is_deterministic_per_seed(task, builder):
    first, again, other = (make_docs(task, 6, seed, builder=builder) for seed in (3, 3, 4))
    assert [(d.get("question"), image_key(d["image"])) for d in first] == [
        (d.get("question"), image_key(d["image"])) for d in again
    ]
    assert [image_key(d["image"]) for d in first] != [image_key(d["image"]) for d in other]


def test_evaluation_images_are_held_out_from_training():
    manifest = json.loads((MODEL / "manifest.json").read_text())
    trained_on = {
        image_key(example.image) for example in training_examples(manifest["examples_per_task"], manifest["seed"])
    }
    for task in TASKS:
        images = {image_key(doc["image"].convert("RGB")) for doc in load_from_disk(str(DATA / task))["test"]}
        assert images and not images & trained_on, task


def test_a_few_training_steps_lower_the_loss():
    examples = training_examples(10, seed=5)
    model, processor = build_testbed(examples, seed=5)
    curriculum = ((3, ("coco2017_cap_val",)),)  # then 9 mixed steps, half withdrawn
    losses = train(model, processor, examples, steps=12, curriculum=curriculum, batch_size=16, progress=False)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5


def test_withdrawn_kl_equals_a_brute_force_sum():
    torch.manual_seed(0)
    logits, full_logits = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, -100, -100, -100]])
    terms = []
    for row, position in [(0, 1), (0, 2), (1, 0)]:  # a label at t+1 is predicted at t
        p = torch.softmax(logits[row, position].double(), -1)
        q = torch.softmax(full_logits[row, position].double(), -1)
        terms.append(sum(p[i] * torch.log(p[i] / q[i]) for i in range(7)))
    # float32 against a float64 sum over 7 classes of KLs of order 1: a few float32 roundings (1.2e-7 each).
    assert torch.allclose(withdrawn_kl(logits, full_logits, labels).double(), sum(terms) / 3, atol=1e-6, rtol=0)


def test_committed_testbed_answers_held_out_questions():
    """Loads offline like a llava-hf checkpoint and answers held-out MMBench counting questions at K = L."""
    model = LlavaForConditionalGeneration.from_pretrained(MODEL).eval()
    processor = AutoProcessor.from_pretrained(MODEL)
    docs = load_from_disk(str(DATA / "mmbench_en_dev"))["test"]
    doc_to_text, target = built_in_prompts()["mmbench_en_dev"], TASKS["mmbench_en_dev"].target
    correct = 0
    for doc in list(docs)[:8]:
        text = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": "<image>\n" + doc_to_text(doc)}], tokenize=False, add_generation_prompt=True
        )
        inputs = processor(images=[doc["image"].convert("RGB")], text=[text], return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        answer = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += answer.strip() == target(doc)
    assert correct >= 6  # of 8; chance is 2


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """The testbed's datasets cache under the built-in tasks' hub ids, private to this test run."""
    home = tmp_path_factory.mktemp("hf_home")
    write_hub_cache(DATA, home)
    return home


@pytest.fixture(scope="module")
def built_in_run(hf_home, tmp_path_factory):
    """The seven built-in task names through the CLI, 4 docs each, at K=3, from the private cache."""
    out = tmp_path_factory.mktemp("built_in")
    default_cache = Path.home() / ".cache" / "huggingface" / "datasets"
    before = sorted(default_cache.glob("lmms-lab-encoder*")) if default_cache.exists() else []
    model_args = f"pretrained={MODEL},device=cpu,withdraw_layer=3,accounting_file={out}/r.jsonl"
    env = hub_environment(hf_home)
    results = run_lmms_eval(
        "vtw_llava",
        model_args,
        ",".join(TASK_NAMES),
        out,
        "--limit",
        "4",
        "--batch_size",
        "4",
        "--log_samples",
        env=env,
    )
    after = sorted(default_cache.glob("lmms-lab-encoder*")) if default_cache.exists() else []
    return results, before, after


@pytest.fixture(scope="module")
def task_manager():
    from lmms_eval.tasks import TaskManager

    return TaskManager(verbosity="ERROR")  # indexing every built-in YAML takes about 10 s


@pytest.mark.cli
@pytest.mark.parametrize("folder", sorted(TASKS))
def test_built_in_task_names_answer_as_the_engine_does(built_in_run, task_manager, folder):
    results_file, _, _ = built_in_run
    name = TASKS[folder].built_in
    assert name in json.loads(results_file.read_text())["results"]
    samples = next(results_file.parent.glob(f"*_samples_{name}.jsonl")).read_text().splitlines()
    answers = {json.loads(line)["doc_id"]: json.loads(line)["filtered_resps"] for line in samples}

    config = task_manager._get_config(name)  # the built-in YAML: prompt function, its kwargs, generation
    kwargs = (config.get("lmms_eval_specific_kwargs") or {}).get("default")
    gen = config.get("generation_kwargs") or {}
    model = LlavaForConditionalGeneration.from_pretrained(MODEL).eval()
    processor = AutoProcessor.from_pretrained(MODEL)
    VisualTokenWithdrawal(model, withdraw_layer=3)
    docs = load_from_disk(str(DATA / folder))["test"]
    for doc_id in sorted(answers):
        doc = docs[doc_id]
        images = [image.convert("RGB") for image in config["doc_to_visual"](doc)]
        question = config["doc_to_text"](doc, kwargs) if kwargs else config["doc_to_text"](doc)
        text = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": "<image>\n" * len(images) + question}],
            tokenize=False,
            add_generation_prompt=True,
        )
        inputs = processor(images=images, text=[text], return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=gen.get("max_new_tokens", 1024), do_sample=False)
        answer = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for stop in gen.get("until", []):
            answer = answer.split(stop)[0]
        assert answers[doc_id] == answer.strip(), (name, doc_id)


@pytest.mark.cli
def test_built_in_runs_write_only_into_the_private_cache(built_in_run, hf_home):
    _, before, after = built_in_run
    assert before == after  # the user's own datasets cache is untouched
    assert not list(DATA.rglob("cache-*"))  # nothing beside the committed data
    assert not list((REPO_ROOT / "tasks").rglob("cache-*"))
    assert (hf_home / "datasets" / "lmms-lab-encoder___gqa" / "testdev_balanced_images").is_dir()


def test_the_cache_writer_refuses_a_real_hugging_face_cache(tmp_path):
    (tmp_path / "hub").mkdir()
    with pytest.raises(ValueError, match="looks like a real Hugging Face cache"):
        write_hub_cache(DATA, tmp_path)


def test_claims_on_hand_made_scores():
    """Every task at the same fractions of its chance-to-best gap, so each claim's edge is known."""

    def rows(baseline_share, vtw_points, k0_share):
        out = []
        for task, (metric, chance) in CHANCE.items():
            best = 100.0 if metric == "gpt_eval_score" else 800.0 if metric.startswith("mme") else 1.0
            value = chance if chance is not None else 0.0
            base = value + baseline_share * (best - value)
            values = [base, base + vtw_points / 100 * best, value + k0_share * (best - value)]
            out.append({"task": task, "metric": metric, "values": values})
        return out

    def met(*args, layer=6):
        return [ok for _, ok, _ in check_claims(rows(*args), withdraw_layer=layer, num_layers=8)]

    assert met(0.5, -2, 0.2) == [True, True, True]  # every edge is inside
    assert met(0.49, -2.1, 0.21) == [False, False, False]
    assert met(0.5, 0, 0.2, layer=8) == [True, True, False]  # withdrawing nothing is not a VTW result


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory, hf_home) -> Path:
    """The main job end to end (calibrate, baseline, VTW at the calibrated K, K=0). All docs:
    lmms-eval's start-up dominates (a 40-doc subset takes as long), and on a subset POPE's answer
    prior is no longer balanced."""
    out = tmp_path_factory.mktemp("demo")
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "demo.py"), "--out", str(out), "--hf-home", str(hf_home)],
        check=True,
        cwd=REPO_ROOT,
    )
    return out


@pytest.fixture(scope="module")
def demo_claims(demo_out) -> dict[str, bool]:
    """Claim letter -> met."""
    record = json.loads((demo_out / "claims.json").read_text())
    return {claim["claim"][1]: claim["met"] for claim in record["claims"]}


@pytest.mark.cli
def test_demo_tests_its_differences_and_draws_the_tradeoff(demo_out):
    """K=0 (near chance) is a significant drop on ScienceQA-IMG by McNemar's test; the plot exists."""
    summary = (demo_out / "summary.md").read_text()
    row = next(line for line in summary.splitlines() if line.startswith("| scienceqa_img"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    k0_p_holm, k0_test = float(cells[-4]), cells[-3]
    assert k0_test == "McNemar exact" and k0_p_holm < 1e-3
    assert "not tested here (cost): coco2017_cap_val" in summary
    assert (demo_out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.cli
def test_demo_near_chance_at_k0(demo_claims):
    assert demo_claims["b"]


@pytest.mark.cli
def test_demo_baseline_far_above_chance(demo_claims):
    assert demo_claims["a"]


@pytest.mark.cli
def test_demo_vtw_at_calibrated_k_within_2_points(demo_claims):
    assert demo_claims["c"]


@pytest.mark.cli
def test_installed_wheel_runs_the_calibration_group_from_anywhere(hf_home, tmp_path):
    """A wheel of the checkout, installed without dependencies (not editable) into a folder of its
    own, runs `--tasks vtw_calibration` from a folder outside the checkout."""
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "-q"]
    source = tmp_path / "source"  # built from a copy: an in-tree build leaves build/ in the checkout
    shutil.copytree(REPO_ROOT / "vtw_eval", source / "vtw_eval", ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / part, source / part)
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, source], check=True)
    (wheel,) = wheels.glob("vtw_eval-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True)
    env = {**os.environ, **hub_environment(hf_home), "PYTHONPATH": str(site), "VTW_CALIBRATION_DOCS": "2"}
    where = subprocess.run(
        [sys.executable, "-m", "vtw_eval.tasks"], cwd=elsewhere, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert where.startswith(str(site)) and Path(where, "vtw_calibration", "vtw_calibration.yaml").is_file()
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "vtw_llava", "--tasks", "vtw_calibration",
        "--model_args", f"pretrained={MODEL},device=cpu,withdraw_layer=none,calibration_dir={tmp_path}/cal",
        "--output_path", str(tmp_path / "out"), "--verbosity", "DEBUG", "--include_path", where,
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (results,) = (tmp_path / "out").glob("*/*_results.json")
    record = json.loads(results.read_text())["results"]["vtw_calibration"]["vtw_calibration,none"]
    assert record["num_samples"] == 6 and len(record["mean_kl"]) == 9  # 2 docs of each subset; 8 layers
    assert len(list((tmp_path / "cal").glob("*.json"))) == 1


@pytest.mark.cli
def test_the_documented_commands_run_on_the_testbed(hf_home, tmp_path):
    """docs/testbed.md's block of README commands, run as written (private cache and output folder)."""
    import re
    import shlex

    text = (REPO_ROOT / "docs" / "testbed.md").read_text()
    block = re.search(r"## The commands on the testbed.*?```sh\n(.*?)```", text, re.S).group(1)
    lines = block.strip().splitlines()
    env = {**os.environ, **hub_environment(hf_home)}
    assert lines[0].startswith("export ") and set(re.findall(r"(\w+)=", lines[0])) == set(hub_environment(hf_home))
    programs = {"lmms-eval": [sys.executable, "-m", "lmms_eval"], "vtw-diff": [sys.executable, "-m", "vtw_eval.diff"]}
    for line in lines[1:]:
        words = shlex.split(line.replace("results/try", str(tmp_path)))
        command = programs[words[0]] + words[1:] + (["--verbosity", "DEBUG"] if words[0] == "lmms-eval" else [])
        completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        assert completed.returncode == 0, (line, completed.stdout[-2000:], completed.stderr[-2000:])
    for run in ("baseline", "k4", "per_task"):
        assert list((tmp_path / run).glob("*/*_results.json")), run
    assert "changed" in completed.stdout and "mme_perception_score" in completed.stdout  # vtw-diff's table
    (calibration,) = (tmp_path / "calibration").glob("*.json")
    entries = json.loads(calibration.read_text())["per_task"]
    assert sorted(entries) == ["mme", "pope"] and all(e["limited"] and e["num_samples"] == 4 for e in entries.values())
