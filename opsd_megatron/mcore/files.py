"""Exported files get the permissions every other file of a run gets (0644 under umask 022).

    save_safetensors(tensors, out / "model.safetensors", {"format": "pt"})   # every safetensors writer
    honour_umask(path)                                                       # after any temp-file writer

safetensors >= 0.5 writes `save_file` through a temporary file (the Rust `tempfile` crate) that it renames
into place; such temporary files are created 0600 so that nobody else can read them meanwhile, and the
rename keeps that mode. So `model.safetensors` and `adapter_model.safetensors` came out 0600 whatever the
umask, unreadable by the other users of a shared output directory while config.json next to them was 0644.
`honour_umask` gives a file the mode a plain `open(path, "w")` would have given it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def current_umask() -> int:
    """This process's umask (read from /proc on Linux, where reading it does not change it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: the only portable way is to set it and put it back
    os.umask(mask)
    return mask


def honour_umask(path: str | Path) -> None:
    """Give the file at `path` the mode a newly created regular file gets (0o666 minus the umask)."""
    os.chmod(path, 0o666 & ~current_umask())


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None
) -> None:
    """`safetensors.torch.save_file(tensors, path, metadata)` with the umask's mode instead of 0600."""
    save_file(tensors, str(path), metadata=metadata)
    honour_umask(path)
