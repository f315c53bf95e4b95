"""Where K is decided (vtw_eval.withdraw_layer_choice), without a model: a hand-made identity and
calibration files, and a stand-in for the backend's KL measurement that records what it is asked."""

from __future__ import annotations

import json

import pytest

from vtw_eval.backends.processes import Processes
from vtw_eval.calibration import summarise
from vtw_eval.calibration_file import write_calibration
from vtw_eval.withdraw_layer_choice import CalibrationSettings, CalibrationTarget, WithdrawLayerChoice

pytestmark = pytest.mark.smoke

IDENTITY = {"model": "tiny", "config_hash": "c" * 64, "weights_fingerprint": "f" * 64, "dtype": "float32"}
NUM_LAYERS = 4
MEAN_KL = [0.5, 0.01, 0.002, 0.0001, 0.0]  # first layer <= 0.003: 2; <= 0.0005: 3


def target(path) -> CalibrationTarget:
    return CalibrationTarget(path, IDENTITY, NUM_LAYERS, "vtw_llava", "org/tiny")


def global_file(path, kl_threshold: float = 0.003):
    identity = {**IDENTITY, "kl_threshold": kl_threshold, "kl_tokens": 1}
    write_calibration(summarise({"s": {"num_samples": 4, "mean_kl": MEAN_KL}}, identity), path)
    return path


def choice(value, path, **settings) -> WithdrawLayerChoice:
    arguments = {"kl_threshold": None, "kl_tokens": 1, "calibrate_per_task": 0, **settings}
    return WithdrawLayerChoice(value, CalibrationSettings.from_arguments(**arguments), target(path), Processes())


class Measure:
    """Per-layer KL rows for the chosen docs: this layer curve for every doc; records each call."""

    def __init__(self, curve):
        self.curve, self.calls = curve, []

    def __call__(self, task, chosen):
        self.calls.append((task, sorted(chosen)))
        return [(doc, list(self.curve)) for doc in sorted(chosen)], 1000 * len(chosen)


def test_a_fixed_k_and_none_need_no_file(tmp_path):
    missing = tmp_path / "none.json"
    assert choice(2, missing).default == 2 and choice("none", missing).default is None
    layers, flops = choice(2, missing).for_tasks({"mme": ({0, 1}, 10)}, Measure(MEAN_KL))
    assert layers == {"mme": 2} and flops == {} and not missing.exists()


@pytest.mark.parametrize(
    "value, settings, message",
    [
        (2, {"kl_threshold": 0.01}, "kl_threshold with withdraw_layer=2 would change nothing"),
        (2, {"kl_tokens": 3}, "kl_tokens with withdraw_layer=2 would change nothing"),
        (
            "none",
            {"calibrate_per_task": 5},
            "calibrate_per_task=5 chooses each task's K, so it needs withdraw_layer=auto",
        ),
        (9, {}, "withdraw_layer=9 is not accepted; use an integer from 0 to 4"),
    ],
)
def test_arguments_that_cannot_choose_k_are_refused(tmp_path, value, settings, message):
    with pytest.raises(ValueError, match=message):
        choice(value, tmp_path / "none.json", **settings)


def test_auto_takes_the_files_k_and_another_threshold_from_its_curve(tmp_path):
    path = global_file(tmp_path / "model.json")
    assert choice("auto", path).default == 2
    assert choice("auto", path, kl_threshold=0.0005).default == 3  # the curve, not a new calibration
    with pytest.raises(ValueError, match=r"--tasks vtw_calibration --include_path"):  # the command that makes it
        choice("auto", tmp_path / "missing.json")


def test_auto_with_the_response_cache_is_refused_naming_the_k(tmp_path):
    path = global_file(tmp_path / "model.json")
    settings = CalibrationSettings.from_arguments(None, 1, 0)
    with pytest.raises(ValueError, match=r"Pass withdraw_layer=2 \(what auto resolves to now"):
        WithdrawLayerChoice("auto", settings, target(path), Processes(), response_cache=True)


def test_per_task_calibrates_once_then_reuses_and_recalibrates_on_another_threshold(tmp_path):
    path = tmp_path / "model.json"
    # Whole tasks (an entry made on part of a task is recalibrated by the next run: test_trust.py).
    docs = {"mme": (set(range(0, 20, 2)), 10), "pope": (set(range(6)), 6)}
    measure = Measure([0.2, 0.1, 0.0001, 0.0, 0.0])
    layers, flops = choice("auto", path, calibrate_per_task=4).for_tasks(docs, measure)
    assert layers == {"mme": 2, "pope": 2} and flops == {"mme": 4000, "pope": 4000}
    # 4 prompts spread over the docs of the run, in steps of docs // 4 (their answers are never read)
    assert measure.calls == [("mme", [0, 4, 8, 12]), ("pope", [0, 1, 2, 3])]  # every (10 // 4)-th, (6 // 4)-th doc
    entries = json.loads(path.read_text())["per_task"]
    assert entries["mme"]["withdraw_layer"] == 2 and entries["mme"]["num_samples"] == 4

    again = Measure([0.5] * 4 + [0.0])  # would choose K=4 if it were asked
    assert choice("auto", path, calibrate_per_task=4).for_tasks(docs, again) == ({"mme": 2, "pope": 2}, {})
    assert again.calls == []  # the file's entries serve
    changed, _ = choice("auto", path, calibrate_per_task=4, kl_threshold=0.5).for_tasks(docs, again)
    assert changed == {"mme": 0, "pope": 0} and len(again.calls) == 2  # another threshold: measured again


def test_without_calibrate_per_task_a_tasks_entry_or_the_global_k(tmp_path):
    path = global_file(tmp_path / "model.json")
    choice("auto", path, calibrate_per_task=2).for_tasks({"pope": ({0, 1}, 2)}, Measure([0.2, 0.0, 0.0, 0.0, 0.0]))
    layers, flops = choice("auto", path).for_tasks({"pope": ({0, 1}, 2), "mme": ({0}, 2)}, Measure(MEAN_KL))
    assert layers == {"pope": 1, "mme": 2} and flops == {}  # pope's own K, mme the global one
