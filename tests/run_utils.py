"""Reading a finished run back in tests: the metric entries that must be equal across a resume, and a
checkpoint's `opsd_state.json`."""

from __future__ import annotations

import json
from pathlib import Path

from opsd_megatron.observe.metrics import TIME_KEYS
from opsd_megatron.run.checkpoint_index import STATE_FILE


def deterministic_view(row: dict) -> dict:
    """A metrics row without wall-time entries (what must be bit-identical across a resume)."""
    return {k: v for k, v in row.items() if not k.startswith(TIME_KEYS) and "per_s" not in k}


def read_state(path: str | Path) -> dict:
    """The `opsd_state.json` of a checkpoint ({} when absent)."""
    p = Path(path) / STATE_FILE
    return json.loads(p.read_text()) if p.is_file() else {}
