#!/usr/bin/env bash
# scripts/gpu_check.py on a machine that has Python 3.12 and a CUDA torch of its own but no network
# and no lmms-eval (a lent GPU: see README "On a GPU"). The packages it lacks travel as wheels in
# .whl/ (`make gpu-wheels` writes them here); they and this project go into a folder of their own
# in front of the machine's site-packages, so its torch stays and nothing of it is changed.
#     bash scripts/gpu_check_image.sh OUT_DIR [gpu_check.py arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash scripts/gpu_check_image.sh OUT_DIR [gpu_check.py arguments]}
shift
python=${PYTHON:-python3}
# "site-packages" in the name matters: dill (datasets' map with num_proc, which lmms-eval's GQA
# task runs) pickles modules from any other folder by value, and fails on multiprocess's.
site=${VTW_SITE:-/tmp/vtw_eval/site-packages}
ls .whl/*.whl > /dev/null || { echo ".whl/ holds no wheels: run \`make gpu-wheels\` where pip reaches PyPI" >&2; exit 2; }
rm -rf "$site"
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
"$python" -m pip install -q --no-index --no-deps --no-compile --no-build-isolation --target "$site" .
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
"$python" -c 'import torch, transformers, lmms_eval; print(f"torch {torch.__version__} (CUDA {torch.cuda.is_available()}), transformers {transformers.__version__}")'
exec "$python" scripts/gpu_check.py --out "$out" "$@"
