"""Shared fixtures: tiny random llava-hf checkpoints built from configs, offline."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# What the backends write by default (calibration files, accounting) goes to a folder of the
# test session, never into the user's own cache (vtw_eval.files.cache_dir).
os.environ.setdefault("VTW_EVAL_CACHE", tempfile.mkdtemp(prefix="vtw_eval_cache_"))

import pytest
from tiny_models import NUM_LAYERS, build_tiny_llava, load_model
from transformers import AutoProcessor


@pytest.fixture(scope="session")
def tiny_llava_path(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"), num_layers=NUM_LAYERS, seed=0)


@pytest.fixture(scope="session")
def processor(tiny_llava_path):
    processor = AutoProcessor.from_pretrained(tiny_llava_path)
    processor.tokenizer.padding_side = "left"
    return processor


@pytest.fixture(params=["sdpa", "eager"])
def model(request, tiny_llava_path):
    return load_model(tiny_llava_path, request.param)


# The longest tests (the demo, per-task calibration through the CLI) go first, so that the two
# `make test` workers (pytest-xdist) do not end with one of them running alone.
LONGEST_FIRST = (
    "test_testbed.py", "test_per_task.py", "test_distributed.py", "test_lmms_eval_parity.py", "test_gpu_check.py"
)  # fmt: skip


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cli: runs lmms-eval's command line (tens of seconds each); -m 'not cli' skips them"
    )
    config.addinivalue_line("markers", "smoke: the subset `make smoke` runs on the other Python versions")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within each file stays
