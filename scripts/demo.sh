#!/usr/bin/env bash
# `make demo`: a real, small OPSD run on CPU. Builds a tiny Qwen3-architecture model and a locally trained
# tokenizer (opsd_megatron.tiny), trains it with TP=2 on two CPU processes (torchrun, gloo) on the shipped math
# set with vLLM rollouts, prints a summary table and leaves a Hugging Face checkpoint in runs/demo/hf.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/demo}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
rm -rf "$OUT"
mkdir -p "$OUT"
echo "== building a tiny Qwen3 model + tokenizer in $OUT/tiny-qwen3"
$PY -m opsd_megatron.tiny "$OUT/tiny-qwen3" --arch qwen3 --seed 0
echo "== OPSD: TP=2 on 2 CPU processes, vLLM rollouts (examples/tiny_cpu_demo.yaml)"
$PY -m torch.distributed.run --standalone --nproc-per-node 2 -m opsd_megatron.train examples/tiny_cpu_demo.yaml \
  output_dir="$OUT" model.path="$OUT/tiny-qwen3" "$@"
$PY - "$OUT" <<'PYEOF'
import sys
from opsd_megatron.metrics import read_metrics, summary_table
out = sys.argv[1]
rows = read_metrics(out)
keys = ["loss", "clipped_fraction", "rollout/accuracy", "rollout/response_length",
        "drift/mean_abs_logprob", "time/rollout_s", "time/teacher_s", "time/train_s", "time/refresh_s"]
print("\n== OPSD demo summary (metrics.jsonl)")
print(summary_table(rows, keys))
print(f"\nHF checkpoint: {out}/hf   (load with transformers.AutoModelForCausalLM.from_pretrained)")
PYEOF
