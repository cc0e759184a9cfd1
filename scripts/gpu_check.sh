#!/usr/bin/env bash
# One-call GPU harness: build the CUDA extension (timed), run the GPU tests, compute-sanitizer
# (memcheck over the kernel tests, racecheck over the kernels with shared memory), then the benchmark
# suite and the report. Everything lands in RESULTS_DIR:
#   build.log tests.log sanitizer.log bench.log results.jsonl BENCHMARKS.md causal_conv1d.png summary.json
#
#   scripts/gpu_check.sh [RESULTS_DIR]        (default: $OUT if set, else ./results)
#
# Env: PYTHON (default python3), MAX_JOBS (default: nproc), TORCH_CUDA_ARCH_LIST (default 8.0;9.0+PTX),
#      BENCHES (default: every benchmarks/bench_*.py), BENCH_ARGS (extra arguments for every benchmarks/bench_*.py, e.g. --sweep),
#      GPU_TESTS (default: tests, i.e. every `-m gpu` test), SKIP_SANITIZER=1, SKIP_BENCH=1, SKIP_PEERS=1.
# Peers: if .peers/causal_conv1d-1.7.0 (source, from benchmarks/fetch_peers.sh) exists it is built for sm_90 in the background while the
# tests run, and benchmarked beside ours. Everything takes longer than one 10-minute device call (the GPU tests
# alone: ~215 s on an H200, ~330 s on an H100; the generate grid 200-260 s): split it, e.g. SKIP_BENCH=1 for
# build + tests + sanitizer, then SKIP_SANITIZER=1 GPU_TESTS=tests/test_generation_gpu.py BENCHES=... for the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${1:-${OUT:-./results}}
mkdir -p "$RES"
RES=$(cd "$RES" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # in-place build: benchmarks and tests import the tree
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
T0=$(date +%s)
declare -A STATUS SECS
step() {  # step NAME LOGFILE TIMEOUT CMD...: run, record status and seconds
  local name=$1 log=$2 to=$3; shift 3
  local s=$(date +%s)
  echo "=== [$name] $* (timeout ${to}s) $(date -u +%H:%M:%S)" | tee -a "$log"
  timeout "$to" "$@" >>"$log" 2>&1
  local rc=$?
  SECS[$name]=$(( $(date +%s) - s ))
  STATUS[$name]=$rc
  echo "=== [$name] rc=$rc in ${SECS[$name]}s" | tee -a "$log"
  return $rc
}

# ---- 0. machine ------------------------------------------------------------------------------------
{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.limit --format=csv
  nvcc --version | tail -2; echo "preset TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<unset>}"; $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
  echo "MAX_JOBS=$MAX_JOBS nproc=$(nproc)"; } >"$RES/build.log" 2>&1

# ---- 1. build (timed; clean) --------------------------------------------------------------------------
rm -rf build aim_kernels/_C*.so
TORCH_CUDA_ARCH_LIST=9.0 step build_sm90 "$RES/build.log" 300 env AIM_KERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 \
  $PY setup.py build_ext --inplace
rm -rf build aim_kernels/_C*.so
# the project default (the device image may preset TORCH_CUDA_ARCH_LIST; override with BUILD_ARCHS)
step build_default "$RES/build.log" 300 env AIM_KERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${BUILD_ARCHS:-8.0;9.0+PTX}" \
  $PY setup.py build_ext --inplace
step info "$RES/build.log" 60 $PY -m aim_kernels.info

# ---- 2. peers in the background (their own log) ------------------------------------------------------
PEER_PID=
if $PY -c 'import importlib.metadata as m, causal_conv1d_cuda; assert m.version("causal_conv1d") == "1.7.0"' 2>/dev/null; then
  echo "=== [peer build] causal-conv1d 1.7.0 already installed: not rebuilt" >"$RES/peer_build.tmp"
  PEER_PID=0
elif [ -d .peers/causal_conv1d-1.7.0 ] && [ -z "${SKIP_PEERS:-}" ]; then
  bash benchmarks/fetch_peers.sh --patch >"$RES/peer_build.tmp" 2>&1
  ( s=$(date +%s)
    cd .peers/causal_conv1d-1.7.0 && rm -rf build && \
    CAUSAL_CONV1D_ONLY_ARCHS=90 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$MAX_JOBS CAUSAL_CONV1D_FORCE_BUILD=TRUE \
      timeout 420 $PY -m pip install --no-build-isolation --no-deps --no-cache-dir -v .
    echo "=== [peer build] rc=$? in $(( $(date +%s) - s ))s" ) >>"$RES/peer_build.tmp" 2>&1 &
  PEER_PID=$!
fi

# ---- 3. GPU tests ------------------------------------------------------------------------------------
export AIM_KERNELS_REQUIRE_CUDA_EXT=1
step gpu_tests "$RES/tests.log" 420 $PY -m pytest -m gpu ${GPU_TESTS:-tests} -q -rfE -p no:cacheprovider

# ---- 4. compute-sanitizer ------------------------------------------------------------------------------
KERNEL_TESTS="tests/test_causal_conv1d.py tests/test_decode.py::test_triton_gpu_steps tests/test_decode.py::test_triton_gpu_out_proj
  tests/test_norm_triton.py tests/test_sampling_triton.py tests/test_gemv.py::test_prologue_cuda
  tests/test_group_norm.py::test_cuda_large_mean tests/test_replay.py::test_triton_gpu_steps tests/test_replay.py::test_fused_triton_gpu_steps
  tests/test_ssm.py::test_state_update_triton_gpu_mamba1 tests/test_gemv.py::test_gemm_cuda tests/test_elementwise.py"  # no CUDA-graph tests: capture needs the caching allocator
SMEM_TESTS_K="bwd or (gemm_cuda and 999)"  # shared memory: the conv backward's block reduction, the GEMM's pipeline
if [ -z "${SKIP_SANITIZER:-}" ]; then
  CS=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 step memcheck "$RES/sanitizer.log" 300 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$CS" --tool memcheck --error-exitcode 99 --print-limit 20 \
    $PY -m pytest -m gpu $KERNEL_TESTS -q -x -p no:cacheprovider -k "not opcheck and not aim_shapes and not falls_back"
  step racecheck "$RES/sanitizer.log" 150 "$CS" --tool racecheck --racecheck-report all --error-exitcode 99 --print-limit 20 \
    $PY -m pytest -m gpu $KERNEL_TESTS -q -x -p no:cacheprovider -k "$SMEM_TESTS_K and not opcheck and not aim_shapes"
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Hazard|Invalid|passed|failed" "$RES/sanitizer.log" | tail -20
fi

# ---- 5. benchmarks -------------------------------------------------------------------------------------
if [ -n "$PEER_PID" ]; then
  [ "$PEER_PID" != 0 ] && wait "$PEER_PID"
  cat "$RES/peer_build.tmp" >>"$RES/bench.log"; rm -f "$RES/peer_build.tmp"
  grep "=== \[peer build\]" "$RES/bench.log"
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  for b in ${BENCHES:-benchmarks/bench_*.py}; do
    step "bench_$(basename "$b" .py)" "$RES/bench.log" 240 $PY "$b" --out "$RES/results.jsonl" ${BENCH_ARGS:-}
  done
  step report "$RES/bench.log" 60 $PY benchmarks/report.py --md "$RES/BENCHMARKS.md" --plot-dir "$RES"
fi

# ---- summary ---------------------------------------------------------------------------------------------
{
  echo "{"
  echo "  \"total_s\": $(( $(date +%s) - T0 )),"
  echo "  \"max_jobs\": $MAX_JOBS,"
  for k in "${!STATUS[@]}"; do echo "  \"$k\": {\"rc\": ${STATUS[$k]}, \"seconds\": ${SECS[$k]}},"; done
  echo "  \"gpu\": \"$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)\""
  echo "}"
} >"$RES/summary.json"
cat "$RES/summary.json"
grep -E "passed|failed|error" "$RES/tests.log" | tail -6
fail=0
for k in "${!STATUS[@]}"; do [ "${STATUS[$k]}" != 0 ] && { echo "FAILED step: $k (rc ${STATUS[$k]})"; fail=1; }; done
exit $fail
