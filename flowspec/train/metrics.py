"""The run's record: one JSON line per evaluation in `metrics.jsonl`, and `curves.png` redrawn in place;
the running means of the training loss between evaluations, kept on the device."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from flowspec.errors import naming

METRICS, CURVES = "metrics.jsonl", "curves.png"


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """Append one row (flushed to disk, so a crash keeps every completed evaluation); a write that fails
    (a full disk) is undone, so the file never ends in half a row."""
    path = run_dir / METRICS
    with naming(path), open(path, "a") as f:
        size = f.tell()
        try:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            f.truncate(size)
            raise


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
    with naming(tmp):
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, run_dir / METRICS)


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: Path, title: str = "") -> None:
    """Train and test bits/dim against steps, one colour per run; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, rows) in enumerate(runs.items()):
        colour = f"C{i % 10}"
        for key, style in (("train_bpd", "--"), ("test_bpd", "-")):
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
            if points:
                xs, ys = zip(*points, strict=True)
                label = f"{name} {key.split('_')[0]}" if len(runs) > 1 else key.split("_")[0]
                ax.plot(
                    xs, ys, style, color=colour, marker="o" if key == "test_bpd" else None, ms=3, label=label
                )
    ax.set_xlabel("step")
    ax.set_ylabel("bits/dim")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        with naming(path):
            fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def record(run_dir: Path, row: dict[str, Any], name: str) -> None:
    """Append an evaluation's row and redraw the run's curves."""
    append_metrics(run_dir, row)
    plot_curves({name: read_metrics(run_dir)}, run_dir / CURVES, name)


class Window:
    """Train bits/dim and gradient norm since the last `reset`, over the steps that were not skipped, and
    the training throughput. The sums stay on the device: `add` never waits for it, `read` does, and
    times the training since the previous `read` (or `restart_clock`, after an evaluation)."""

    def __init__(self, device: torch.device):
        self._sums = torch.zeros(3, dtype=torch.float64, device=device)  # bits/dim, norm, good steps
        self._last = torch.full((), math.nan, dtype=torch.float64, device=device)
        self.images, self.seconds, self.total_images, self.total_seconds = 0, 0.0, 0, 0.0
        self.restart_clock()

    def add(self, bpd: torch.Tensor, norm: torch.Tensor, ok: torch.Tensor, images: int = 0) -> None:
        """One step of `images` (all ranks): its mean bits/dim and gradient norm; `ok` (a bool tensor) is
        false for a skipped step."""
        zero = torch.zeros((), dtype=torch.float64, device=self._sums.device)
        bpd, norm = bpd.detach().double(), norm.detach().double()
        self._sums += torch.stack([torch.where(ok, bpd, zero), torch.where(ok, norm, zero), ok.double()])
        self._last = torch.where(ok, bpd, self._last)
        self._pending += images

    def read(self) -> tuple[float | None, float | None, float]:
        """Mean bits/dim and gradient norm since the reset (None when every step was skipped), and the
        bits/dim of the latest good step (nan before the first)."""
        bpd, norm, good, last = torch.cat([self._sums, self._last[None]]).tolist()
        now = time.monotonic()
        self.images, self.seconds = self.images + self._pending, self.seconds + now - self._since
        self.total_images += self._pending
        self.total_seconds += now - self._since
        self._since, self._pending = now, 0
        return (bpd / good, norm / good, last) if good else (None, None, last)

    def restart_clock(self) -> None:
        """Time from now on (what came since the last `read` is not training)."""
        self._since, self._pending = time.monotonic(), 0

    def reset(self) -> None:
        self._sums.zero_()
        self.images, self.seconds = 0, 0.0

    def img_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def overall_img_s(self) -> float:
        return self.total_images / self.total_seconds if self.total_seconds else 0.0
