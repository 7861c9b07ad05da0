#!/usr/bin/env bash
# The real path on one GPU (bench/gpu_check.py): CUDA detection, fsseg-predict with AMP on SwinUNETR-48 over a
# 512x512x400 CT against the CPU, fsseg-adapt lp/adapter/ft at K=1, torchrun --nproc_per_node=1 pretraining with
# NCCL killed and resumed. About 8 minutes on an H200; writes bench/results/gpu_check.json.
#
#   bash bench/gpu_check.sh                       # fsseg's dependencies installed, a CUDA GPU visible
#   FSSEG_WHEELS=.whl bash bench/gpu_check.sh     # install missing packages (monai, nibabel) from wheels first
#   bash bench/gpu_check.sh --smoke               # the same steps on the CPU with tiny sizes: checks the script
# PYTHON picks the interpreter (default python3); FSSEG_GPU_CHECK_TIMEOUT the limit in seconds (default 480).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${FSSEG_WHEELS:-}" ]; then
  "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fsseg-site \
    "$FSSEG_WHEELS"/*.whl
  export PYTHONPATH=/tmp/fsseg-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout "${FSSEG_GPU_CHECK_TIMEOUT:-480}" "$PYTHON" bench/gpu_check.py "$@"
