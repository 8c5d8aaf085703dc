"""Which training checkpoint to resume from, verified on disk (files only: no Megatron, no process group).

    choice = choose_resume(output_dir / "checkpoints")   # newest COMPLETE step_* directory, or None
    choice.path, choice.skipped                         # [(step_000007, "no opsd_state.json ..."), ...]
    problem = checkpoint_problem(path)                   # None when `path` is complete, else why not

A step directory is complete when `opsd_state.json` exists (written by rank 0 after every rank's save) and
every file it lists in `files` has the size recorded at save time, and every `.distcp` file named by the
Megatron/torch `.metadata` index holds the bytes that index points at. So a crash mid-save, a deleted
newest step, a truncated or missing `.distcp` are all found before any rank starts loading, and the file
is named. The `latest` marker is only a hint: the newest complete directory wins.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from opsd_megatron.config import ConfigError

log = logging.getLogger(__name__)

STATE_FILE = "opsd_state.json"
CONFIG_FILE = "config.yaml"
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (message names the directory and the bad file)."""


def step_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """`(step, path)` of every `step_NNNNNN` directory under `root`, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return sorted(out, reverse=True)


def file_manifest(path: str | Path) -> dict[str, int]:
    """{file name: size} of the regular files directly in `path` (recorded in opsd_state.json at save)."""
    return {p.name: p.stat().st_size for p in sorted(Path(path).iterdir()) if p.is_file()}


def _storage_problem(path: Path) -> str | None:
    """Check the `.distcp` files against the torch.distributed.checkpoint `.metadata` index."""
    if not (path / ".metadata").is_file():
        return None
    try:
        from torch.distributed.checkpoint import FileSystemReader

        md = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a truncated or garbled index
        return f"file .metadata cannot be read ({type(e).__name__}: {e})"
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is not None:
            need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in sorted(need.items()):
        f = path / rel
        if not f.is_file():
            return f"file {rel} is missing"
        have = f.stat().st_size
        if have < size:
            return f"file {rel} is truncated ({have} bytes, the index needs {size})"
    return None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the checkpoint directory `path` cannot be resumed from, or None when it is complete."""
    path = Path(path)
    if not path.is_dir():
        return "the directory does not exist"
    state_path = path / STATE_FILE
    if not state_path.is_file():
        return f"no {STATE_FILE} (the save did not finish, or the file was removed)"
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError) as e:
        return f"file {STATE_FILE} cannot be read ({e})"
    for name, size in sorted((state.get("files") or {}).items()):
        f = path / name
        if not f.is_file():
            return f"file {name} is missing"
        have = f.stat().st_size
        if have != size:
            return f"file {name} has {have} bytes, {size} when it was saved (truncated or overwritten)"
    if not (path / "metadata.json").is_file():
        return "file metadata.json is missing (not a Megatron distributed checkpoint)"
    return _storage_problem(path)


def read_state(path: str | Path) -> dict:
    """The `opsd_state.json` of a checkpoint ({} when absent)."""
    p = Path(path) / STATE_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


@dataclass
class ResumeChoice:
    """The checkpoint a run resumes from and the newer step directories it passed over."""

    path: Path | None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def describe(self) -> str:
        head = f"resuming from {self.path}" if self.path else "no complete checkpoint: starting at step 0"
        if self.skipped:
            head += "; skipped " + "; ".join(f"{n}: {why}" for n, why in self.skipped)
        return head


def choose_resume(root: str | Path) -> ResumeChoice:
    """The newest complete checkpoint under `root` (verified), and the newer ones skipped with reasons."""
    skipped: list[tuple[str, str]] = []
    for _, path in step_dirs(root):
        problem = checkpoint_problem(path)
        if problem is None:
            return ResumeChoice(path, skipped)
        skipped.append((path.name, problem))
    return ResumeChoice(None, skipped)


def verify_checkpoint(path: str | Path, *, key: str = "checkpoint.load") -> Path:
    """`path` when it is a complete checkpoint; else CheckpointError naming `key`, the path and the file."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"config key '{key}': checkpoint {str(path)!r} cannot be loaded: {problem}.")
    return Path(path)
