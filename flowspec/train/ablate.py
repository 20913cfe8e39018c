"""Ablations: several specs trained for the same budget on the same data and seed, then compared."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from flowspec.errors import UserError, flowspec_command
from flowspec.spec import FlowSpec
from flowspec.train.ablation_plan import PLAN, Plan
from flowspec.train.batches import check_batch
from flowspec.train.checkpoint import LAST
from flowspec.train.data import ImageSet, load_split
from flowspec.train.datacache import quietly
from flowspec.train.distributed import agreed, job_size, join, main_process, teardown
from flowspec.train.files import file_problem, replaced_whole
from flowspec.train.lock import WRITERS, RunLock, check_free
from flowspec.train.metrics import is_eval, plot_curves, read_metrics
from flowspec.train.rundir import enclosing_run, previous_checkpoint, run_mark, set_aside
from flowspec.train.signals import StopCheck, is_signal, never
from flowspec.train.trainer import RunOptions, RunResult, train

SPLITS = ("train", "test")
Datasets = dict[str, ImageSet]  # train's keyword arguments: train_set, test_set
COLUMNS = ("spec", "parameters", "test bits/dim", "test images", "best bits/dim", "steps", "img/s")


@dataclass
class Ablation:
    """What an ablation did: the runs in order (the last one stopped by a signal, if one came) and the
    specs whose run failed with a `UserError` (folder name, message); the others ran on after them."""

    runs: list[RunResult] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # said after the table

    @property
    def finished(self) -> list[RunResult]:
        """The runs not stopped by a signal: the ones compared."""
        return [r for r in self.runs if not is_signal(r.stopped)]


def with_seed(spec: FlowSpec, seed: int) -> FlowSpec:
    """`spec` training with `seed` (every spec of an ablation trains with the same)."""
    return spec.model_copy(update={"train": spec.train.model_copy(update={"seed": seed})})


def folder_names(names: list[str], files: list[str | None] | None = None) -> list[str]:
    """A run folder per spec: its model name; when names repeat, with its file's name (`a-base`,
    `a-wide` for base.flow and wide.flow) or else its position (`a-0`, `a-1`); all numbered in front
    (`0-a`, ...) when that would still give two specs one folder (`a`, `a`, `a-1`)."""
    stems = [Path(f).stem if f else None for f in files or [None] * len(names)]
    folders = []
    for i, (name, stem) in enumerate(zip(names, stems, strict=True)):
        namesakes = [s for n, s in zip(names, stems, strict=True) if n == name]
        if len(namesakes) == 1:
            folders.append(name)
        else:
            folders.append(f"{name}-{stem}" if stem and namesakes.count(stem) == 1 else f"{name}-{i}")
    if len(set(folders)) < len(folders):
        folders = [f"{i}-{n}" for i, n in enumerate(names)]
    return folders


def run_ablation(
    specs: list[FlowSpec],
    options: RunOptions,
    out: Path,
    seed: int,
    stop: StopCheck = never,
    overrides: Sequence[str] = (),
    budget: str | None = None,
) -> Ablation:
    """Train each spec into `out/<name>` under the same options; write `ablation.json` (each row with
    the spec's file and the `overrides` applied to every spec) and `curves.png`. The budget is
    `options.max_steps` or `options.max_run_time` (each run's training time, over every process that
    trains it); `budget` says it in the table's title.

    Before the first run the plan (`OUT/ablation-plan.json`) is written; a stop signal (`stop`, or one
    that stopped a run) ends the ablation with the runs so far, fewer than the specs or with the last one
    stopped, and only the finished runs are compared; `resume_ablation(out)` finishes it. A run that fails
    with a `UserError` (it diverged, the disk is full) is recorded and the next spec trains.

    Every spec's data is read before the first run, so that a mistake in the last spec's data section is
    reported before hours of training the others; specs with the same data share one copy."""
    if options.max_time is not None or (options.max_steps is None) == (options.max_run_time is None):
        raise ValueError("an ablation's budget is one of max_steps and max_run_time (not max_time)")
    folders = folder_names([s.name for s in specs], [s.source for s in specs])
    with agreed(join(options.device)):  # under torchrun, a mistake one process meets alone stops them all
        check_out_folder(out)
        if main_process():  # an ablation going on there is named first
            check_free(out, WRITERS)
        for planned in (PLAN, "ablation.json"):
            if (out / planned).exists():
                raise UserError(
                    f"{out} already holds an ablation ({out / planned}); choose another --out"
                    + (f", or finish it with: {resume_command(out)}" if planned == PLAN else "")
                )
        for spec, folder in zip(specs, folders, strict=True):  # an earlier run there is refused first
            previous_checkpoint(out / folder, spec, resume=False)
        data_dirs = [_absolute(options.data_dir or spec.data.path) for spec in specs]
        seeded = [with_seed(spec, seed) for spec in specs]
        title = budget or (
            f"{options.max_steps} steps" if options.max_steps else f"{options.max_run_time:g}s"
        )
        plan = Plan.make(seeded, folders, data_dirs, options, title, list(overrides))
        datasets = _datasets(plan, options.quiet)
        _check_lengths(plan, datasets, options.max_steps)
    return _carry_out(plan, datasets, out, stop, options, write_plan=True)


def check_out_folder(out: Path) -> None:
    """Refuse, before anything is written, an `--out` that is not a folder, or that holds a run or lies
    inside one's folder (`enclosing_run`): the ablation's curves.png and its runs would be written among
    the run's files (links followed)."""
    if os.path.lexists(out) and not out.is_dir():
        what = file_problem(out) or "is a file"
        raise UserError(
            f"--out {out} {what}: an ablation writes its runs and comparison into a folder; name a folder"
        )
    target = Path(os.path.realpath(out))
    mark = run_mark(target)
    if mark is not None:
        raise UserError(
            f"--out {out} holds a run ({mark}): an ablation writes its runs and curves.png into "
            f"a folder of its own; choose another --out"
        )
    enclosing = enclosing_run(target)
    if enclosing is not None:
        folder, mark = enclosing
        raise UserError(
            f"--out {out} lies inside the run folder {folder} (it holds {mark}): an ablation writes "
            f"its runs and curves.png into a folder of its own; choose another --out, outside it"
        )


def resume_command(out: Path) -> str:
    """The command that finishes the ablation in `out`."""
    return flowspec_command("ablate", "--resume", out)


def resume_ablation(
    out: Path, options: RunOptions, stop: StopCheck = never, plan: Plan | None = None
) -> Ablation:
    """Finish the interrupted ablation in `out` with its own specs and settings: the runs it finished are
    kept, a run stopped part way goes on from its `last.pt` (to the same budget) and the others start.
    From `options` only how to run is taken: `device` and `threads` (default: the plan's), `quiet` and,
    if set, `data_dir` (the data moved). `plan`: `read_plan(out)` if already read."""
    with agreed(join(options.device or planned_device(out))):
        plan = plan or read_plan(out)
        if options.data_dir is not None:
            for run in plan.runs:
                run.data_dir = str(_absolute(options.data_dir))
        options = plan.run_options(
            RunOptions(device=options.device, threads=options.threads, quiet=options.quiet)
        )
        datasets = _datasets(plan, options.quiet)
    return _carry_out(plan, datasets, out, stop, options, write_plan=False)


def planned_device(out: Path) -> str | None:
    """Under torchrun, the device to join the job with (its backend) before the plan in `out` is read
    for real, as each process may fail to read it alone: `cpu` when the plan names it, read leniently,
    else None (cuda when available, as for the plan's other devices; a plan a process cannot read
    is then refused by `read_plan` in the job's agreed set-up)."""
    try:
        device = json.loads((out / PLAN).read_text())["options"]["device"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return "cpu" if device == "cpu" else None


def read_plan(out: Path) -> Plan:
    """The plan of the ablation in `out`, to resume it: a `UserError` when there is none, it is damaged,
    or the ablation goes on in another process (named)."""
    if main_process():  # (the job's other processes would find rank 0's lock)
        check_free(out)
    return Plan.read(out)


def _datasets(plan: Plan, quiet: bool) -> dict[int, Datasets]:
    """The data of each run of the plan that has no result yet, by its position (specs with the same data
    share one copy); a batch the job cannot split or train on is refused (before any run trains)."""
    read: dict[str, Datasets] = {}
    datasets = {}
    for i, (spec, run) in enumerate(zip(plan.specs, plan.runs, strict=True)):
        if run.folder in plan.results:
            continue
        datasets[i] = _data_of(spec, Path(run.data_dir) if run.data_dir else None, read, quiet)
        t = spec.train
        check_batch(
            t.batch, job_size(), len(datasets[i]["train_set"]), t.accumulate, spec.source or spec.name
        )
    return datasets


def _length(spec: FlowSpec, data: Datasets) -> int | None:
    """The steps `spec` trains for by its `length` (None: unbounded)."""
    length = spec.train.length
    if length is None:
        return None
    return length.count * (len(data["train_set"]) // spec.train.batch if length.unit == "epochs" else 1)


def _check_lengths(plan: Plan, datasets: dict[int, Datasets], steps: int | None) -> None:
    """Refuse a `--steps` budget longer than some spec's length: its run would stop at its length,
    short of the budget the others train for."""
    if steps is None:
        return
    short = {}
    for i, spec in enumerate(plan.specs):
        length = _length(spec, datasets[i])
        if length is not None and length < steps:
            count = spec.train.length.count
            epochs = f"{count} epoch{'s' * (count != 1)}: " if spec.train.length.unit == "epochs" else ""
            short[f"{spec.source or spec.name} ({epochs}{length} steps)"] = length
    if short:
        names, runs = (", ".join(short), "their runs") if len(short) > 1 else (next(iter(short)), "its run")
        raise UserError(
            f"--steps {steps} is beyond the training length of {names}: {runs} would stop there, short "
            f"of the {steps} steps every spec is to train for; give --steps {min(short.values())} or "
            f"fewer, or lengthen every spec with --set 'train.length={steps} steps'"
        )


def _short_of_budget(run: RunResult, options: RunOptions, budget: str) -> list[str]:
    """A note when a run ended at its spec's length before the budget did (a `--budget` longer than the
    run's training, or a `--steps` beyond its length in a plan that an earlier flowspec wrote)."""
    if run.stopped != "finished" or (options.max_steps is not None and run.step >= options.max_steps):
        return []
    return [
        f"{run.run_dir.name} ended at its spec's length (step {run.step}) before its budget ({budget}) "
        "was spent: --set 'train.length=N steps' lengthens every spec"
    ]


def _carry_out(
    plan: Plan,
    datasets: dict[int, Datasets],
    out: Path,
    stop: StopCheck,
    options: RunOptions,
    write_plan: bool,
) -> Ablation:
    """Train the plan's runs that have no result yet (`datasets`: their data), in order, and write the
    comparison. Under torchrun the job's process group serves every run; it is left on an error, and
    otherwise by the caller once rank 0 has reported (`teardown(together=True)`): a process that exits
    with an error (a failed run) makes torchrun end the others, rank 0 while it writes."""
    specs, folders = plan.specs, [run.folder for run in plan.runs]
    data_dirs = [Path(run.data_dir) if run.data_dir else None for run in plan.runs]
    todo = list(datasets)
    done = Ablation()
    lock = RunLock(out) if main_process() else None  # one process carries out an ablation
    options = replace(options, continue_with=resume_command(out))
    try:
        if lock is not None:
            if write_plan:
                plan.write(out)
            for i in todo:  # before any run: the job's other processes look at the folders when theirs starts
                done.notes += _set_aside(out / folders[i])
        for i, (spec, folder) in enumerate(zip(specs, folders, strict=True)):
            if folder in plan.results:
                done.runs.append(plan.finished(out, folder))
                done.notes += _since_finished(out / folder, plan.results[folder].step)
                done.notes += _short_of_budget(done.runs[-1], options, plan.budget)
                continue
            if stop():
                break
            try:
                resume = (out / folder / LAST).exists()
                where = replace(options, out=out / folder, data_dir=data_dirs[i], resume=resume)
                run = train(spec, where, keep_group=True, **datasets[i])
            except UserError as error:
                done.failed.append((folder, str(error)))
                continue
            done.runs.append(run)
            if is_signal(run.stopped):
                break
            if options.max_steps is not None and run.step > options.max_steps:
                done.notes.append(
                    f"{folder} was trained past the budget outside the ablation (step {run.step})"
                )
            done.notes += _short_of_budget(run, options, plan.budget)
            if lock is not None:
                plan.record(run)
                plan.write(out)
    except BaseException:
        teardown()
        raise
    finally:
        if lock is not None:
            lock.release()
    if not main_process():  # rank 0 writes the comparison
        return done
    files = {folder: spec.source for folder, spec in zip(folders, specs, strict=True)}
    if done.finished or done.failed:  # a run stopped by a signal is not compared
        rows = [dict(zip(COLUMNS, row_values(r), strict=True)) for r in done.finished]
        rows += [{"spec": folder, "error": message} for folder, message in done.failed]
        rows = [row | {"file": files[row["spec"]], "overrides": plan.overrides} for row in rows]
        with replaced_whole(out / "ablation.json") as partial:
            partial.write_text(json.dumps(rows, indent=2) + "\n")
    if done.finished:
        plot_curves({r.run_dir.name: r.history for r in done.finished}, out / "curves.png", "ablation")
    return done


def _set_aside(run_dir: Path) -> list[str]:
    """Move the files of a run that stopped before its first checkpoint (a crash, two quick Ctrl-Cs) out of
    its folder, as `train --out` would (`rundir.set_aside`); what is said."""
    aside = set_aside(run_dir)
    if aside is None:  # nothing to move, or a folder the run refuses: it fails with train's message
        return []
    return [
        f"{run_dir.name} had stopped before its first checkpoint: it starts again; its files are in {aside}"
    ]


def _since_finished(run_dir: Path, step: int) -> list[str]:
    """A note when the folder of a run finished at `step` is gone, or the run was trained further outside
    the ablation (its table row stays its result at the end of the budget)."""
    if not run_dir.is_dir():
        return [f"{run_dir} is gone: the row of {run_dir.name} is the one its plan kept"]
    last = max((row["step"] for row in read_metrics(run_dir)), default=step)
    if last <= step:
        return []
    return [f"{run_dir.name} was trained on outside the ablation (to step {last}); its row is step {step}"]


def _absolute(folder: str | Path | None) -> Path | None:
    """A data folder as a resumed ablation will find it from another working directory."""
    return Path(os.path.abspath(folder)) if folder is not None else None  # `..` folded, links kept


def _data_of(
    spec: FlowSpec, data_dir: Path | None, read: dict[str, Datasets], quiet: bool = False
) -> Datasets:
    """The train and test sets of `spec`, from `read` when an earlier spec had the same data section and
    folder; a data error names the spec it belongs to."""
    key = f"{spec.data.model_dump_json()} {data_dir}"
    if key not in read:
        try:
            with quietly(quiet):
                read[key] = {f"{split}_set": load_split(spec.data, split, data_dir) for split in SPLITS}
        except UserError as error:
            raise UserError(f"{spec.source or spec.name}: {error}") from None
    return read[key]


def test_images(result: RunResult) -> int | None:
    """How many test images the run's last evaluation measured."""
    return next((r.get("test_images") for r in reversed(result.history) if is_eval(r)), None)


def row_values(result: RunResult) -> tuple:
    """A row of the comparison: the run's folder name, parameters, last test bits/dim and the test images
    it was measured on, best test bits/dim, steps and training images per second (3 significant digits:
    slow models train at a fraction of an image)."""
    rate = float(f"{result.img_s:.3g}")
    name, images = result.run_dir.name, test_images(result)
    return (name, result.parameters, result.test_bpd, images, result.best_bpd, result.step, rate)


def fmt_rate(img_s: float) -> str:
    """`1,234`, `45.6`, `0.312` img/s."""
    return f"{img_s:,.0f}" if img_s >= 100 else f"{img_s:.3g}"
