#!/usr/bin/env bash
# `make demo`: OPSD that you can see learn, on CPU.
#  1. the synthetic addition task (train / held-out splits that never overlap: opsd_megatron.demo.synthetic);
#  2. the warm start: the tiny task model after SFT, shipped in opsd_megatron/demo/assets/warmstart (rebuilt by
#     `make warmstart`; WARMSTART=DIR uses another one);
#  3. held-out evaluation of the warm start with opsd-eval (Avg@n, the run's step 0);
#  4. OPSD: TP=2 on two CPU processes, vLLM rollouts, teacher = the warm start shown the reference solution,
#     held-out evaluation every 25 steps (examples/synthetic_opsd.yaml);
#  5. the before/after table (95 % CIs) and plots.png next to metrics.jsonl.
# CONTROL=1 also runs the same OPSD with teacher.privileged=false (teacher prompt = student prompt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/demo}
WARMSTART=${WARMSTART:-opsd_megatron/demo/assets/warmstart}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
if [ ! -f "$WARMSTART/model.safetensors" ]; then
  echo "error: no warm start in $WARMSTART (run \`make warmstart\`, or set WARMSTART=DIR)" >&2
  exit 1
fi
# Only what this script writes (another run under $OUT, e.g. a tiny demo, is left alone).
rm -rf "$OUT/task" "$OUT/warmstart" "$OUT/opsd" "$OUT/control"
mkdir -p "$OUT"
echo "== synthetic task: $OUT/task/{train,heldout}.jsonl"
$PY -c "from opsd_megatron.demo.warmstart import write_task; write_task('$OUT/task')"
cp -r "$WARMSTART" "$OUT/warmstart"
eval_args=(--benchmark "$OUT/task/heldout.jsonl" --n 4 --temperature 1.0 --top-p 0.95 --max-new-tokens 48
  --no-thinking --seed 0 --max-model-len 256 --dtype float32)
echo "== held-out evaluation of the warm start (opsd-eval)"
$PY -m opsd_megatron.eval --model "$OUT/warmstart" "${eval_args[@]}" --out-dir "$OUT/opsd/eval/step_000000"

run_opsd() {  # $1 = run dir, rest = config overrides
  local dir=$1
  shift
  $PY -m torch.distributed.run --standalone --nproc-per-node 2 -m opsd_megatron.train examples/synthetic_opsd.yaml \
    output_dir="$dir" model.path="$OUT/warmstart" data.path="$OUT/task/train.jsonl" \
    eval.path="$OUT/task/heldout.jsonl" "$@"
}
echo "== OPSD: TP=2 on 2 CPU processes, vLLM rollouts (examples/synthetic_opsd.yaml)"
run_opsd "$OUT/opsd" "$@"
runs=("OPSD=$OUT/opsd")
if [ "${CONTROL:-0}" = 1 ]; then
  echo "== control: the same run with teacher.privileged=false"
  mkdir -p "$OUT/control/eval"
  cp -r "$OUT/opsd/eval/step_000000" "$OUT/control/eval/"
  run_opsd "$OUT/control" teacher.privileged=false "$@"
  runs+=("control (teacher.privileged=false)=$OUT/control")
fi
echo
echo "== did it learn? (held-out = problems never trained on)"
$PY -m opsd_megatron.observe.learning "${runs[@]}"
if [ "${CONTROL:-0}" = 1 ]; then
  $PY -m opsd_megatron.observe.plots "$OUT/control" --title "control (teacher.privileged=false)"
  $PY -m opsd_megatron.observe.plots "$OUT/opsd" --title OPSD --compare "control (teacher.privileged=false)=$OUT/control"
else
  $PY -m opsd_megatron.observe.plots "$OUT/opsd" --title OPSD
fi
echo "HF checkpoint: $OUT/opsd/hf   (load with transformers.AutoModelForCausalLM.from_pretrained)"
