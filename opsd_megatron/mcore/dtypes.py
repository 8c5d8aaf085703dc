"""The one table from a config's dtype name to a torch dtype (`model.dtype`, `opsd-convert --dtype`); the
names are `config.DType`, "bf16" / "fp32" / "fp16" are accepted aliases:

    torch_dtype("bfloat16")   # torch.bfloat16
"""

from __future__ import annotations

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named `name` (a key of `TORCH_DTYPES` or an alias); KeyError names the choices."""
    key = ALIASES.get(name, name)
    if key not in TORCH_DTYPES:
        raise KeyError(f"unknown dtype {name!r}; expected one of {sorted(TORCH_DTYPES) + sorted(ALIASES)}")
    return TORCH_DTYPES[key]
