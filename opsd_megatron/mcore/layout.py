"""The parallel-layout rules, declared once and torch-free: what TP, PP (and an uneven `pipeline_layers`
split), EP, expert-TP and the rollout engines' TP must satisfy against the process count and the model.

    check_world(world, tp, pp, ep=1, etp=None)            # TP x PP and EP x ETP x PP tile the world
    check_pipeline_layers(pipeline_layers, pp, num_layers) # an uneven split Megatron can build
    check_model_layout(hf_config, tp=2, pp=1, ep=1, ...)   # TP/PP/EP/engine TP against heads, layers, experts

Each failure is one `LayoutError` (a ValueError; `.key` is the config key, `.problem` the sentence after
it). Used by the config checks (`config.checks`, which re-raise it as `ConfigError`),
`mcore.parallel.initialize`, `mcore.models.build_model` and `opsd-convert`. Also holds the two config.json
facts these checks read before any model exists (`hf_num_experts`, `hf_dense_mlp_layers`), and the rank and
process count the launcher put in the environment (`env_rank`, `env_world_size`). Imports nothing
from opsd_megatron, so the torch-free config layer can import it.
"""

from __future__ import annotations

import os
from typing import Any


class LayoutError(ValueError):
    """A parallel layout that cannot work: `key` names the config key, `problem` says what was expected."""

    def __init__(self, key: str, problem: str, sentence: str | None = None):
        super().__init__(sentence or f"config key '{key}': {problem}")
        self.key, self.problem = key, problem


def env_rank() -> int:
    """This process's global rank as its launcher set it (torchrun `RANK`, srun `SLURM_PROCID`; 0 for a plain
    `python`): readable before torch.distributed starts."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)


def env_world_size() -> int:
    """The process count torchrun / srun started (`WORLD_SIZE`, `SLURM_NTASKS`; 1 for a plain `python`)."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def hf_num_experts(hf_config: dict) -> int | None:
    """Experts per MoE layer of an HF config dict (`num_experts`, alias `num_local_experts`); None or 0 for a
    dense model."""
    return hf_config.get("num_experts", hf_config.get("num_local_experts"))


def hf_context_len(hf_config: dict) -> int | None:
    """The longest sequence (prompt + response) the model takes: `max_position_embeddings` (of `text_config`
    for a multimodal config), times a RoPE scaling `factor` when the config has one (the larger, so a
    scaled model is never refused); None when the config does not say."""
    cfg = hf_config.get("text_config") or hf_config
    n = cfg.get("max_position_embeddings") or hf_config.get("max_position_embeddings")
    if not n:
        return None
    factor = (cfg.get("rope_scaling") or {}).get("factor") or 1.0
    return int(max(n, n * float(factor)))


def hf_dense_mlp_layers(hf_config: dict) -> list[int]:
    """Layers of a Qwen3-MoE config.json with a dense MLP (HF semantics: layer i is sparse iff i is not in
    `mlp_only_layers` and (i + 1) % `decoder_sparse_step` == 0)."""
    n = int(hf_config.get("num_hidden_layers") or 0)
    only = set(hf_config.get("mlp_only_layers") or [])
    step = int(hf_config.get("decoder_sparse_step") or 1)
    return [i for i in range(n) if i in only or (i + 1) % step != 0]


def check_world(world: int, tp: int, pp: int, ep: int = 1, etp: int | None = None, cp: int = 1) -> int:
    """TP x PP x CP (dense) and EP x ETP x PP (experts; etp None = tp) must divide the world; returns DP."""
    etp = tp if etp is None else etp
    for key, val in [("parallel.tp", tp), ("parallel.pp", pp), ("parallel.ep", ep), ("parallel.etp", etp),
                     ("parallel.cp", cp)]:  # fmt: skip
        if val < 1:
            raise LayoutError(key, f"must be >= 1, got {val}.")
    mp = tp * pp
    if world % mp:
        raise LayoutError(
            "parallel.tp",
            f"x parallel.pp = {mp} does not divide the world size {world}.",
            f"config keys 'parallel.tp' x 'parallel.pp' = {tp} x {pp} = {mp} do not divide the {world} "
            "process(es) started (torchrun --nproc-per-node / srun --ntasks).",
        )
    if world % (ep * etp * pp):
        raise LayoutError(
            "parallel.ep", f"ep x etp x pp = {ep} x {etp} x {pp} does not divide the world size {world}."
        )
    if world % (tp * pp * cp):
        raise LayoutError(
            "parallel.cp",
            f"{cp} x parallel.tp x parallel.pp = {cp * tp * pp} does not divide the world size {world}.",
        )
    return world // (mp * cp)


def check_pipeline_layers(
    pipeline_layers: list[int] | None, pp: int, num_layers: int | None = None, pp_key: str = "parallel.pp"
) -> None:
    """An uneven split (decoder layers per stage) must have `pp` entries, each >= 1, equal middle stages
    (Megatron sizes first, last and the rest) and sum to `num_layers` when given. None: even split."""
    if pipeline_layers is None:
        return
    pl, key = list(pipeline_layers), "parallel.pipeline_layers"
    if len(pl) != pp:
        raise LayoutError(key, f"has {len(pl)} entries, {pp_key} is {pp} (one layer count per stage).")
    if min(pl, default=0) < 1:
        raise LayoutError(key, f"has a stage without layers: {pl}.")
    if len(set(pl[1:-1])) > 1:
        raise LayoutError(key, f"{pl}: the middle stages must hold equal layer counts (Megatron splits "
                               "first/last/rest).")  # fmt: skip
    if num_layers is not None and sum(pl) != num_layers:
        raise LayoutError(key, f"{pl} sums to {sum(pl)}, but the model has {num_layers} layers.")


def _check_divides(size: int, total: int | None, key: str, what: str) -> None:
    if total is not None and total % size:
        raise LayoutError(key, f"{size} does not divide the model's {total} {what}.")


def check_model_layout(
    hf_config: dict[str, Any],
    *,
    tp: int = 1,
    pp: int = 1,
    pipeline_layers: list[int] | None = None,
    ep: int = 1,
    sequence_parallel: bool = False,
    engine_tp: int = 1,
) -> None:
    """The layout against a model's `config.json`: TP divides the attention and key/value heads, PP the
    layers (or `pipeline_layers` sums to them), EP the experts (and no EP for a dense model; sequence
    parallelism for MoE at TP > 1), and the rollout engines' TP divides the heads."""
    heads = hf_config.get("num_attention_heads")
    groups = hf_config.get("num_key_value_heads", heads)
    layers = hf_config.get("num_hidden_layers")
    _check_divides(tp, heads, "parallel.tp", "attention heads")
    _check_divides(tp, groups, "parallel.tp", "key/value heads")
    if pipeline_layers is not None:
        check_pipeline_layers(pipeline_layers, pp, layers)
    elif layers is not None and layers % pp:
        raise LayoutError(
            "parallel.pp",
            f"{pp} does not divide the model's {layers} layers (set parallel.pipeline_layers for an uneven "
            "split).",
        )
    _check_divides(engine_tp, heads, "rollout.tensor_parallel_size", "attention heads")
    if groups is not None and groups % engine_tp and engine_tp % groups:
        raise LayoutError(
            "rollout.tensor_parallel_size",
            f"{engine_tp} and the model's {groups} key/value heads must divide one another (vLLM).",
        )
    experts = hf_num_experts(hf_config)
    if not experts:
        if ep != 1:
            raise LayoutError(
                "parallel.ep", f"is {ep}, but the model has no experts (not a mixture-of-experts)."
            )
        return
    _check_divides(ep, experts, "parallel.ep", "experts")
    if tp > 1 and not sequence_parallel:
        raise LayoutError(
            "parallel.sequence_parallel",
            f"must be true for a mixture-of-experts model at parallel.tp={tp}: megatron-core's MoE layer "
            "refuses to train with tensor parallelism but without sequence parallelism.",
        )
