"""The run's record in `metrics.jsonl` (a "train" row at every logging step, a row per evaluation) and
`curves.png` redrawn in place; the running means of the training loss, kept on the device."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flowspec.errors import UserError, named_error, naming

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS, CURVES = "metrics.jsonl", "curves.png"


def append_metrics(run_dir: Path, row: dict[str, Any], drop_evaluation_at: int | None = None) -> None:
    """Append one row (flushed to disk, so a crash keeps every completed evaluation); a write that fails
    (a full disk) is undone, so the file never ends in half a row. With `drop_evaluation_at`, the file is
    rewritten at once without what came after that step and without an evaluation at it, then the row
    (`truncate_metrics`)."""
    if drop_evaluation_at is not None:
        truncate_metrics(run_dir, drop_evaluation_at, drop_evaluation=True, then=row)
        return
    path = run_dir / METRICS
    with naming(path), open(path, "a") as f:
        size = f.tell()
        try:
            f.write(_line(row))
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            f.truncate(size)
            raise


def _line(row: dict[str, Any]) -> str:
    """A row as one line of strict JSON: a value that is not finite becomes null (NaN is not JSON)."""
    row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    return json.dumps(row, allow_nan=False) + "\n"


def read_metrics(run_dir: Path, after_step: int | None = None) -> list[dict[str, Any]]:
    """All rows of a run; rows past `after_step` are dropped (what a resumed run will write again). A last
    line cut short (a process killed while writing it) is left out; any other line that is not a row is
    a `UserError` naming the file and line."""
    path = run_dir / METRICS
    if not path.exists():
        return []
    with naming(path, "reading"):
        lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if _is_row(row):
            rows.append(row)
        elif number < len(lines):  # the last element follows the last newline: a row not yet finished
            raise UserError(
                f"{path}:{number} is not a row of flowspec metrics ({line[:40]!r}): this run's record is "
                f"damaged; remove that line (or the file) and try again"
            )
    return [r for r in rows if after_step is None or r["step"] <= after_step]


NUMBERS = ("epoch", "train_bpd", "test_bpd", "test_images", "inversion_error", "lr", "grad_norm", "img_s")
NUMBERS += ("skipped", "eval_seconds")  # a row's numbers (each may be null)


def _is_row(row: Any) -> bool:
    """A dict with a whole `step`, and numbers (or null) where a row has them."""
    if not isinstance(row, dict) or type(row.get("step")) is not int:
        return False
    return all(row[k] is None or type(row[k]) in (int, float) for k in NUMBERS if k in row)


def truncate_metrics(
    run_dir: Path, step: int, drop_evaluation: bool = False, then: dict[str, Any] | None = None
) -> None:
    """Keep only rows up to `step`: a resumed run rewrites what came after its checkpoint. With
    `drop_evaluation`, an evaluation at `step` goes too (one that the uninterrupted run would not make);
    `then` is a row added after them, in the same replacement of the file."""
    rows = read_metrics(run_dir, after_step=step)
    if drop_evaluation:
        rows = [r for r in rows if not (r["step"] == step and is_eval(r))]
    rows += [then] if then is not None else []
    path, tmp = run_dir / METRICS, run_dir / (METRICS + ".tmp")
    try:
        tmp.write_text("".join(_line(r) for r in rows))
        os.replace(tmp, path)
    except OSError as error:  # named as the file the user knows; it is left as it was
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise named_error(error, path) from None


def check_writable(run_dir: Path) -> None:
    """Raise the `OSError` (named as metrics.jsonl) that rewriting the metrics would meet in a folder that
    is read-only, by making and removing the file `truncate_metrics` writes first."""
    path, tmp = run_dir / METRICS, run_dir / (METRICS + ".tmp")
    try:
        tmp.write_text("")
        tmp.unlink()
    except OSError as error:
        raise named_error(error, path) from None


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


def curves_figure(runs: dict[str, list[dict[str, Any]]], title: str = "") -> Figure:
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
            dot = "o" if len(set(xs)) < 2 else None  # a single step draws no line
            bits.plot(xs, ys, color=colour, alpha=0.25, lw=1, gid=f"{name} train raw")
            bits.plot(
                xs, smooth(ys), color=colour, lw=1.5, marker=dot, label=f"{prefix}train", gid=f"{name} train"
            )
        xs, ys = _finite([r for r in rows if is_eval(r)], "test_bpd")
        if xs:
            bits.plot(
                xs, ys, "o--", color=colour, ms=5, lw=1, zorder=3, label=f"{prefix}test", gid=f"{name} test"
            )
        xs, ys = _finite(rows, "lr")
        if xs:
            lr.plot(xs, ys, color=colour, marker="o" if len(set(xs)) < 2 else None, gid=f"{name} lr")
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
    try:
        with naming(path):
            fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def record(run_dir: Path, row: dict[str, Any], name: str) -> None:
    """Append an evaluation's row and redraw the run's curves."""
    append_metrics(run_dir, row)
    plot_curves({name: read_metrics(run_dir)}, run_dir / CURVES, name)


class Window:
    """Train bits/dim and gradient norm (of the loss in nats per image) since the last `reset`, over the
    steps that were not skipped, and the training throughput. The sums stay on the device: `add` never
    waits for it, `read` does, and times the training since the previous `read`; the time between
    `pause` and `restart_clock` (an evaluation, a checkpoint) is not training and is not counted."""

    def __init__(self, device: torch.device):
        self._sums = torch.zeros(3, dtype=torch.float64, device=device)  # bits/dim, norm, good steps
        self._last = torch.full((), math.nan, dtype=torch.float64, device=device)
        self.images, self.seconds, self.total_images, self.total_seconds = 0, 0.0, 0, 0.0
        self.first: tuple[int, float] | None = None  # the first read's images and seconds (warm-up)
        self.recent_bpd: float | None = None  # mean bits/dim of the good steps between the last two reads
        self._seen = (0.0, 0.0)  # the bits/dim sum and good steps at the previous read
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
        recent = good - self._seen[1]
        self.recent_bpd, self._seen = ((bpd - self._seen[0]) / recent if recent else None), (bpd, good)
        self._count()
        return (bpd / good, norm / good, last) if good else (None, None, last)

    def _count(self) -> None:
        """Add the images trained since the clock last started, and the time they took, to the rates."""
        now = time.monotonic()
        images, seconds = self._pending, now - self._since if self._since is not None else 0.0
        if images:
            self.images, self.seconds = self.images + images, self.seconds + seconds
            if self.first is None:  # the first step(s) warm up (allocations, lazy init): not the run's rate
                self.first = (images, seconds)
            else:
                self.total_images += images
                self.total_seconds += seconds
        self._since, self._pending = (now if self._since is not None else None), 0

    def pause(self) -> None:
        """Stop the clock (what follows until `restart_clock` is not training)."""
        self._count()
        self._since = None

    def restart_clock(self) -> None:
        """Time from now on (what came since the last `read` is not training)."""
        self._since, self._pending = time.monotonic(), 0

    def state_dict(self) -> dict[str, Any]:
        """The running sums and the images and seconds counted since the reset: what a resumed run needs to
        log the means and throughput the uninterrupted run would."""
        sums = {"sums": self._sums.tolist(), "last": self._last.item(), "seen": list(self._seen)}
        return sums | {"images": self.images, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sums.copy_(torch.tensor(state["sums"], dtype=torch.float64))
        self._last.fill_(state["last"])
        self._seen = (float(state["seen"][0]), float(state["seen"][1]))
        self.images, self.seconds = state.get("images", 0), state.get("seconds", 0.0)  # absent from older

    def latest(self) -> float:
        """The bits/dim of the latest good step (nan before the first)."""
        return self._last.item()

    def reset(self) -> None:
        self._sums.zero_()
        self._seen = (0.0, 0.0)
        self.images, self.seconds = 0, 0.0

    def img_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def overall_img_s(self) -> float:
        """Training images per second, the first read's steps left out unless they are all there is (and
        when this process trained none, those of the interval it resumed)."""
        if self.total_images and self.total_seconds:
            return self.total_images / self.total_seconds
        return self.first[0] / self.first[1] if self.first and self.first[1] else self.img_s()
