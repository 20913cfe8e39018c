"""Commands of the training stage: train, eval, sample, ablate."""

from __future__ import annotations

import json
import signal
import sys
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flowspec.api import parse_duration
from flowspec.cli.app import app
from flowspec.cli.examples import epilog
from flowspec.cli.options import (
    Device,
    DeviceOption,
    SetOption,
    StoredSetOption,
    ThreadsOption,
    load_cli_spec,
)
from flowspec.errors import UserError

if TYPE_CHECKING:
    from flowspec.spec import FlowSpec


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class Split(str, Enum):
    train = "train"
    test = "test"


DataOption = Annotated[
    Path | None,
    typer.Option(
        "--data", metavar="DIR", help="A torchvision cifar-10-batches-py folder or a folder of .npz shards."
    ),
]


def _device(device: Device | None) -> str | None:
    return device.value if device else None


@app.command(epilog=epilog("train"))
def train(
    spec: Annotated[
        Path | None,
        typer.Argument(
            metavar="SPEC", help="The .flow spec (optional with --resume: the run's stored spec)."
        ),
    ] = None,
    data: DataOption = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", metavar="RUN_DIR", help="Run folder; default runs/<model>-<time>."),
    ] = None,
    sets: SetOption = None,
    device: DeviceOption = None,
    precision: Annotated[
        Precision, typer.Option("--precision", help="bf16: autocast the coupling networks.")
    ] = Precision.fp32,
    compile_networks: Annotated[
        bool, typer.Option("--compile", help="torch.compile the coupling networks.")
    ] = False,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", metavar="RUN_DIR", help="Continue a run from its last checkpoint."),
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option("--max-steps", min=1, help="Stop at this step (counted from the run's start)."),
    ] = None,
    max_time: Annotated[
        str | None, typer.Option("--max-time", metavar="DURATION", help="Stop after this long: 90s, 30m, 2h.")
    ] = None,
    log_every: Annotated[
        int, typer.Option("--log-every", min=1, help="Read the loss from the device every N steps.")
    ] = 10,
    tensorboard: Annotated[
        bool, typer.Option("--tensorboard", help="Also log to RUN_DIR/tensorboard (pip install tensorboard).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    threads: ThreadsOption = None,
) -> None:
    """Train a spec with its recipe; evaluate, sample and checkpoint every interval."""
    import flowspec

    try:
        result = flowspec.train(
            spec,
            data,
            out,
            sets=sets or (),
            resume=resume,
            device=_device(device),
            precision=precision.value,
            compile=compile_networks,
            max_steps=max_steps,
            max_time=max_time,
            log_every=log_every,
            tensorboard=tensorboard,
            quiet=quiet,
            threads=threads,
        )
    except KeyboardInterrupt:  # before the loop started, or a second Ctrl-C: checkpoints are never torn
        print("interrupted: finished checkpoints are kept; continue with --resume RUN_DIR", file=sys.stderr)
        raise typer.Exit(130) from None
    if result.stopped in ("SIGINT", "SIGTERM"):
        raise typer.Exit(128 + int(signal.Signals[result.stopped]))
    if not quiet and result.history:
        best = f" (best {result.best_bpd:.4f})" if result.best_bpd is not None else ""
        print(
            f"done ({result.stopped}) at step {result.step}: test {result.test_bpd:.4f} bits/dim{best}; "
            f"run folder {result.run_dir}"
        )


def _with_overrides(spec: FlowSpec, sets: list[str] | None, path: Path) -> FlowSpec:
    """The stored spec with `--set` overrides, which may change data and train settings, not the model."""
    if not sets:
        return spec
    from flowspec.formatter import format_spec
    from flowspec.loader import parse_spec

    changed = parse_spec(format_spec(spec), source=f"{path} (stored spec)", overrides=sets)
    model_fields = ("preprocess", "dequantize", "flow", "prior")
    same_model = all(getattr(changed, f) == getattr(spec, f) for f in model_fields) and (
        changed.data.shape,
        changed.data.levels,
    ) == (spec.data.shape, spec.data.levels)
    if not same_model:
        raise UserError(
            f"--set {' '.join(sets)} would change the model stored in {path}; with a trained checkpoint "
            f"--set may change only data and train settings (e.g. --set data.classes=dog)"
        )
    return changed


def _load_for_inference(
    target: Path, device: Device | None, sets: list[str] | None = None, threads: int | None = None
):
    """The model of a run folder, checkpoint or export with the EMA weights, and its spec with `--set`;
    torch's thread count chosen for it (said on stderr)."""
    import torch

    from flowspec.threads import set_threads
    from flowspec.train.export import load_trained

    where = _device(device) or ("cuda" if torch.cuda.is_available() else "cpu")
    trained = load_trained(target, where)
    spec = _with_overrides(trained.spec, sets, trained.path)
    choice = set_threads(sum(p.numel() for p in trained.model.parameters() if p.requires_grad), threads)
    print(f"{spec.name}, step {trained.step}, device {where}, {choice}", file=sys.stderr)
    return trained, spec


@app.command("eval", epilog=epilog("eval"))
def evaluate(
    target: Annotated[
        Path,
        typer.Argument(metavar="RUN|CKPT|EXPORT", help="A run folder, checkpoint or .safetensors export."),
    ],
    data: DataOption = None,
    iw: Annotated[
        int, typer.Option("--iw", min=1, help="Importance samples K per image (1: single-sample only).")
    ] = 1,
    split: Annotated[Split, typer.Option("--split", help="The data split to evaluate.")] = Split.test,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images per forward pass.")] = 256,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Evaluate the first N images only.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the dequantization noise.")] = 0,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            metavar="FILE",
            help="JSON file; default eval_<split>[_iwK].json by the checkpoint.",
        ),
    ] = None,
    device: DeviceOption = None,
    sets: StoredSetOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Test bits/dim with EMA weights: the single-sample bound and the importance-weighted bound (--iw K)."""
    import torch
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from flowspec.train.data import load_split
    from flowspec.train.evaluate import bounds

    trained, spec = _load_for_inference(target, device, sets, threads)
    images = load_split(spec.data, split.value, data or trained.data_dir).images
    images = images[:limit] if limit else images
    torch.manual_seed(seed)
    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(f"eval {split.value}", total=len(images))
        result = bounds(
            trained.model, images, iw, batch, trained.model.device, lambda n: progress.advance(task, n)
        )
    record = {
        "checkpoint": str(trained.path),
        "spec": spec.name,
        "step": trained.step,
        "split": split.value,
        "iw_samples": iw,
        "seed": seed,
        **result,
    }
    out = out or trained.path.parent / f"eval_{split.value}{f'_iw{iw}' if iw > 1 else ''}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    caption = f"{split.value}: {result['images']} images"
    table = Table(title=f"{spec.name}, step {trained.step}", caption=caption)
    table.add_column("bound")
    table.add_column("bits/dim", justify="right")
    table.add_row("single sample", f"{result['bpd']:.4f}")
    if iw > 1:
        table.add_row(f"importance weighted, K={iw}", f"{result[f'iw{iw}_bpd']:.4f}")
    Console().print(table)
    print(f"wrote {out}")


@app.command(epilog=epilog("sample"))
def sample(
    target: Annotated[
        Path,
        typer.Argument(metavar="RUN|CKPT|EXPORT", help="A run folder, checkpoint or .safetensors export."),
    ],
    n: Annotated[int, typer.Option("--count", "-n", min=1, help="Number of images.")] = 64,
    temperature: Annotated[
        float, typer.Option("--temperature", "-t", min=0.0, help="Prior temperature.")
    ] = 1.0,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", metavar="FILE", help="The image grid (.png); default samples_stepN_tT.png here."
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed of the samples (default: a fresh draw).")
    ] = None,
    device: DeviceOption = None,
    sets: StoredSetOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Draw a grid of samples with the EMA weights of a trained run."""
    from flowspec.train.sampling import grid_name, save_grid

    trained, spec = _load_for_inference(target, device, sets, threads)
    out = out or Path(f"samples_{grid_name(trained.step, temperature)}")
    save_grid(trained.model, n, temperature, out, spec.data.levels, seed)
    print(f"wrote {n} samples of {spec.name} (step {trained.step}, T={temperature}) to {out}")


@app.command("export", epilog=epilog("export"))
def export_model(
    target: Annotated[
        Path, typer.Argument(metavar="RUN_DIR|CKPT", help="A run folder or a checkpoint file.")
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", metavar="FILE", help="The .safetensors file; default model.safetensors beside it."
        ),
    ] = None,
) -> None:
    """Write the EMA weights and the resolved spec to a .safetensors file (for load, eval and sample)."""
    from flowspec.train.checkpoint import resolve
    from flowspec.train.export import SUFFIX, export

    output = output or resolve(target).parent / f"model{SUFFIX}"
    if output.suffix != SUFFIX:
        raise UserError(f"the export must be a {SUFFIX} file, got {output}")
    trained = export(target, output)
    print(f"wrote {trained.spec.name} (step {trained.step}, EMA weights and spec) to {output}")


@app.command(epilog=epilog("ablate"))
def ablate(
    specs: Annotated[list[Path], typer.Argument(metavar="SPEC...", help="The specs to compare.")],
    steps: Annotated[
        int | None, typer.Option("--steps", min=1, help="Train each spec this many steps.")
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option("--budget", metavar="DURATION", help="Or train each for this long: 90s, 20m, 2h."),
    ] = None,
    data: DataOption = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", metavar="DIR", help="Folder of the runs; default runs/ablate-<time>."),
    ] = None,
    sets: SetOption = None,
    seed: Annotated[int, typer.Option("--seed", help="The seed every spec trains with.")] = 0,
    device: DeviceOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output, only the table.")] = False,
    threads: ThreadsOption = None,
) -> None:
    """Train several specs for the same budget on the same data and seed; compare test bits/dim."""
    from rich.console import Console
    from rich.table import Table

    from flowspec.train.ablate import COLUMNS, fmt_rate, row_values, run_ablation
    from flowspec.train.trainer import RunOptions

    if (steps is None) == (budget is None):
        raise UserError("ablate needs exactly one budget: --steps N or --budget DURATION (e.g. 20m)")
    resolved = [load_cli_spec(path, sets) for path in specs]
    out = out or Path("runs") / f"ablate-{datetime.now():%Y%m%d-%H%M%S}"
    options = RunOptions(
        data_dir=data,
        device=_device(device),
        max_steps=steps,
        max_time=parse_duration(budget) if budget else None,
        quiet=quiet,
        threads=threads,
    )
    results = run_ablation(resolved, options, out, seed)
    table = Table(title=f"ablation ({f'{steps} steps' if steps else budget} each, seed {seed})")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "spec" else "right")
    for result in results:
        name, params, test, best, step, img_s = row_values(result)
        fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
        table.add_row(name, f"{params:,}", fmt(test), fmt(best), str(step), fmt_rate(img_s))
    Console().print(table)
    print(f"runs and curves in {out}")
    stopped = results[-1].stopped
    if stopped in ("SIGINT", "SIGTERM"):
        print(f"{stopped}: stopped after {len(results)} of {len(resolved)} specs", file=sys.stderr)
        raise typer.Exit(128 + int(signal.Signals[stopped]))
