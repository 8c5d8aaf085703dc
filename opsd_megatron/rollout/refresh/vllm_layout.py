"""What one vLLM tensor-parallel rank holds, as `Piece`s of HF tensors: the targets of a shard-exact refresh.

    targets = vllm_targets(hf_names_of_one_layer, spec, tp=2, rank=1)
    # [Target("model.layers.0.self_attn.qkv_proj.weight", (q/2 + 2*kv/2, h), (q, k, v pieces)), ...]

vLLM 0.32's tensor parallelism for the supported architectures (Llama, Qwen2, Qwen3, Qwen3-MoE; read from
its `linear.py`, `vocab_parallel_embedding.py`, `fused_moe/layer.py` weight loaders; checked bit for bit
against those loaders in tests/test_refresh_shards.py):

    vLLM parameter                          rank j of T holds (in memory order)
    self_attn.qkv_proj.weight / .bias       q rows of heads [j*H/T, (j+1)*H/T), then k rows, then v rows of
                                            kv heads [j*K/T, ...) (K < T: kv head j // (T/K), replicated)
    self_attn.o_proj.weight                 columns [j*q/T, (j+1)*q/T)
    mlp.gate_up_proj.weight                 gate rows [j*f/T, ...), then up rows (MergedColumnParallelLinear)
    mlp.down_proj.weight                    columns [j*f/T, ...)
    embed_tokens.weight / lm_head.weight    rows [j*Vp/T, (j+1)*Vp/T) of the vocabulary padded to a multiple
                                            of 64 (vLLM's DEFAULT_VOCAB_PADDING_SIZE); padding rows zero
    mlp.experts.w13_weight [E, 2*I/T, h]    for each expert e: gate_e rows [j*I/T, ...), then up_e rows
    mlp.experts.w2_weight  [E, h, I/T]      for each expert e: down_e columns [j*I/T, ...)
    everything else (norms, router)         the full tensor

Pure functions; no vLLM import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from opsd_megatron.mcore.conversion.mapping import hf_shape
from opsd_megatron.mcore.conversion.shards import Piece, full_piece, range_piece, vocab_pieces
from opsd_megatron.mcore.models.hf_config import ModelSpec

VOCAB_PADDING = 64  # vllm.model_executor.layers.vocab_parallel_embedding.DEFAULT_VOCAB_PADDING_SIZE

_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
          "up_proj": "gate_up_proj"}  # fmt: skip
_ROW = ("o_proj", "down_proj")


@dataclass(frozen=True)
class Target:
    """One vLLM parameter of one rank: its name, local shape, and the pieces it is made of (memory order)."""

    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]


def _qkv_pieces(prefix: str, kind: str, spec: ModelSpec, tp: int, rank: int) -> list[Piece]:
    """q, k, v pieces of rank `rank`'s qkv_proj `kind` ("weight" / "bias")."""
    hd = spec.head_dim
    q_name, k_name, v_name = (f"{prefix}.{p}_proj.{kind}" for p in "qkv")
    qs, ks = hf_shape(q_name, spec), hf_shape(k_name, spec)
    heads = spec.num_heads // tp
    kv_heads = max(1, spec.num_kv_heads // tp)
    kv_index = rank // (tp // spec.num_kv_heads) if spec.num_kv_heads < tp else rank
    k0 = kv_index * kv_heads * hd
    return [
        Piece(q_name, 0, rank * heads * hd, (rank + 1) * heads * hd, qs),
        Piece(k_name, 0, k0, k0 + kv_heads * hd, ks),
        Piece(v_name, 0, k0, k0 + kv_heads * hd, ks),
    ]


def _shape_of(pieces: list[Piece]) -> tuple[int, ...]:
    """Local shape of a target made of dim-0 slabs (rows add up) or of one slab."""
    if len(pieces) == 1:
        return pieces[0].slab_shape
    first = pieces[0].slab_shape
    return (sum(p.slab_shape[0] for p in pieces), *first[1:])


def _expert_targets(prefix: str, experts: dict[int, set[str]], spec: ModelSpec, tp: int, rank: int):
    """w13 / w2 targets of one layer's fused experts (all experts of the layer must be present)."""
    if sorted(experts) != list(range(spec.num_experts)):
        raise ValueError(
            f"{prefix}: the refresh has experts {sorted(experts)[:8]}..., vLLM fuses all "
            f"{spec.num_experts} experts of a layer into one module (send them together)."
        )
    w13, w2 = [], []
    for e in range(spec.num_experts):
        names = {k: f"{prefix}.{e}.{k}.weight" for k in ("gate_proj", "up_proj", "down_proj")}
        w13 += [
            range_piece(names[k], hf_shape(names[k], spec), 0, rank, tp) for k in ("gate_proj", "up_proj")
        ]
        w2.append(range_piece(names["down_proj"], hf_shape(names["down_proj"], spec), 1, rank, tp))
    fe, h = w13[0].slab_shape
    return [
        Target(f"{prefix}.w13_weight", (spec.num_experts, 2 * fe, h), tuple(w13)),
        Target(f"{prefix}.w2_weight", (spec.num_experts, *w2[0].slab_shape), tuple(w2)),
    ]


def vllm_targets(hf_names: list[str], spec: ModelSpec, tp: int, rank: int) -> list[Target]:
    """vLLM parameters (of rank `rank` of `tp`) made from `hf_names`, which must hold whole fused groups
    (one decoder layer, or top-level tensors); targets in first-appearance order."""
    out: dict[str, Target] = {}
    experts: dict[str, dict[int, set[str]]] = {}
    for name in hf_names:
        m = _EXPERT_RE.match(name)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), set()).add(m.group(3))
            continue
        shape = hf_shape(name, spec)
        parts = name.split(".")
        proj, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", "")
        if proj in ("q_proj", "k_proj", "v_proj"):
            prefix = ".".join(parts[:-2])
            vname = f"{prefix}.qkv_proj.{kind}"
            if vname not in out:
                pieces = _qkv_pieces(prefix, kind, spec, tp, rank)
                out[vname] = Target(vname, _shape_of(pieces), tuple(pieces))
        elif proj in ("gate_proj", "up_proj"):
            prefix = ".".join(parts[:-2])
            vname = f"{prefix}.{_FUSED[proj]}.{kind}"
            if vname not in out:
                pieces = [
                    range_piece(f"{prefix}.{p}.{kind}", shape, 0, rank, tp) for p in ("gate_proj", "up_proj")
                ]
                out[vname] = Target(vname, _shape_of(pieces), tuple(pieces))
        elif proj in _ROW:
            p = range_piece(name, shape, 1, rank, tp)
            out[name] = Target(name, p.slab_shape, (p,))
        elif name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            padded = -(-shape[0] // VOCAB_PADDING) * VOCAB_PADDING
            pieces = vocab_pieces(name, shape, rank, padded // tp)
            out[name] = Target(name, (padded // tp, *shape[1:]), tuple(pieces))
        else:
            p = full_piece(name, shape)
            out[name] = Target(name, shape, (p,))
    targets = list(out.values())
    for prefix, found in experts.items():
        targets += _expert_targets(prefix, found, spec, tp, rank)
    return targets


@dataclass
class ExpertParts:
    """A fused-experts tensor [E, N, K] (`w13_weight` / `w2_weight`, this rank's, vLLM layout) given as its
    E expert blocks [N, K], e.g. views of the Megatron experts' own weights: a shard refresh hands these
    instead of stacking them into one tensor first (`ShardSyncer`, when the engine `takes_expert_parts`)."""

    parts: list[torch.Tensor]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts), *self.parts[0].shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    def numel(self) -> int:
        return sum(p.numel() for p in self.parts)

    def element_size(self) -> int:
        return self.parts[0].element_size()

    def stacked(self) -> torch.Tensor:
        """The one tensor [E, N, K] (a copy)."""
        return torch.stack(self.parts)
