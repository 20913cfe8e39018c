"""Commands that train: train, ablate."""

from __future__ import annotations

import signal
import sys
from dataclasses import replace
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flowspec.api import eval_written_by, parse_duration, parse_size
from flowspec.cli.app import app
from flowspec.cli.examples import epilog
from flowspec.cli.options import (
    PRECISION_HELP,
    AllowLargeOption,
    CompileOption,
    DataOption,
    DeviceOption,
    Precision,
    SetOption,
    ThreadsOption,
    device_name,
    load_cli_spec,
    valid_seed,
)
from flowspec.cli.stopping import stoppable
from flowspec.errors import (
    Interrupted,
    RunStopped,
    Terminated,
    UserError,
    shell_command,
)

if TYPE_CHECKING:
    from flowspec.train.ablate import Ablation
    from flowspec.train.trainer import RunOptions, RunResult


class Recompute(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


EvalImagesOption = Annotated[
    int | None,
    typer.Option(
        "--eval-images",
        min=1,
        metavar="N",
        help="Test images per evaluation (default: the spec's eval section, else all; a short run: 64).",
    ),
]
EvalBatchOption = Annotated[
    int | None,
    typer.Option(
        "--eval-batch",
        min=1,
        metavar="N",
        help="Images per forward pass of an evaluation (default: the spec's eval.batch, else the batch).",
    ),
]
EvalSamplesOption = Annotated[
    int | None,
    typer.Option(
        "--eval-samples",
        min=0,
        metavar="N",
        help="Images per sample grid, a grid per temperature; 0: none (default: the spec's eval.samples, "
        "64 unless set; a short run: one grid of 16).",
    ),
]
EvalInversionOption = Annotated[  # two options, not --eval-inversion/--no-eval-inversion: typer's help
    bool,  # gives the second name a column of its own, too wide for an 80-column terminal
    typer.Option(
        "--eval-inversion",
        help="The inversion check on a test batch (default: the spec's eval.inversion, on unless set; "
        "a short run: off).",
    ),
]
NoEvalInversionOption = Annotated[bool, typer.Option("--no-eval-inversion", help="No inversion check.")]


def _eval_settings(
    images: int | None, batch: int | None, samples: int | None, inversion: bool, no_inversion: bool
) -> dict[str, int | bool]:
    """The `--eval-*` options given, as settings of the spec's `eval` section."""
    if inversion and no_inversion:
        raise UserError("--eval-inversion and --no-eval-inversion contradict each other: give one of them")
    on = True if inversion else False if no_inversion else None
    given = {"images": images, "batch": batch, "samples": samples, "inversion": on}
    return {key: value for key, value in given.items() if value is not None}


PrecisionOption = Annotated[
    Precision | None,
    typer.Option(
        "--precision",
        help=f"{PRECISION_HELP}. Default: fp32, or the precision a resumed run trained in.",
        show_default=False,
    ),
]
AblatePrecisionOption = Annotated[
    Precision | None,
    typer.Option("--precision", help=f"{PRECISION_HELP}. Default: fp32.", show_default=False),
]
RecomputeOption = Annotated[
    Recompute,
    typer.Option(
        "--recompute",
        help="on: recompute the networks' cheap work in the backward pass (under half the memory); "
        "off: keep every activation (faster); auto: off when that fits (80% of a GPU, half the RAM), "
        "but on under --compile on a GPU.",
    ),
]
DataMemoryOption = Annotated[
    str | None,
    typer.Option(
        "--data-memory",
        metavar="SIZE",
        help="Hold a training set up to this size in (device) memory, stream a larger one (default 4G).",
    ),
]


def _seed_refused(value: str | None) -> None:
    if value is not None:
        raise typer.BadParameter("train takes its seed from the spec: --set train.seed=N")


@app.command(epilog=epilog("train"))
def train(
    spec: Annotated[
        Path | None,
        typer.Argument(
            metavar="SPEC",
            help="The .flow spec (optional with --resume: the run's stored spec).",
        ),
    ] = None,
    data: DataOption = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", metavar="RUN_DIR", help="Run folder; default runs/<model>-<time>."),
    ] = None,
    sets: SetOption = None,
    _seed: Annotated[
        str | None,
        typer.Option(
            "--seed",
            hidden=True,
            expose_value=False,
            callback=_seed_refused,
            help="Refused: train takes its seed from the spec (--set train.seed=N).",
        ),
    ] = None,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    compile_networks: CompileOption = False,
    recompute: RecomputeOption = Recompute.auto,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", metavar="RUN_DIR", help="Continue a run from its last checkpoint."),
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option(
            "--max-steps", min=1, metavar="N", help="Stop at this step (counted from the run's start)."
        ),
    ] = None,
    max_time: Annotated[
        str | None,
        typer.Option(
            "--max-time",
            metavar="DURATION",
            help="Stop after this much training (evaluations not counted): 90s, 30m, 2h.",
        ),
    ] = None,
    log_every: Annotated[
        int | None,
        typer.Option(
            "--log-every",
            min=1,
            metavar="N",
            help="Read the loss from the device every N steps (default 10, or the resumed run's).",
            show_default=False,
        ),
    ] = None,
    tensorboard: Annotated[
        bool,
        typer.Option("--tensorboard", help="Also log to RUN_DIR/tensorboard (pip install tensorboard)."),
    ] = False,
    eval_images: EvalImagesOption = None,
    eval_batch: EvalBatchOption = None,
    eval_samples: EvalSamplesOption = None,
    eval_inversion: EvalInversionOption = False,
    no_eval_inversion: NoEvalInversionOption = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", "-q", help="No progress output (notes, errors and a stop's line still show)."
        ),
    ] = False,
    data_memory: DataMemoryOption = None,
    threads: ThreadsOption = None,
    allow_large: AllowLargeOption = False,
) -> None:
    """Train a spec with its recipe; checkpoint, evaluate and sample every interval."""
    import flowspec
    from flowspec.train.signals import is_signal

    try:
        result = flowspec.train(
            spec,
            data,
            out,
            sets=sets or (),
            resume=resume,
            device=device_name(device),
            precision=precision.value if precision else None,
            compile=compile_networks,
            recompute=recompute.value,
            max_steps=max_steps,
            max_time=max_time,
            log_every=log_every,
            tensorboard=tensorboard,
            quiet=quiet,
            threads=threads,
            allow_large=allow_large,
            data_memory=data_memory,
            eval=_eval_settings(eval_images, eval_batch, eval_samples, eval_inversion, no_eval_inversion),
        )
    except RunStopped as stop:  # saved: said below
        result = stop.result
    except KeyboardInterrupt as stop:  # before the loop started, or a second signal: no checkpoint is torn
        raise Interrupted(
            "checkpoints already written are kept (a run folder with last.pt goes on with --resume RUN_DIR; "
            "one without starts again with the same command and --out RUN_DIR)",
            isinstance(stop, Terminated),
        ) from None
    if is_signal(result.stopped):
        from flowspec.train.distributed import main_process
        from flowspec.train.trainer import resume_command, stop_line

        if quiet and main_process():  # the loop's line: errors and this still show
            go_on = resume_command(result.run_dir, max_steps)
            print(stop_line(result.stopped, result.step, result.run_dir, go_on), file=sys.stderr)
        raise typer.Exit(128 + int(signal.Signals[result.stopped]))
    if not quiet and result.history:
        kept = result.best_bpd is not None and (result.run_dir / "best.pt").is_file()
        which = "the best scheduled evaluation" if result.best_scheduled else "this short run's evaluation"
        best = f" (best.pt: {result.best_bpd:.4f}, {which})" if kept else ""
        test = f"{result.test_bpd:.4f}" if result.test_bpd is not None else "not finite"
        print(
            f"done ({result.stopped}) at step {result.step}: test {test} bits/dim{best}; "
            f"run folder {result.run_dir}"
        )


#: what `ablate --resume` takes from the command line: how to run, not what (the plan's own)
RESUME_TAKES = ("resume", "quiet", "threads", "device", "allow_large", "data")


@app.command(epilog=epilog("ablate"))
def ablate(
    ctx: typer.Context,
    specs: Annotated[
        list[Path] | None,
        typer.Argument(metavar="SPEC", help="The specs to compare (none with --resume)."),
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", min=1, metavar="N", help="Train each spec this many steps.")
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(
            "--budget",
            metavar="DURATION",
            help="Or train each for this long (evaluations not counted): 90s, 20m, 2h.",
        ),
    ] = None,
    data: DataOption = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", metavar="DIR", help="Folder of the runs; default runs/ablate-<time>."),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            metavar="DIR",
            help="Finish an interrupted ablation with its own specs and settings.",
        ),
    ] = None,
    sets: SetOption = None,
    seed: Annotated[
        int,
        typer.Option("--seed", metavar="SEED", callback=valid_seed, help="The seed every spec trains with."),
    ] = 0,
    device: DeviceOption = None,
    precision: AblatePrecisionOption = None,
    compile_networks: CompileOption = False,
    recompute: RecomputeOption = Recompute.auto,
    data_memory: DataMemoryOption = None,
    eval_images: EvalImagesOption = None,
    eval_batch: EvalBatchOption = None,
    eval_samples: EvalSamplesOption = None,
    eval_inversion: EvalInversionOption = False,
    no_eval_inversion: NoEvalInversionOption = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress output: the table, notes and errors only.")
    ] = False,
    threads: ThreadsOption = None,
    allow_large: AllowLargeOption = False,
) -> None:
    """Train several specs for the same budget on the same data and seed; compare test bits/dim."""
    from flowspec.threads import check_threads
    from flowspec.train.distributed import teardown
    from flowspec.train.trainer import RunOptions

    if threads is not None:  # before the plan is written: a run refusing it leaves a half-made ablation
        check_threads(threads)
    how = RunOptions(data_dir=data, device=device_name(device), quiet=quiet, threads=threads)
    try:
        if resume is not None:
            code = _finish_ablation(ctx, specs, resume, how, allow_large)
        else:
            asked = replace(
                how,
                precision=precision.value if precision else None,
                compile=compile_networks,
                recompute=recompute.value,
            )
            code = _start_ablation(
                specs,
                sets or [],
                asked,
                allow_large,
                out=out,
                steps=steps,
                budget=budget,
                seed=seed,
                data_memory=data_memory,
                evals=(eval_images, eval_batch, eval_samples, eval_inversion, no_eval_inversion),
            )
    except BaseException:
        teardown()  # at once: the others may never reach a barrier
        raise
    # after rank 0's report: a process that exits with an error (a failed run) makes torchrun end the others
    teardown(together=True)
    if code:
        raise typer.Exit(code)


def _finish_ablation(
    ctx: typer.Context, specs: list[Path] | None, resume: Path, how: RunOptions, allow_large: bool
) -> int:
    """`ablate --resume`: finish the ablation in `resume` with its plan's specs and settings (`how` says
    only how to run them), report it and return the exit code."""
    from flowspec.train.ablate import planned_device, read_plan, resume_ablation
    from flowspec.train.distributed import agreed, join
    from flowspec.train.recompute import check_training

    _check_resume_alone(ctx, specs, resume)
    with agreed(join(how.device or planned_device(resume))):  # one process may fail to read it
        plan = read_plan(resume)
        runs = plan.options
        for each in plan.specs:  # on the device the runs will use, as they will train
            where = how.device or runs.device
            check_training(each, where, allow_large, runs.precision, runs.recompute, runs.compile)
    with stoppable("the ablation", _kept_by_ablation(resume)) as signals:
        done = resume_ablation(resume, how, signals.check, plan)
    caption = f"{plan.budget} each, seed {plan.specs[0].train.seed}"
    return _report_ablation(done, len(plan.runs), signals.received, caption, resume)


def _start_ablation(
    specs: list[Path] | None,
    sets: list[str],
    how: RunOptions,
    allow_large: bool,
    *,
    out: Path | None,
    steps: int | None,
    budget: str | None,
    seed: int,
    data_memory: str | None,
    evals: tuple[int | None, int | None, int | None, bool, bool],
) -> int:
    """A new ablation of `specs` (with the `--set` overrides `sets`) for `steps` or `budget` each, run as
    `how` says (with the `--data-memory` and `--eval-*` options, `evals`), in `out` (default
    runs/ablate-<time>); report it and return the exit code."""
    from flowspec.train.ablate import run_ablation
    from flowspec.train.distributed import agreed, join
    from flowspec.train.recompute import check_training

    if not specs:
        raise UserError("ablate needs the specs to compare (or --resume DIR to finish an ablation)")
    if (steps is None) == (budget is None):
        raise UserError("ablate needs exactly one budget: --steps N or --budget DURATION (e.g. 20m)")
    run_time = parse_duration(budget, "--budget") if budget is not None else None  # '' too: no duration
    with agreed(join(how.device)):  # under torchrun, one process may lack its copy of a spec
        resolved = [load_cli_spec(path, sets) for path in specs]
        for each in resolved:
            check_training(each, how.device, allow_large, how.precision, how.recompute, how.compile)
    out = out or Path("runs") / f"ablate-{datetime.now():%Y%m%d-%H%M%S}"
    options = replace(
        how,
        data_memory=parse_size(data_memory) if data_memory is not None else None,
        max_steps=steps,
        max_run_time=run_time,
        eval={**eval_written_by(resolved[0], sets), **_eval_settings(*evals)},
    )
    title = f"{steps} steps" if steps is not None else str(budget)
    with stoppable("the ablation", _kept_by_ablation(out)) as signals:
        done = run_ablation(resolved, options, out, seed, signals.check, sets, title)
    return _report_ablation(done, len(resolved), signals.received, f"{title} each, seed {seed}", out)


def _report_ablation(done: Ablation, planned: int, received: str | None, caption: str, out: Path) -> int:
    """Print the comparison (rank 0), its notes and failed runs, and a stop line; the exit code."""
    from flowspec.train.ablate import resume_command
    from flowspec.train.distributed import main_process
    from flowspec.train.signals import is_signal

    last = done.runs[-1].stopped if done.runs else None
    complete = len(done.runs) + len(done.failed) == planned and not is_signal(last)
    stopped = None if complete else received or last  # a signal after the last run changes nothing
    main = main_process()  # under torchrun, rank 0 says what the ablation did
    finished = done.finished
    if main and finished:
        _print_ablation(finished, caption, out)
    for note in done.notes if main else []:
        print(f"note: {note}")
    for folder, message in done.failed if main else []:
        print(f"error: the run of {folder} failed: {message}", file=sys.stderr)
    if is_signal(stopped):
        if main:
            compared = (
                f"the table compares the {len(finished)} finished" if finished else "nothing was compared"
            )
            cut = done.runs[-1] if is_signal(last) else None
            where = f" in the run of {cut.run_dir.name} (step {cut.step})" if cut else ""
            print(
                f"{stopped}: the ablation stopped{where}; {len(finished) + len(done.failed)} of {planned} "
                f"runs done; {compared}; finish it with: {resume_command(out)}",
                file=sys.stderr,
            )
        return 128 + int(signal.Signals[stopped])
    return 2 if done.failed else 0


def _kept_by_ablation(out: Path) -> str:
    """What an ablation stopped at once (a second Ctrl-C) keeps, and how to go on."""
    from flowspec.train.ablate import resume_command

    return f"finished checkpoints are kept in {out}; finish it with: {resume_command(out)}"


def _check_resume_alone(ctx: typer.Context, specs: list[Path] | None, resume: Path) -> None:
    """`ablate --resume DIR` takes the specs and settings from the ablation's plan: a spec or a setting
    given beside it is refused (it would not be what the other runs were compared under)."""
    from flowspec.train.ablation_plan import PLAN

    given = [
        param.opts[0]
        for param in ctx.command.params
        if param.name not in RESUME_TAKES
        and param.opts[0].startswith("-")
        and getattr(ctx.get_parameter_source(param.name), "name", None) == "COMMANDLINE"  # not a default
    ]
    if specs or given:
        extra = " and ".join(filter(None, ("specs" if specs else "", ", ".join(given))))
        raise UserError(
            f"ablate --resume {shell_command(resume)} finishes the ablation with its own specs and settings "
            f"(from {resume / PLAN}): leave out the {extra}; only --device, --threads, --data, "
            f"--quiet and --allow-large may be given"
        )


def _print_ablation(results: list[RunResult], budget: str, out: Path) -> None:
    """The comparison table of finished ablation runs (also in `out/ablation.json`)."""
    from rich.console import Console
    from rich.table import Table

    from flowspec.train.ablate import COLUMNS, fmt_rate, row_values, test_images

    images = sorted({n for n in map(test_images, results) if n is not None})
    caption = f"test bits/dim on {images[0]} test images" if len(images) == 1 else None
    table = Table(title=f"ablation ({budget})", caption=caption)
    shown = [c for c in COLUMNS if not (caption and c == "test images")]  # the caption says it: narrower
    fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
    cells = []
    for result in results:
        row = dict(zip(COLUMNS, row_values(result), strict=True))
        text = {
            "spec": row["spec"],
            "parameters": f"{row['parameters']:,}",
            "test bits/dim": fmt(row["test bits/dim"]),
            "test images": str(row["test images"]) if row["test images"] is not None else "-",
            "best bits/dim": fmt(row["best bits/dim"]),
            "steps": str(row["steps"]),
            "img/s": fmt_rate(row["img/s"]),
        }
        cells.append([text[column] for column in shown])
    for i, column in enumerate(shown):
        if column == "spec":  # the names tell the runs apart: the room the numbers leave, folded if it must
            table.add_column(column, overflow="fold")
        else:  # as wide as its numbers (its header wrapped onto more lines)
            widest = max([len(row[i]) for row in cells] + [len(word) for word in column.split()])
            table.add_column(column, justify="right", max_width=widest)
    for row in cells:
        table.add_row(*row)
    Console().print(table)
    if len(images) > 1:
        counts = ", ".join(map(str, images))
        print(
            f"note: the test bits/dim come from different numbers of test images ({counts}); a run whose "
            "budget ends before its first evaluation interval is evaluated as a short run (64 images): "
            "--eval-images N evaluates every run on the same N"
        )
    print(f"runs and curves in {out}")
