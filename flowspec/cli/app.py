"""The typer app shared by all command modules, and the user-error boundary."""

from __future__ import annotations

import sys

import typer

from flowspec.errors import UserError

app = typer.Typer(
    name="flowspec",
    help="Declarative normalizing-flow image models: validate, show, inspect, train, eval, sample, ablate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def run(argv: list[str] | None = None) -> int:
    """Run the app and return its exit code.

    A `UserError` becomes its one-paragraph message on stderr and exit code 2; usage errors (bad options)
    keep typer's own message and its exit code 2.
    """
    try:
        app(args=argv, prog_name="flowspec")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
