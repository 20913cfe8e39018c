"""`flowspec specs`: the specs shipped with flowspec (package data), listed or copied into a folder where
they can be trained, changed and extended."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flowspec.cli.app import app
from flowspec.cli.examples import epilog
from flowspec.errors import UserError, one_process

if TYPE_CHECKING:
    from flowspec.spec import FlowSpec


@app.command("specs", epilog=epilog("specs"))
def specs(
    folder: Annotated[
        str | None,
        typer.Argument(
            metavar="DIR",
            help="Copy the specs into this folder (made if missing; ablations/ with them, so that their "
            "extends still find flowpp_cifar.flow). Without it, list them.",
        ),
    ] = None,
) -> None:
    """List the specs shipped with flowspec, or copy them into DIR to train, change and extend."""
    one_process("specs")
    with resources.as_file(resources.files("flowspec") / "specs") as root:
        names = sorted((p.relative_to(root).as_posix() for p in root.rglob("*.flow")), key=_order)
        if folder is None:
            _list(root, names)
        elif not folder.strip():
            raise UserError("DIR is empty: give the folder to copy the specs into (`.` for this one)")
        else:
            _check_outside(Path(folder), root)
            _copy(root, names, Path(folder))


def _check_outside(folder: Path, root: Path) -> None:
    """Refuse a DIR inside the flowspec package (its shipped specs folder, `root`, above all): the copies
    would be written among the files flowspec ships (links followed)."""
    target, package = Path(os.path.realpath(folder)), Path(os.path.realpath(root)).parent
    for inside, what in ((Path(os.path.realpath(root)), "shipped specs folder"), (package, "package")):
        if target == inside or inside in target.parents:
            raise UserError(
                f"{folder} is inside flowspec's own {what} ({inside}): flowspec specs copies the shipped "
                "specs out of it, to be changed; give a folder outside it"
            )


def _order(name: str) -> tuple[int, str]:
    """The specs of the top folder first, then those of `ablations/`."""
    return name.count("/"), name


def _list(root: Path, names: list[str]) -> None:
    """A table of the specs: name, parameter count and the first line of its comment, up to a parenthesis."""
    from rich.console import Console
    from rich.table import Table

    from flowspec.loader import load_spec

    table = Table(caption="flowspec specs DIR copies them into DIR")
    table.add_column("spec", no_wrap=True)
    table.add_column("parameters", justify="right", no_wrap=True)
    table.add_column("description")
    for name in names:
        spec = load_spec(root / name)
        table.add_row(name, f"{_parameters(spec):,}", _description(root / name))
    Console().print(table)


def _description(path: Path) -> str:
    """The first line of the comment a spec file starts with, up to a parenthesis."""
    first = path.read_text(encoding="utf-8").partition("\n")[0]
    return first.lstrip("#").split(" (")[0].strip().rstrip(".:,") if first.startswith("#") else ""


def _parameters(spec: FlowSpec) -> int:
    """The spec's parameter count: its `target_params` (the tests pin it to the built model's), else the count
    of the model built without memory."""
    if spec.target_params is not None:
        return spec.target_params
    import flowspec

    model = flowspec.build(spec, device="meta")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _copy(root: Path, names: list[str], folder: Path) -> None:
    """Copy the specs into `folder`, keeping their layout, after checking that no file would be replaced;
    on a failure part way, what it wrote is removed again (so that the same command can be run again)."""
    folders = sorted({(folder / name).parent for name in names})
    blocked = [str(f) for f in (folder, *folders) if (f.exists() or f.is_symlink()) and not f.is_dir()]
    if blocked:
        raise UserError(f"{blocked[0]} is not a folder: give a folder to copy the specs into")
    taken = [name for name in names if (folder / name).exists() or (folder / name).is_symlink()]
    if taken:
        raise UserError(
            f"{folder} already holds {', '.join(taken)}: flowspec specs replaces no file; move them away "
            "or give another folder"
        )
    deepest_first = (*sorted(folders, key=lambda f: len(f.parts), reverse=True), *folder.parents)
    made = [f for f in deepest_first if not f.exists()]
    written: list[Path] = []
    try:
        for name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            written.append(folder / name)  # before the copy: a partial file is removed too
            shutil.copyfile(root / name, folder / name)
    except BaseException:
        for path in [*written, *made]:
            with contextlib.suppress(OSError):
                path.unlink() if path in written else path.rmdir()
        raise
    for path in written:
        typer.echo(f"wrote {path}")
    typer.echo(f"next: flowspec train {shlex.quote(str(folder / 'quickstart.flow'))}")
