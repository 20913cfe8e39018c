"""SIGINT and SIGTERM during training: noted, so the loop can finish its step (or an evaluation its batch),
save and stop."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, ClassVar

from flowspec.errors import torchrun_worker

# what work that stops between batches asks: the name of a signal received (SIGINT, SIGTERM), or None
StopCheck = Callable[[], "str | None"]


class StoppedBySignal(Exception):
    """A stop signal ended work that stops between batches (an evaluation, a sample grid); `done` says how
    far it got, e.g. "after 320 of 1000 test images"."""

    def __init__(self, signal_name: str, done: str):
        super().__init__(f"{signal_name} {done}")
        self.signal, self.done = signal_name, done

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM: what a shell reports for a process the signal ended."""
        return 128 + int(signal.Signals[self.signal])


def is_signal(stopped: str | None) -> bool:
    """Whether a run (or an ablation) was stopped by SIGINT or SIGTERM (its `stopped` names the signal)."""
    return stopped in ("SIGINT", "SIGTERM")


def never() -> str | None:
    """The stop check of work that nothing interrupts."""
    return None


class StopSignals:
    """While active, SIGINT and SIGTERM set `received` instead of stopping the process.

    A second signal of the same kind acts as usual (KeyboardInterrupt, or termination), so a stuck run
    can still be stopped; under torchrun only after `ECHO_SECONDS`, since a scheduler's SIGTERM to every
    process of a job reaches each worker twice (its own, and the one torchrun forwards). The previous
    handlers are restored on exit. Outside the main thread, or when `enabled` is false, nothing is
    installed and `received` stays None. Nested inside another (an ablation's runs), it starts with the
    outer one's signal and hands its own back on exit. `announce`, when given, is written to stderr on the
    first signal after its name (e.g. "SIGINT: <announce>"), so that a stop that takes a while is seen.
    """

    _active: ClassVar[list[StopSignals]] = []  # entered and not yet left, innermost last
    ECHO_SECONDS = 5.0

    def __init__(self, enabled: bool = True, announce: str | None = None):
        self.enabled, self.announce = enabled, announce
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        self._first: dict[int, float] = {}  # signal -> when it first came
        self._echoes = torchrun_worker()

    def check(self) -> str | None:
        """The signal received so far (a `StopCheck`)."""
        return self.received

    def _note(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if signum in self._first:  # a torchrun worker's second signal (elsewhere the default acts)
            if now - self._first[signum] < self.ECHO_SECONDS:
                return  # the same stop, forwarded by torchrun
            signal.signal(signum, signal.SIG_DFL)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)  # terminated, as without a handler
            return
        self._first[signum] = now
        self.received = signal.Signals(signum).name
        if self.announce:  # os.write: a print here could re-enter a print the signal interrupted
            with contextlib.suppress(OSError):  # stderr's reader gone (`| tee` killed by the same Ctrl-C)
                os.write(2, f"\n{self.received}: {self.announce}\n".encode())
        if not self._echoes:  # the kernel's default: it stops a process stuck in a long kernel call too
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def __enter__(self) -> StopSignals:
        if self.enabled:
            try:
                self._previous = {s: signal.signal(s, self._note) for s in (signal.SIGINT, signal.SIGTERM)}
            except ValueError:  # not the main thread: leave signals alone
                self._previous = {}
        if self._previous:
            self.received = StopSignals._active[-1].received if StopSignals._active else None
            StopSignals._active.append(self)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._previous:
            StopSignals._active.remove(self)
            if StopSignals._active and self.received:
                StopSignals._active[-1].received = self.received
        self._previous = {}
