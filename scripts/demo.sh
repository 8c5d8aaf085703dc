#!/usr/bin/env bash
# `make demo`: OPSD that you can see learn, on CPU.
#  1. the synthetic addition task (train / dev / test splits that never overlap: opsd_megatron.demo.synthetic;
#     dev is for choosing settings, test is reported and never used to choose anything);
#  2. the warm start: the tiny task model after SFT, shipped in opsd_megatron/demo/assets/warmstart (rebuilt by
#     `make warmstart`; WARMSTART=DIR uses another one);
#  3. evaluation of the warm start with opsd-eval on dev (the curve's step 0) and on test (the table's step 0);
#  4. OPSD: TP=2 on two CPU processes, vLLM rollouts, teacher = the warm start shown the reference solution,
#     dev evaluation every 25 steps (examples/synthetic_opsd.yaml);
#  5. the test evaluation of the result, the before/after table (95 % CIs) and plots.png next to metrics.jsonl;
#     exit 1, with the reason, when the gain's 95 % CI includes 0 (nothing measurable was learned).
# CONTROL=1 also runs the same OPSD with teacher.privileged=shuffled (the teacher's template with another
# training problem's reference solution). benchmarks/learning.py does this over 3 seeds.
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
echo "== synthetic task: $OUT/task/{train,dev,test}.jsonl"
$PY -c "from opsd_megatron.demo.warmstart import write_task; write_task('$OUT/task')"
cp -r "$WARMSTART" "$OUT/warmstart"
eval_args=(--n 4 --temperature 1.0 --top-p 0.95 --max-new-tokens 48 --no-thinking --seed 0 --max-model-len 256
  --dtype float32)
echo "== evaluation of the warm start on dev and test (opsd-eval)"
$PY -m opsd_megatron.eval --model "$OUT/warmstart" --benchmark "$OUT/task/dev.jsonl" "${eval_args[@]}" \
  --out-dir "$OUT/opsd/eval/step_000000"
$PY -m opsd_megatron.eval --model "$OUT/warmstart" --benchmark "$OUT/task/test.jsonl" "${eval_args[@]}" \
  --out-dir "$OUT/opsd/test/step_000000"
test_after() {  # $1 = run dir: its HF export on the test split, as test/step_<last step>
  local step
  step=$($PY -c "from opsd_megatron.observe.metrics import read_metrics; print(read_metrics('$1')[-1]['step'])")
  $PY -m opsd_megatron.eval --model "$1/hf" --benchmark "$OUT/task/test.jsonl" "${eval_args[@]}" \
    --out-dir "$1/test/step_$(printf %06d "$step")"
}

run_opsd() {  # $1 = run dir, rest = config overrides
  local dir=$1
  shift
  $PY -m torch.distributed.run --standalone --nproc-per-node 2 -m opsd_megatron.train examples/synthetic_opsd.yaml \
    output_dir="$dir" model.path="$OUT/warmstart" data.path="$OUT/task/train.jsonl" \
    eval.path="$OUT/task/dev.jsonl" "$@"
}
echo "== OPSD: TP=2 on 2 CPU processes, vLLM rollouts (examples/synthetic_opsd.yaml)"
run_opsd "$OUT/opsd" "$@"
test_after "$OUT/opsd"
runs=("OPSD=$OUT/opsd")
if [ "${CONTROL:-0}" = 1 ]; then
  echo "== control: the same run with teacher.privileged=shuffled"
  mkdir -p "$OUT/control/eval" "$OUT/control/test"
  cp -r "$OUT/opsd/eval/step_000000" "$OUT/control/eval/"
  cp -r "$OUT/opsd/test/step_000000" "$OUT/control/test/"
  run_opsd "$OUT/control" teacher.privileged=shuffled "$@"
  test_after "$OUT/control"
  runs+=("control (teacher.privileged=shuffled)=$OUT/control")
fi
if [ "${CONTROL:-0}" = 1 ]; then
  $PY -m opsd_megatron.observe.plots "$OUT/control" --title "control (teacher.privileged=shuffled)"
  $PY -m opsd_megatron.observe.plots "$OUT/opsd" --title OPSD --compare "control (teacher.privileged=shuffled)=$OUT/control"
else
  $PY -m opsd_megatron.observe.plots "$OUT/opsd" --title OPSD
fi
echo "HF checkpoint: $OUT/opsd/hf   (load with transformers.AutoModelForCausalLM.from_pretrained)"
echo
echo "== did it learn? (test split: never trained on, never used to choose settings; curve in plots.png: dev)"
$PY -m opsd_megatron.observe.learning --evals test --require-gain "${runs[@]}"
