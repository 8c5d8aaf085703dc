"""Write a Megatron model as an HF checkpoint: sharded safetensors + index + config + tokenizer files.

    save_hf_checkpoint(model_chunks, out_dir, tokenizer_dir=hf_dir)   # collective; rank 0 writes

The result loads with `transformers.AutoModelForCausalLM.from_pretrained(out_dir)`. Tensors stream from
`export_hf_weights` one at a time (every rank takes part in the TP/PP/EP gathers and drops what it is not
writing); rank 0 fills one shard (a bucket of at most `max_shard_bytes`, or one tensor larger than that)
and writes it as soon as the next tensor would not fit, then frees it (`_ShardWriter`), so no process holds
more than one bucket plus the tensor in flight (safetensors >= 0.6 writes from the tensors' memory without a
copy). Shards are written under temporary names and renamed once their number is known; the index is
assembled at the end. The files are the same, byte for byte, as collecting every tensor first.

Re-exporting never leaves stale files: the export is written to a temporary sibling directory and swapped in
for `out_dir` (whose old shards, index and config go with the old directory). A directory that holds files an
export does not write (anything but weights, index, config and tokenizer files) is refused before the export
starts (`check_export_dir`), so a wrong `--out` cannot delete a user's files.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from opsd_megatron.mcore.conversion.export import export_hf_weights
from opsd_megatron.mcore.files import save_safetensors
from opsd_megatron.mcore.models.builder import model_info

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
    "added_tokens.json",
)

EXPORT_OWNED = (
    "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
    "config.json", ".opsd_export_source.json", *TOKENIZER_FILES,
)  # fmt: skip
"""File names an HF export writes or replaces; anything else in an export directory is refused."""

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def check_export_dir(out: Path) -> None:
    """Raise ValueError naming a file in `out` that an HF export does not own (a subdirectory, a run's
    files, sources); a missing or empty directory, or one holding an earlier export, is fine."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"export directory {str(out)!r} is a file.")
    for p in sorted(out.iterdir()):
        if p.is_dir() or not any(fnmatch.fnmatch(p.name, pat) for pat in EXPORT_OWNED):
            raise ValueError(
                f"export directory {str(out)!r} holds {p.name!r}, which an HF export does not write; "
                "refusing to replace it (choose an empty or new directory)."
            )


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by the finished export `tmp` (old files leave with the old directory)."""
    if out.exists():
        check_export_dir(out)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


class _ShardWriter:
    """Rank 0's safetensors shards, written one bucket at a time (`add`), renamed and indexed at `finish`.

    Shard boundaries: a tensor starts a new shard when it would take the current (non-empty) one past
    `max_bytes`; names `model-0000i-of-0000n.safetensors`, or `model.safetensors` when there is one."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.bucket: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.written: list[Path] = []
        self.weight_map: dict[str, int] = {}

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.size + nbytes > self.max_bytes and self.bucket:
            self._flush()
        self.bucket[name] = t
        self.weight_map[name] = len(self.written)
        self.size += nbytes

    def _flush(self) -> None:
        path = self.out / f".shard-{len(self.written):05d}.partial"
        save_safetensors(self.bucket, path, {"format": "pt"})
        self.total += self.size
        self.written.append(path)
        self.bucket, self.size = {}, 0

    def finish(self) -> None:
        """Write the last shard, rename all to their final names, write the index (more than one shard)."""
        if self.bucket or not self.written:
            self._flush()
        n = len(self.written)
        files = (
            [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            if n > 1
            else ["model.safetensors"]
        )
        for src, name in zip(self.written, files):
            src.rename(self.out / name)
        if n > 1:
            index = {
                "metadata": {"total_size": self.total},
                "weight_map": {k: files[v] for k, v in self.weight_map.items()},
            }
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_hf_checkpoint(
    model_chunks: list,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    shard_hook=None,
) -> Path:
    """Export the model to `out_dir` in HF format (collective over the model's ranks; rank 0 writes, one
    shard of at most `max_shard_bytes` in memory at a time).

    `dtype` casts the tensors (default: the model's dtype); `tokenizer_dir` (usually the source HF
    directory) supplies tokenizer and generation-config files; `shard_hook` is passed to export_hf_weights.
    """

    info = model_info(model_chunks)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    final = Path(out_dir)
    check_export_dir(final)  # every rank: fail before the collective export, not after it
    out = final.with_name(f".{final.name}.partial-{os.getpid()}")
    if rank0:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
    dtype = dtype or info.dtype
    writer = _ShardWriter(out, max_shard_bytes)
    for name, tensor in export_hf_weights(model_chunks, shard_hook=shard_hook):
        if rank0:
            writer.add(name, tensor.to(device="cpu", dtype=dtype).contiguous())
        del tensor
    if rank0:
        writer.finish()
        config = dict(info.hf_config)
        config["dtype"] = _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))
        config.pop("torch_dtype", None)
        (out / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / fname
                if src.is_file():
                    shutil.copyfile(src, out / fname)  # a new file: the umask's mode
        _swap_in(out, final)
    if dist.is_initialized():
        dist.barrier()
    return final
