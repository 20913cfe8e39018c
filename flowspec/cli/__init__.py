"""The `flowspec` command line: one typer app, its commands grouped by pipeline stage.

Each command module registers its commands on the shared app; heavy imports (torch) happen inside the
commands, so `validate` and `show` start fast.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading

_done: int | None = None  # the exit code of the command `main` ran (in the main thread), once it is done


class _Terminated(BaseException):
    """SIGTERM before the command line's own handlers are in place (`run` installs them); a BaseException,
    as KeyboardInterrupt, so that no `except Exception` takes it for a bug."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


def _exit_now(signum: int, frame: object) -> None:
    """SIGINT or SIGTERM while the interpreter exits, after the command is done: the process ends at once
    with the command's exit code, the exit handlers left (one can hang: a data-loading worker joined whose
    read of a stalled network filesystem never returns). Every file the command wrote is complete by then;
    the output still buffered is written first."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a reader gone; a write the signal interrupted
            stream.flush()
    os._exit(_done if _done is not None else 1)


def _ignore_signals() -> None:
    """The last exit handler (registered before the others, with this module): past it, Python reads no
    handler of its own (it resets them to the default, which ends the process by the signal), so SIGINT
    and SIGTERM are ignored for the rest of the exit, which frees memory and does not wait."""
    if _done is not None and threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


atexit.register(_ignore_signals)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script and of `python -m flowspec`. The commands are imported here (with
    `flowspec.cli.app`), not with this module, so that a Ctrl-C or SIGTERM while they are imported is one
    line too. Once the command is done, either ends the process at once with the command's exit code while
    the interpreter exits (`_exit_now`): torch's exit handlers, cut short by the signal, would print a
    traceback or end the process by the signal, without a word, and one that hangs would hold it."""
    global _done
    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    if in_main_thread:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        from flowspec.cli.app import run

        code = run(argv)
    except KeyboardInterrupt:  # before `run` handles signals itself
        print("error: interrupted (Ctrl-C); files already written are kept", file=sys.stderr)
        code = 130
    except _Terminated:
        print("error: terminated (SIGTERM); files already written are kept", file=sys.stderr)
        code = 143
    # also keeps a torchrun worker's exit code when torchrun sends SIGTERM after another worker failed
    if in_main_thread:
        _done = code
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _exit_now)
    sys.exit(code)
