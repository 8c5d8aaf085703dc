#!/usr/bin/env bash
# One prepared GPU session (H100/H200, no network): install carried wheels (megatron-core 0.19.x, liger-kernel),
# then run each GPU check with its own time limit, logging to $OUT (or ./gpu_logs).
#   bash benchmarks/gpu_checks.sh [foundation] [loss] [step] [refresh]
set -u
OUT=${OUT:-./gpu_logs}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'mcore', m.__version__)" | tee -a "$OUT/gpu.txt"
checks=("$@"); [ ${#checks[@]} -eq 0 ] && checks=(foundation loss step)
for c in "${checks[@]}"; do
  case $c in
    foundation) cmd="python3 benchmarks/gpu_foundation_check.py"; lim=200 ;;
    loss) cmd="python3 benchmarks/bench_loss.py"; lim=200 ;;
    step) cmd="python3 benchmarks/gpu_step_check.py"; lim=200 ;;
    refresh) cmd="python3 benchmarks/bench_refresh.py"; lim=120 ;;
    *) echo "unknown check $c"; continue ;;
  esac
  echo "=== $c: $cmd (limit ${lim}s)"
  start=$(date +%s)
  timeout "$lim" $cmd 2>&1 | tee "$OUT/$c.log"
  echo "=== $c: rc=${PIPESTATUS[0]} in $(( $(date +%s) - start ))s"
done
