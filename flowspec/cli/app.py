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


def fail(error: UserError) -> None:
    """Print a user error as one clean paragraph on stderr and exit with its code (2)."""
    print(str(error), file=sys.stderr)
    raise typer.Exit(code=error.exit_code)


def run(argv: list[str] | None = None) -> int:
    """Run the app; user errors become a message and exit code 2, usage errors keep click's code 2."""
    try:
        result = app(args=argv, standalone_mode=False)
    except UserError as error:
        print(str(error), file=sys.stderr)
        return error.exit_code
    except typer.Exit as done:
        return done.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # click usage errors and aborts
        import click

        if isinstance(error, click.ClickException):
            error.show()
            return error.exit_code
        if isinstance(error, click.exceptions.Abort):
            return 1
        raise
    return result if isinstance(result, int) else 0
