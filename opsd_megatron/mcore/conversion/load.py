"""Load HF safetensors straight into this rank's Megatron shards, one tensor slice at a time.

    load_hf_weights(model_chunks, hf_dir)

Each rank opens the checkpoint's safetensors files lazily and reads only the rows/columns of its own TP
shard (MoE: only its own EP rank's experts, their expert-TP shard) (via `safe_open(...).get_slice`), so no
process ever holds the whole model. No collectives.
Errors name the tensor and file: a missing tensor, or a tensor whose shape differs from the config's.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from megatron.core import parallel_state as mps
from safetensors import safe_open

from opsd_megatron.mcore.conversion.mapping import EXPERT_TRANSFORMS, hf_shape, param_maps
from opsd_megatron.mcore.conversion.transforms import hf_to_shard
from opsd_megatron.mcore.models.builder import model_info, unwrap

log = logging.getLogger(__name__)


class SafetensorsReader:
    """Lazy, slice-wise access to the tensors of an HF checkpoint directory (single file or sharded)."""

    def __init__(self, hf_dir: str | Path):
        self.hf_dir = Path(hf_dir)
        index = self.hf_dir / "model.safetensors.index.json"
        single = self.hf_dir / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.hf_dir / f for name, f in weight_map.items()}
        elif single.is_file():
            with safe_open(str(single), framework="pt") as f:
                self.files = {name: single for name in f.keys()}  # noqa: SIM118
        else:
            raise FileNotFoundError(
                f"HF checkpoint directory {self.hf_dir} has neither model.safetensors nor "
                f"model.safetensors.index.json."
            )
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, object] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        self._require(name)
        return tuple(self._handle(self.files[name]).get_slice(name).get_shape())

    def _require(self, name: str, needed_by: str = "") -> None:
        if name not in self.files:
            extra = f" (needed for Megatron parameter {needed_by!r})" if needed_by else ""
            raise KeyError(f"HF checkpoint {self.hf_dir} has no tensor {name!r}{extra}.")

    def read(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        """The full tensor (dim=None) or rows/columns [start, stop) along dim 0 or 1."""
        self._require(name)
        sl = self._handle(self.files[name]).get_slice(name)
        if dim is None:
            return sl[:]
        return sl[start:stop] if dim == 0 else sl[:, start:stop]


def load_hf_weights(model_chunks: list, hf_dir: str | Path, *, strict: bool = True) -> None:
    """Copy HF checkpoint weights into this rank's model chunks (any TP x PP); no collectives.

    Checks each needed HF tensor's shape against the model config first (ValueError naming tensor,
    expected and found shapes); a missing tensor raises KeyError naming it. Tensors are cast to each
    parameter's dtype. With strict=False, parameters without an HF tensor are left as they are.
    """

    info = model_info(model_chunks)
    spec = info.spec
    tp_rank, tp = mps.get_tensor_model_parallel_rank(), mps.get_tensor_model_parallel_world_size()
    etp_rank, etp = tp_rank, tp
    if spec.is_moe:
        etp_rank, etp = mps.get_expert_tensor_parallel_rank(), mps.get_expert_tensor_parallel_world_size()
    params = {}
    for ci, chunk in enumerate(model_chunks):
        for name, p in unwrap(chunk).named_parameters():
            params[(ci, name)] = p
    with SafetensorsReader(hf_dir) as reader, torch.no_grad():
        checked: set[str] = set()
        for pm in param_maps(model_chunks):
            missing = [n for n in pm.hf_names if n not in reader.files]
            if missing:
                if not strict:
                    log.warning("HF checkpoint lacks %s; leaving %s as is", missing, pm.megatron_name)
                    continue
                reader._require(missing[0], pm.megatron_name)
            for n in pm.hf_names:
                if n in checked:
                    continue
                expected, found = hf_shape(n, spec), reader.shape(n)
                if tuple(expected) != tuple(found):
                    raise ValueError(
                        f"HF checkpoint tensor {n!r} in {hf_dir} has shape {list(found)}, expected "
                        f"{list(expected)} from the model config."
                    )
                checked.add(n)
            param = params[(pm.chunk_index, pm.local_name)]
            r, n = (etp_rank, etp) if pm.transform in EXPERT_TRANSFORMS else (tp_rank, tp)
            shard = hf_to_shard(pm.transform, reader.read, pm.hf_names, spec, r, n, info.padded_vocab_size)
            if tuple(shard.shape) != tuple(param.shape):
                raise ValueError(
                    f"Megatron parameter {pm.megatron_name!r}: shard from {list(pm.hf_names)} has shape "
                    f"{list(shard.shape)}, the model expects {list(param.shape)}."
                )
            param.data.copy_(shard.to(dtype=param.dtype))
