"""`flowspec validate` and `flowspec show`: check specs and print them resolved. Neither imports torch."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from flowspec.cli.app import app
from flowspec.cli.examples import epilog
from flowspec.cli.options import SetOption, load_cli_spec
from flowspec.errors import UserError
from flowspec.inspection.unroll import check_steps


class ShowFormat(str, Enum):
    flow = "flow"
    json = "json"


@app.command(epilog=epilog("validate"))
def validate(
    specs: Annotated[list[Path], typer.Argument(metavar="SPEC", help="Spec files to check.")],
    sets: SetOption = None,
) -> None:
    """Check spec files: syntax, settings, extends, and shapes through every step. Exit 2 if any is wrong."""
    failed = 0
    for path in specs:
        try:
            spec = load_cli_spec(path, sets)
            check_steps(spec)
        except UserError as error:
            failed += 1
            named = len(specs) == 1 or str(path) in str(error)  # else say which spec it is about
            typer.echo(f"error: {error}" if named else f"error: {path}: {error}", err=True)
            continue
        typer.echo(f"ok: {path} ({spec.name})")
    if failed:
        typer.echo(f"{failed} of {len(specs)} specs have errors", err=True)
        raise typer.Exit(code=2)


@app.command(epilog=epilog("show"))
def show(
    spec: Annotated[Path, typer.Argument(metavar="SPEC", help="Spec file to show.")],
    format: Annotated[
        ShowFormat, typer.Option("--format", "-f", help="flow: canonical DSL; json: the spec model.")
    ] = ShowFormat.flow,
    sets: SetOption = None,
) -> None:
    """Print the resolved spec (after extends, defaults and --set overrides) as canonical DSL or JSON."""
    resolved = load_cli_spec(spec, sets)
    check_steps(resolved)  # what validate refuses is not shown as if it were a spec
    if format is ShowFormat.json:
        typer.echo(resolved.model_dump_json(indent=2))
    else:
        from flowspec.formatter import format_spec

        typer.echo(format_spec(resolved), nl=False)
