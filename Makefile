# Quick start: `make demo` (main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install lock check-latest testbed-cache demo test

# Exactly the lock, nothing resolved: a fresh venv, every locked package without its dependencies,
# then the project itself (no build isolation: the locked setuptools builds it), then pip's check
# that the set is consistent.
$(VENV)/.installed: requirements.lock pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-deps -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

install: $(VENV)/.installed

# Re-resolve pyproject.toml with pip and rewrite requirements.lock (commit it with the change).
lock:
	$(PYTHON) scripts/lock.py

# The newest versions the pyproject ranges allow, in a throwaway venv: smoke tests and what moved.
check-latest: install
	$(PY) scripts/check_latest.py

# The testbed's data under the built-in tasks' hub ids, in a cache folder of this project's.
results/hf_home/.written: $(VENV)/.installed vtw_eval/testbed/hub_cache.py $(wildcard testbed/data/*/test/*.arrow)
	$(PY) scripts/make_testbed_cache.py --hf-home results/hf_home
	touch $@

testbed-cache: results/hf_home/.written

demo: install testbed-cache
	$(PY) scripts/demo.py

test: install
	$(PY) -m pytest -q
