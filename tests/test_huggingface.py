"""vtw_huggingface and vtw_smolvlm in-process: dispatch by model_type, refusals, and what lmms-eval's
generic huggingface backend gets wrong done right (its parity runs are in test_lmms_eval_parity)."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers
from lmms_eval.api.instance import Instance
from tiny_models import build_tiny_qwen2_vl, build_tiny_smolvlm, picture

from vtw_eval.backends.huggingface import VTWHuggingface, VTWSmolVLM, system_turn
from vtw_eval.backends.qwen2_vl import VTWQwen2VL

QUESTIONS = ["Is there a red square ?", "What colour is it ?", "Is it big ?", "Is there a circle ?"]


def requests(image_counts: list[int]) -> tuple[dict, list[Instance]]:
    """One doc per entry with that many pictures (each doc its own), greedy, 6 new tokens."""
    docs = [{"images": [picture(10 * doc + i, (64, 40)) for i in range(n)]} for doc, n in enumerate(image_counts)]
    instances = [
        Instance(
            "generate_until",
            (QUESTIONS[doc], {"max_new_tokens": 6, "until": ["."]}, lambda d: d["images"], doc, "tiny", "test"),
            idx=0,
            metadata={"task": "tiny", "doc_id": doc, "repeats": 1},
        )
        for doc in range(len(image_counts))
    ]
    return {"tiny": {"test": docs}}, instances


def test_a_served_model_type_gets_its_familys_class_and_engine_declaration(tmp_path):
    """A Qwen2-VL checkpoint through vtw_huggingface: Qwen2-VL's class and declaration (positions
    from the attention mask), the generic backend's prompt (system turn read from a file), and
    withdrawal on (K=1 changes the answers: the guard)."""
    path = str(build_tiny_qwen2_vl(tmp_path / "model", "2"))
    system = tmp_path / "system.txt"
    system.write_text("Be brief.\n")
    task_dict, instances = requests([1, 2])
    answers = {}
    for layer in ("none", 1):
        lm = VTWHuggingface(pretrained=path, withdraw_layer=layer, device="cpu", system_prompt=str(system))
        lm.task_dict = task_dict
        answers[layer] = lm.generate_until(instances)
    assert type(lm.model) is transformers.Qwen2VLForConditionalGeneration
    assert lm.architecture == VTWQwen2VL.architecture and lm.architecture.decoding_positions == "from_attention_mask"
    assert lm.build_prompt("Hi", [picture(0)]).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert answers[1] != answers["none"]


def test_a_system_prompt_is_text_or_a_files_text():
    """As lmms-eval reads it: ``\\n`` as a newline, a file's text when it names a file; a prompt
    longer than a file name can be is text, not an error."""
    assert system_turn("Be brief.\\nAnswer in one word.") == "Be brief.\nAnswer in one word."
    assert system_turn("x" * 5000) == "x" * 5000
    assert system_turn(str(Path(__file__))).startswith('"""vtw_huggingface and vtw_smolvlm in-process')
    assert system_turn("") is None and system_turn(None) is None


def test_answers_are_not_cut_at_the_tasks_until_strings(tmp_path):
    """As lmms-eval's chat huggingface: answers run to EOS or max_new_tokens, whatever ``until`` says."""
    lm = VTWSmolVLM(pretrained=str(build_tiny_smolvlm(tmp_path / "model")), device="cpu")
    assert lm.stop_strings(["."]) == [] and lm.default_generation_kwargs["max_new_tokens"] == 4096


def test_an_unserved_model_type_is_refused_before_loading(tmp_path):
    """An Idefics3 config without weights: refused by its type, the served types named."""
    transformers.Idefics3Config().save_pretrained(tmp_path / "idefics3")
    with pytest.raises(ValueError, match=r"is a 'idefics3' model; VTWHuggingface serves \[.*'qwen2_vl'.*'smolvlm'"):
        VTWHuggingface(pretrained=str(tmp_path / "idefics3"), device="cpu")
    with pytest.raises(ValueError, match=r"is a 'idefics3' model; VTWSmolVLM serves \['smolvlm'\]"):
        VTWSmolVLM(pretrained=str(tmp_path / "idefics3"), device="cpu")


@pytest.mark.parametrize("withdraw_layer", ["none", 2])
def test_batch_with_mixed_image_counts_equals_one_by_one(tmp_path, withdraw_layer):
    """Rows with 1, 0, 2 and 1 images, each row's images its own list (lmms-eval's backend flattens
    the batch's, which SmolVLM's processor refuses)."""
    path = str(build_tiny_smolvlm(tmp_path / "model"))
    task_dict, instances = requests([1, 0, 2, 1])
    batched = VTWSmolVLM(pretrained=path, withdraw_layer=withdraw_layer, device="cpu", batch_size=4)
    batched.task_dict = task_dict
    single = VTWSmolVLM(pretrained=path, withdraw_layer=withdraw_layer, device="cpu", batch_size=1)
    single.task_dict = task_dict
    answers = batched.generate_until(instances)
    assert answers == [single.generate_until([instance])[0] for instance in instances]
    assert len(set(answers)) > 2


def test_a_video_is_refused_by_name(tmp_path):
    lm = VTWSmolVLM(pretrained=str(build_tiny_smolvlm(tmp_path / "model")), device="cpu")
    lm.task_dict = {"video": {"test": [{"video": "clip.mp4"}]}}
    arguments = ("What is it ?", {"max_new_tokens": 3}, lambda doc: [doc["video"]], 0, "video", "test")
    request = Instance("generate_until", arguments, idx=0, metadata={"task": "video", "doc_id": 0, "repeats": 1})
    with pytest.raises(RuntimeError, match=r"cannot read the video clip.mp4: ValueError: VTWSmolVLM takes images"):
        lm.generate_until([request])


def test_vtw_huggingface_answers_as_vtw_smolvlm(tmp_path):
    """vtw_smolvlm is vtw_huggingface limited to SmolVLM: on a SmolVLM checkpoint the two answer
    alike, doc for doc (vtw_smolvlm's answers equal lmms-eval's huggingface backend's through the
    CLI: test_lmms_eval_parity). Gemma 4 checkpoints get Gemma 4's class and declaration."""
    from tiny_models import build_tiny_gemma4

    from vtw_eval.backends.gemma4 import VTWGemma4

    path = str(build_tiny_smolvlm(tmp_path / "model"))
    task_dict, instances = requests([1, 2, 1, 0])
    answers = []
    for backend in (VTWHuggingface, VTWSmolVLM):
        lm = backend(pretrained=path, withdraw_layer="none", device="cpu")
        lm.task_dict = task_dict
        answers.append(lm.generate_until(instances))
    assert answers[0] == answers[1] and len(set(answers[0])) > 2
    lm = VTWHuggingface(pretrained=str(build_tiny_gemma4(tmp_path / "gemma4")), device="cpu")
    assert type(lm.model) is transformers.Gemma4ForConditionalGeneration
    assert lm.architecture is VTWGemma4.architecture and lm.withdrawal.key_producers == [None, None, 0, 1]
