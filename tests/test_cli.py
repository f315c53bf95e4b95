"""End to end: the lmms-eval CLI with --model vtw_llava on the tiny local task, offline."""

from __future__ import annotations

import json

import pytest
from datasets import load_from_disk
from lmms_eval.tasks.mme.utils import mme_doc_to_text
from tiny_models import load_model

from vtw_eval.engine import VisualTokenWithdrawal
from vtw_eval.run import REPO_ROOT, run_lmms_eval

pytestmark = [pytest.mark.cli, pytest.mark.smoke]

POST_PROMPT = "\nAnswer the question using a single word or phrase."  # vtw_tiny_mme.yaml's


def engine_answers(path, processor, withdraw_layer) -> list[str]:
    """The tiny task's answers straight from transformers and the engine, one doc at a time."""
    model = load_model(path)
    VisualTokenWithdrawal(model, withdraw_layer=withdraw_layer)
    answers = []
    for doc in load_from_disk(str(REPO_ROOT / "tasks/vtw_tiny/data"))["test"]:
        question = mme_doc_to_text(doc, {"pre_prompt": "", "post_prompt": POST_PROMPT})
        text = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": "<image>\n" + question}], tokenize=False, add_generation_prompt=True
        )
        inputs = processor(images=[doc["image"].convert("RGB")], text=[text], return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=3, eos_token_id=2)
        answer = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers.append(answer.strip())
    return answers


@pytest.mark.parametrize("withdraw_layer", [2])
def test_cli_run_answers_equal_the_engine(tiny_llava_path, processor, tmp_path, withdraw_layer):
    results_file = run_lmms_eval(
        "vtw_llava",
        f"pretrained={tiny_llava_path},withdraw_layer={withdraw_layer},device=cpu,accounting_file={tmp_path}/a.jsonl",
        "vtw_tiny_mme",
        tmp_path,
        "--batch_size",
        "3",
        "--log_samples",
    )
    results = json.loads(results_file.read_text())
    assert "mme_perception_score,none" in results["results"]["vtw_tiny_mme"]
    assert f"withdraw_layer={withdraw_layer}" in results["config"]["model_args"]

    samples_file = next(results_file.parent.glob("*_samples_vtw_tiny_mme.jsonl"))
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    answers = [sample["filtered_resps"] for sample in samples]
    assert answers == engine_answers(tiny_llava_path, processor, withdraw_layer)
    assert len(set(answers)) > 1  # the comparison is not between constant answers
