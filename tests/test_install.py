"""The suite runs on the locked package set: the key packages' installed versions equal the lock."""

from __future__ import annotations

import importlib.metadata
import sys

import pytest

from vtw_eval.run import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from lock import LOCK, normalise, read_lock  # noqa: E402

KEY_PACKAGES = ["torch", "transformers", "lmms-eval", "datasets", "accelerate", "filelock", "huggingface-hub"]


@pytest.mark.parametrize("package", KEY_PACKAGES)
def test_installed_version_equals_the_lock(package):
    locked = read_lock(LOCK)
    assert normalise(package) in locked, f"{package} is missing from {LOCK.name}"
    assert importlib.metadata.version(package) == locked[normalise(package)], (
        f"{package} {importlib.metadata.version(package)} is installed, {LOCK.name} has "
        f"{locked[normalise(package)]}: run `make install` (or `make lock` after changing pyproject.toml)"
    )


def test_lock_reader_and_names(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# header\nHuggingFace_Hub==2.4.0\nzope.interface==7.0  # why\n\n")
    assert read_lock(lock) == {"huggingface-hub": "2.4.0", "zope-interface": "7.0"}


def test_drift_rows_list_every_difference():
    from check_latest import drift_rows

    locked = {"torch": "2.14.1", "filelock": "3.32.7", "gone": "1.0", "pip": "23.2.1"}
    latest = {"torch": "2.14.1", "filelock": "4.3.1", "new": "0.1", "pip": "26.3"}
    assert drift_rows(locked, latest) == [("filelock", "3.32.7", "4.3.1"), ("gone", "1.0", "-"), ("new", "-", "0.1")]
