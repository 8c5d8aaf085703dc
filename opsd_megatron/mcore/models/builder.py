"""Build Megatron-core `GPTModel` chunks for this rank from an HF config (Llama 3.x, Qwen2/2.5, Qwen3,
Qwen3-MoE).

    ps = opsd_megatron.mcore.parallel.initialize(tp=2, pp=2)
    chunks = build_model("path/to/hf_dir", dtype=torch.bfloat16)        # list[GPTModel], one per chunk
    load_hf_weights(chunks, "path/to/hf_dir")                            # opsd_megatron.mcore.conversion

Forward (per chunk; see `models/forward.py` for a pipelined helper):
    out = chunk(input_ids, position_ids, attention_mask=None)
      input_ids     [b, s] int64 (used on the first stage only; other stages get `chunk.set_input_tensor(h)`)
      position_ids  [b, s] int64; NOTE Megatron's RoPE ignores them and uses 0..s-1 for every row, so
                    rows must start at position 0 (right padding / no left padding)
      attention_mask None = causal (the layer spec's mask type); or a bool [b, 1, s, s], True = masked out
      returns       last stage: logits [b, s, v_padded / tp] (vocab-parallel: TP rank r holds rows
                    [r*v_padded/tp, (r+1)*v_padded/tp) of the padded vocabulary; entries >= vocab_size are
                    padding, logit 0, and must be masked — see `vocab.py`);
                    other stages: hidden states [s, b, h].
Each chunk carries `chunk.opsd_info` (`ModelInfo`): the HF spec, raw HF config, true/padded vocab sizes.
Layer spec: `model.use_te` (auto: Transformer Engine when it imports, the reason logged once when not;
true: TE or a clear error; false: Megatron's local spec), see `resolve_use_te`.
Qwen3-MoE: MoE layers (router + experts, `models/moe.py`) where the HF config puts them, dense MLPs
elsewhere; experts are split over the expert-parallel group (`parallel.initialize(ep=...)`).
"""

from __future__ import annotations

import dataclasses
import logging
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as mps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt import gpt_layer_specs as gls
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from opsd_megatron.config import ConfigError
from opsd_megatron.config.schema import UseTE, choice_text, is_choice
from opsd_megatron.mcore import parallel
from opsd_megatron.mcore.layout import check_pipeline_layers
from opsd_megatron.mcore.models.cp_attention import AllGatherCPAttention
from opsd_megatron.mcore.models.hf_config import ModelSpec, parse_hf_config, rope_inv_freq
from opsd_megatron.mcore.models.moe import check_moe_divisibility, moe_config_kwargs
from opsd_megatron.mcore.models.norm import SequenceParallelRMSNorm, replace_norms
from opsd_megatron.mcore.models.tp_attributes import mark_tensor_parallel_weights

log = logging.getLogger(__name__)


@dataclass
class ModelInfo:
    """What a model chunk knows about its origin; attached as `chunk.opsd_info`."""

    spec: ModelSpec
    hf_config: dict = field(repr=False)
    vocab_size: int  # true vocabulary size (HF)
    padded_vocab_size: int  # Megatron's padded size (divisible by make_vocab_size_divisible_by * tp)
    tp: int
    pp: int
    dtype: torch.dtype
    use_te: bool
    vp_stage: int | None = None
    ep: int = 1  # expert-parallel size (MoE)
    etp: int = 1  # expert tensor-parallel size (MoE)


_OPTIONAL_CONFIG_KEYS = {
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "masked_softmax_fusion",
    "persist_layer_norm",
    "apply_rope_fusion",
    "gradient_accumulation_fusion",
    "pipeline_dtype",
}


_LOGGED: set[str] = set()  # messages said once per process

_TE_STATUS: list = []  # [None] when Transformer Engine imports, else [why not]; filled on first use


def te_import_error() -> str | None:
    """None when `transformer_engine.pytorch` imports, else why not ("ExceptionType: message"); cached."""
    if not _TE_STATUS:
        try:
            import transformer_engine.pytorch  # noqa: F401 (optional heavy dependency: Transformer Engine)

            _TE_STATUS.append(None)
        except Exception as e:  # noqa: BLE001 - ImportError, but also CUDA/ABI errors raised at import
            _TE_STATUS.append(
                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            )
    return _TE_STATUS[0]


def have_te() -> bool:
    """True when Transformer Engine imports (then its fused layer spec can be used)."""
    return te_import_error() is None


def resolve_use_te(setting: UseTE | str | None = "auto") -> bool:
    """`model.use_te` (`config.UseTE`: "auto", True or False; None and the strings "true"/"false" are read
    as those) -> whether to build the TE layer spec. "auto": TE when it imports, else Megatron's local
    spec, and the reason TE did not import is logged once; True: TE, or a RuntimeError saying why it cannot
    be imported; False: the local spec."""
    choice = "auto" if setting is None else setting
    if isinstance(choice, str) and choice.lower() in ("true", "false"):
        choice = choice.lower() == "true"
    if not is_choice(choice, typing.get_args(UseTE)):
        raise ValueError(f"model.use_te must be {choice_text(typing.get_args(UseTE))}, got {setting!r}.")
    if choice is False:
        return False
    why = te_import_error()
    if choice is True and why is not None:
        raise RuntimeError(f"model.use_te=true but transformer_engine.pytorch does not import: {why}")
    if why is not None and not _TE_STATUS[1:]:
        _TE_STATUS.append("logged")
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        say = log.warning if rank == 0 else log.debug  # once per job, not once per rank
        say("Transformer Engine not used (model.use_te=auto): import failed with %s; "
            "building Megatron's local layer spec.", why)  # fmt: skip
    return why is None


def check_context_parallel(cp: int, *, pp: int = 1, is_moe: bool = False) -> None:
    """`parallel.cp` at start-up: 1 passes; > 1 runs Megatron's load-balanced context parallelism, with
    Transformer Engine's attention when TE imports, else `models.cp_attention.AllGatherCPAttention` in the
    local spec. Refused with one `ConfigError`: CP with pipeline parallelism or a mixture-of-experts model
    (neither path is implemented nor tested with CP)."""
    if cp <= 1:
        return
    if pp > 1:
        raise ConfigError(f"config key 'parallel.cp': {cp} with parallel.pp {pp} is not supported; use pp 1.")
    if is_moe:
        raise ConfigError(f"config key 'parallel.cp': {cp} is not supported with a mixture-of-experts model.")


def _pad_vocab(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's padding: the smallest multiple of `divisible_by * tp` that is >= vocab_size."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


padded_vocab_size = _pad_vocab


def _check_divisibility(
    spec: ModelSpec, tp: int, pp: int, pipeline_layers: list[int] | None, ep: int = 1, etp: int = 1
) -> None:
    for name, value in (
        ("num_attention_heads", spec.num_heads),
        ("num_key_value_heads", spec.num_kv_heads),
        ("intermediate_size", spec.ffn_hidden_size),
    ):
        if value % tp != 0:
            raise ValueError(f"tensor parallel size {tp} does not divide HF config '{name}' ({value}).")
    if spec.is_moe:
        check_moe_divisibility(spec, ep, etp)
    elif ep > 1:
        raise ValueError(
            f"expert parallel size {ep} > 1 needs a mixture-of-experts model; {spec.architecture} has none."
        )
    if pipeline_layers is not None:
        check_pipeline_layers(pipeline_layers, pp, spec.num_layers)
    elif spec.num_layers % pp != 0:
        raise ValueError(
            f"pipeline parallel size {pp} does not divide HF config 'num_hidden_layers' ({spec.num_layers}); "
            f"pass pipeline_layers=[...] for an explicit uneven split."
        )


def transformer_config(
    spec: ModelSpec,
    *,
    tp: int,
    pp: int,
    dtype: torch.dtype = torch.float32,
    pipeline_layers: list[int] | None = None,
    perform_initialization: bool = True,
    sequence_parallel: bool = False,
    ep: int = 1,
    etp: int | None = None,
    cp: int = 1,
    **overrides: Any,
):
    """Megatron `TransformerConfig` for `spec` at TP x PP (x EP x expert-TP for MoE; dropout off, no fusions
    that need CUDA kernels). MoE keys (`moe_aux_loss_coeff`, ...) may be overridden like any other."""

    etp = tp if etp is None else etp
    _check_divisibility(spec, tp, pp, pipeline_layers, ep, etp)
    on_cuda = torch.cuda.is_available()
    kw: dict[str, Any] = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_cuda,
        perform_initialization=perform_initialization,
        init_method_std=0.02,
    )
    if spec.is_moe:
        kw.update(moe_config_kwargs(spec, ep=ep, etp=etp, grouped_gemm=on_cuda and have_te()))
    if overrides.get("variable_seq_lengths") and not spec.is_moe:
        # Megatron refuses variable lengths with its default (allgather) dispatcher even without experts
        kw["moe_token_dispatcher_type"] = "alltoall"  # unused: a dense model has no MoE layer
    if overrides.get("variable_seq_lengths") and kw.get("moe_token_dispatcher_type") == "allgather":
        overrides = {k: v for k, v in overrides.items() if k != "variable_seq_lengths"}
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if "variable_seq_lengths" not in _LOGGED and rank == 0:
            _LOGGED.add("variable_seq_lengths")
            log.warning(
                "train.group_by_length: Megatron's allgather MoE token dispatcher (CPU) does not "
                "take variable sequence lengths between pipeline stages; one padded length per step."
            )
    if pipeline_layers is not None and pp > 1:
        kw["num_layers_in_first_pipeline_stage"] = pipeline_layers[0]
        kw["num_layers_in_last_pipeline_stage"] = pipeline_layers[-1]
    kw.update(overrides)
    # Fusion switches come and go between megatron-core releases: drop the ones this version lacks.
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    for key in _OPTIONAL_CONFIG_KEYS - known:
        kw.pop(key, None)
    with warnings.catch_warnings():
        if not have_te():  # Megatron's advice for TE's fused attention; without TE the attention is the
            # local spec's unfused one, whose [b, heads, s, s] scores selective recompute does drop
            warnings.filterwarnings("ignore", message=".*core_attn is from transformer_engine.*")
        return TransformerConfig(**kw)


def recompute_overrides(mode: str = "none", method: str = "uniform", num_layers: int | None = None,
                        total_layers: int | None = None) -> dict[str, Any]:  # fmt: skip
    """`TransformerConfig` keys for `model.recompute` (none | selective | full): {} for none; selective:
    Megatron's core-attention recomputation (`recompute_modules=["core_attn"]`, the local spec's
    `DotProductAttention` and TE's alike); full: `recompute_method` uniform (units of `num_layers`, default
    1) or block (`num_layers` layers per stage, default `total_layers`: all of them). Megatron recomputes
    only in training mode (`module.training`), so a forward-only pass in eval mode (the teacher's) keeps
    nothing and recomputes nothing."""
    if mode == "none":
        return {}
    if mode == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if mode != "full":
        raise ValueError(f"model.recompute must be none, selective or full, got {mode!r}.")
    if num_layers is None:
        num_layers = 1 if method == "uniform" else total_layers
    if num_layers is None or num_layers < 1:
        raise ValueError("model.recompute_num_layers must be >= 1 (block recompute needs the layer count).")
    return {"recompute_granularity": "full", "recompute_method": method, "recompute_num_layers": num_layers}


def layer_spec(spec: ModelSpec, use_te: bool | str | None = None, config=None):
    """Megatron layer spec: TE fused spec if available (or requested), local spec otherwise. With the local
    spec and `config.sequence_parallel`, a block spec whose norms support it (`models/norm.py`).

    MoE models need `config` (the `TransformerConfig`): they get a per-layer block spec for this PP stage
    (MoE layers where `config.moe_layer_freq` says, dense ones elsewhere)."""

    if spec.is_moe:
        if config is None:
            raise ValueError("layer_spec() of a mixture-of-experts model needs its TransformerConfig.")
        block = gls.get_gpt_decoder_block_spec(config, resolve_use_te(use_te), normalization="RMSNorm")
        if resolve_use_te(use_te) or not config.sequence_parallel:
            return block

        return replace_norms(block, WrappedTorchNorm, SequenceParallelRMSNorm)
    if resolve_use_te(use_te):
        return gls.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_norm)
    local = gls.get_gpt_layer_local_spec(qk_layernorm=spec.qk_norm, normalization="RMSNorm")
    if config is not None and config.context_parallel_size > 1:  # the local attention refuses CP
        local = replace_norms(local, DotProductAttention, AllGatherCPAttention)
    if config is None or not config.sequence_parallel:
        return local

    layer = replace_norms(local, WrappedTorchNorm, SequenceParallelRMSNorm)
    n = get_num_layers_to_build(config)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=SequenceParallelRMSNorm)


def build_model(
    hf_config_or_dir: Any,
    dtype: torch.dtype = torch.float32,
    *,
    use_te: bool | str | None = None,
    pipeline_layers: list[int] | None = None,
    make_vocab_size_divisible_by: int = 128,
    padded_vocab_size: int | None = None,
    perform_initialization: bool = True,
    sequence_parallel: bool = False,
    recompute: str = "none",
    recompute_method: str = "uniform",
    recompute_num_layers: int | None = None,
    **config_overrides: Any,
) -> list:
    """Build this rank's model chunks (one `GPTModel` per chunk; pre/post_process set by PP stage).

    Needs `opsd_megatron.mcore.parallel.initialize(tp, pp)` first; TP/PP are read from Megatron's
    parallel_state,
    `pipeline_layers` (layers per stage) defaults to the one given to `parallel.initialize`.
    `sequence_parallel=True` (TP > 1) turns on Megatron's sequence parallelism: activations outside the
    tensor-parallel regions are split over the sequence (`models.forward.hidden_states_forward` gathers
    the last stage's output).
    `recompute` / `recompute_method` / `recompute_num_layers`: `model.recompute*` (`recompute_overrides`).
    `padded_vocab_size` overrides Megatron's padding (e.g. to load a checkpoint saved at another TP).
    Weights are randomly initialised (or uninitialised with perform_initialization=False): load them with
    `opsd_megatron.mcore.conversion.load_hf_weights`. Collective: with PP > 1 and tied embeddings, the first
    and
    last stages synchronise the output weight over the embedding group at construction.
    Wrapping in Megatron DDP (needed for finalize_model_grads: tied-embedding and q/k-norm grad
    all-reduces) is the trainer's job.
    """

    if not mps.model_parallel_is_initialized():
        raise RuntimeError("call opsd_megatron.mcore.parallel.initialize(tp, pp) before build_model().")
    if pipeline_layers is None and parallel.is_initialized():  # the run's split (parallel.initialize)
        pipeline_layers = parallel.get_state().pipeline_layers
    spec, raw = parse_hf_config(hf_config_or_dir)
    tp = mps.get_tensor_model_parallel_world_size()
    pp = mps.get_pipeline_model_parallel_world_size()
    ep = mps.get_expert_model_parallel_world_size()
    etp = mps.get_expert_tensor_parallel_world_size()
    cp = mps.get_context_parallel_world_size()
    check_context_parallel(cp, pp=pp, is_moe=spec.is_moe)
    config = transformer_config(
        spec,
        tp=tp,
        pp=pp,
        ep=ep,
        etp=etp,
        cp=cp,
        dtype=dtype,
        pipeline_layers=pipeline_layers,
        perform_initialization=perform_initialization,
        sequence_parallel=sequence_parallel,
        **recompute_overrides(recompute, recompute_method, recompute_num_layers, spec.num_layers),
        **config_overrides,
    )
    te = resolve_use_te(use_te)
    vpad = padded_vocab_size or _pad_vocab(spec.vocab_size, tp, make_vocab_size_divisible_by)
    if vpad < spec.vocab_size or vpad % tp != 0:
        raise ValueError(
            f"padded_vocab_size {vpad} must be >= vocab_size ({spec.vocab_size}) and divisible by TP ({tp})."
        )
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(spec, te, config),
        vocab_size=vpad,
        max_sequence_length=spec.max_position_embeddings,
        pre_process=mps.is_pipeline_first_stage(),
        post_process=mps.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(spec.rope_theta),
    )
    if not perform_initialization:  # Megatron marks TP-split weights only when it initialises them
        mark_tensor_parallel_weights(model)
    # Megatron hard-codes llama3's low/high frequency factors and original context: use HF's exact values.
    if getattr(model, "rotary_pos_emb", None) is not None:
        model.rotary_pos_emb.inv_freq = rope_inv_freq(spec).to(model.rotary_pos_emb.inv_freq.device)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    model.opsd_info = ModelInfo(
        spec=spec,
        hf_config=raw,
        vocab_size=spec.vocab_size,
        padded_vocab_size=vpad,
        tp=tp,
        pp=pp,
        dtype=dtype,
        use_te=te,
        ep=ep,
        etp=etp,
    )
    return [model]


def unwrap(chunk):
    """The model inside DDP / Float16Module wrappers: follows `.module` until a model built here
    (`opsd_info`) or any Megatron GPTModel (`decoder`). The one unwrap helper of the package."""
    while not (hasattr(chunk, "opsd_info") or hasattr(chunk, "decoder")) and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_info(model_chunks) -> ModelInfo:
    """`ModelInfo` of a list of chunks (or one chunk)."""
    chunk = model_chunks[0] if isinstance(model_chunks, (list, tuple)) else model_chunks
    chunk = unwrap(chunk)
    if not hasattr(chunk, "opsd_info"):
        raise TypeError("model chunk was not built by opsd_megatron.mcore.models.build_model (no opsd_info).")
    return chunk.opsd_info
