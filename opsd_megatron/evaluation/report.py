"""Evaluation outputs: the terminal table, the summary JSON and flat metric names for loggers.

print(format_table(summary))        # summary: what `evaluate` returns
flat_metrics(summary, "eval")       # {"eval/aime24/avg@12": 0.43, ..., "eval/overall/maj@12": ...}
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def format_table(summary: dict) -> str:
    """A fixed-width table: one row per benchmark plus the problem-weighted and benchmark-mean overall rows.

    Columns (percent): Avg@n, Pass@1, Pass@k for k = 2, 4, 8, ... below n, Pass@n, Maj@n; then the share of
    samples without a boxed answer and of truncated samples.
    """
    n = int(summary["n"])
    ks = sorted({1, n} | {k for k in (2, 4, 8, 16, 32, 64) if k < n})
    cols = [f"avg@{n}"] + [f"pass@{k}" for k in ks] + [f"maj@{n}"]
    extra = ["no_answer_rate", "truncated_rate"]
    rows: list[tuple[str, dict]] = [(name, m) for name, m in summary["benchmarks"].items()]
    overall = summary.get("overall", {})
    if len(rows) > 1 and overall.get("num_problems"):
        rows.append(("overall", overall))
        rows.append(("mean(bench)", {c: overall.get(f"macro_{c}") for c in cols + extra}))
    width = max([len("benchmark")] + [len(r[0]) for r in rows])
    head = f"{'benchmark':<{width}} {'#':>5} " + " ".join(f"{c:>8}" for c in cols)
    head += " " + " ".join(f"{h:>9}" for h in ("no-box", "truncated"))
    lines = [head, "-" * len(head)]
    for name, m in rows:
        cells = [_pct(m.get(c)) for c in cols]
        more = [_pct(m.get(c), 9) for c in extra]
        count = m.get("num_problems")
        lines.append(
            f"{name:<{width}} {'' if count is None else count:>5} " + " ".join(cells) + " " + " ".join(more)
        )
    return "\n".join(lines)


def _pct(v: float | None, w: int = 8) -> str:
    return f"{'-':>{w}}" if v is None else f"{100 * v:>{w}.1f}"


def flat_metrics(summary: dict, prefix: str = "eval") -> dict[str, float]:
    """`{prefix}/{benchmark}/{metric}` and `{prefix}/overall/{metric}` scalars, for TensorBoard / W&B."""
    out: dict[str, float] = {}
    for name, m in list(summary["benchmarks"].items()) + [("overall", summary.get("overall", {}))]:
        for k, v in m.items():
            if isinstance(v, (int, float)):
                out[f"{prefix}/{name}/{k}"] = float(v)
    return out


def write_json_atomic(path: str | Path, obj: dict) -> None:
    """Write JSON through a temporary file and a rename, so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
