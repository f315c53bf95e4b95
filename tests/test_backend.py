"""The vtw_llava lmms-eval backend, driven with lmms-eval Instances in-process."""

from __future__ import annotations

import pytest
import torch
from backend_requests import QUESTIONS, backend, doc_to_visual, docs, generation_requests, request
from reference import reference_vtw_logits
from tiny_models import NUM_LAYERS, load_model, picture
from tolerances import REORDERED, SAME_ARITHMETIC, log_likelihood_tolerance

from vtw_eval.backends.arguments import withdraw_layer as parse_withdraw_layer
from vtw_eval.backends.llava import VTWLlava
from vtw_eval.engine import VisualTokenWithdrawal


def expected_answers(path, processor, withdraw_layer):
    """Greedy answers computed straight from transformers plus the engine, one prompt at a time."""
    model = load_model(path)
    VisualTokenWithdrawal(model, withdraw_layer=withdraw_layer)
    answers = []
    for doc in docs():
        context = (
            " ".join(["<image>"] * len(doc["images"])) + "\n" + doc["question"] if doc["images"] else doc["question"]
        )
        text = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": context}], tokenize=False, add_generation_prompt=True
        )
        inputs = processor(images=doc["images"] or None, text=[text], return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=3, eos_token_id=2)
        answers.append(
            processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        )
    return answers


@pytest.mark.parametrize("withdraw_layer", [1, "none"])
def test_generate_until_batched_equals_engine(tiny_llava_path, processor, withdraw_layer):
    layer = None if withdraw_layer == "none" else withdraw_layer
    expected = expected_answers(tiny_llava_path, processor, layer)
    assert backend(tiny_llava_path, withdraw_layer, 1).generate_until(generation_requests()) == expected
    assert backend(tiny_llava_path, withdraw_layer, 3).generate_until(generation_requests()) == expected


def test_loglikelihood_equals_reference(tiny_llava_path, processor):
    withdraw_layer, continuation = 2, " Yes"
    lm = backend(tiny_llava_path, withdraw_layer)
    arguments = (QUESTIONS[0], continuation, doc_to_visual, 0, "tiny", "test")
    ((log_likelihood, is_greedy),) = lm.loglikelihood([request("loglikelihood", arguments)])

    model = load_model(tiny_llava_path)
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\n" + QUESTIONS[0]}], tokenize=False, add_generation_prompt=True
    )
    inputs = dict(processor(images=[picture(0)], text=[prompt + continuation], return_tensors="pt"))
    logits, _ = reference_vtw_logits(model, inputs, withdraw_layer)
    target = processor.tokenizer.convert_tokens_to_ids("Yes")
    assert inputs["input_ids"][0, -1] == target
    expected = torch.log_softmax(logits[0, -2], dim=-1)[target].item()
    assert log_likelihood == pytest.approx(expected, abs=log_likelihood_tolerance(logits, SAME_ARITHMETIC, 1))
    assert is_greedy == (logits[0, -2].argmax().item() == target)


def test_multi_token_loglikelihood_is_the_sum_over_the_continuation(tiny_llava_path, processor):
    """Tells the sum apart from the mean and from the last token's log-probability."""
    withdraw_layer, words = 1, ["Yes", "it", "is", "red"]
    lm = backend(tiny_llava_path, withdraw_layer)
    arguments = (QUESTIONS[0], " " + " ".join(words), doc_to_visual, 0, "tiny", "test")
    ((log_likelihood, is_greedy),) = lm.loglikelihood([request("loglikelihood", arguments)])

    model = load_model(tiny_llava_path)
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\n" + QUESTIONS[0]}], tokenize=False, add_generation_prompt=True
    )
    inputs = dict(processor(images=[picture(0)], text=[prompt + " " + " ".join(words)], return_tensors="pt"))
    logits, _ = reference_vtw_logits(model, inputs, withdraw_layer)
    targets = processor.tokenizer.convert_tokens_to_ids(words)
    assert inputs["input_ids"][0, -len(words) :].tolist() == targets
    per_token = [
        torch.log_softmax(logits[0, -len(words) - 1 + i], dim=-1)[target].item() for i, target in enumerate(targets)
    ]
    assert log_likelihood == pytest.approx(
        sum(per_token), abs=log_likelihood_tolerance(logits, SAME_ARITHMETIC, len(words))
    )
    assert abs(sum(per_token) - per_token[-1]) > 1e-3 and abs(sum(per_token) - sum(per_token) / 4) > 1e-3
    greedy = all(logits[0, -len(words) - 1 + i].argmax().item() == t for i, t in enumerate(targets))
    assert is_greedy == greedy


def test_failed_generation_names_the_doc(tiny_llava_path):
    lm = backend(tiny_llava_path, 1)
    lm.task_dict["tiny"]["test"][1]["images"] = ["not-an-image.png"]
    with pytest.raises(RuntimeError, match=r"\('tiny', 1\).*takes images"):
        lm.generate_until(generation_requests())


def test_generation_errors_are_raised_not_swallowed(tiny_llava_path, monkeypatch):
    lm = backend(tiny_llava_path, 1)

    def broken_generate(**kwargs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(lm.model, "generate", broken_generate)
    with pytest.raises(RuntimeError, match=r"VTW generation failed.*\('tiny', 3\).*simulated"):
        lm.generate_until(generation_requests())


@pytest.mark.parametrize(
    "value, expected",
    [(None, None), ("none", None), ("None", None), (0, 0), ("3", 3), (3.0, 3), (NUM_LAYERS, NUM_LAYERS)],
)
def test_parse_withdraw_layer(value, expected):
    assert parse_withdraw_layer(value, NUM_LAYERS) == expected


@pytest.mark.parametrize("value", [-1, NUM_LAYERS + 1, "sixteen", "2.5", 2.5, True])
def test_parse_withdraw_layer_rejects(value):
    with pytest.raises(
        ValueError, match=rf"withdraw_layer={value!r} is not accepted; use an integer from 0 to {NUM_LAYERS}"
    ):
        parse_withdraw_layer(value, NUM_LAYERS)


def test_unknown_model_args_are_refused(tiny_llava_path):
    with pytest.raises(ValueError, match="Unknown model_args.*withdraw_layers"):
        VTWLlava(pretrained=str(tiny_llava_path), withdraw_layers=3, device="cpu")


@pytest.mark.parametrize("value", ["abc", "-0.1", "nan"])
def test_bad_kl_threshold_is_refused(tiny_llava_path, value):
    with pytest.raises(ValueError, match=f"kl_threshold='{value}' is not accepted; use a finite number >= 0"):
        VTWLlava(pretrained=str(tiny_llava_path), device="cpu", kl_threshold=value)


def test_batch_size_in_model_args_wins_over_lmms_evals(tiny_llava_path):
    model_args = f"pretrained={tiny_llava_path},batch_size=2,device=cpu,accounting_file={tiny_llava_path}/a.jsonl"
    lm = VTWLlava.create_from_arg_string(model_args, {"batch_size": 1, "max_batch_size": None, "device": None})
    assert lm.batch_size == 2


@pytest.mark.parametrize(
    "model_args, message",
    [
        ({"batch_size": "abc"}, r"batch_size='abc' is not accepted; use a positive integer"),
        ({"batch_size": 0}, r"batch_size=0 is not accepted"),
        ({"dtype": "float64"}, r"dtype='float64' is not accepted; use one of auto, float32"),
        ({"device_map": "cpu"}, r"device='cpu' and device_map='cpu' both place the model"),
    ],
)
def test_bad_arguments_name_themselves(tiny_llava_path, model_args, message):
    with pytest.raises(ValueError, match=message):
        VTWLlava(pretrained=str(tiny_llava_path), **{"device": "cpu", **model_args})


def test_missing_pretrained_path_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"pretrained='.*/nowhere/model' is not accepted: no such directory"):
        VTWLlava(pretrained=str(tmp_path / "nowhere" / "model"), device="cpu")


@pytest.mark.parametrize("value", ["0", "-3", "abc", ""])
def test_bad_calibration_doc_count_is_refused(monkeypatch, value):
    from vtw_eval.calibration_task import calibration_docs_wanted

    monkeypatch.setenv("VTW_CALIBRATION_DOCS", value)
    with pytest.raises(ValueError, match=rf"VTW_CALIBRATION_DOCS='{value}' is not accepted; use a positive integer"):
        calibration_docs_wanted()


def test_decoding_stops_at_a_stop_string_with_the_answer_cutting_gives(tiny_llava_path):
    lm = backend(tiny_llava_path, 1)
    gen_kwargs = {"max_new_tokens": 8, "temperature": 0, "do_sample": False}
    args = (QUESTIONS[0], dict(gen_kwargs), doc_to_visual, 0, "tiny", "test")
    (full,) = lm.generate_until([request("generate_until", args)])
    words = full.split(" ")  # the tiny tokenizer is word-level: one token per word
    position = next(p for p in range(1, len(words)) if words[p] not in words[:p])
    stop_word = words[position]

    calls = []
    lm.model.register_forward_pre_hook(lambda module, a, kw: calls.append(1), with_kwargs=True)
    args = (QUESTIONS[0], {**gen_kwargs, "until": [stop_word]}, doc_to_visual, 0, "tiny", "test")
    (cut,) = lm.generate_until([request("generate_until", args)])
    assert cut == full.split(stop_word)[0].strip()
    assert len(calls) == position + 1  # the prefill gives word 0; one decoding step per later word


def test_batched_loglikelihood_equals_one_by_one(tiny_llava_path):
    continuations = [" Yes", " No it is red", " Yes", " two squares"]
    arguments = [
        (doc["question"], continuation, doc_to_visual, i, "tiny", "test")
        for i, (doc, continuation) in enumerate(zip(docs(), continuations))
    ]
    one_by_one = [backend(tiny_llava_path, 1).loglikelihood([request("loglikelihood", a)])[0] for a in arguments]
    batched = backend(tiny_llava_path, 1, batch_size=3).loglikelihood([request("loglikelihood", a) for a in arguments])
    assert [greedy for _, greedy in batched] == [greedy for _, greedy in one_by_one]
    for (got, _), (want, _), continuation in zip(batched, one_by_one, continuations):
        # The tiny LLaVA's logits are below 1 in size: the tolerance's scale is 1.
        tokens = len(continuation.split())
        assert got == pytest.approx(want, abs=log_likelihood_tolerance(1.0, REORDERED, tokens))
    assert len({round(value, 3) for value, _ in one_by_one}) > 2  # different requests, different values


def test_response_cache_on_the_command_line_is_seen():
    from vtw_eval.backends.arguments import response_cache_requested

    assert response_cache_requested(["lmms-eval", "--model", "vtw_llava", "--use_cache", "/tmp/c"])
    assert response_cache_requested(["lmms-eval", "--use_cache=/tmp/c"])
    assert not response_cache_requested(["lmms-eval", "--model_args", "use_cache=True"])


def test_a_prompt_longer_than_the_models_positions_is_named_in_a_warning(tiny_llava_path):
    from loguru import logger

    lm = backend(tiny_llava_path, 1)
    long_question = " ".join(["red"] * 600)  # the tiny model has 512 positions
    lm.task_dict = {"tiny": {"test": [{"question": long_question, "images": [picture(0)]}]}}
    messages = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        args = (long_question, {"max_new_tokens": 1}, doc_to_visual, 0, "tiny", "test")
        lm.generate_until([request("generate_until", args)])
    finally:
        logger.remove(sink)
    assert any(
        "task tiny doc 0: the prompt has" in str(m) and "more than the model's 512 positions" in str(m)
        for m in messages
    )
