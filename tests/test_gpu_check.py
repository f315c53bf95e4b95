"""scripts/gpu_check.py keeps working without a GPU: on this CPU it runs every check a CPU can at a
small size, says which it skipped, and its comparisons fail when what they compare differs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from vtw_eval.run import REPO_ROOT

pytestmark = pytest.mark.smoke


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# Three of the tiny models, for the suite's time: plain attention, sliding windows with two rotary
# embeddings, recurrent layers (tests/test_architectures.py holds every family to the reference).
FAMILIES = ["llava", "gemma3", "qwen3_5"]


@pytest.mark.cli
def test_the_whole_check_runs_on_cpu(tmp_path, gpu_check):
    """One answer of the committed file changed: that check, and only that one, fails (exit 1)."""
    committed = json.loads(gpu_check.ANSWERS_FILE.read_text())
    committed["answers"]["pope"]["3"] = "changed"
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(committed))
    out = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--out", str(out), "--families", ",".join(FAMILIES),
         "--answers", str(answers)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert completed.returncode == 1, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "doc 3: CPU 'changed', here" in completed.stdout
    # Seven files, few enough for a lent machine to send back.
    assert sorted(path.name for path in out.rglob("*") if path.is_file()) == [
        "bench.log", "gpu_check.json", "speed.json", "speed.png", "speed_qwen3_5.json", "speed_qwen3_5.png",
        "testbed.log",
    ]  # fmt: skip
    record = json.loads((out / "gpu_check.json").read_text())
    assert record["device"] == "cpu" and set(record["seconds"]) == {*gpu_check.SECTIONS, "total"}
    checks = {(c["section"], c["name"]): c for c in record["checks"]}
    assert [name for (section, name), c in checks.items() if c["status"] == "FAIL"] == ["pope"]
    assert {c["status"] for c in checks.values()} <= {"pass", "skipped", "reported", "FAIL"}
    # What a CPU cannot do is listed as skipped, with why.
    skipped = {name: c["detail"] for (section, name), c in checks.items() if c["status"] == "skipped"}
    assert "no CUDA" in skipped["device = CPU (logits, greedy tokens)"] and "flash_attention_2" in skipped

    assert [name for section, name in checks if section == "exactness"][: len(FAMILIES)] == FAMILIES
    for family in FAMILIES:  # against the naive reference, both kernels
        figures = checks[("exactness", family)]["figures"]
        assert figures["eager_vs_reference"] <= 1e-4 and figures["sdpa_vs_reference"] <= 1e-4
        same, total = figures["bfloat16_greedy_equal_float32"]
        assert total == 10 and 0 <= same <= total
    split = [c for (section, _), c in checks.items() if section == "split"]
    assert [c["name"].split(" ")[0] for c in split] == ["K=2", "K=6", "K=none"]
    assert all("cpu/disk" in c["name"] and c["figures"]["equal"] == 8 for c in split)
    for task in committed["answers"]:
        if checks[("testbed", task)]["status"] != "skipped":
            assert checks[("testbed", task)]["figures"]["compared"] == 8
    assert checks[("testbed", "pope")]["figures"]["differing"] == ["3"]

    for stem, architecture in (("speed", "llava"), ("speed_qwen3_5", "qwen3_5")):
        summary = json.loads((out / "bench" / f"{stem}.json").read_text())
        assert summary["architecture"] == architecture
        assert [row["withdraw_layer"] for row in summary["rows"]] == [4, 0, 2]
        for row in summary["rows"]:
            assert row["kv_cache_bytes_measured"] == row["kv_cache_bytes_analytic"]
            # The tower, projector and head do not shrink: the whole model's limit is below the decoder's.
            assert 1 <= row["analytic_whole_model_prefill_speedup"] <= row["analytic_prefill_speedup"]
        assert (out / "bench" / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
        assert checks[("speed", f"{architecture}: KV cache = cost model")]["status"] == "pass"


def outcome(gpu_check, logits, tokens, scores):
    return gpu_check.Outcome(torch.tensor(logits), torch.tensor(tokens), torch.tensor(scores))


def test_agreement_allows_ties_only(gpu_check):
    tolerance = 1e-4
    scores = [[[0.5, 0.2, 0.1], [0.3, 0.3 - tolerance / 2, 0.0]]]  # step 1's best two are within it
    expected = {0: outcome(gpu_check, [[1.0, 2.0]], [[0, 0]], scores)}
    same = {0: outcome(gpu_check, [[1.0, 2.0 + tolerance / 2]], [[0, 0]], scores)}
    assert gpu_check.agreement(expected, same, tolerance) == (
        # 2.0 + 5e-5 in float32 is off by up to 1.2e-7 (an ulp of 2): 1% of 5e-5 covers it.
        True, {"max_logit_difference": pytest.approx(tolerance / 2, rel=0.01), "ties": 0, "diverged": []}
    )  # fmt: skip
    tie = {0: outcome(gpu_check, [[1.0, 2.0]], [[0, 1]], scores)}
    ok, found = gpu_check.agreement(expected, tie, tolerance)
    assert ok and found["ties"] == 1
    diverged = {0: outcome(gpu_check, [[1.0, 2.0]], [[2, 1]], scores)}  # step 1: 0.5 vs 0.1
    ok, found = gpu_check.agreement(expected, diverged, tolerance)
    assert not ok and found["diverged"] == ["K=0 row 0 step 0"]
    far = {0: outcome(gpu_check, [[1.0, 2.0 + 2 * tolerance]], [[0, 0]], scores)}
    assert not gpu_check.agreement(expected, far, tolerance)[0]


def test_compare_answers_names_the_first_differing_doc(gpu_check):
    want = {"0": "yes", "1": "no", "2": "red"}
    assert gpu_check.compare_answers("pope", {"0": "yes", "1": "no"}, want, "K=7").status == "pass"
    check = gpu_check.compare_answers("pope", {"0": "yes", "1": "yes"}, want, "K=7")
    assert check.status == "FAIL" and "doc 1: CPU 'no', here 'yes'" in check.detail
    assert gpu_check.compare_answers("pope", {}, want, "K=7").status == "FAIL"


def test_split_device_map_by_hand(gpu_check):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(REPO_ROOT / "testbed" / "model")
    device_map = gpu_check.split_device_map(model, 4, 0, "cpu")
    assert {name for name, place in device_map.items() if place == "cpu"} == {
        *(f"model.language_model.layers.{i}" for i in range(4, 8)), "model.language_model.norm", "lm_head"
    }  # fmt: skip
    assert {name for name, place in device_map.items() if place == 0} == {
        "model.vision_tower", "model.multi_modal_projector", "model.language_model.embed_tokens",
        "model.language_model.rotary_emb", *(f"model.language_model.layers.{i}" for i in range(4)),
    }  # fmt: skip
    for name, _ in model.named_parameters():  # every weight has a place
        assert any(name == key or name.startswith(key + ".") for key in device_map), name


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--limit", "0"], "argument --limit: '0' is not accepted; use an integer >= 1"),
        (["--limit", "-3"], "argument --limit: '-3' is not accepted; use an integer >= 1"),
        (["--families", ""], "argument --families: '' is not accepted; give one or more names"),
        (["--sections", "speed,"], "argument --sections: 'speed,' is not accepted; give one or more names"),
        (["--sections", "speed,fast"], "--sections speed,fast: unknown ['fast']; accepted: speed, exactness"),
        (["--record-answers", "nowhere"], "--record-answers nowhere: no claims.json there"),
    ],
)
def test_bad_arguments_exit_2_naming_them(gpu_check, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(arguments)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def immutable(path):
    """``chattr +i``: not even root may create files in ``path`` (the suite runs as root, whom
    permission bits do not stop); the test is skipped where the file system cannot."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported on this file system")
    return path


def test_unwritable_outputs_are_refused_before_any_section(gpu_check, tmp_path, capsys, monkeypatch):
    def never(*args):
        raise AssertionError("a section ran")

    monkeypatch.setattr(gpu_check, "speed_checks", never)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for out, message in [
        (a_file, f"--out: {a_file} is a file, not a folder"),
        (a_file / "sub", f"--out: cannot create directory {a_file / 'sub'} (Not a directory)"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            gpu_check.main(["--out", str(out), "--sections", "speed"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    immutable(locked)
    try:
        with pytest.raises(SystemExit) as exit_info:
            gpu_check.main(["--out", str(locked), "--sections", "speed"])
        assert exit_info.value.code == 2
        assert f"--out: cannot write {locked / 'gpu_check.json'} (Operation not permitted)" in capsys.readouterr().err
        answers = tmp_path / "demo"
        answers.mkdir()
        (answers / "claims.json").write_text("{}")
        with pytest.raises(SystemExit) as exit_info:
            gpu_check.main(["--record-answers", str(answers), "--answers", str(locked / "answers.json")])
        assert exit_info.value.code == 2 and "--answers: cannot write" in capsys.readouterr().err
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


def test_json_after_each_section_and_the_table_whatever_happens_to_it(gpu_check, tmp_path, capsys, monkeypatch):
    """The first section's checks are on disk before the second runs; when the folder stops taking
    files, the table is still printed, the run exits 1 and says what it could not write."""
    out = tmp_path / "out"
    seen = {}

    def first(device, out):
        return [gpu_check.Check("speed", "first", "pass", "measured")]

    def second(device, work, families):
        seen["on disk"] = json.loads((out / "gpu_check.json").read_text())["checks"]
        immutable(out)
        return [gpu_check.Check("exactness", "second", "pass", "compared")]

    monkeypatch.setattr(gpu_check, "speed_checks", first)
    monkeypatch.setattr(gpu_check, "exactness_checks", second)
    try:
        code = gpu_check.main(["--out", str(out), "--sections", "speed,exactness"])
    finally:
        subprocess.run(["chattr", "-i", str(out)], capture_output=True)  # (it may never have been set)
    captured = capsys.readouterr()
    assert [check["name"] for check in seen["on disk"]] == ["first"]
    assert code == 1 and "first" in captured.out and "second" in captured.out  # the table, both checks
    assert f"could not write {out / 'gpu_check.json'}" in captured.err
    assert [c["name"] for c in json.loads((out / "gpu_check.json").read_text())["checks"]] == ["first"]
