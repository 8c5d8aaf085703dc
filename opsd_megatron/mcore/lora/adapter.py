"""One tensor-parallel LoRA adapter, attached to one Megatron linear layer (local or Transformer Engine).

    delta = adapter(x)          # added to the base layer's output: y = W x + scale * B (A dropout(x))

Sharding follows the base layer so that no full-size activation is ever gathered:

* column-parallel base (weight [out/tp, in], e.g. `linear_qkv`, `linear_fc1`):
    A `lora_a` [r, in] replicated on every TP rank;
    B `lora_b` [out/tp, r] sharded on dim 0 exactly like the base weight (same rows: for the fused QKV the
                       per-query-group interleaving, for SwiGLU fc1 the per-rank [gate shard ‖ up shard]).
    forward:  h = x A^T [s, b, r];  h = copy_to_tensor_model_parallel_region(h) (fwd identity, bwd
              all-reduce, so A's gradient and the LoRA part of dx are complete);  y += scale * h B^T.
    with sequence parallelism x is [s/tp, b, in]: h = gather_from_sequence_parallel_region(x A^T)
              (fwd all-gather of the rank-r activation, bwd reduce-scatter); A's gradient is then partial
              over the sequence and A carries `sequence_parallel=True`, so Megatron's `finalize_model_grads`
              all-reduces it over TP (as it does for layer norms).
* row-parallel base (weight [out, in/tp], e.g. `linear_proj`, `linear_fc2`):
    A `lora_a` [r, in/tp] sharded on dim 1 like the base weight;
    B `lora_b` [out, r] replicated.
    forward:  h = reduce_from_tensor_model_parallel_region(x A^T) (fwd all-reduce of [s, b, r], bwd
              identity); y += scale * h B^T.  With sequence parallelism: reduce_scatter instead, and B is
              marked `sequence_parallel=True`.

Layouts. `fused` (Megatron's usual LoRA): ONE rank-r adapter over the whole fused output of `linear_qkv`
(q, k, v) / `linear_fc1` (gate, up), so the q/k/v update has rank <= r. `per_projection` (PEFT's layout):
one rank-r adapter per projection, stored as A `lora_a` [P*r, in] (the P projections' A stacked, each
[r, in]) and B `lora_b` [out/tp, r] with the base weight's rows: a row of projection p is multiplied
with h_p = x A_p^T only. The local output is viewed as [G, W] (qkv: G = local query groups, W =
(heads_per_group + 2) * head_dim split into [q | k | v]; fc1: G = 1, W split into [gate | up]), so
each projection is a contiguous column range of W. Row-parallel layers have one projection: both layouts
agree there. With dropout > 0 the P projections share one dropout mask of x (PEFT draws one per module).

MoE experts (`expert=True`: a Megatron expert linear with `explicit_expert_comm`, i.e. expert-TP or EP > 1):
Megatron's token dispatcher owns every collective there (it all-gathers the tokens over the EP x expert-TP
group before fc1, and reduce-scatters fc2's partial outputs after it), so the adapter adds NO activation
collective: column (fc1) h = x A^T, y_local += scale h B_local^T, whose input gradient is partial
over expert-TP like the base layer's (the dispatcher sums it); row (fc2) y_partial += scale (x_local
A_local^T) B^T, summed by the dispatcher. The replicated factor's gradient (A for fc1, B for fc2) is then
partial over expert-TP and is all-reduced over the expert-TP group in backward
(`copy_to_tensor_model_parallel_region` applied to the weight). `tp_group` is the layer's expert-TP
group. Both factors take the base weight's `allreduce` flag: False for experts under EP > 1, so Megatron's
DDP reduces their gradients over the expert-data-parallel group (like the expert weights), not the full
data-parallel group.

B starts at zero, so a fresh adapter leaves the model's output bit-identical. A is initialised like PEFT
(kaiming-uniform, a=sqrt(5)) on the FULL [r, in] matrix from a generator seeded by (seed, global layer
name), then sliced: the adapter is the same whatever the TP layout (TP=2 equals TP=1 exactly). For experts
the global name carries the GLOBAL expert index (`local_experts.{g}`), so EP=2 equals EP=1 exactly.
"""

from __future__ import annotations

import contextlib
import math
import zlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core import tensor_parallel as mtp
from torch import nn

COLUMN = "column"
ROW = "row"


def _tp_size_rank(group) -> tuple[int, int]:
    if group is None or not torch.distributed.is_initialized():
        return 1, 0
    return torch.distributed.get_world_size(group), torch.distributed.get_rank(group)


def full_a_init(rank: int, in_features: int, seed: int, name: str) -> torch.Tensor:
    """Deterministic full A [rank, in_features] (fp32, CPU): PEFT's kaiming-uniform(a=sqrt(5)) bound."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform(a=sqrt(5)) on fan_in = in_features
    return (torch.rand(rank, in_features, generator=g) * 2 - 1) * bound


class LoRAAdapter(nn.Module):
    """Low-rank update of one TP-sharded linear layer; see the module docstring for the sharding.

    Parameters `lora_a` ([r, in] column / [r, in/tp] row) and `lora_b` ([out/tp, r] column / [out, r]
    row) carry Megatron's TP attributes (`tensor_model_parallel`, `partition_dim`, `partition_stride`), so
    grad-norm clipping counts replicated ones once, and `sequence_parallel` where their gradient is partial.
    """

    def __init__(
        self,
        parallel_mode: str,
        base_weight: torch.Tensor,
        *,
        rank: int,
        alpha: float,
        dropout: float,
        tp_group,
        sequence_parallel: bool,
        seed: int,
        name: str,
        parts: tuple[tuple[str, int, bool], ...] | None = None,
        groups: int = 1,
        expert: bool = False,
        stride: int | None = None,
    ):
        """`parts` (per_projection only): ((projection name, columns in W, has an adapter), ...) of the
        local output viewed as [groups, W]; None = one adapter over the whole output (fused layout).
        `expert`: the base is a MoE expert linear whose collectives the token dispatcher does (see the module
        docstring); `tp_group` is then its expert-TP group. `stride`: the base weight's TP partition stride
        (2 for a SwiGLU fc1: rank r holds [gate shard r | up shard r]); None = its `partition_stride`
        attribute (Megatron sets it only when it initialises the weight)."""
        super().__init__()
        if parallel_mode not in (COLUMN, ROW):
            raise ValueError(f"parallel_mode must be 'column' or 'row', got {parallel_mode!r}.")
        self.parallel_mode = parallel_mode
        self.rank = rank
        out_local = base_weight.shape[0]
        if parts is not None and (
            parallel_mode != COLUMN or groups * sum(n for _, n, _ in parts) != out_local
        ):
            raise ValueError(
                f"LoRA {name}: projections {parts} x {groups} groups do not tile the "
                f"{parallel_mode}-parallel output of {out_local} rows."
            )
        self.parts = tuple(parts) if parts is not None else None
        self.groups = groups
        self.active_parts = tuple(n for n, _, on in parts if on) if parts is not None else None
        self.a_rows = rank * (len(self.active_parts) if parts is not None else 1)
        self.scale = alpha / rank
        self.tp_group = tp_group
        self.tp_size, self.tp_rank = _tp_size_rank(tp_group)
        self.expert = bool(expert)
        self.sequence_parallel = bool(sequence_parallel) and self.tp_size > 1 and not self.expert
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        out_local, in_local = base_weight.shape
        dtype, device = base_weight.dtype, base_weight.device
        if parallel_mode == COLUMN:
            self.in_features, self.out_features = in_local, out_local * self.tp_size
            a_shape, b_shape = (rank, in_local), (out_local, rank)
        else:
            self.in_features, self.out_features = in_local * self.tp_size, out_local
            a_shape, b_shape = (rank, in_local), (out_local, rank)
        a_shape = (self.a_rows, a_shape[1])
        self.lora_a = nn.Parameter(torch.empty(a_shape, dtype=dtype, device=device))
        self.lora_b = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=device))
        if self.active_parts is None:
            a_full = full_a_init(rank, self.in_features, seed, name)
        else:  # each projection its own A, seeded by its own name (as PEFT: independent modules)
            a_full = torch.cat(
                [full_a_init(rank, self.in_features, seed, f"{name}.{p}") for p in self.active_parts]
            )
        with torch.no_grad():
            self.lora_a.copy_(self._local_a(a_full))
        stride = stride if stride is not None else getattr(base_weight, "partition_stride", 1)
        sharded, replicated = (
            (self.lora_b, self.lora_a) if parallel_mode == COLUMN else (self.lora_a, self.lora_b)
        )
        sharded.tensor_model_parallel = self.tp_size > 1
        sharded.partition_dim = 0 if parallel_mode == COLUMN else 1
        sharded.partition_stride = stride if parallel_mode == COLUMN else 1
        replicated.tensor_model_parallel = False
        replicated.partition_dim = -1
        replicated.partition_stride = 1
        if self.expert and self.tp_size == 1:  # not duplicated inside the expert model-parallel group
            replicated.tensor_model_parallel = True  # (Megatron's grad norm then counts it on every rank)
        for p in (self.lora_a, self.lora_b):
            # Megatron's DDP: allreduce=False (experts under EP > 1) -> expert-data-parallel reduction
            p.allreduce = bool(getattr(base_weight, "allreduce", True))
        if self.sequence_parallel:
            replicated.sequence_parallel = True  # its gradient is partial over the sequence shards

    # ---- full <-> local -------------------------------------------------------------------------------
    def _local_a(self, a_full: torch.Tensor) -> torch.Tensor:
        if self.parallel_mode == COLUMN:
            return a_full
        return a_full.chunk(self.tp_size, dim=1)[self.tp_rank]

    def _local_b(self, b_full: torch.Tensor) -> torch.Tensor:
        if self.parallel_mode == ROW:
            return b_full
        stride = getattr(self.lora_b, "partition_stride", 1)
        # stride 2 (SwiGLU fc1): rank r holds [gate shard r ‖ up shard r]
        parts = b_full.chunk(stride, dim=0)
        return torch.cat([p.chunk(self.tp_size, dim=0)[self.tp_rank] for p in parts], dim=0)

    @torch.no_grad()
    def set_full_weights(self, a_full: torch.Tensor, b_full: torch.Tensor) -> None:
        """Load full (unsharded, Megatron row order) A [a_rows, in] (a_rows = r, or P*r per_projection)
        and B [out, r]; keeps this rank's shard."""
        if tuple(a_full.shape) != (self.a_rows, self.in_features):
            raise ValueError(
                f"LoRA A must be [{self.a_rows}, {self.in_features}], got {tuple(a_full.shape)}."
            )
        if tuple(b_full.shape) != (self.out_features, self.rank):
            raise ValueError(f"LoRA B must be [{self.out_features}, {self.rank}], got {tuple(b_full.shape)}.")
        self.lora_a.copy_(self._local_a(a_full.to(self.lora_a)))
        self.lora_b.copy_(self._local_b(b_full.to(self.lora_b)))

    # ---- math -----------------------------------------------------------------------------------------
    def _dropout_ctx(self):
        # x is identical on all TP ranks only for a column-parallel base without SP: then the default
        # generator (same stream on all TP ranks) keeps the masks equal; otherwise use the TP-rank stream.
        if isinstance(self.dropout, nn.Identity) or not self.training:
            return contextlib.nullcontext()
        if self.parallel_mode == COLUMN and not self.sequence_parallel:
            return contextlib.nullcontext()

        return tensor_parallel.get_cuda_rng_tracker().fork()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the base layer's input -> scale * B A dropout(x), shaped and sharded like the base output.

        Column: x [s, b, in] (SP: [s/tp, b, in]) -> [s, b, out/tp].  Row: x [s, b, in/tp] -> [s, b, out]
        (SP: [s/tp, b, out]). Collectives: see the module docstring (all on the rank-r activation).
        """

        with self._dropout_ctx():
            x = self.dropout(x)
        if self.expert:
            return self._expert_forward(x)
        h = F.linear(x, self.lora_a)  # column: [s(/tp), b, r] ; row: partial sums [s, b, r]
        if self.tp_size > 1:
            if self.parallel_mode == COLUMN:
                if self.sequence_parallel:
                    h = mtp.gather_from_sequence_parallel_region(h, True, self.tp_group)  # [s, b, r]
                else:
                    h = mtp.copy_to_tensor_model_parallel_region(h, self.tp_group)  # bwd: all-reduce
            elif self.sequence_parallel:
                h = mtp.reduce_scatter_to_sequence_parallel_region(h, self.tp_group)  # [s/tp, b, r]
            else:
                h = mtp.reduce_from_tensor_model_parallel_region(h, self.tp_group)  # [s, b, r]
        return self._up(h)

    def _expert_forward(self, x: torch.Tensor) -> torch.Tensor:
        """MoE expert: x [tokens, in] (column) / [tokens, in/etp] (row) -> [tokens, out/etp] (column) /
        partial [tokens, out] (row). No activation collective; backward all-reduces the replicated factor's
        gradient over expert-TP (see the module docstring)."""

        a, b = self.lora_a, self.lora_b
        if self.tp_size > 1 and self.parallel_mode == COLUMN:
            a = mtp.copy_to_tensor_model_parallel_region(a, self.tp_group)  # fwd identity, bwd all-reduce
        elif self.tp_size > 1:
            b = mtp.copy_to_tensor_model_parallel_region(b, self.tp_group)
        return self._up(F.linear(x, a), b)

    def _up(self, h: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """h [..., P*r] -> scale * B h per projection ([..., out_local]); `b` defaults to `lora_b`."""
        b = self.lora_b if b is None else b
        if self.parts is None:
            return F.linear(h, b) * self.scale  # [s, b, out/tp] column ; [s(/tp), b, out] row
        # per_projection: h [s, b, P*r] -> each projection's columns of the [G, W] view of the output
        hs = iter(h.split(self.rank, dim=-1))
        bv = b.view(self.groups, -1, self.rank)  # [G, W, r]
        outs, off = [], 0
        for _, width, on in self.parts:
            if on:
                outs.append(torch.einsum("...r,gwr->...gw", next(hs), bv[:, off : off + width]))
            else:
                outs.append(h.new_zeros(*h.shape[:-1], self.groups, width))
            off += width
        return torch.cat(outs, dim=-1).flatten(-2) * self.scale  # [s, b, G*W = out/tp]

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """scale * B_local @ A_local in fp32: [out/tp, in] (column) or [out, in/tp] (row), the local shard
        of the full update, aligned with the base layer's local weight. No collective."""
        if self.parts is None:
            return self.scale * (self.lora_b.float() @ self.lora_a.float())
        a_parts = iter(self.lora_a.float().split(self.rank, dim=0))
        bv = self.lora_b.float().view(self.groups, -1, self.rank)
        blocks, off = [], 0
        for _, width, on in self.parts:
            b = bv[:, off : off + width]  # [G, width, r]
            blocks.append(b @ next(a_parts) if on else b.new_zeros(*b.shape[:2], self.lora_a.shape[1]))
            off += width
        return self.scale * torch.cat(blocks, dim=1).flatten(0, 1)  # [out/tp, in]

    def extra_repr(self) -> str:
        parts = self.active_parts or "fused"
        return (
            f"{self.parallel_mode}, rank={self.rank}, parts={parts}, scale={self.scale:g}, "
            f"in={self.in_features}, out={self.out_features}, tp={self.tp_size}, sp={self.sequence_parallel}"
            + (", expert" if self.expert else "")
        )
