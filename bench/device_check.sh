#!/usr/bin/env bash
# One-shot check on a GPU machine (H100/H200, no network), under 8 minutes in all:
#   1. environment (GPU, driver, torch, triton)      -> $OUT/env.txt
#   2. build treedec._cuda for this card              -> $OUT/build.log
#   3. pytest -m gpu (CUDA ops, Triton kernels compiled for real, GPU capture) -> $OUT/pytest_gpu.log
#   4. the Triton CPU-sized cases, compiled on the GPU -> $OUT/pytest_triton_small.log
#   5. python bench/kernels.py --device cuda          -> $OUT/bench.log (+ its CSV if it writes one)
# Each stage runs under `timeout`, gets what is left of the overall budget, and a failing stage
# does not stop the later ones. $OUT/summary.txt lists every stage's exit status and seconds.
# Assumes torch (CUDA), transformers and triton are already installed.
#
# Usage: OUT=/some/dir bash bench/device_check.sh      (from the repository root)
set -u

cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PYTHON="${PYTHON:-python}"
BUDGET_S="${BUDGET_S:-470}"  # total wall clock for all stages
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
STATUS=0

left() { echo $((BUDGET_S - ($(date +%s) - START))); }

# stage NAME LIMIT_S LOG CMD...: run CMD under timeout min(LIMIT_S, time left), log to LOG.
stage() {
  local name=$1 limit=$2 log=$3
  shift 3
  local remaining
  remaining=$(left)
  if [ "$remaining" -lt 10 ]; then
    echo "$name: skipped (budget spent)" | tee -a "$SUMMARY"
    return 0
  fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  local t0 rc
  t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  echo "$name: rc=$rc seconds=$(($(date +%s) - t0))$([ $rc -eq 124 ] && echo ' (timed out)')" | tee -a "$SUMMARY"
  return $rc
}

# 1. Environment
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv 2>&1
  nvcc --version 2>&1 | tail -1
  "$PYTHON" - <<'EOF' 2>&1
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
try:
    import triton
    print("triton", triton.__version__)
except ImportError as error:
    print("triton missing:", error)
EOF
  git log --oneline -1 2>&1
} >"$OUT/env.txt" 2>&1
echo "env: written" | tee -a "$SUMMARY"

# 2. Build the CUDA extension (offline: no index, no dependency resolution)
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
stage build 200 "$OUT/build.log" env TREEDEC_BUILD_CUDA=1 "$PYTHON" -m pip install --no-build-isolation --no-deps -e . || STATUS=1
"$PYTHON" -c "from treedec import _cuda; print('treedec._cuda', _cuda.__file__)" >>"$OUT/build.log" 2>&1 \
  || { echo "build: treedec._cuda does not import" | tee -a "$SUMMARY"; STATUS=1; }

# 3. GPU tests
stage pytest_gpu 180 "$OUT/pytest_gpu.log" "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider || STATUS=1

# 4. The interpreter-sized Triton cases, now compiled on the GPU (no TRITON_INTERPRET there)
stage pytest_triton_small 60 "$OUT/pytest_triton_small.log" \
  env -u TRITON_INTERPRET "$PYTHON" -m pytest tests/kernels/test_triton.py -m "not gpu" -q -p no:cacheprovider || STATUS=1

# 5. Microbenchmarks (tolerant of failure: whatever they print is kept)
BENCH_ARGS=(--device cuda)
if "$PYTHON" bench/kernels.py --help 2>/dev/null | grep -q -- "--out"; then
  BENCH_ARGS+=(--out "$OUT/kernels.csv")
fi
stage bench 120 "$OUT/bench.log" "$PYTHON" bench/kernels.py "${BENCH_ARGS[@]}" || true

echo "total: seconds=$(($(date +%s) - START)) status=$STATUS" | tee -a "$SUMMARY"
exit $STATUS
