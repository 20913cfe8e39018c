"""How eval, sample and ablate stop on a signal: one line saying what is kept, and the signal's exit code."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from flowspec.train.signals import StopSignals


@contextmanager
def stoppable(work: str, kept: str = "nothing was written") -> Iterator[StopSignals]:
    """SIGINT and SIGTERM stop `work` between batches: one line on stderr (saying what is `kept`), exit
    code 130 or 143."""
    from flowspec.train.signals import StoppedBySignal, StopSignals

    try:
        with StopSignals(announce=f"stopping {work} after the batch in progress (again: at once)") as signals:
            yield signals
    except StoppedBySignal as stop:
        print(f"{stop.signal}: {work} stopped {stop.done}; {kept}", file=sys.stderr)
        raise typer.Exit(stop.exit_code) from None
    except KeyboardInterrupt:  # a second Ctrl-C
        print(f"interrupted: {work} stopped; {kept}", file=sys.stderr)
        raise typer.Exit(130) from None
