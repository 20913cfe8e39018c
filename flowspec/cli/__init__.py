"""The `flowspec` command line: one typer app, its commands grouped by pipeline stage.

Each command module registers its commands on the shared app; heavy imports (torch) happen inside the
commands, so `validate` and `show` start fast.
"""

from __future__ import annotations

import signal
import sys

from flowspec.errors import torchrun_worker


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script and of `python -m flowspec`. The commands are imported here (with
    `flowspec.cli.app`), not with this module, so that a Ctrl-C while they are imported is one line too."""
    try:
        from flowspec.cli.app import run

        code = run(argv)
    except KeyboardInterrupt:  # before `run` handles signals itself
        print("error: interrupted (Ctrl-C); files already written are kept", file=sys.stderr)
        code = 130
    if torchrun_worker():  # a torchrun worker that is done: the SIGTERM torchrun sends when another
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # worker exited with an error first keeps its exit code
    sys.exit(code)
