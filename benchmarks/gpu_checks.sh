#!/usr/bin/env bash
# `make gpu-test`: every GPU check in one command, prepared for one 15-minute session on one H100/H200 with no
# network (docs/performance.md). Exits 1 when any check fails, raises, times out or misses its threshold
# (benchmarks/thresholds.py; OPSD_THRESHOLD_SCALE=0.01 makes every threshold fail, to see that they bite).
#   bash benchmarks/gpu_checks.sh [pytest] [loss] [bench] [step] [bench-tp2] [foundation] [refresh] [step-tiny] [moe]
#   bash benchmarks/gpu_checks.sh --plan [checks...]   # print the checks, commands, limits and total; no run
# Default: pytest loss bench step, whose limits add up to 480 s: one 600-s device call (timeout_s 600) with
# 120 s for start-up and wheels. The checks named must fit GPU_CHECKS_BUDGET_S (default 480) or nothing runs.
# pytest runs with OPSD_GPU_STRICT_SKIPS=1: a skipped GPU test fails the run unless tests/gpu_skips.py lists
# it with its reason (no Transformer Engine / no vLLM on the lent image).
# Wheels the GPU image lacks (megatron-core 0.19.x, liger-kernel) are installed from .whl/ when present
# (`make gpu-wheels` fetches them; carry .whl).
# Logs: $OUT (or .gpu/logs). GPU_CHECKS_ALLOW_CPU=1 skips the GPU probe and the wheels (CPU smoke runs).
set -euo pipefail
plan=0
if [ "${1:-}" = --plan ]; then plan=1; shift; fi
BUDGET=${GPU_CHECKS_BUDGET_S:-480}
checks=("$@")
[ ${#checks[@]} -eq 0 ] && checks=(pytest loss bench step)
PY=${PY:-python3}
check_cmd() {  # sets cmd and lim for check $1; returns 1 for an unknown name
  case $1 in
    pytest) cmd="$PY -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu.py"; lim=150 ;;
    loss) cmd="$PY benchmarks/gpu_loss_check.py"; lim=80 ;;
    bench) cmd="$PY benchmarks/bench_loss.py --device cuda"; lim=70 ;;
    step) cmd="$PY benchmarks/gpu_step_check.py --prompts 4 --reps 2"; lim=180 ;;
    bench-tp2) cmd="$PY benchmarks/bench_loss.py --device cuda --vocab 75968"; lim=70 ;;  # one TP=2 shard
    foundation) cmd="$PY benchmarks/gpu_foundation_check.py"; lim=200 ;;
    refresh) cmd="$PY benchmarks/bench_refresh.py"; lim=120 ;;
    step-tiny) cmd="$PY benchmarks/gpu_step_check.py --tiny --seq 128 --prompts 2 --reps 1"; lim=120 ;;
    moe) cmd="$PY benchmarks/bench_moe.py --gpu --world 1 --ep 1 --layers 2 --batch 1 --steps 2"; lim=240 ;;
    *) return 1 ;;
  esac
}
total=0
for c in "${checks[@]}"; do
  if check_cmd "$c"; then
    total=$((total + lim))
    [ $plan = 1 ] && printf '%-11s %4ss  %s\n' "$c" "$lim" "$cmd"
  else
    echo "unknown check $c"; exit 1
  fi
done
echo "limits total ${total}s (budget ${BUDGET}s)"
if [ "$total" -gt "$BUDGET" ]; then
  echo "FAIL: the limits of '${checks[*]}' add up to ${total}s > ${BUDGET}s: split them over two calls"
  exit 1
fi
[ $plan = 1 ] && exit 0
OUT=${OUT:-.gpu/logs}
mkdir -p "$OUT"
if [ "${GPU_CHECKS_ALLOW_CPU:-0}" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRITON_DEFAULT_FP_FUSION=1
export OPSD_GPU_STRICT_SKIPS=1
if [ "${GPU_CHECKS_ALLOW_CPU:-0}" != 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" \
    || { echo "FAIL: no GPU (nvidia-smi failed)"; exit 1; }
fi
"$PY" -c "
import os, torch, triton, megatron.core as m
print('torch', torch.__version__, 'triton', triton.__version__, 'mcore', m.__version__)
assert torch.cuda.is_available() or os.environ.get('GPU_CHECKS_ALLOW_CPU') == '1', 'FAIL: torch sees no CUDA device'
" | tee -a "$OUT/gpu.txt"
failed=()
for c in "${checks[@]}"; do
  check_cmd "$c"
  echo "=== $c: $cmd (limit ${lim}s)"
  start=$(date +%s)
  rc=0
  timeout "$lim" $cmd 2>&1 | tee "$OUT/$c.log" || rc=$?
  echo "=== $c: rc=$rc in $(( $(date +%s) - start ))s"
  [ "$rc" -eq 0 ] || failed+=("$c(rc=$rc)")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu-test FAILED: ${failed[*]} (logs in $OUT)"
  exit 1
fi
echo "gpu-test PASSED: ${checks[*]}"
