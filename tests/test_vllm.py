"""VTW inside vLLM (vtw_eval.vllm_worker, the vtw_vllm backend): run in vLLM's own venv
(`make install-vllm`; `make test` runs this file there when that venv exists), skipped elsewhere.

Exactness: greedy tokens from vLLM with withdrawal at K equal vtw_eval's transformers engine at K
(float32, eager) over 16 decoding steps of a batch mixing a text-only request with one- and
two-image requests, also when chunked prefill splits the images over steps; at K = L and without
the worker, plain vLLM. Each vLLM run is a process of its own (vLLM's engine is not made to be
started twice in one process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vllm_fixtures import (  # noqa: E402
    QUESTIONS,
    build_vllm_llava,
    build_vllm_qwen2_vl,
    build_vllm_qwen3_vl,
    transformers_greedy,
)

from vtw_eval.run import run_lmms_eval  # noqa: E402

# The settings that ran here (NOTES: vLLM on this CPU): a small KV cache, both cores, the engine
# in this process's child, the first model runner.
VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_USE_V2_MODEL_RUNNER": "0",
}
NUM_LAYERS = 4


def vllm_greedy(path: Path, withdraw_layer: int | None, **settings) -> list[list[int]]:
    arguments = json.dumps({"path": str(path), "withdraw_layer": withdraw_layer, **settings})
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("vllm_fixtures.py")), arguments],
        capture_output=True, text=True, timeout=600, env={**os.environ, **VLLM_ENV},
    )  # fmt: skip
    lines = [line for line in completed.stdout.splitlines() if line.startswith("VLLM_TOKENS ")]
    assert completed.returncode == 0 and lines, completed.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("VLLM_TOKENS "))


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    return build_vllm_llava(tmp_path_factory.mktemp("vllm_llava") / "model", num_layers=NUM_LAYERS)


@pytest.fixture(scope="module")
def llava_plain(llava) -> list[list[int]]:
    return transformers_greedy(str(llava), None)


def test_plain_vllm_equals_transformers(llava, llava_plain):
    assert vllm_greedy(llava, None) == llava_plain
    # guard: the requests' answers differ, so equality is about each of them
    assert len({tuple(tokens) for tokens in llava_plain}) == len(QUESTIONS)


@pytest.mark.parametrize("withdraw_layer", [0, 2, 3])
def test_withdrawal_equals_transformers_engine(llava, llava_plain, withdraw_layer):
    expected = transformers_greedy(str(llava), withdraw_layer)
    assert vllm_greedy(llava, withdraw_layer) == expected
    changed = [row for row, (a, b) in enumerate(zip(expected, llava_plain)) if a != b]
    assert changed and all(QUESTIONS[row][1] > 0 for row in changed)  # K changes image requests only


def test_withdrawal_with_chunked_prefill(llava):
    # 16 tokens a step: the two-image prompt (39 tokens) and the one-image prompts (24) are split
    # inside their images, and the steps mix prefill chunks with other requests' decoding.
    assert vllm_greedy(llava, 2, max_num_batched_tokens=16) == transformers_greedy(str(llava), 2)


def test_withdraw_layer_at_depth_is_plain_vllm(llava, llava_plain):
    assert vllm_greedy(llava, NUM_LAYERS) == llava_plain


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_qwen2_vl_withdrawal_equals_transformers_engine(tmp_path, version):
    path = build_vllm_qwen2_vl(tmp_path / "model", version=version, num_layers=NUM_LAYERS)
    expected = transformers_greedy(str(path), 1)
    assert vllm_greedy(path, 1) == expected
    assert expected != transformers_greedy(str(path), None)  # guard: K changes the answers


def test_qwen3_vl_withdrawal_after_deepstack_equals_transformers_engine(tmp_path):
    """DeepStack adds visual features after layers 0, 1, 2: K >= 3 cuts after every addition."""
    from vtw_eval.backends.vllm import VTWVLLM

    path = build_vllm_qwen3_vl(tmp_path / "model", num_layers=6)
    expected = transformers_greedy(str(path), 3)
    assert vllm_greedy(path, 3) == expected
    assert expected != transformers_greedy(str(path), None)  # guard: K changes the answers
    with pytest.raises(ValueError, match="adds visual features after decoder layers 0..2.*withdraw_layer >= 3"):
        VTWVLLM(model=str(path), withdraw_layer=2)


def test_refusals_are_named_before_the_engine_starts():
    from vtw_eval.backends.vllm import VTWVLLM, withdrawing_engine_arguments

    with pytest.raises(ValueError, match="enable_prefix_caching=True cannot run with withdraw_layer=2"):
        withdrawing_engine_arguments({"enable_prefix_caching": True}, 2)
    with pytest.raises(ValueError, match="enforce_eager=False"):
        withdrawing_engine_arguments({"enforce_eager": False}, 2)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 is not supported"):
        withdrawing_engine_arguments({"tensor_parallel_size": 2}, 2)
    with pytest.raises(ValueError, match="does not take calibrate_per_task="):
        VTWVLLM(model="unused", calibrate_per_task=8)
    settings = withdrawing_engine_arguments({"dtype": "float32"}, 2)
    assert settings["enforce_eager"] is True and settings["enable_prefix_caching"] is False
    assert settings["additional_config"] == {"vtw_withdraw_layer": 2} and settings["worker_cls"].endswith("Worker")


@pytest.mark.cli
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_vtw_vllm_through_lmms_eval(family, llava, tmp_path, monkeypatch):
    """At K=none vtw_vllm answers as lmms-eval's own vllm backend, doc for doc; at K=2 some answers
    change and every request is accounted for."""
    for name, value in VLLM_ENV.items():
        monkeypatch.setenv(name, value)
    path = llava if family == "llava" else build_vllm_qwen2_vl(tmp_path / "model", "2.5", num_layers=NUM_LAYERS)
    common = (
        f"model={path},dtype=float32,enforce_eager=True,enable_prefix_caching=False,max_new_tokens=8,max_model_len=512"
    )
    answers = {}
    for label, backend, extra in [
        ("vllm", "vllm", ""),
        ("none", "vtw_vllm", ",withdraw_layer=none"),
        ("k2", "vtw_vllm", f",withdraw_layer=2,accounting_file={tmp_path}/r.jsonl"),
    ]:
        out = tmp_path / label
        results_file = run_lmms_eval(backend, common + extra, "vtw_tiny_mme", out, "--batch_size", "4", "--log_samples")
        samples = next(results_file.parent.glob("*_samples_vtw_tiny_mme.jsonl")).read_text().splitlines()
        # an empty answer has no "resps" in lmms-eval's samples, only an empty "filtered_resps"
        answers[label] = {json.loads(s)["doc_id"]: json.loads(s)["filtered_resps"] for s in samples}
        if label == "k2":
            throughput = json.loads(results_file.read_text())["throughput"]
    assert answers["none"] == answers["vllm"] and len(answers["vllm"]) == 16
    assert len({str(answer) for answer in answers["vllm"].values()}) > 1  # guard: answers differ across docs
    assert answers["k2"] != answers["none"]
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(records) == 16 and all(r["withdraw_layer"] == 2 and 0 < r["visual_tokens"] for r in records)
    assert all(r["kept_tokens"] == r["prompt_tokens"] - r["visual_tokens"] for r in records)
    assert throughput["avg_withdraw_layer"] == 2 and throughput["avg_prefill_flops_saved"] > 0


def test_unserved_architecture_is_refused_before_the_engine_starts(tmp_path):
    from tiny_models import build_tiny_qwen3

    from vtw_eval.backends.vllm import VTWVLLM

    path = build_tiny_qwen3(tmp_path / "model", "qwen3_5")
    with pytest.raises(ValueError, match="vtw_vllm withdraws inside .*LlavaForConditionalGeneration"):
        VTWVLLM(model=str(path), withdraw_layer=1)


@pytest.mark.cli
def test_auto_reads_the_transformers_backends_calibration(llava, tmp_path, monkeypatch):
    from transformers import AutoConfig

    from vtw_eval.backends.vllm import calibrated_withdraw_layer
    from vtw_eval.calibration import choose_withdraw_layer

    monkeypatch.setenv("VTW_EVAL_CACHE", str(tmp_path / "cache"))
    config = AutoConfig.from_pretrained(llava)
    with pytest.raises(ValueError, match="(?s)has not calibrated .* lmms-eval --model vtw_llava"):
        calibrated_withdraw_layer(str(llava), config, "LlavaForConditionalGeneration", None, None)
    results_file = run_lmms_eval(
        "vtw_llava", f"pretrained={llava},withdraw_layer=none,device=cpu", "vtw_calibration_tiny", tmp_path / "out"
    )
    record = json.loads(results_file.read_text())["results"]["vtw_calibration_tiny"]["vtw_calibration,none"]
    found = calibrated_withdraw_layer(str(llava), config, "LlavaForConditionalGeneration", None, None)
    assert found == record["withdraw_layer"] == choose_withdraw_layer(record["mean_kl"], 0.003)[0]
