"""PNG plots of a training run, written next to its metrics.jsonl.

    python -m opsd_megatron.observe.plots RUN_DIR            # -> RUN_DIR/plots.png
    plot_run("runs/demo/opsd")                       # same, returns the PNG path

Panels (those with data): the loss, the divergence, the rollout accuracy (the student's own samples, per
step), and the held-out accuracy per evaluation. Held-out points come from `RUN_DIR/eval/step_*/summary.json`
(the trainer's periodic evaluation, and any evaluation written there, e.g. the demo's step-0 run of
`opsd-eval`), with a 95 % confidence interval over problems when `generations.jsonl` is there; metrics rows
with `eval/overall/avg@n` fill in otherwise. Works on any run (OPSD or SFT). Needs matplotlib (Agg backend).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from pathlib import Path

from opsd_megatron.evaluation.paired import accuracy_ci
from opsd_megatron.observe.metrics import read_metrics

log = logging.getLogger(__name__)

PANELS = (("loss", "loss"), ("divergence", "divergence"), ("rollout/accuracy", "rollout accuracy"))


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not math.isnan(float(v)):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def _same(a: tuple, b: tuple) -> bool:
    """Two panels (key, label, xs, ys) with the same steps and values (to 1e-5 relative)."""
    return a[2] == b[2] and all(abs(x - y) <= 1e-5 * max(1.0, abs(x)) for x, y in zip(a[3], b[3]))


def heldout_points(run_dir: str | Path) -> list[tuple[int, float, float]]:
    """(step, Avg@n, 95 % CI half-width) of every held-out evaluation of the run, sorted by step."""
    run = Path(run_dir)
    pts: dict[int, tuple[float, float]] = {}
    for d in sorted((run / "eval").glob("step_*")):
        m = re.fullmatch(r"step_(\d+)", d.name)
        if m and (d / "summary.json").is_file() and (d / "generations.jsonl").is_file():
            mean, half = accuracy_ci(d)
            pts[int(m.group(1))] = (mean, half)
    if not pts:
        for r in read_metrics(run) if (run / "metrics.jsonl").is_file() else []:
            keys = [k for k in r if re.fullmatch(r"eval/overall/avg@\d+", k)]
            if keys:
                pts[int(r["step"])] = (float(r[keys[0]]), float("nan"))
    return sorted((s, m, h) for s, (m, h) in pts.items())


def plot_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    title: str | None = None,
    compare: dict[str, str | Path] | None = None,
) -> Path:
    """Write the run's plots to `out` (default RUN_DIR/plots.png); returns the path. `compare` ({label: run
    dir}) overlays other runs' held-out accuracy (e.g. the control run) on the held-out panel."""
    import matplotlib  # heavy: only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    if not (run / "metrics.jsonl").is_file():
        raise FileNotFoundError(
            f"{str(run / 'metrics.jsonl')!r} does not exist: not a training run directory."
        )
    rows = read_metrics(run)
    panels = [(k, label, *_series(rows, k)) for k, label in PANELS]
    panels = [p for p in panels if p[2]]
    if (
        len(panels) > 1
        and panels[0][0] == "loss"
        and panels[1][0] == "divergence"
        and _same(panels[0], panels[1])
    ):
        panels = panels[1:]  # OPSD without clipping: the loss is the divergence
    held = heldout_points(run)
    n = len(panels) + (1 if held else 0)
    if n == 0:
        raise ValueError(
            f"{str(run)!r}: metrics.jsonl has none of {[k for k, _ in PANELS]} and no evaluations."
        )
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.0), squeeze=False)
    for ax, (key, label, xs, ys) in zip(axes[0], panels):
        if key == "rollout/accuracy":
            ys = [100 * y for y in ys]
            label += " (%)"
        ax.plot(xs, ys, marker="." if len(xs) < 40 else None, alpha=0.5 if len(xs) >= 10 else 1.0)
        if len(xs) >= 10:  # noisy per-step values: add a 5-step moving average
            k = 5
            avg = [
                sum(ys[max(0, i - k + 1) : i + 1]) / len(ys[max(0, i - k + 1) : i + 1])
                for i in range(len(ys))
            ]
            ax.plot(xs, avg, color="C1", label="5-step mean")
            ax.legend(fontsize=7)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if held:
        ax = axes[0][-1]
        steps = [s for s, _, _ in held]
        acc = [100 * a for _, a, _ in held]
        err = [0 if math.isnan(h) else 100 * h for _, _, h in held]
        ax.errorbar(steps, acc, yerr=err, marker="o", capsize=3, label=title or "this run")
        for i, (label, other) in enumerate((compare or {}).items()):
            pts = heldout_points(other)
            oerr = [0 if math.isnan(h) else 100 * h for _, _, h in pts]
            ax.errorbar([p[0] for p in pts], [100 * p[1] for p in pts], yerr=oerr, marker="s", capsize=3,
                        color=f"C{i + 2}", label=label)  # fmt: skip
        if compare:
            ax.legend(fontsize=7)
        ax.set_title("held-out accuracy (%, 95% CI)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(out) if out is not None else run / "plots.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m opsd_megatron.observe.plots", description=__doc__.split("\n")[0]
    )
    ap.add_argument("run_dir", help="A run's output_dir (with metrics.jsonl).")
    ap.add_argument("--out", help="PNG path (default RUN_DIR/plots.png).")
    ap.add_argument("--title")
    ap.add_argument("--compare", action="append", metavar="LABEL=RUN_DIR", help="Overlay another run's "
                    "held-out accuracy (repeatable).")  # fmt: skip
    a = ap.parse_args(argv)
    try:
        compare = dict(c.rsplit("=", 1) for c in a.compare or [])
        path = plot_run(a.run_dir, a.out, a.title, compare)
    except (FileNotFoundError, ValueError) as e:
        print(f"plots: {e}")
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
