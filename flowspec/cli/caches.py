"""`flowspec cache`: the prepared-data caches, listed with their size, data and state, and removed."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer

from flowspec.cli.app import app
from flowspec.cli.examples import epilog
from flowspec.errors import UserError, one_process
from flowspec.train import caches
from flowspec.units import fmt_bytes


@app.command("cache", epilog=epilog("cache"))
def cache(
    path: Annotated[
        str | None,
        typer.Argument(
            metavar="PATH",
            help="A data folder or file (as --data takes): the caches of its data, wherever flowspec keeps "
            "them; or a cache folder: all of its caches. Without it: $FLOWSPEC_CACHE_DIR, else "
            "~/.cache/flowspec/prepared.",
        ),
    ] = None,
    clean: Annotated[
        bool,
        typer.Option(
            "--clean",
            help="Remove the caches that can never be used again: of source files that are gone, damaged, "
            "or left by a killed build.",
        ),
    ] = False,
    remove_all: Annotated[
        bool,
        typer.Option("--all", help="Remove every cache listed (each is rebuilt when a run needs it)."),
    ] = False,
) -> None:
    """List the prepared-data caches (the decoded images of folder, npy and ImageNet datasets), or remove
    them. A cache that a process reads or builds is never removed."""
    one_process("cache")
    if path is not None and not path.strip():
        raise UserError("PATH is empty: give a data folder or file, or a cache folder")
    if path is not None and not os.path.exists(path):
        raise UserError(f"{path} does not exist: give a data folder or file, or a cache folder")
    roots, of = caches.roots(Path(path) if path is not None else None)
    found = [c for root in roots if root.is_dir() for c in caches.find(root, of)]
    where = " and ".join(str(r) for r in roots)
    if not found:
        typer.echo(f"no prepared data in {where}")
        return
    if clean or remove_all:
        _remove([c for c in found if remove_all or c.state in caches.UNUSABLE])
    else:
        _table(found, where)


def _table(found: list[caches.Cache], where: str) -> None:
    from rich.console import Console
    from rich.table import Table

    unusable = [c for c in found if c.state in caches.UNUSABLE]
    count = f"{len(found)} cache{'s' if len(found) > 1 else ''}"
    caption = f"{count}, {fmt_bytes(sum(c.size for c in found))}, in {where}"
    if unusable:
        caption += f"; --clean removes the {len(unusable)} never usable again ({_total(unusable)})"
    table = Table(caption=caption)
    table.add_column("cache", no_wrap=True)
    table.add_column("data (source)", overflow="fold")
    table.add_column("train + test", justify="right")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("last used")
    table.add_column("state")
    for c in found:
        images = f"{c.images[0]:,} + {c.images[1]:,}" if c.images else ""
        used = _when(c.used if c.used is not None else c.built)  # a cache read before uses were recorded
        table.add_row(c.name[:8], _data(c), images, fmt_bytes(c.size), used, c.state)
    Console().print(table)


def _data(c: caches.Cache) -> str:
    """`folder 3x64x64, 256 levels, classes (cat, dog)`."""
    d = c.data
    if not d:
        return ""
    text = f"{d.get('dataset')} {'x'.join(str(n) for n in d.get('shape') or ())}, {d.get('levels')} levels"
    if d.get("classes") is not None:
        text += f", class labels {', '.join(str(x) for x in d['classes'])}"
    return f"{text} ({os.path.commonpath(c.sources)})" if c.sources else text


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(stamp)) if stamp is not None else ""


def _total(found: list[caches.Cache]) -> str:
    return fmt_bytes(sum(c.size for c in found))


def _remove(chosen: list[caches.Cache]) -> None:
    freed = 0
    kept: list[str] = []
    for c in chosen:
        why = caches.remove(c)
        if why is None:
            freed += c.size
            typer.echo(f"removed {c.folder} ({fmt_bytes(c.size)}, {c.state})")
        else:
            kept.append(f"kept {c.folder}: {why}")
    for line in kept:
        typer.echo(line)
    typer.echo(f"freed {fmt_bytes(freed)}" if chosen else "nothing to remove: every cache can be used")
