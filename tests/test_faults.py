"""Bad input and faults: a clear message naming the argument or file, a non-zero exit, no partial output."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys

import pytest
from backend_requests import backend, generation_requests, request
from PIL import Image

from vtw_eval.files import write_atomically
from vtw_eval.run import run_lmms_eval


@pytest.mark.cli
def test_cli_bad_withdraw_layer(tiny_llava_path, tmp_path):
    model_args = f"pretrained={tiny_llava_path},withdraw_layer=99,device=cpu,calibration_dir={tmp_path}/none"
    with pytest.raises(RuntimeError, match="lmms-eval failed"):
        run_lmms_eval("vtw_llava", model_args, "vtw_tiny_mme", tmp_path)
    log = (tmp_path / "lmms_eval.log").read_text()
    assert "withdraw_layer=99 is not accepted; use an integer from 0 to 4" in log
    assert not list(tmp_path.glob("*/*_results.json"))


@pytest.mark.parametrize("value, shown", [("-1", "-1.0"), ("abc", "'abc'"), ("2.5", "2.5")])
def test_bad_withdraw_layer_as_lmms_eval_passes_it(tiny_llava_path, value, shown):
    """The entry point lmms-eval calls with the --model_args string (the CLI path above)."""
    from vtw_eval.backends.llava import VTWLlava

    with pytest.raises(ValueError, match=rf"withdraw_layer={re.escape(shown)} is not accepted; use an integer from 0"):
        VTWLlava.create_from_arg_string(f"pretrained={tiny_llava_path},device=cpu,withdraw_layer={value}")


def test_auto_with_a_corrupt_calibration_file(tiny_llava_path, tmp_path):
    """Where the backend is made (the CLI path of a bad file: tests/test_trust.py)."""
    from vtw_eval.backends.llava import VTWLlava

    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"withdraw_layer": 2, "num_la')
    with pytest.raises(ValueError, match=rf"calibration file {corrupt} is unreadable \(not readable JSON"):
        VTWLlava(pretrained=str(tiny_llava_path), withdraw_layer="auto", calibration=str(corrupt), device="cpu")


def test_undecodable_image_names_the_doc_and_stops(tiny_llava_path):
    lm = backend(tiny_llava_path, 1)

    def broken_visual(doc):
        return [Image.open(io.BytesIO(b"not a png"))]

    requests = generation_requests()
    requests[2] = request(
        "generate_until", (requests[2].args[0], requests[2].args[1], broken_visual, 2, "tiny", "test")
    )
    with pytest.raises(RuntimeError, match=r"\('tiny', 2\).*cannot identify image file"):
        lm.generate_until(requests)


def test_image_token_count_mismatch_names_the_doc(tiny_llava_path):
    lm = backend(tiny_llava_path, 1)
    args = generation_requests()[0].args
    mismatched = request("generate_until", ("<image> <image>\n" + args[0], *args[1:]))  # two tokens, one image
    with pytest.raises(RuntimeError, match=r"\('tiny', 0\).*(image|Image)"):
        lm.generate_until([mismatched])


def test_unwritable_accounting_file_fails_before_evaluating(tiny_llava_path, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"accounting_file: cannot create directory .*a_file/sub"):
        backend(tiny_llava_path, 1, accounting_file=str(blocker / "sub" / "requests.jsonl"))


def test_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "calibration.json"
    target.write_text("old")

    def interrupted_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, b"new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["calibration.json"]  # the temporary file is cleaned up


WRITER = """
import sys, signal, time
from pathlib import Path
from vtw_eval.files import write_atomically
# A background job inherits SIGINT ignored; a user's Ctrl-C raises KeyboardInterrupt.
signal.signal(signal.SIGINT, signal.default_int_handler)
target = Path(sys.argv[1])
write_atomically(target, b"1" * 4_000_000)  # a whole file
def half_then_wait(self, data):  # the next write stops halfway through its temporary file
    with open(self, "wb") as file:
        file.write(data[: len(data) // 2])
    print("mid-write", flush=True)
    time.sleep(60)
Path.write_bytes = half_then_wait
write_atomically(target, b"2" * 4_000_000)
"""


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_writing_never_leaves_a_half_written_file(tmp_path, signal_number):
    """The writer is stopped at a known point: half of the new file written, the rename not done."""
    target = tmp_path / "record.json"
    with subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True) as writer:
        assert writer.stdout.readline().strip() == "mid-write"
        (temporary,) = [p for p in tmp_path.iterdir() if p != target]
        assert temporary.stat().st_size == 2_000_000  # really mid-write
        writer.send_signal(signal_number)
        assert writer.wait(timeout=30) != 0
    assert target.read_bytes() == b"1" * 4_000_000  # the old file, whole
    if signal_number == signal.SIGINT:  # Python unwinds: the temporary file is removed too
        assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


@pytest.mark.parametrize(
    "model_args, options, environment, message",
    [
        ("", ["--batch_size", "0"], {}, "batch_size='0' is not accepted; use a positive integer"),
        ("", [], {"VTW_CALIBRATION_DOCS": "0"}, "VTW_CALIBRATION_DOCS='0' is not accepted; use a positive integer"),
    ],
)
@pytest.mark.cli
def test_cli_bad_arguments_name_themselves(tiny_llava_path, tmp_path, model_args, options, environment, message):
    """Through the CLI: the run fails, the log names the argument and what is accepted, nothing is written."""
    if "device=" not in model_args:
        model_args = f"device=cpu,{model_args}"
    tasks = "vtw_calibration_tiny" if environment else "vtw_tiny_mme"
    arguments = f"pretrained={tiny_llava_path},{model_args},accounting_file={tmp_path}/acc/r.jsonl".rstrip(",")
    with pytest.raises(RuntimeError, match="lmms-eval failed"):
        run_lmms_eval("vtw_llava", arguments, tasks, tmp_path / "out", *options, env=environment)
    assert message in (tmp_path / "out" / "lmms_eval.log").read_text()
    assert not list((tmp_path / "out").glob("*/*_results.json"))
    assert not list(tmp_path.glob("acc/*"))


@pytest.mark.parametrize(
    "model_args, message",
    [
        ("batch_size=abc", "batch_size='abc' is not accepted; use a positive integer"),
        ("device=cuda", "device='cuda' is not accepted: this machine has 0 CUDA device(s)"),
        ("kl_threshold=-1", "kl_threshold=-1.0 is not accepted; use a finite number >= 0"),
        ("max_num_frames=4", "Unknown model_args for VTWLlava: ['max_num_frames']"),
    ],
)
def test_bad_arguments_as_lmms_eval_passes_them(tiny_llava_path, tmp_path, model_args, message):
    """The entry point lmms-eval calls with --model_args and its own options (the CLI path above)."""
    from vtw_eval.backends.llava import VTWLlava

    if "device=" not in model_args:
        model_args = f"device=cpu,{model_args}"
    arg_string = f"pretrained={tiny_llava_path},{model_args},accounting_file={tmp_path}/acc/r.jsonl"
    with pytest.raises(ValueError) as error:
        VTWLlava.create_from_arg_string(arg_string, {"batch_size": 1, "device": None})
    assert message in str(error.value)
    assert not list(tmp_path.glob("acc/*"))


def test_a_calibration_file_of_another_layer_count_names_the_field(tiny_llava_path, tmp_path):
    from tiny_models import load_model

    from vtw_eval.backends.llava import VTWLlava
    from vtw_eval.calibration import summarise
    from vtw_eval.calibration_file import model_identity, write_calibration

    identity = {**model_identity(load_model(tiny_llava_path), str(tiny_llava_path)), "kl_tokens": 1}
    record = summarise({"s": {"num_samples": 1, "mean_kl": [0.1] * 6 + [0.0]}}, {**identity, "kl_threshold": 0.003})
    path, _ = write_calibration(record, tmp_path / "six_layers.json")  # the tiny model has 4 layers
    with pytest.raises(ValueError) as error:
        VTWLlava(pretrained=str(tiny_llava_path), withdraw_layer="auto", calibration=str(path), device="cpu")
    message = str(error.value)
    assert (
        f"calibration file {path} is unreadable (field 'num_layers' is 6, not 4, the model's decoder layers)" in message
    )
    assert "--tasks vtw_calibration --include_path" in message  # the command that makes the right one


@pytest.mark.cli
def test_lmms_eval_plugins_variable_fails_with_our_message(tiny_llava_path, tmp_path):
    """lmms-eval imports `<plugin>.models` for LMMS_EVAL_PLUGINS; ours says what to do instead."""
    log = tmp_path / "out" / "lmms_eval.log"
    with pytest.raises(RuntimeError, match="lmms-eval failed"):
        run_lmms_eval(
            "vtw_llava", f"pretrained={tiny_llava_path},device=cpu", "vtw_tiny_mme", tmp_path / "out",
            env={"LMMS_EVAL_PLUGINS": "vtw_eval"},
        )  # fmt: skip
    assert "LMMS_EVAL_PLUGINS=vtw_eval is not supported and not needed" in log.read_text()
