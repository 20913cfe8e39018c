"""What the user sees while training: a rich progress bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any


class Reporter:
    """Progress of a run. `mode`: "bar" (rich, for terminals), "lines" (logs, pipes) or "quiet" (nothing)."""

    def __init__(self, mode: str, total: int | None, start_step: int, every_s: float = 30.0):
        self.mode, self.total, self.every_s = mode, total, every_s
        self._last_line = time.monotonic()
        self._bar = None
        if mode == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._task = self._bar.add_task("train", total=total, completed=start_step, stats="")
            self._bar.start()

    @staticmethod
    def auto(quiet: bool, total: int | None, start_step: int) -> Reporter:
        mode = "quiet" if quiet else ("bar" if sys.stdout.isatty() else "lines")
        return Reporter(mode, total, start_step)

    def step(self, step: int, bpd: float, img_s: float) -> None:
        stats = f"step {step}  {bpd:.3f} bits/dim  {img_s:.1f} img/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, stats=stats)
        elif self.mode == "lines" and time.monotonic() - self._last_line >= self.every_s:
            self._last_line = time.monotonic()
            of = f"/{self.total}" if self.total else ""
            print(f"step {step}{of}  train {bpd:.4f} bits/dim  {img_s:.1f} img/s", flush=True)

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)
        elif self.mode == "lines":
            print(text, flush=True)

    def evaluation(self, row: dict[str, Any]) -> None:
        train = f"{row['train_bpd']:.4f}" if row.get("train_bpd") is not None else "-"
        self.message(
            f"step {row['step']}  epoch {row['epoch']:.2f}  train {train}  "
            f"test {row['test_bpd']:.4f} bits/dim  "
            f"inversion error {row['inversion_error']:.1e}  lr {row['lr']:.2e}  {row['img_s']:.1f} img/s  "
            f"skipped {row['skipped']}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
