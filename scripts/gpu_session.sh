#!/usr/bin/env bash
# The whole GPU check in one staged run, for a machine with an H100/H200 and no network:
#   OUT=/some/dir bash scripts/gpu_session.sh
#
# Stages run in order of value; each has its own time cap and writes its log (and JSON) under
# $OUT as soon as it ends, so a run cut short still returns what finished. At most 8 files land
# in $OUT:
#   1. build        use a prebuilt spinal_ops/_C*.so for this Python/torch if one loads with the
#                   CUDA kernels (scripts/prebuild_gpu.sh makes it on a machine without a GPU),
#                   else pip install -e . for sm_90                                  -> build.log
#   2. tests        pytest of the cuda backend, its training stages (dropout, batch norm) and CUDA
#                   graph capture (tests/test_cuda_graphs.py), then of
#                   the triton backend with its dropout (its kernels compile on first use:
#                   pytest-xdist spreads that over the cores)                        -> pytest.log
#      persistent   the persistent forward and backward launch 1 (one switch, SPINAL_OPS_CUDA_PERSISTENT=1,
#                   not yet measured): their pytest on CUDA tensors, then the cuda backend's bfloat16
#                   timings at w >= 256 (cnn_cifar, resnet_head, cifar_vgg; B = 64, 1024; infer, and
#                   train: the persistent pair at every width against the hoisted or tile pair) with
#                   the switch off, then on               -> pytest.log, bench.log (JSON in /tmp only)
#      lt           the hoisted chain on cuBLASLt (SPINAL_OPS_CUDA_LT=1, never run on a GPU before): its
#                   pytest (tests/test_cuda_lt.py), then the cuda backend's bfloat16 timings against dense
#                   on cifar_vgg, cnn_cifar, resnet_head at B = 1024, 65536 (infer and train) with the
#                   switch off, then on; SKIP_STAGES="pytest_lt lt_0 lt_1" leaves it out
#                                                        -> pytest.log, bench.log (JSON in /tmp only)
#      warp_narrow  the warp-level narrow forward and backward launch 1 (opt-in, one switch,
#                   SPINAL_OPS_CUDA_WARP_NARROW=1; never run on a GPU before): their pytest on CUDA
#                   tensors, then mnist bf16 train/infer timings (train: both kernels) at
#                   B = 64, 65536 against dense without and with the switch (the cost model picks the
#                   native path there); SKIP_STAGES="pytest_warp_narrow warp_narrow_0 warp_narrow_1"
#                   leaves it out                          -> pytest.log, bench.log (JSON in /tmp only)
#      triton       the Triton tests again with the tiled kernels switched on (SPINAL_OPS_TRITON_TILED=1),
#                   then bfloat16 train/infer timings (TRITON_PRESETS, default mnist vgg5 resnet_head
#                   cifar_vgg; B = 64, 65536, with dense for E): the one-block kernels (w <= 128) against cuda, then
#                   the tiled kernels against cuda in a second process (the switch is read at
#                   import); the ratios to cuda in the two tables decide whether the tiled kernels
#                   may become the default; SKIP_STAGES="pytest_triton_tiled triton_default
#                   triton_tiled" leaves it out                -> pytest.log, bench.log (JSON in /tmp only)
#   3. sanitize     compute-sanitizer on the native kernels (forced): memcheck, racecheck (split-K
#                   batch); initcheck of a torch matmul into a column block (does it see
#                   cuBLAS's writes there?) and of the hoisted chain's weight-gradient matmuls
#                   and copies in plain torch (scripts/initcheck_probe.py)
#   4. bench        bfloat16 presets (BENCH_PRESETS, default all) at B = 1, 64, 1024, 65536 in
#                   every mode against reference, dense and triton, each step also replayed from a
#                   CUDA graph (--cuda-graphs; BENCH_GRAPHS=0 leaves that out) -> bench.log, bench_bf16.json
#   5. profile      ncu's speed-of-light and occupancy sections for the native kernels (vgg5, bf16,
#                   B = 1024) and for the narrow kernels (mnist, bf16, B = 65536)
#                                                                                    -> sanitize.log
#   6. the rest     the host's share of a batch-64 step and of one op call, for the cuda and the
#                   triton backend (scripts/host_profile.py -> bench.log),
#                   torch.compile(reference) on two presets, float32 on three at B = 64, 65536
#                   (bench_compiled.json, bench_fp32.json); synccheck and initcheck of the native
#                   kernels, initcheck of the hoisted path                           -> sanitize.log
# The timings of both CUDA paths per case (scripts/cuda_paths.py, which the cost model is fitted
# to) run only when PATHS=1 (PATHS_ARGS: more arguments, e.g. "--preset mnist"); they add two
# files (paths.log, cuda_paths.json), so skip two JSON stages then to stay within 8.
# AB_BASE=dir times a kernel change against the build before it on the same machine: dir holds a
# copy of spinal_ops/ with that build's library (e.g. `cp -r spinal_ops .ab/base/` before
# rebuilding; carry it), and scripts/cuda_paths.py (AB_ARGS, default mnist at 8192 and 65536)
# runs on both builds in turn, twice                                               -> bench.log
# session.log gets the device, versions, each stage's exit status and
# duration. SKIP_STAGES="a b" leaves out the stages of those names (a rerun of what failed, within
# what device time is left). The script runs every stage that fits BUDGET_S and exits non-zero if
# any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the logs}"
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-400}
START=$SECONDS
FAILED=0
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

log() { echo "[$((SECONDS - START))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - (SECONDS - START))); }
cap() { local l; l=$(left); echo $((l < $1 ? l : $1)); }  # cap SECONDS: at most SECONDS, at most what is left

# stage NAME LOGFILE TIMEOUT_S COMMAND...: runs COMMAND with a time limit, logs its status.
stage() {
  local name=$1 logfile=$2 limit=$3
  shift 3
  if [[ " ${SKIP_STAGES:-} " == *" $name "* ]]; then
    log "SKIP $name: in SKIP_STAGES"
    return 1
  fi
  if [ "$limit" -lt 15 ]; then
    log "SKIP $name: only ${limit}s of the budget left"
    FAILED=1
    return 1
  fi
  local t0=$SECONDS
  log "START $name (limit ${limit}s): $*"
  echo "=== $name: $*" >>"$OUT/$logfile"
  timeout --kill-after=5 "$limit" "$@" >>"$OUT/$logfile" 2>&1
  local rc=$?
  [ "$rc" -eq 0 ] || FAILED=1
  log "END $name rc=$rc in $((SECONDS - t0))s (log: $logfile)"
  tail -n 4 "$OUT/$logfile" | sed 's/^/    /' | tee -a "$LOG"
  return $rc
}

log "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1)"
log "versions: $($PY -c 'import torch, triton, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' 2>&1 | tail -n 1)"

# 1. build ------------------------------------------------------------------------------------
CHECK_CUDA='import spinal_ops.dispatch as d; s = d.available_backends(); print({k: (bool(v), v.reason) for k, v in s.items()}); raise SystemExit(0 if s["cuda"] else 1)'
if ! stage prebuilt_extension build.log 30 $PY -c "$CHECK_CUDA"; then
  FAILED=0  # a missing prebuilt library is not a failure: build here instead
  rm -f spinal_ops/_C*.so
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} SPINAL_OPS_FORCE_CUDA=1
  stage build build.log "$(cap 220)" env NVCC_APPEND_FLAGS="-Xptxas -v" \
    $PY -m pip install --no-build-isolation --no-deps -e .
  # Without the CUDA kernels every CUDA test would skip and pass: stop here instead.
  stage cuda_backend_available build.log 30 $PY -c "$CHECK_CUDA" || { log "no CUDA backend: stopping"; exit 1; }
fi

# 2. tests ------------------------------------------------------------------------------------
PYTEST="$PY -m pytest -q -rfEs -p no:cacheprovider --durations=5 -n ${PYTEST_WORKERS:-8}"
stage pytest_cuda pytest.log "$(cap 100)" $PYTEST tests/test_cuda_backend.py tests/test_backends.py \
  -k "cuda or rejects_bad_input"  # -k: the cuda cases of test_backends.py, and every op's input checks
# The training stages on CUDA tensors: dropout on the hoisted pair and, forced, on the native
# kernels; batch norm on the normed pair (their CUDA cases skip elsewhere).
stage pytest_cuda_stages pytest.log "$(cap 60)" $PYTEST tests/test_dropout_ops.py tests/test_batchnorm_ops.py -k cuda
stage pytest_cuda_graphs pytest.log "$(cap 60)" $PYTEST tests/test_cuda_graphs.py
# The persistent forward and backward launch 1: correctness against the reference, then A/B against
# the default path (training included).
stage pytest_persistent pytest.log "$(cap 45)" $PYTEST tests/test_cuda_backend.py -k persistent
# switch_bench NAME VARIABLE VALUE LIMIT ARGS...: the cuda backend's bfloat16 timings with an opt-in
# kernel's switch set to VALUE, one process per setting (the JSON in /tmp, the tables in bench.log).
switch_bench() {
  local name=$1 variable=$2 value=$3 limit=$4
  shift 4
  stage "$name" bench.log "$limit" env "$variable=$value" $PY -m spinal_ops.bench --device cuda --dtype bfloat16 \
    --mode infer train --min-run-time 0.05 --no-progress --json "/tmp/$name.json" --plot "/tmp/$name.png" "$@"
}
for value in 0 1; do
  switch_bench "persistent_$value" SPINAL_OPS_CUDA_PERSISTENT $value "$(cap 25)" \
    --preset cnn_cifar resnet_head cifar_vgg --batch 64 1024 --backends cuda
done
# The hoisted chain on cuBLASLt (SPINAL_OPS_CUDA_LT=1, never run on a GPU before; the ops read the
# switch per call): its tests, then the cuda backend's bfloat16 timings against dense with the switch
# off, then on. The cuda rows differ only where the cost model runs the hoisted path (cifar_vgg
# always, the w = 256 presets where it picks hoisted); each record's floor_ms gives the share of a
# dense GEMM of the same FLOPs.
stage pytest_lt pytest.log "$(cap 60)" $PYTEST tests/test_cuda_lt.py
for value in 0 1; do
  switch_bench "lt_$value" SPINAL_OPS_CUDA_LT $value "$(cap 25)" \
    --preset cifar_vgg cnn_cifar resnet_head --batch 1024 65536 --backends cuda dense
done
stage pytest_triton pytest.log "$(cap 100)" $PYTEST tests/test_triton_backend.py tests/test_triton_dropout.py \
  tests/test_backends.py -k triton

# warp_narrow: the tests set the switch themselves (monkeypatch; the launchers read it per call). The
# A/B timing is one process per setting, ~20 s each: compare the cuda rows of its two tables in
# bench.log (infer: the forward; train: the forward and backward launch 1).
stage pytest_warp_narrow pytest.log "$(cap 90)" $PYTEST tests/test_cuda_backend.py -k warp_narrow
for value in 0 1; do
  switch_bench "warp_narrow_$value" SPINAL_OPS_CUDA_WARP_NARROW $value "$(cap 20)" \
    --preset mnist --batch 64 65536 --backends cuda dense
done

# triton: the tiled kernels (not yet measured; behind SPINAL_OPS_TRITON_TILED=1): their tests on
# CUDA, then their timings against the one-block kernels and cuda. Within the 8-file cap: logs go
# to pytest.log and bench.log, the JSON to /tmp.
triton_bench() {  # triton_bench NAME LIMIT TILED PRESETS...
  local name=$1 limit=$2 tiled=$3
  shift 3
  stage "$name" bench.log "$limit" env SPINAL_OPS_TRITON_TILED="$tiled" $PY -m spinal_ops.bench --device cuda \
    --dtype bfloat16 --preset "$@" --batch 64 65536 --mode train infer --backends triton cuda dense \
    --min-run-time 0.05 --no-progress --json "/tmp/$name.json" --plot "/tmp/$name.png"
}
stage pytest_triton_tiled pytest.log "$(cap 100)" env SPINAL_OPS_TRITON_TILED=1 $PYTEST tests/test_triton_tiled.py \
  tests/test_triton_backend.py tests/test_backends.py -k triton
triton_bench triton_default "$(cap 40)" 0 mnist vgg5  # the one-block kernels run w <= 128 only
triton_bench triton_tiled "$(cap 80)" 1 ${TRITON_PRESETS:-mnist vgg5 resnet_head cifar_vgg}

# 3.-5. sanitizer, benchmark, profile: ordered so that what a short run leaves out is what
# passed before on unchanged kernels (synccheck, initcheck of the native kernels) --------------------
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}
NCU=${NCU:-$(command -v ncu || echo "${CUDA_HOME:-/usr/local/cuda}/bin/ncu")}
SANITIZE="$PY scripts/sanitize.py --preset mnist vgg5 --path native"  # the hoisted path is cuBLAS
sanitize() {  # sanitize NAME LIMIT TOOL ARGS...
  if [ -x "$SANITIZER" ]; then
    local name=$1 limit=$2 tool=$3
    shift 3
    stage "$name" sanitize.log "$limit" "$SANITIZER" --tool "$tool" --error-exitcode 1 "$@"
  else
    log "SKIP $1: compute-sanitizer not found (set SANITIZER=/path/to/compute-sanitizer)"
    FAILED=1
  fi
}
bench() {  # bench NAME LIMIT ARGS...
  local name=$1 limit=$2
  shift 2
  stage "$name" bench.log "$limit" $PY -m spinal_ops.bench --device cuda --min-run-time 0.05 --no-progress \
    --json "$OUT/$name.json" --plot "/tmp/$name.png" "$@"
}

sanitize memcheck "$(cap 25)" memcheck $SANITIZE --dtype float32 bfloat16 --batch 37 300
# batch 300: the weight gradients take the split-K reduction
sanitize racecheck "$(cap 30)" racecheck --racecheck-report all $SANITIZE --dtype bfloat16 --batch 300
# Does initcheck see the writes of cuBLAS's kernels? A matmul into a column block of a buffer, as
# the hoisted chain's weight gradients are written, then a copy of the block; nothing of ours.
sanitize initcheck_cublas "$(cap 20)" initcheck $PY -c "import torch; a = torch.randn(37, 300, device='cuda', \
dtype=torch.bfloat16); buf = torch.empty(300, 90, device='cuda', dtype=torch.bfloat16); \
torch.mm(a.T, a[:, 10:50], out=buf[:, 20:60]); print(buf[:, 20:60].clone().float().sum().item())"
# The hoisted chain's own weight-gradient matmuls and layer-order copies (mnist shapes): reports
# here, and not from our code, mean initcheck misses those matmuls' writes.
sanitize initcheck_probe "$(cap 20)" initcheck --print-limit 4 $PY scripts/initcheck_probe.py

if [ "${PATHS:-0}" = 1 ]; then  # both CUDA paths per case: what the cost model is fitted to
  stage cuda_paths paths.log "$(cap 90)" $PY scripts/cuda_paths.py --json "$OUT/cuda_paths.json" \
    --batch 1 64 1024 8192 65536 ${PATHS_ARGS:-}
fi
if [ -n "${AB_BASE:-}" ]; then  # a kernel change against the build before it, alternating, same machine
  for round in 1 2; do
    for build in "$AB_BASE" "$PWD"; do
      stage "ab_round${round}" bench.log "$(cap 40)" env PYTHONPATH="$build" $PY scripts/cuda_paths.py \
        --json "/tmp/ab_round${round}_$(basename "$build").json" ${AB_ARGS:---preset mnist --batch 8192 65536}
    done
  done
fi
GRAPHS_FLAG=$([ "${BENCH_GRAPHS:-1}" = 1 ] && echo --cuda-graphs)
bench bench_bf16 "$(cap 110)" --dtype bfloat16 --preset ${BENCH_PRESETS:-all} --batch 1 64 1024 65536 \
  --backends cuda triton reference dense $GRAPHS_FLAG

# where the native kernels' time goes (no clock control: the card is left as found)
if [ -x "$NCU" ]; then
  stage ncu sanitize.log "$(cap 40)" "$NCU" --clock-control none --section SpeedOfLight --section Occupancy \
    -k regex:spinal_ --launch-skip 3 --launch-count 3 $PY scripts/sanitize.py --preset vgg5 --dtype bfloat16 \
    --path native --batch 1024 1024
  # the narrow kernels (one thread per row) where they matter: mnist, large batch (the first
  # case's data-gradient launch, the second case's forward)
  stage ncu_narrow sanitize.log "$(cap 40)" "$NCU" --clock-control none --section SpeedOfLight --section Occupancy \
    -k regex:spinal_narrow --launch-skip 1 --launch-count 2 $PY scripts/sanitize.py --preset mnist --dtype bfloat16 \
    --path native --batch 65536 65536
else
  log "SKIP ncu: not found (set NCU=/path/to/ncu)"
fi

# where a small batch's time goes on the host (torch.profiler's CPU table, cuda and dense)
stage host_profile bench.log "$(cap 40)" $PY scripts/host_profile.py --preset mnist vgg5 --batch 64
# the triton backend's host time per call and per training step (its kernels compile on first use)
stage host_profile_triton bench.log "$(cap 40)" $PY scripts/host_profile.py --backend triton --preset mnist vgg5 \
  --batch 64 --split-only
bench bench_compiled "$(cap 100)" --dtype bfloat16 --preset mnist vgg5 --batch 64 1024 65536 --mode train infer \
  --backends cuda compiled_reference dense
bench bench_fp32 "$(cap 90)" --dtype float32 --preset mnist vgg5 resnet_head --batch 64 65536 --mode train infer \
  --backends cuda reference dense
sanitize synccheck "$(cap 25)" synccheck $SANITIZE --dtype bfloat16 --batch 37 300
sanitize initcheck "$(cap 25)" initcheck $SANITIZE --dtype bfloat16 --batch 37
# the hoisted path (ATen and cuBLAS calls): its first reports, if any, with their stacks
sanitize initcheck_hoisted "$(cap 30)" initcheck --print-limit 4 --show-backtrace yes $PY scripts/sanitize.py --preset mnist --path hoisted \
  --dtype bfloat16 --batch 37

log "done in $((SECONDS - START))s, failed=$FAILED"
exit $FAILED
