#!/usr/bin/env bash
# Builds spinal_ops/_C for a GPU machine on a machine without one, so that scripts/gpu_session.sh
# spends no GPU time compiling:
#   PYTHON=/path/to/python3.12 bash scripts/prebuild_gpu.sh
# PYTHON must have the GPU machine's Python minor version and torch build (the extension links
# against that torch's libraries and that Python's ABI). The library lands in spinal_ops/ as
# _C.cpython-3XX-...so; the kernels' register/shared-memory report lands in build/ptxas-sm90.log.
# It then loads the library in PYTHON (no GPU needed) and fails if it does not load.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export SPINAL_OPS_FORCE_CUDA=1
export MAX_JOBS=${MAX_JOBS:-2}
mkdir -p build
NVCC_APPEND_FLAGS="-Xptxas -v" "$PY" setup.py build_ext --inplace 2>&1 | tee build/ptxas-sm90.log | grep -E "error|warning: |^building" || true
ls -la spinal_ops/_C*.so
# Loading needs no GPU: a symbol that the GPU image's torch does not export fails here, not there.
PYTHONPATH="$PWD" "$PY" -W ignore -c 'import spinal_ops; s = spinal_ops.available_backends()["cpu"]; print("extension loads:", bool(s), s.reason); raise SystemExit(0 if s else 1)'
