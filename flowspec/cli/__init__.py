"""The `flowspec` command line: one typer app, its commands grouped by pipeline stage.

Each command module registers its commands on the shared app; heavy imports (torch) happen inside the
commands, so `validate` and `show` start fast.
"""

from __future__ import annotations

import signal
import sys
import threading


class _Terminated(BaseException):
    """SIGTERM before the command line's own handlers are in place (`run` installs them); a BaseException,
    as KeyboardInterrupt, so that no `except Exception` takes it for a bug."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script and of `python -m flowspec`. The commands are imported here (with
    `flowspec.cli.app`), not with this module, so that a Ctrl-C or SIGTERM while they are imported is one
    line too. Once the command is done, both are ignored while the interpreter exits: torch's exit
    handlers, cut short, would print a traceback or end the process by the signal, without a word."""
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
    for signum in (signal.SIGINT, signal.SIGTERM) if in_main_thread else ():
        signal.signal(signum, signal.SIG_IGN)
    sys.exit(code)
