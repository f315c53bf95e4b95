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
from vtw_eval.testbed.tasks import (
    CHANCE,
    TASKS,
    check_claims,
    gqa_training_docs,
    image_key,
    make_docs,
    training_examples,
)
from vtw_eval.testbed.train import build_testbed, train, withdrawn_kl

MODEL = REPO_ROOT / "testbed" / "model"
DATA = REPO_ROOT / "tasks" / "vtw_testbed" / "data"


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
    assert torch.allclose(withdrawn_kl(logits, full_logits, labels).double(), sum(terms) / 3, atol=1e-6)


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


def test_claims_on_hand_made_scores():
    """Every task at the same fractions of its chance-to-best gap, so each claim's edge is known."""

    def rows(baseline_share, vtw_points, k0_share):
        out = []
        for task, (metric, chance) in CHANCE.items():
            best = 100.0 if metric == "gpt_eval_score" else 800.0 if metric.startswith("mme") else 1.0
            value = chance if chance is not None else 0.0
            base = value + baseline_share * (best - value)
            out.append({"task": task, "metric": metric, "b": base, "v": base + vtw_points / 100 * best,
                        "k": value + k0_share * (best - value)})  # fmt: skip
        return out

    def met(*args, layer=6):
        return [ok for _, ok, _ in check_claims(rows(*args), "b", "v", "k", withdraw_layer=layer, num_layers=8)]

    assert met(0.5, -2, 0.2) == [True, True, True]  # every edge is inside
    assert met(0.49, -2.1, 0.21) == [False, False, False]
    assert met(0.5, 0, 0.2, layer=8) == [True, True, False]  # withdrawing nothing is not a VTW result


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


def test_demo_baseline_far_above_chance(demo_claims):
    assert demo_claims["a"]


def test_demo_vtw_at_calibrated_k_within_2_points(demo_claims):
    assert demo_claims["c"]
