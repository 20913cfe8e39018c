"""`flowspec inspect` and `flowspec diff`: the compiled model as a readable tree; what an ablation changes."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from flowspec.cli.app import app
from flowspec.cli.examples import epilog
from flowspec.cli.options import AllowLargeOption, SetOption, ThreadsOption, load_cli_spec
from flowspec.errors import UserError


class InspectFormat(str, Enum):
    rich = "rich"
    json = "json"
    md = "md"
    dot = "dot"
    mermaid = "mermaid"


PROBE_BATCH = 8  # images `inspect --probe` runs when --batch is not given


@app.command(epilog=epilog("inspect"))
def inspect(
    spec: Annotated[Path, typer.Argument(metavar="SPEC", help="Spec file to inspect.")],
    format: Annotated[
        InspectFormat,
        typer.Option(
            "--format",
            "-f",
            metavar="FORMAT",
            help="rich: the tree in the terminal; json, md (a table), dot, mermaid.",
        ),
    ] = InspectFormat.rich,
    depth: Annotated[
        int | None,
        typer.Option(
            "--depth", "-d", min=1, metavar="N", help="Collapse below this depth (1: one row per stage)."
        ),
    ] = None,
    target_params: Annotated[
        int | None,
        typer.Option(
            "--target-params", min=0, metavar="N", help="Show the difference from this parameter count."
        ),
    ] = None,
    probe: Annotated[
        bool, typer.Option("--probe", help="Run one batch: per-step log-det (bits/dim) and inversion error.")
    ] = False,
    data: Annotated[
        Path | None,
        typer.Option("--data", metavar="PATH", help="Probe on test images from PATH (else random)."),
    ] = None,
    batch: Annotated[
        int | None,
        typer.Option(
            "--batch",
            min=2,
            max=4096,
            metavar="N",
            help="Probe batch size (default 8; init needs 2 or more).",
        ),
    ] = None,
    sets: SetOption = None,
    threads: ThreadsOption = None,
    allow_large: AllowLargeOption = False,
) -> None:
    """Show what SPEC builds: every step with its settings, source line, halves, shapes and parameters."""
    probe_only = (
        ("--data", data),
        ("--threads", threads),
        ("--batch", batch),
        ("--allow-large", allow_large or None),
    )
    for name, value in probe_only:
        if value is not None and not probe:
            raise UserError(f"{name} is only used with --probe: add --probe, or drop {name}")
    batch = batch or PROBE_BATCH
    resolved = load_cli_spec(spec, sets)
    import torch

    import flowspec
    from flowspec.inspection import inspect_model, render
    from flowspec.inspection.budget import check_size
    from flowspec.inspection.unroll import check_steps

    if probe:  # the probe allocates the weights and a batch; without it, nothing is allocated
        from flowspec.inspection.probe import init_count

        check_size(resolved, "build", allow_large=allow_large, images=init_count(resolved, batch))
    else:
        check_steps(resolved)
    torch.manual_seed(resolved.train.seed)
    model = flowspec.build(resolved, None if probe else "meta")  # meta: counting needs no weights
    report = inspect_model(model, resolved, target_params)
    if probe:
        from flowspec.inspection.probe import probe_images, run_probe
        from flowspec.threads import set_threads

        set_threads(report.total, threads)

        images, source = probe_images(resolved, batch, data)
        run_probe(model, resolved, report, images, source, batch)
    if format is InspectFormat.rich:
        render.print_rich(report, depth)
    else:
        typer.echo(render.RENDERERS[format.value](report, depth), nl=False)


@app.command(epilog=epilog("diff"))
def diff(
    spec_a: Annotated[Path, typer.Argument(metavar="A", help="The reference spec.")],
    spec_b: Annotated[
        Path | None,
        typer.Argument(metavar="B", help="The spec to compare (default: A, with --set applied)."),
    ] = None,
    sets: SetOption = None,
) -> None:
    """Show the settings that differ between two resolved specs (--set applies to B) and parameter deltas."""
    a = load_cli_spec(spec_a, None)
    b = load_cli_spec(spec_b or spec_a, sets)
    from rich.console import Console

    from flowspec.inspection import inspect_spec
    from flowspec.inspection.unroll import check_steps

    for spec in (a, b):  # both are built on the meta device: only their step count matters
        check_steps(spec)
    from flowspec.inspection.diff import render_diff
    from flowspec.loader import setting_sources

    reports = inspect_spec(a, measure=False), inspect_spec(b, measure=False)
    sources = setting_sources(spec_a), setting_sources(spec_b or spec_a, tuple(sets or ()))
    Console().print(render_diff(a, b, *reports, *sources))
