"""What the user sees while training: a rich progress bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any


class Reporter:
    """Progress of a run. `mode`: "bar" (rich, for terminals), "lines" (logs, pipes) or "quiet" (only the
    notes, unless `notes` is False)."""

    def __init__(
        self,
        mode: str,
        total: int | None,
        start_step: int,
        every_s: float = 30.0,
        train: bool = True,
        notes: bool = True,
    ):
        self.mode, self.total, self.every_s, self.notes = mode, total, every_s, notes
        self._last_line = time.monotonic()
        self._bar = None
        self.lost = False  # stdout's reader went away (`| head`, a `| tee` that Ctrl-C killed)
        if mode == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            if train:
                self._task = self._bar.add_task("train", total=total, completed=start_step, stats="")
            self._bar.start()

    @staticmethod
    def auto(
        quiet: bool, total: int | None, start_step: int, train: bool = True, notes: bool = True
    ) -> Reporter:
        mode = "quiet" if quiet else ("bar" if sys.stdout.isatty() else "lines")
        return Reporter(mode, total, start_step, train=train, notes=notes)

    def meter(self, label: str, total: int, unit: str) -> Meter:
        """The progress of one pass of an evaluation over `total` `unit`s (test images, samples)."""
        lines = self._print if self.mode == "lines" else None
        return Meter(label, total, unit, self._bar, lines, self.every_s)

    def step(self, step: int, bpd: float, img_s: float) -> None:
        stats = f"step {step}  {bpd:.3f} bits/dim  {img_s:.1f} img/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, stats=stats)
        elif self.mode == "lines" and time.monotonic() - self._last_line >= self.every_s:
            self._last_line = time.monotonic()
            of = f"/{self.total}" if self.total else ""
            self._print(f"step {step}{of}  train {bpd:.4f} bits/dim  {img_s:.1f} img/s")

    def message(self, text: str, keep: bool = False) -> None:
        """A line as written (no rich markup, not wrapped). `keep`: a line that must be seen (a stop's
        resume command), on stderr once stdout's reader is gone."""
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False, soft_wrap=True)
        elif self.mode == "lines":
            self._print(text)
        if keep and self.lost:
            with contextlib.suppress(OSError):
                print(text, file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """A line that says why the run does other than asked (nothing, on other data, with files moved):
        shown in "quiet" mode too, where `notes` allows (under torchrun, rank 0's)."""
        if self.mode != "quiet":
            self.message(text)
        elif self.notes:
            self._print(text)

    def _print(self, text: str) -> None:
        """A log line on stdout; once its reader is gone (a broken pipe), nothing more: stdout then writes
        to the null device, so that the run goes on and nothing fails at exit."""
        if self.lost:
            return
        try:
            print(text, flush=True)
        except OSError:
            self.lost = True
            with contextlib.suppress(OSError, ValueError):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, sys.stdout.fileno())
                os.close(null)

    def evaluation(self, row: dict[str, Any]) -> None:
        train = f"{row['train_bpd']:.4f}" if row.get("train_bpd") is not None else "-"
        inversion = row["inversion_error"]
        self.message(
            f"step {row['step']}  epoch {row['epoch']:.2f}  train {train}  "
            f"test {row['test_bpd']:.4f} bits/dim  "
            f"inversion error {f'{inversion:.1e}' if math.isfinite(inversion) else '-'}  "
            f"lr {row['lr']:.2e}  {row['img_s']:.1f} img/s  skipped {row['skipped']}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


class Meter:
    """Progress of one pass of an evaluation: done of `total`, the running bits/dim when there is one, and
    the time left; as a task on a rich progress bar (removed when closed), or a log line (written by
    `lines`) every `every_s` seconds. Called like `evaluate.Progress` with each batch."""

    def __init__(
        self,
        label: str,
        total: int,
        unit: str,
        bar: Any = None,
        lines: Callable[[str], None] | None = None,
        every_s: float = 30.0,
    ):
        self.label, self.total, self.unit = label, total, unit
        self.bar, self.lines, self.every_s = bar, lines, every_s
        self.done = 0
        self._start = self._last = time.monotonic()
        self._task = bar.add_task(label, total=total, stats=unit) if bar is not None else None

    def __call__(self, count: int, bpd: float | None = None) -> None:
        self.done += count
        stats = f"{self.unit}  {bpd:.4f} bits/dim" if bpd is not None else self.unit
        if self.bar is not None:
            self.bar.update(self._task, advance=count, stats=stats)
        elif self.lines is not None and time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            self.lines(f"{self.label} {self.done}/{self.total} {stats}  {self._left()} left")

    def _left(self) -> str:
        elapsed = time.monotonic() - self._start
        seconds = elapsed / self.done * (self.total - self.done) if self.done else math.nan
        return duration(seconds)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.remove_task(self._task)
            self._task = None


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h10m` (`?` when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
