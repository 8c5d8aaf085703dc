#!/usr/bin/env bash
# `make gpu-test`: every GPU check in one command, prepared for one 15-minute session on one H100/H200 with no
# network (docs/performance.md). Exits 1 when any check fails, raises, times out or misses its threshold
# (benchmarks/thresholds.py; OPSD_THRESHOLD_SCALE=0.01 makes every threshold fail, to see that they bite).
#   bash benchmarks/gpu_checks.sh [pytest] [loss] [bench] [step] [bench-tp2] [foundation] [refresh] [step-tiny] [moe]
# Default: pytest loss bench step (limits add up to < 12 min, expected ~6; a device call may last 10 min:
# give it timeout_s 600, and if it is cut, run CHECKS="pytest loss" and CHECKS="bench step" separately).
# Wheels the GPU image lacks (megatron-core 0.19.x, liger-kernel) are installed from .whl/ when present
# (`make gpu-wheels` fetches them; carry .whl).
# Logs: $OUT (or .gpu/logs). GPU_CHECKS_ALLOW_CPU=1 skips the GPU probe and the wheels (CPU smoke runs).
set -euo pipefail
OUT=${OUT:-.gpu/logs}
mkdir -p "$OUT"
PY=${PY:-python3}
if [ "${GPU_CHECKS_ALLOW_CPU:-0}" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRITON_DEFAULT_FP_FUSION=1
if [ "${GPU_CHECKS_ALLOW_CPU:-0}" != 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" \
    || { echo "FAIL: no GPU (nvidia-smi failed)"; exit 1; }
fi
"$PY" -c "
import os, torch, triton, megatron.core as m
print('torch', torch.__version__, 'triton', triton.__version__, 'mcore', m.__version__)
assert torch.cuda.is_available() or os.environ.get('GPU_CHECKS_ALLOW_CPU') == '1', 'FAIL: torch sees no CUDA device'
" | tee -a "$OUT/gpu.txt"
checks=("$@")
[ ${#checks[@]} -eq 0 ] && checks=(pytest loss bench step)
failed=()
for c in "${checks[@]}"; do
  case $c in
    pytest) cmd="$PY -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu.py"; lim=200 ;;
    loss) cmd="$PY benchmarks/gpu_loss_check.py"; lim=120 ;;
    bench) cmd="$PY benchmarks/bench_loss.py --device cuda"; lim=150 ;;
    step) cmd="$PY benchmarks/gpu_step_check.py"; lim=240 ;;
    bench-tp2) cmd="$PY benchmarks/bench_loss.py --device cuda --vocab 75968"; lim=150 ;;  # one TP=2 shard
    foundation) cmd="$PY benchmarks/gpu_foundation_check.py"; lim=200 ;;
    refresh) cmd="$PY benchmarks/bench_refresh.py"; lim=120 ;;
    step-tiny) cmd="$PY benchmarks/gpu_step_check.py --tiny --seq 128 --prompts 2 --reps 1"; lim=300 ;;
    moe) cmd="$PY benchmarks/bench_moe.py --gpu --world 1 --ep 1 --layers 2 --batch 1 --steps 2"; lim=240 ;;  # 30B-A3B layers
    *) echo "unknown check $c"; failed+=("$c(unknown)"); continue ;;
  esac
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
