"""The `flowspec` command line: one typer app, its commands grouped by pipeline stage.

Each command module registers its commands on `app`; heavy imports (torch) happen inside the commands,
so `validate` and `show` start fast.
"""

from __future__ import annotations

import sys

from flowspec.cli.app import app
from flowspec.cli import language  # noqa: F401  (registers validate, show)
from flowspec.cli import inspecting  # noqa: F401  (registers inspect, diff)
from flowspec.cli import training  # noqa: F401  (registers train, eval, sample, ablate)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script and of `python -m flowspec`."""
    from flowspec.cli.app import run

    sys.exit(run(argv))
