"""Calibration: per-layer KL from one pass against brute force, the choice of K, the file, auto."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from reference import reference_vtw_logits
from tiny_models import NUM_LAYERS, encode, load_model
from tolerances import REORDERED, SAME_ARITHMETIC, kl_tolerance
from transformers import LlavaForConditionalGeneration

from vtw_eval.backends.llava import VTWLlava
from vtw_eval.calibration import (
    choose_withdraw_layer,
    layer_kl_divergences,
    summarise,
    task_entry,
    with_greedy_answer,
)
from vtw_eval.calibration_file import (
    config_hash,
    load_calibration,
    model_identity,
    write_calibration,
    write_task_calibration,
)
from vtw_eval.engine import VisualTokenWithdrawal
from vtw_eval.run import REPO_ROOT, run_lmms_eval


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """KL(p || q) from log-probabilities, written out."""
    return float((log_p.exp() * (log_p - log_q)).sum().detach())


def test_one_pass_kl_equals_brute_force_reference(tiny_llava_path, processor):
    model = load_model(tiny_llava_path)
    inputs = encode(processor, [("Is there a red square ?", 2)])
    kl_one_pass = layer_kl_divergences(VisualTokenWithdrawal(model, withdraw_layer=None), inputs)[0]
    log_p_full = torch.log_softmax(model(**inputs).logits[0, -1], -1)
    assert kl_one_pass[NUM_LAYERS] == 0.0
    for layer in range(NUM_LAYERS):  # a separate, naive withdrawal forward per layer
        logits, _ = reference_vtw_logits(model, inputs, layer)
        expected = kl(torch.log_softmax(logits[0, -1], -1), log_p_full)
        assert kl_one_pass[layer].item() == pytest.approx(expected, abs=kl_tolerance(logits, SAME_ARITHMETIC))
        assert expected > 1e-6  # withdrawal changes the distribution: the comparison has teeth


def test_batched_kl_equals_one_prompt_at_a_time(tiny_llava_path, processor):
    """Left padding and rows with 0, 1 and 2 images: each row's KL as if it were alone."""
    model = load_model(tiny_llava_path)
    withdrawal = VisualTokenWithdrawal(model, withdraw_layer=None)
    rows = [("Is there a red square ?", 2), ("What colour is it ?", 1), ("Is it big ?", 0)]
    batch = layer_kl_divergences(withdrawal, encode(processor, rows))
    for index, row in enumerate(rows):
        single = layer_kl_divergences(withdrawal, encode(processor, [row], seed=index))
        torch.testing.assert_close(batch[index], single[0], atol=kl_tolerance(1.0, REORDERED), rtol=0)
    # A text-only prompt loses nothing, so its KL is 0 up to rounding: the one-pass measurement runs
    # the later layers over other shapes than the plain forward (seen on one thread: 7e-8 alone,
    # 2e-8 in the batch; 0 with two threads), hence the tolerance and not exact equality.
    assert batch[2].abs().max() <= kl_tolerance(1.0, REORDERED)
    assert batch[1].abs().max() > 1e-6  # rows with an image do change: the comparison has teeth


def naive_greedy_answer(model, inputs: dict, steps: int, eos_token_id: int) -> list[int]:
    """Greedy decoding of one unpadded prompt written out: a whole forward per token, no cache."""
    inputs, answer = dict(inputs), []
    for _ in range(steps):
        token = int(model(**inputs, use_cache=False).logits[0, -1].argmax())
        answer.append(token)
        if token == eos_token_id:
            break
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[token]])], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
    return answer


def test_the_answer_is_the_unmodified_models_greedy_answer(tiny_llava_path, processor):
    model = load_model(tiny_llava_path)
    withdrawal = VisualTokenWithdrawal(model, withdraw_layer=1)  # must not touch the answer
    rows = [("Is there a red square ?", 2), ("What colour ?", 1)]
    batch = encode(processor, rows)
    extended, counted = with_greedy_answer(withdrawal, batch, 6, processor.tokenizer.eos_token_id)
    assert withdrawal.withdraw_layer == 1 and counted.shape == (2, 6) and counted[:, 0].all()
    withdrawal.remove()
    for index, row in enumerate(rows):
        single = encode(processor, [row], seed=index)
        expected = naive_greedy_answer(model, single, 5, processor.tokenizer.eos_token_id)
        answer = extended["input_ids"][index, batch["input_ids"].shape[1] :].tolist()
        assert answer[: len(expected)] == expected
        with torch.no_grad():  # and transformers' own greedy generate, on the unhooked model
            generated = model.generate(**single, max_new_tokens=5, do_sample=False, pad_token_id=2, eos_token_id=2)
        assert generated[0, single["input_ids"].shape[1] :].tolist()[: len(expected)] == expected
        ended = expected[-1] == processor.tokenizer.eos_token_id  # the EOS position itself predicts nothing
        assert counted[index].sum() == 1 + len(expected) - ended


@pytest.mark.parametrize("eos_after", [None, 2])
def test_kl_over_answer_tokens_equals_brute_force(tiny_llava_path, processor, eos_after):
    """kl_tokens=4: the KL averaged over the last prompt position and the first three answer tokens,
    each against a whole naive withdrawn forward of prompt plus answer; positions after an EOS
    do not count."""
    model = load_model(tiny_llava_path)
    withdrawal = VisualTokenWithdrawal(model, withdraw_layer=None)
    inputs = encode(processor, [("Is there a red square ?", 2)])
    eos = processor.tokenizer.eos_token_id
    if eos_after is None:
        extended, counted = with_greedy_answer(withdrawal, inputs, 4, eos)
        eos = -1  # the greedy answer of this prompt has no EOS in its first three tokens
        assert counted.all()
    else:  # the model's "answer" is given, with an EOS as its second token
        answer = torch.tensor([[5, eos, eos]])
        attention = torch.cat([inputs["attention_mask"], torch.ones(1, 3, dtype=torch.long)], 1)
        extended = dict(inputs, input_ids=torch.cat([inputs["input_ids"], answer], 1), attention_mask=attention)
        counted = torch.tensor([[True, True, True, False]])
    withdrawal_kl = layer_kl_divergences(withdrawal, extended, counted)[0]
    with torch.no_grad():
        full = model(**extended, use_cache=False).logits[0, -4:]
    answer_tokens = extended["input_ids"][0, -3:].tolist()
    positions = 1 + next((i + 1 for i, token in enumerate(answer_tokens) if token == eos), 3)
    for layer in range(NUM_LAYERS):
        logits, _ = reference_vtw_logits(model, extended, layer)
        per_position = [
            kl(torch.log_softmax(logits[0, -4 + i], -1), torch.log_softmax(full[i], -1)) for i in range(positions)
        ]
        assert withdrawal_kl[layer].item() == pytest.approx(
            sum(per_position) / positions, abs=kl_tolerance(logits, SAME_ARITHMETIC)
        )
        assert max(per_position[1:]) > 1e-6  # answer positions are really compared
    assert withdrawal_kl[NUM_LAYERS] == 0.0


def test_choose_withdraw_layer():
    mean_kl = [0.5, 0.01, 0.002, 0.004, 0.001, 0.0]
    assert choose_withdraw_layer(mean_kl, 0.003) == (2, True)  # the first, not the last, under it
    assert choose_withdraw_layer(mean_kl, 0.5) == (0, True)
    assert choose_withdraw_layer(mean_kl, 0.0005) == (5, False)


def test_summary_weights_subsets_by_size_and_says_when_no_layer_met_it():
    identity = {"model": "m", "config_hash": "h", "kl_threshold": 1e-9}
    record = summarise(
        {"a": {"num_samples": 3, "mean_kl": [0.4, 0.1, 0.0]}, "b": {"num_samples": 1, "mean_kl": [0.0, 0.5, 0.0]}},
        identity,
    )
    assert record["mean_kl"] == pytest.approx([0.3, 0.2, 0.0])  # (3*0.4 + 1*0.0) / 4, (3*0.1 + 0.5) / 4
    assert record["num_samples"] == 4
    assert (record["withdraw_layer"], record["threshold_met"]) == (2, False)
    assert "No layer before 2 met" in record["message"]


def global_record(identity: dict, mean_kl: list[float], threshold: float = 0.003) -> dict:
    """A calibration group's record of ``mean_kl``, from two samples."""
    return summarise(
        {"s": {"num_samples": 2, "mean_kl": mean_kl}}, {**identity, "kl_threshold": threshold, "kl_tokens": 1}
    )


def test_calibration_file_round_trip_and_errors(tmp_path, tiny_llava_path):
    model = load_model(tiny_llava_path)
    identity = model_identity(model, "tiny")
    json_path, plot_path = write_calibration(
        global_record(identity, [0.1, 0.001, 0.0, 0.0, 0.0]), tmp_path / "tiny.json"
    )
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    how = "lmms-eval --model vtw_llava ..."
    assert load_calibration(json_path, identity, NUM_LAYERS, how)[0]["withdraw_layer"] == 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["tiny.json", "tiny.png"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no temporary left

    with pytest.raises(ValueError, match=r"no calibration file .*missing.json; create it with:\n  lmms-eval"):
        load_calibration(tmp_path / "missing.json", identity, NUM_LAYERS, how)
    truncated = tmp_path / "truncated.json"
    truncated.write_text(json_path.read_text()[:40])
    with pytest.raises(ValueError, match=r"truncated.json is unreadable"):
        load_calibration(truncated, identity, NUM_LAYERS, how)
    other_weights = {**identity, "weights_fingerprint": "0000"}
    with pytest.raises(ValueError, match=r"measured on another model .*weights_fingerprint .*this model's is 0000"):
        load_calibration(json_path, other_weights, NUM_LAYERS, how)
    with pytest.raises(ValueError, match=r"config_hash .*this model's is 0000"):
        load_calibration(json_path, {**identity, "config_hash": "0000"}, NUM_LAYERS, how)


DELETE = object()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("mean_kl", [0.1, 0.0], r"field 'mean_kl' is \[0.1, 0.0\], not a list of 5 finite numbers"),
        ("mean_kl", [0.1, "x", 0.0, 0.0, 0.0], r"field 'mean_kl' is .*, not a list of 5"),
        ("num_layers", 6, r"field 'num_layers' is 6, not 4, the model's decoder layers"),
        ("withdraw_layer", True, r"field 'withdraw_layer' is True, not an integer in 0..4"),
        ("withdraw_layer", 9, r"field 'withdraw_layer' is 9, not an integer in 0..4"),
        # an edited K: the file's own curve and threshold give 1
        ("withdraw_layer", 0, r"field 'withdraw_layer' is 0 \(threshold_met True\), but its own mean_kl at "
         r"kl_threshold 0.003 gives K=1 \(threshold_met True\)"),
        ("threshold_met", False, r"field 'withdraw_layer' is 1 \(threshold_met False\), but its own mean_kl"),
        ("format", 3, r"format 3; this version reads format 4 \(earlier formats identified a model by a sample"),
        ("kl_tokens", 0, r"field 'kl_tokens' is 0, not a positive integer"),
        ("dtype", DELETE, r"field 'dtype' is missing"),
        ("num_samples", DELETE, r"field 'num_samples' is missing"),
        ("per_subset", {"s": {"num_samples": 2}}, r"field 'per_subset.s.mean_kl' is missing"),
        ("per_task", [], r"field 'per_task' is \[\], not an object"),
    ],
)  # fmt: skip
def test_calibration_file_fields_are_checked(tmp_path, tiny_llava_path, field, value, message):
    identity = model_identity(load_model(tiny_llava_path), "tiny")
    json_path, _ = write_calibration(global_record(identity, [0.1, 0.001, 0.0, 0.0, 0.0]), tmp_path / "tiny.json")
    on_disk = json.loads(json_path.read_text())
    if value is DELETE:
        del on_disk[field]
    else:
        on_disk[field] = value
    json_path.write_text(json.dumps(on_disk))
    with pytest.raises(ValueError, match=rf"{json_path.name} (is unreadable \(|was ){message}"):
        load_calibration(json_path, identity, NUM_LAYERS, "how")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mean_kl": [0.1]}, r"field 'per_task.mme.mean_kl' is \[0.1\], not a list of 5 finite numbers"),
        ({"kl_threshold": DELETE}, r"field 'per_task.mme.kl_threshold' is missing"),
        ({"kl_tokens": DELETE}, r"field 'per_task.mme.kl_tokens' is missing"),
        ({"num_samples": DELETE}, r"field 'per_task.mme.num_samples' is missing"),
        ({"task_docs": DELETE}, r"field 'per_task.mme.task_docs' is missing"),
        ({"withdraw_layer": 9}, r"field 'per_task.mme.withdraw_layer' is 9, not an integer in 0..4"),
        ({"withdraw_layer": 0}, r"field 'per_task.mme.withdraw_layer' is 0 \(threshold_met True\), but its own"),
    ],
)
def test_per_task_entries_are_checked_one_by_one(tmp_path, tiny_llava_path, change, message):
    """A bad entry is reported as that task's problem; the file's other parts stay usable."""
    identity = model_identity(load_model(tiny_llava_path), "tiny")
    kl = torch.tensor([[0.1, 0.01, 0.002, 0.0, 0.0]])
    good = task_entry(kl, 0.003, 1, task_docs=16, limited=False)
    json_path = tmp_path / "tiny.json"
    write_task_calibration(json_path, identity, NUM_LAYERS, "mme", good)
    write_task_calibration(json_path, identity, NUM_LAYERS, "gqa", good)
    write_calibration(global_record(identity, [0.1, 0.001, 0.0, 0.0, 0.0]), json_path)
    on_disk = json.loads(json_path.read_text())
    bad = {**good, **change}
    on_disk["per_task"]["mme"] = {key: value for key, value in bad.items() if value is not DELETE}
    json_path.write_text(json.dumps(on_disk))
    record, problems = load_calibration(json_path, identity, NUM_LAYERS, "how")
    assert list(problems) == ["mme"] and re.search(message, problems["mme"]), problems
    assert list(record["per_task"]) == ["gqa"] and record["withdraw_layer"] == 1
    # The next write drops the bad entry (replaced by nothing until the task is calibrated again).
    write_task_calibration(json_path, identity, NUM_LAYERS, "pope", good)
    assert sorted(json.loads(json_path.read_text())["per_task"]) == ["gqa", "pope"]


def test_identity_ignores_dtype_and_path(tiny_llava_path, tmp_path):
    import shutil

    moved = shutil.copytree(tiny_llava_path, tmp_path / "elsewhere")
    here = model_identity(load_model(tiny_llava_path), str(tiny_llava_path))
    there = model_identity(LlavaForConditionalGeneration.from_pretrained(moved, dtype=torch.bfloat16), "elsewhere")
    assert here["config_hash"] == there["config_hash"] and here["weights_fingerprint"] == there["weights_fingerprint"]
    assert (here["dtype"], there["dtype"]) == ("float32", "bfloat16")
    # One interior weight (not among a tensor's first or last values) changed: another model.
    changed = load_model(tiny_llava_path)
    weight = changed.get_output_embeddings().weight
    with torch.no_grad():
        weight.view(-1)[weight.numel() // 2] += 0.5
    assert model_identity(changed, "x")["weights_fingerprint"] != here["weights_fingerprint"]


@pytest.mark.cli
def test_cli_calibration_then_auto(tiny_llava_path, tmp_path):
    calibration_dir = tmp_path / "calibration"
    common = f"pretrained={tiny_llava_path},device=cpu,calibration_dir={calibration_dir}"
    results_file = run_lmms_eval(
        "vtw_llava",
        common + f",accounting_file={tmp_path}/a.jsonl",
        "vtw_calibration_tiny",
        tmp_path / "calibrate",
        "--batch_size",
        "4",
    )
    group = json.loads(results_file.read_text())["results"]["vtw_calibration_tiny"]
    record = group["vtw_calibration,none"]
    # K, threshold and count also as plain numbers: readable in the table lmms-eval prints.
    assert (group["withdraw_layer,none"], group["kl_threshold,none"], group["num_samples,none"]) == (
        record["withdraw_layer"], 0.003, 16,
    )  # fmt: skip
    table = (tmp_path / "calibrate" / "lmms_eval.log").read_text()
    assert re.search(
        rf"\|vtw_calibration_tiny *\|none *\| *\|withdraw_layer *\|. *\| *{record['withdraw_layer']}\.000\|", table
    )
    files = sorted(p.name for p in calibration_dir.iterdir() if not p.name.startswith("."))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".png")
    on_disk = json.loads((calibration_dir / files[0]).read_text())
    assert on_disk["mean_kl"] == record["mean_kl"] and on_disk["withdraw_layer"] == record["withdraw_layer"]
    assert record["num_samples"] == 16 and len(record["mean_kl"]) == NUM_LAYERS + 1
    assert record["per_subset"]["vtw_calibration_tiny_mme"]["num_samples"] == 16
    assert record["config_hash"] == config_hash(load_model(tiny_llava_path).config)
    assert (record["withdraw_layer"], True) == choose_withdraw_layer(record["mean_kl"], 0.003)

    # The same model spelt another way (a relative path from where lmms-eval runs) and loaded in
    # another dtype finds the file; the dtype difference is logged.
    relative = os.path.relpath(tiny_llava_path, REPO_ROOT)
    results_file = run_lmms_eval(
        "vtw_llava",
        f"pretrained={relative},device=cpu,dtype=bfloat16,calibration_dir={calibration_dir},withdraw_layer=auto,"
        f"accounting_file={tmp_path}/b.jsonl",
        "vtw_tiny_mme",
        tmp_path / "auto",
    )
    assert json.loads(results_file.read_text())["throughput"]["avg_withdraw_layer"] == record["withdraw_layer"]
    assert (
        "withdraw_layer=auto: calibrated in float32, running in bfloat16"
        in (tmp_path / "auto" / "lmms_eval.log").read_text()
    )

    # lmms-eval's response cache keys on the model_args string, blind to the K auto resolves to.
    with pytest.raises(RuntimeError, match="lmms-eval failed"):
        run_lmms_eval(
            "vtw_llava", common + ",withdraw_layer=auto", "vtw_tiny_mme", tmp_path / "cached",
            "--use_cache", str(tmp_path / "response_cache"),
        )  # fmt: skip
    log = (tmp_path / "cached" / "lmms_eval.log").read_text()
    assert f"Pass withdraw_layer={record['withdraw_layer']} (what auto resolves to now" in log
    assert not list((tmp_path / "cached").glob("*/*_results.json"))


def test_auto_without_a_calibration_file_is_refused(tiny_llava_path, tmp_path):
    with pytest.raises(ValueError, match="withdraw_layer=auto: no calibration file"):
        VTWLlava(pretrained=str(tiny_llava_path), withdraw_layer="auto", device="cpu", calibration_dir=str(tmp_path))


def test_a_threshold_given_with_auto_rechooses_k_from_the_curve_in_the_file(tmp_path, tiny_llava_path):
    identity = model_identity(load_model(tiny_llava_path), str(tiny_llava_path))
    json_path, _ = write_calibration(global_record(identity, [0.5, 0.02, 0.002, 0.0005, 0.0]), tmp_path / "tiny.json")
    for threshold, expected in [(None, 2), (0.003, 2), (0.001, 3), (0.05, 1), (0.0, 4)]:
        extra = {} if threshold is None else {"kl_threshold": threshold}
        lm = VTWLlava(pretrained=str(tiny_llava_path), withdraw_layer="auto", calibration=str(json_path),
                      device="cpu", accounting_file=str(tmp_path / "a.jsonl"), **extra)  # fmt: skip
        assert lm.withdrawal.withdraw_layer == expected, threshold


def test_calibration_writers_hold_a_lock(tmp_path):
    import fcntl

    from vtw_eval.files import exclusive_lock

    target = tmp_path / "tiny.json"
    with exclusive_lock(target):
        with open(tmp_path / ".tiny.json.lock") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a second writer would wait here
    with open(tmp_path / ".tiny.json.lock") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released


def test_rows_whose_answer_ends_early_count_only_their_answer(tiny_llava_path, processor):
    """In a batch, a row whose greedy answer reaches EOS stops counting after it, the others go on
    (the EOS is chosen as row 0's second answer token, so that row ends there)."""
    model = load_model(tiny_llava_path)
    rows = [("Is there a red square ?", 2), ("What colour ?", 1)]
    first = naive_greedy_answer(model, encode(processor, [rows[0]]), 2, eos_token_id=-1)
    eos = first[1]
    withdrawal = VisualTokenWithdrawal(model, withdraw_layer=None)
    _, counted = with_greedy_answer(withdrawal, encode(processor, rows), 6, eos)
    # Row 0: the last prompt position and the one after its first token; the EOS predicts nothing.
    assert counted[0].tolist() == [True, True, False, False, False, False][: counted.shape[1]]
    expected = naive_greedy_answer(model, encode(processor, [rows[1]], seed=1), 5, eos)
    ended = expected[-1] == eos
    assert counted[1].sum() == 1 + len(expected) - ended


def test_a_checkpoints_fingerprint_is_remembered_until_its_files_change(tiny_llava_path, tmp_path, monkeypatch):
    import shutil

    from vtw_eval import calibration_file

    monkeypatch.setenv("VTW_EVAL_CACHE", str(tmp_path / "cache"))
    folder = shutil.copytree(tiny_llava_path, tmp_path / "model")
    hashed = []
    compute = calibration_file.weights_fingerprint
    monkeypatch.setattr(calibration_file, "weights_fingerprint", lambda model: hashed.append(1) or compute(model))
    model = load_model(folder)
    first = calibration_file.cached_weights_fingerprint(model, folder)
    assert calibration_file.cached_weights_fingerprint(load_model(folder), folder) == first == compute(model)
    assert len(hashed) == 1  # the second load was not hashed
    weight = model.get_output_embeddings().weight
    with torch.no_grad():
        weight.view(-1)[weight.numel() // 2] += 0.5
    model.save_pretrained(folder)  # the same file names, rewritten
    changed = calibration_file.cached_weights_fingerprint(load_model(folder), folder)
    assert len(hashed) == 2 and changed != first and changed == compute(model)
