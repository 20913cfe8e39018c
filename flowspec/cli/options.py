"""Options shared by the commands: `--set KEY=VALUE` overrides, device, threads, precision, data, seeds."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flowspec.spec import MAX_SEED

if TYPE_CHECKING:
    from flowspec.spec import FlowSpec


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    auto = "auto"


PRECISION_HELP = (
    "bf16: the networks compute in bfloat16 (log-dets stay float32); auto: bf16 where the CPU or GPU has it "
    "natively"
)


SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a spec setting, e.g. --set defaults.coupling.filters=64 (repeatable).",
    ),
]

SampleSetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Rename the model for the grid's file name: --set model=NAME (samples come from the model "
        "alone: data settings would change nothing).",
    ),
]
StoredSetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a data setting (or the model name) of the stored spec, e.g. --set data.classes=3 "
        "(repeatable; settings of the model are fixed by the checkpoint).",
    ),
]
DeviceOption = Annotated[
    Device | None, typer.Option("--device", help="Where to run: cpu or cuda (default: cuda when available).")
]
ThreadsOption = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        metavar="N",
        help="Intra-op CPU threads (default: 1 for small models or a busy CPU, else the idle cores).",
    ),
]
InferencePrecisionOption = Annotated[
    Precision | None,
    typer.Option(
        "--precision",
        help=f"{PRECISION_HELP}. Default: the precision the run trained in (fp32 for an export that does not "
        "record it).",
        show_default=False,
    ),
]
CompileOption = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile the coupling networks on a GPU; on a CPU only their elementwise chains "
        "(whole compiled networks are slower there).",
    ),
]
AllowLargeOption = Annotated[
    bool,
    typer.Option("--allow-large", help="Go ahead with a model that needs more memory than this machine has."),
]


def load_cli_spec(path: Path, sets: list[str] | None) -> FlowSpec:
    """Load, resolve and validate a spec file with the command line's overrides (raises `SpecError`)."""
    from flowspec.loader import load_spec

    return load_spec(path, overrides=tuple(sets or ()))


DataOption = Annotated[
    Path | None,
    typer.Option(
        "--data",
        metavar="PATH",
        help="The data's folder or file (the spec's data path), e.g. a cifar-10-batches-py folder.",
    ),
]


def valid_seed(value: int | None) -> int | None:
    """`value` when it is a seed (the help names it SEED: typer's range would fill the option's column)."""
    if value is not None and not 0 <= value <= MAX_SEED:
        raise typer.BadParameter(f"a seed is a whole number from 0 to {MAX_SEED}, got {value}")
    return value


def device_name(device: Device | None) -> str | None:
    """The `--device` given, as torch names it (None: not given)."""
    return device.value if device else None
