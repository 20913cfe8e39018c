"""The `flowspec` command line: one typer app, its commands grouped by pipeline stage.

Each command module registers its commands on the shared app; heavy imports (torch) happen inside the
commands, so `validate` and `show` start fast.
"""

from __future__ import annotations

import sys

from flowspec.cli import inspecting, language, training  # noqa: F401  (they register the commands)
from flowspec.cli.app import run


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script and of `python -m flowspec`."""
    sys.exit(run(argv))
