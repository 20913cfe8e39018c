"""The run's record in `metrics.jsonl` (a "train" row every few steps, a row per evaluation) and
`curves.png` redrawn in place."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

METRICS, CURVES = "metrics.jsonl", "curves.png"
TRAIN_LOG_EVERY = 10


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """Append one row (flushed to disk, so a crash keeps every completed evaluation)."""
    with open(run_dir / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: Path, after_step: int | None = None) -> list[dict[str, Any]]:
    """All rows of a run; rows past `after_step` are dropped (what a resumed run will write again)."""
    path = run_dir / METRICS
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if after_step is None or r["step"] <= after_step]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep only rows up to `step`: a resumed run rewrites what came after its checkpoint."""
    rows = read_metrics(run_dir, after_step=step)
    tmp = run_dir / (METRICS + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, run_dir / METRICS)


class TrainLog:
    """Train bits/dim every `every` steps (and after the first), as `metrics.jsonl` rows of kind "train":
    the mean over the finite steps since the last such row, the learning rate and the epoch."""

    def __init__(self, run_dir: Path, every: int = TRAIN_LOG_EVERY):
        self.run_dir, self.every = run_dir, every
        self.total, self.count = 0.0, 0
        self.skipped: int | None = None  # the run's count of skipped steps at the previous step

    def add(self, step: int, bpd: float, lr: float, epoch: float, skipped: int) -> dict[str, Any] | None:
        """Count the step just taken (`skipped`: the run's total of skipped steps so far); return the row
        written at a logging step, else None."""
        if skipped == (self.skipped if self.skipped is not None else skipped) and math.isfinite(bpd):
            self.total, self.count = self.total + bpd, self.count + 1
        self.skipped = skipped
        if (step % self.every and step != 1) or not self.count:
            return None
        row = {"kind": "train", "step": step, "epoch": round(epoch, 4), "train_bpd": self.total / self.count}
        row["lr"] = lr
        append_metrics(self.run_dir, row)
        self.total, self.count = 0.0, 0
        return row


def is_eval(row: dict[str, Any]) -> bool:
    """An evaluation row (test bits/dim, inversion error, ...), not a "train" row."""
    return row.get("kind") != "train"


def smooth(values: list[float]) -> list[float]:
    """A centred moving average over about sqrt(n) points, its window shrinking symmetrically at the ends
    (so a straight trend stays straight and the curve keeps its first and last values)."""
    n = len(values)
    half = max(1, round(math.sqrt(n) / 2))
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    out = []
    for i in range(n):
        h = min(half, i, n - 1 - i)
        out.append((sums[i + h + 1] - sums[i - h]) / (2 * h + 1))
    return out


def _finite(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
    return ([p[0] for p in points], [p[1] for p in points]) if points else ([], [])


def curves_figure(runs: dict[str, list[dict[str, Any]]], title: str = ""):
    """The figure of `curves.png`: train bits/dim (raw faint, smoothed solid) with test points on top,
    and the learning rate in a second panel below; one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 6), layout="constrained")
    bits, lr = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    for i, (name, rows) in enumerate(runs.items()):
        colour, prefix = f"C{i % 10}", f"{name} " if len(runs) > 1 else ""
        logged = [r for r in rows if not is_eval(r)] or rows  # runs from before train rows: eval rows
        xs, ys = _finite(logged, "train_bpd")
        if xs:
            bits.plot(xs, ys, color=colour, alpha=0.25, lw=1, gid=f"{name} train raw")
            bits.plot(xs, smooth(ys), color=colour, lw=1.5, label=f"{prefix}train", gid=f"{name} train")
        xs, ys = _finite([r for r in rows if is_eval(r)], "test_bpd")
        if xs:
            bits.plot(
                xs, ys, "o--", color=colour, ms=5, lw=1, zorder=3, label=f"{prefix}test", gid=f"{name} test"
            )
        xs, ys = _finite(rows, "lr")
        if xs:
            lr.plot(xs, ys, color=colour, gid=f"{name} lr")
    bits.set_ylabel("bits/dim")
    bits.set_title(title)
    bits.grid(alpha=0.3)
    if bits.lines:
        bits.legend()
    lr.set_xlabel("step")
    lr.set_ylabel("learning rate")
    lr.grid(alpha=0.3)
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    return fig


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: Path, title: str = "") -> None:
    """Write `curves_figure` to `path` atomically."""
    fig = curves_figure(runs, title)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
