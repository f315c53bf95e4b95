"""The testbed: generator, training, the committed model, the miniature benchmarks, the demo's claims."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vtw_eval.run import REPO_ROOT
from vtw_eval.testbed.tasks import CHANCE, TASKS, image_key, make_docs, training_examples
from vtw_eval.testbed.train import build_testbed, train

MODEL = REPO_ROOT / "testbed" / "model"
DATA = REPO_ROOT / "tasks" / "vtw_testbed" / "data"


def test_generator_is_deterministic_per_seed():
    for task in TASKS:
        first, again, other = make_docs(task, 6, seed=3), make_docs(task, 6, seed=3), make_docs(task, 6, seed=4)
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
    curriculum = ((3, ("coco2017_cap_val",)), (3, ("mme", "pope")))  # then 6 mixed steps, half withdrawn
    losses = train(model, processor, examples, steps=12, curriculum=curriculum, batch_size=16, progress=False)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5


def test_committed_testbed_answers_held_out_questions():
    """Loads offline like a llava-hf checkpoint and answers held-out MMBench counting questions at K = L."""
    model = LlavaForConditionalGeneration.from_pretrained(MODEL).eval()
    processor = AutoProcessor.from_pretrained(MODEL)
    docs = load_from_disk(str(DATA / "mmbench_en_dev"))["test"]
    _, _, doc_to_text, target = TASKS["mmbench_en_dev"]
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


def test_miniature_benchmarks_load_through_lmms_eval_task_code():
    from lmms_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(REPO_ROOT / "tasks"))
    tasks = get_task_dict(["vtw_testbed"], manager)
    (group,) = tasks.values()
    assert {task for task in group} == set(CHANCE)
    for name, task in group.items():
        docs = task.test_docs()
        assert len(docs) >= 40
        assert isinstance(task.doc_to_text(docs[0]), str) and task.doc_to_visual(docs[0])


@pytest.fixture(scope="module")
def demo_claims(tmp_path_factory) -> dict[str, bool]:
    """The main job end to end (calibrate, baseline, VTW at the calibrated K, K=0); claim letter ->
    met. All docs: lmms-eval's start-up dominates (a 40-doc subset takes as long), and on a subset
    POPE's answer prior is no longer balanced."""
    out = tmp_path_factory.mktemp("demo")
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "demo.py"), "--out", str(out)],
        check=True,
        cwd=REPO_ROOT,
    )
    record = json.loads((out / "claims.json").read_text())
    return {claim["claim"][1]: claim["met"] for claim in record["claims"]}


def test_demo_near_chance_at_k0(demo_claims):
    assert demo_claims["b"]


@pytest.mark.xfail(strict=True, reason="issue 4 open: the testbed has not learned POPE and MME's position questions")
def test_demo_baseline_far_above_chance(demo_claims):
    assert demo_claims["a"]


@pytest.mark.xfail(strict=True, reason="issue 4 open: calibration finds no K < L under KL 0.003 on the testbed")
def test_demo_vtw_at_calibrated_k_within_2_points(demo_claims):
    assert demo_claims["c"]
