#!/usr/bin/env bash
# The whole GPU check of the CUDA backend in one go, for a lent H100/H200 (no network):
#   OUT=/some/dir bash scripts/gpu_session.sh
# Steps (each logged under $OUT, each bounded so that the whole run stays under ~9 minutes):
#   1. pip install --no-build-isolation -e . (sm90 only, CUDA kernels forced on)  -> build.log
#   2. pytest tests/test_cuda_backend.py                                          -> pytest_cuda.log
#   3. pytest tests/test_triton_backend.py, if present                            -> pytest_triton.log
#   4. compute-sanitizer memcheck + racecheck over scripts/sanitize.py            -> sanitize.log
#   5. python -m spinal_ops.bench on CUDA, if the module exists    -> bench.log, bench_fused.json, bench_wide.json
# session.log gets the device, versions, each step's exit status and duration. At most 8 files
# land in $OUT (what the device tool brings back).
# The script always runs every step and exits non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the logs}"
mkdir -p "$OUT"
PY=${PYTHON:-python}
BUDGET_S=${BUDGET_S:-530}
START=$SECONDS
FAILED=0
LOG="$OUT/session.log"

log() { echo "[$((SECONDS - START))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - (SECONDS - START))); }

# step NAME LOGFILE TIMEOUT_S COMMAND...: runs COMMAND with a time limit, logs its status.
step() {
  local name=$1 logfile=$2 limit=$3
  shift 3
  if [ "$limit" -lt 20 ]; then
    log "SKIP $name: only ${limit}s of the budget left"
    FAILED=1
    return
  fi
  local t0=$SECONDS
  log "START $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/$logfile" 2>&1
  local rc=$?
  [ "$rc" -eq 0 ] || FAILED=1
  log "END $name rc=$rc in $((SECONDS - t0))s (log: $logfile)"
  tail -n 5 "$OUT/$logfile" | sed 's/^/    /' | tee -a "$LOG"
}

log "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
log "versions: $($PY -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1)"
log "triton: $($PY -c 'import triton; print(triton.__version__)' 2>&1 | tail -n 1)"
log "nvcc: $(${CUDA_HOME:-/usr/local/cuda}/bin/nvcc --version 2>&1 | tail -n 1)"

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export SPINAL_OPS_FORCE_CUDA=1
# -Xptxas -v: the register/smem/spill report of every kernel lands in build.log.
step build build.log 300 env NVCC_APPEND_FLAGS="-Xptxas -v" $PY -m pip install --no-build-isolation --no-deps -v -e .
# Without the CUDA kernels every CUDA test would skip and pass: make that a failure here.
step cuda_backend_available build.log 60 $PY -c \
  'import spinal_ops.dispatch as d; s = d.available_backends(); print(s); raise SystemExit(0 if s["cuda"] else 1)'

step pytest_cuda pytest_cuda.log "$(($(left) < 150 ? $(left) : 150))" \
  $PY -m pytest -q -rs --durations=10 tests/test_cuda_backend.py
if [ -f tests/test_triton_backend.py ]; then
  step pytest_triton pytest_triton.log "$(($(left) < 60 ? $(left) : 60))" \
    $PY -m pytest -q -rs tests/test_triton_backend.py
fi

SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}
if [ -x "$SANITIZER" ]; then
  step memcheck sanitize.log "$(($(left) < 75 ? $(left) : 75))" \
    "$SANITIZER" --tool memcheck --error-exitcode 1 $PY scripts/sanitize.py --batch 37 300
  step racecheck sanitize.log "$(($(left) < 60 ? $(left) : 60))" \
    "$SANITIZER" --tool racecheck --racecheck-report all --error-exitcode 1 $PY scripts/sanitize.py \
    --dtype bfloat16 float32 --batch 37
else
  log "SKIP sanitizer: compute-sanitizer not found (set SANITIZER=/path/to/compute-sanitizer)"
  FAILED=1
fi

if $PY -c 'import spinal_ops.bench' >/dev/null 2>&1; then
  BACKENDS="cuda reference compiled_reference dense"
  [ -f tests/test_triton_backend.py ] && BACKENDS="cuda triton reference compiled_reference dense"
  # Fused-path presets first (the issue's goals), the multi-launch ones (w = 512) with what is left;
  # one JSON each so that a timeout in the second keeps the first. Plots stay off $OUT (8-file limit).
  bench() {  # bench JSON_NAME LIMIT PRESET...
    local json=$1 limit=$2
    shift 2
    step "$json" bench.log "$limit" $PY -m spinal_ops.bench --device cuda --dtype bfloat16 --preset "$@" \
      --batch 1024 65536 --backends $BACKENDS --json "$OUT/$json.json" --plot "/tmp/$json.png" --no-progress
  }
  bench bench_fused "$(($(left) * 2 / 3))" mnist vgg5 cnn_cifar resnet_head
  bench bench_wide "$(($(left) - 10))" cifar_vgg vgg_head
else
  log "SKIP bench: spinal_ops.bench is not in this checkout"
fi

log "done in $((SECONDS - START))s, failed=$FAILED"
exit $FAILED
