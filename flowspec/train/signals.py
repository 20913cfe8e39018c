"""SIGINT and SIGTERM during training: noted, so the loop can finish its step, save and stop."""

from __future__ import annotations

import signal
from types import TracebackType
from typing import Any


class StopSignals:
    """While active, SIGINT and SIGTERM set `received` instead of stopping the process.

    A second signal of the same kind acts as usual (KeyboardInterrupt, or termination), so a stuck run
    can still be stopped. The previous handlers are restored on exit. Outside the main thread, or when
    `enabled` is false, nothing is installed and `received` stays None.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _note(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def __enter__(self) -> StopSignals:
        if self.enabled:
            try:
                self._previous = {s: signal.signal(s, self._note) for s in (signal.SIGINT, signal.SIGTERM)}
            except ValueError:  # not the main thread: leave signals alone
                self._previous = {}
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
