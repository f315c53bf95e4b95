"""A K you can trust: one test per way a calibration file could serve the wrong K or lose data,
through the lmms-eval CLI (or vtw-diff): the exit, the message naming the argument or file, the
file left as it was (or rightly replaced), and no stray files."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch
from tiny_models import NUM_LAYERS, build_tiny_llava, load_model

from vtw_eval.backends.llava import VTWLlava
from vtw_eval.calibration import summarise, task_entry
from vtw_eval.calibration_file import (
    load_calibration,
    model_identity,
    stale_reason,
    write_calibration,
    write_task_calibration,
)
from vtw_eval.diff import main as diff_main
from vtw_eval.run import run_lmms_eval

TASK = "vtw_tiny_mme"  # 16 docs


def global_file(model_path, path, mean_kl=(0.3, 0.1, 0.05, 0.002, 0.0)):
    """A valid calibration file of the model at ``model_path``: K=3 at the default threshold."""
    identity = model_identity(load_model(model_path), str(model_path))
    record = summarise(
        {"s": {"num_samples": 2, "mean_kl": list(mean_kl)}}, {**identity, "kl_threshold": 0.003, "kl_tokens": 1}
    )
    return write_calibration(record, path)[0]


def fails(model_args: str, out, tasks: str = TASK, *options: str) -> str:
    """Run the CLI, assert it failed without results, return its log."""
    with pytest.raises(RuntimeError, match="lmms-eval failed"):
        run_lmms_eval("vtw_llava", model_args, tasks, out, *options)
    assert not list(out.glob("*/*_results.json"))
    return (out / "lmms_eval.log").read_text()


def files_in(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def per_task_run(model_path, out, calibration, extra: str = "", *options: str):
    """A run of TASK with withdraw_layer=auto; returns the results JSON, the calibration file's
    entry for TASK, and the log."""
    model_args = (
        f"pretrained={model_path},device=cpu,withdraw_layer=auto,calibration={calibration},"
        f"accounting_file={out}/requests.jsonl{extra}"
    )
    results = run_lmms_eval("vtw_llava", model_args, TASK, out, "--batch_size", "4", *options)
    entry = json.loads(calibration.read_text())["per_task"][TASK]
    return json.loads(results.read_text()), entry, (out / "lmms_eval.log").read_text()


@pytest.mark.cli
def test_1_an_edited_k_is_refused(tiny_llava_path, tmp_path):
    path = global_file(tiny_llava_path, tmp_path / "cal.json")
    record = json.loads(path.read_text())
    assert record["withdraw_layer"] == 3
    path.write_text(json.dumps({**record, "withdraw_layer": 0}))  # the curve still says 3
    before = path.read_bytes()
    message = (
        f"calibration file {path} is unreadable (field 'withdraw_layer' is 0 (threshold_met True), but its own "
        "mean_kl at kl_threshold 0.003 gives K=3"
    )
    # With the file's own threshold given, through the CLI; without one, where the backend is made.
    model_args = f"pretrained={tiny_llava_path},device=cpu,withdraw_layer=auto,calibration={path},kl_threshold=0.003"
    assert message in fails(model_args, tmp_path / "out")
    with pytest.raises(ValueError, match=re.escape(message)):
        VTWLlava(pretrained=str(tiny_llava_path), device="cpu", withdraw_layer="auto", calibration=str(path))
    assert path.read_bytes() == before


@pytest.mark.cli
def test_2_two_checkpoints_in_folders_of_one_name_never_share_a_file(tiny_llava_path, tmp_path):
    """A fine-tune saved as .../model beside another .../model: same config, other weights."""
    first = shutil.copytree(tiny_llava_path, tmp_path / "a" / "model")
    second = build_tiny_llava(tmp_path / "b" / "model", num_layers=NUM_LAYERS, seed=1)
    calibration_dir = tmp_path / "calibration"
    first_file = VTWLlava(pretrained=str(first), device="cpu", calibration_dir=str(calibration_dir)).calibration_file
    global_file(first, first_file)
    first_bytes = first_file.read_bytes()
    # The second's per-task run, same calibration_dir: a file of its own; the first's untouched.
    run_lmms_eval(
        "vtw_llava",
        f"pretrained={second},device=cpu,withdraw_layer=auto,calibrate_per_task=4,calibration_dir={calibration_dir},"
        f"accounting_file={tmp_path}/a.jsonl",
        TASK, tmp_path / "second",
    )  # fmt: skip
    names = files_in(calibration_dir)
    assert len(names) == 4 and all(name.startswith("model_") for name in names)  # two JSON, two PNG
    (second_file,) = [calibration_dir / n for n in names if n.endswith(".json") and n != first_file.name]
    assert list(json.loads(second_file.read_text())["per_task"]) == [TASK]
    assert first_file.read_bytes() == first_bytes
    # Pointed at the first's file explicitly, the second refuses where it is made, before any
    # calibration prompt, naming the file.
    with pytest.raises(
        ValueError, match=rf"calibration file {first_file} was measured on another model .* not written over"
    ):
        VTWLlava(pretrained=str(second), device="cpu", withdraw_layer="auto", calibrate_per_task=4,
                 calibration=str(first_file))  # fmt: skip
    assert first_file.read_bytes() == first_bytes


@pytest.mark.cli
def test_3_a_model_whose_interior_weights_differ_is_another_model(tiny_llava_path, tmp_path):
    path = global_file(tiny_llava_path, tmp_path / "cal.json")
    changed_path = tmp_path / "changed"
    shutil.copytree(tiny_llava_path, changed_path)
    changed = load_model(changed_path)
    with torch.no_grad():
        for parameter in changed.parameters():  # every tensor, away from its first and last values
            if parameter.numel() > 32:
                parameter.view(-1)[parameter.numel() // 2] += 0.25
    changed.save_pretrained(changed_path)
    log = fails(f"pretrained={changed_path},device=cpu,withdraw_layer=auto,calibration={path}", tmp_path / "out")
    assert f"calibration file {path} was measured on another model" in log and "weights_fingerprint" in log


@pytest.mark.cli
def test_4_a_smoke_test_calibration_is_not_reused_by_a_full_run(tiny_llava_path, tmp_path):
    calibration = global_file(tiny_llava_path, tmp_path / "cal.json")  # a global K too, for runs without per-task
    _, smoke, _ = per_task_run(
        tiny_llava_path, tmp_path / "smoke", calibration, ",calibrate_per_task=2", "--limit", "4"
    )
    assert (smoke["num_samples"], smoke["task_docs"], smoke["limited"]) == (2, 16, True)
    # Without calibrate_per_task the entry is used, with a warning naming it and how to redo it.
    _, _, log = per_task_run(tiny_llava_path, tmp_path / "warned", calibration, "", "--limit", "4")
    assert f"task {TASK}'s entry in " in log and "is used, but it was made under --limit, on 2 prompts" in log
    assert "calibrate_per_task=20,kl_tokens=1,calibration=" in log
    # A full run asking for more prompts than the task has: recalibrated on all 16, a warning says so.
    results, full, log = per_task_run(tiny_llava_path, tmp_path / "full", calibration, ",calibrate_per_task=20")
    assert "is not reused (it was made under --limit" in log
    assert f"calibrate_per_task=20: task {TASK} has 16 docs in this run; its K is calibrated on all 16" in log
    assert (full["num_samples"], full["task_docs"], full["limited"]) == (16, 16, False)
    assert results["throughput"][f"avg_withdraw_layer/{TASK}"] == full["withdraw_layer"]
    # Fewer prompts than the entry's: it serves (test_per_task shows a run reusing an entry).
    assert stale_reason(full, 16, 8) is None and stale_reason(full, 16, 16) is None
    assert stale_reason(full, 20, 8) == "it was made when the task had 16 docs; it has 20 now"


@pytest.mark.cli
def test_5_a_bad_per_task_entry_is_refused_then_replaced_by_the_printed_command(tiny_llava_path, tmp_path):
    path = global_file(tiny_llava_path, tmp_path / "cal.json")
    identity = model_identity(load_model(tiny_llava_path), str(tiny_llava_path))
    entry = task_entry(torch.tensor([[0.2, 0.1, 0.0, 0.0, 0.0]]), 0.003, 1, task_docs=16, limited=False)
    write_task_calibration(path, identity, NUM_LAYERS, TASK, entry)
    record = json.loads(path.read_text())
    record["per_task"][TASK]["withdraw_layer"] = 9  # out of range
    path.write_text(json.dumps(record))
    log = fails(f"pretrained={tiny_llava_path},device=cpu,withdraw_layer=auto,calibration={path}", tmp_path / "refused")
    assert f"the entry of task {TASK} is invalid (field 'per_task.{TASK}.withdraw_layer' is 9" in log
    command = re.search(r"recalibrate it with:\n\s+lmms-eval --model vtw_llava --model_args (\S+) --tasks (\S+)", log)
    assert command and command.group(2) == TASK
    run_lmms_eval("vtw_llava", command.group(1) + f",accounting_file={tmp_path}/a.jsonl", TASK, tmp_path / "fixed")
    fixed = json.loads(path.read_text())
    assert fixed["per_task"][TASK]["withdraw_layer"] in range(NUM_LAYERS + 1)
    assert fixed["per_task"][TASK]["num_samples"] == 16 and fixed["withdraw_layer"] == 3  # the global record kept
    _, problems = load_calibration(path, identity, NUM_LAYERS, "how")
    assert problems == {}  # runs without calibrate_per_task work again


def test_6_a_file_without_dtype_is_refused_naming_the_field(tiny_llava_path, tmp_path):
    path = global_file(tiny_llava_path, tmp_path / "cal.json")
    record = json.loads(path.read_text())
    del record["dtype"]
    path.write_text(json.dumps(record))
    message = f"calibration file {path} is unreadable (field 'dtype' is missing)"
    with pytest.raises(ValueError, match=re.escape(message)):
        VTWLlava(pretrained=str(tiny_llava_path), device="cpu", withdraw_layer="auto", calibration=str(path))


@pytest.mark.cli
def test_7_what_will_be_written_is_checked_before_any_work(tiny_llava_path, tmp_path):
    # A calibration path that is a directory: refused at load (per-task) or before the first
    # calibration prompt (the calibration group); no PNG left anywhere.
    directory = tmp_path / "a_directory.json"
    directory.mkdir()
    with pytest.raises(ValueError, match=re.escape(f"calibration (or calibration_dir): {directory} is a directory")):
        VTWLlava(pretrained=str(tiny_llava_path), device="cpu", withdraw_layer="auto", calibrate_per_task=4,
                 calibration=str(directory))  # fmt: skip
    log = fails(
        f"pretrained={tiny_llava_path},device=cpu,calibration={directory}", tmp_path / "group", "vtw_calibration_tiny"
    )
    assert f"{directory} is a directory, not a file" in log
    # calibration_dir under a file: cannot be created.
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"calibration \(or calibration_dir\): cannot create directory .*blocker/sub"):
        VTWLlava(pretrained=str(tiny_llava_path), device="cpu", withdraw_layer="auto", calibrate_per_task=4,
                 calibration_dir=str(blocker / "sub"))  # fmt: skip
    assert not list(tmp_path.rglob("*.png"))


def test_7_an_immutable_calibration_file_is_found_before_any_work_and_the_pair_stays_whole(tiny_llava_path, tmp_path):
    path = global_file(tiny_llava_path, tmp_path / "cal.json")
    png = path.with_suffix(".png")
    before = (path.read_bytes(), png.read_bytes())
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported on this file system")
    try:
        with pytest.raises(
            ValueError, match=rf"calibration \(or calibration_dir\): cannot write {path} \(Operation not permitted\)"
        ):
            VTWLlava(pretrained=str(tiny_llava_path), device="cpu", withdraw_layer="auto", calibrate_per_task=4,
                     calibration=str(path))  # fmt: skip
        # A writer that gets past the check anyway (the file made immutable since): JSON and PNG
        # are written together or not at all.
        identity = model_identity(load_model(tiny_llava_path), str(tiny_llava_path))
        entry = task_entry(torch.tensor([[0.2, 0.1, 0.0, 0.0, 0.0]]), 0.003, 1, task_docs=16, limited=False)
        with pytest.raises(PermissionError):
            write_task_calibration(path, identity, NUM_LAYERS, TASK, entry)
        assert (path.read_bytes(), png.read_bytes()) == before
        assert files_in(tmp_path) == ["cal.json", "cal.png"]
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_9_vtw_diff_labels_cannot_hide_a_value_and_unknown_directions_are_listed(tmp_path, capsys):
    def results(path, value, higher_is_better):
        data = {
            "results": {"mme": {"mme_perception_score,none": value, "alias": "mme"}},
            "higher_is_better": {"mme": {"mme_perception_score": higher_is_better}}
            if higher_is_better is not None
            else {},
            "config": {"model": "m"},
        }
        path.write_text(json.dumps(data))
        return str(path)

    base, fallen = results(tmp_path / "a.json", 1500.0, None), results(tmp_path / "b.json", 1138.0, None)
    # Rows hold one value per run, whatever the labels: a label equal to a field of the table
    # (once refused, because rows were keyed by label) names a column and overwrites nothing.
    for label in ("task", "metric", "higher_is_better", "present_in", "x delta", "base"):
        assert diff_main([base, fallen, "--labels", f"base,{label}", "--format", "json"]) == 0
        (row,) = json.loads(capsys.readouterr().out)["metrics"]
        assert row["task"] == "mme" and row["values"] == [1500.0, 1138.0] and row["delta"] == [None, -362.0]
    # A 362-point fall of a metric without higher_is_better: not gated, and said so.
    code = diff_main([base, fallen, "--fail-on-drop", "1"])
    captured = capsys.readouterr()
    assert code == 0 and "NOT GATED mme mme_perception_score: its direction is unknown" in captured.err
    assert "Direction unknown (?), so not gated by --fail-on-drop: mme mme_perception_score" in captured.out
    # Where the results carry lmms-eval's higher_is_better, the fall is gated.
    base, fallen = results(tmp_path / "c.json", 1500.0, True), results(tmp_path / "d.json", 1138.0, True)
    assert diff_main([base, fallen, "--fail-on-drop", "1"]) == 1
    assert "DROP mme mme_perception_score: m worse by 362" in capsys.readouterr().err  # the candidate, run 2


@pytest.mark.parametrize(
    "model_args, message",
    [
        ("withdraw_layer=4,withdraw_layer=none", "withdraw_layer is given twice in --model_args (4 and 'none')"),
    ],
)
@pytest.mark.cli
def test_10_arguments_through_the_cli(tiny_llava_path, tmp_path, model_args, message):
    log = fails(f"pretrained={tiny_llava_path},device=cpu,{model_args}", tmp_path / "out")
    assert message in log


@pytest.mark.parametrize(
    "model_args, message",
    [
        ("withdraw_layer=", "withdraw_layer='' is not accepted; use an integer from 0 to 4"),
        ("withdraw_layer=٣", "withdraw_layer='٣' is not accepted; use an integer from 0 to 4"),
        ("withdraw_layer=²", "withdraw_layer='²' is not accepted; use an integer from 0 to 4"),
        ("batch_size=٣", "batch_size='٣' is not accepted; use a positive integer"),
        ("pretrained=", "pretrained='' is not accepted; use a hub id (org/name) or a local checkpoint directory"),
        ("device=", "device='' is not accepted; use cpu, cuda or cuda:N"),
        ("withdraw_layer=2,kl_threshold=0.01", "kl_threshold with withdraw_layer=2 would change nothing"),
        ("withdraw_layer=4,kl_tokens=8", "kl_tokens with withdraw_layer=4 would change nothing"),
        ("withdraw_layer=auto,calibrate_per_task=2,calibrate_per_task=3", "calibrate_per_task is given twice"),
    ],
)
def test_10_arguments_as_lmms_eval_passes_them(tiny_llava_path, model_args, message):
    """Through the entry point lmms-eval calls with the --model_args string."""
    arg_string = f"pretrained={tiny_llava_path},{model_args}" if "pretrained=" not in model_args else model_args
    if "device=" not in arg_string:
        arg_string += ",device=cpu"
    with pytest.raises(ValueError) as error:
        VTWLlava.create_from_arg_string(arg_string, {"batch_size": 1})
    assert message in str(error.value)
