"""Ablations: several specs trained for the same budget on the same data and seed, then compared."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flowspec.errors import UserError, naming
from flowspec.spec import FlowSpec
from flowspec.train.checkpoint import LAST
from flowspec.train.data import ImageSet, load_split
from flowspec.train.datacache import quietly
from flowspec.train.distributed import main_process, teardown
from flowspec.train.files import replaced_whole
from flowspec.train.lock import RunLock, check_free
from flowspec.train.metrics import is_eval, plot_curves, read_metrics
from flowspec.train.rundir import previous_checkpoint
from flowspec.train.signals import StopCheck, never
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


PLAN = "ablation-plan.json"
#: the run options an ablation keeps in its plan (the others are how it reports, or given again)
PLANNED = ("device", "precision", "compile", "recompute", "data_memory", "max_steps", "max_run_time", "eval")


@dataclass
class Plan:
    """What an ablation trains: each spec (resolved, seed set) with its run folder and data folder, the
    options of every run and the `--set` overrides; and, as each run finishes, its result. Written to
    `OUT/ablation-plan.json` before the first run, so that `resume_ablation` can finish an interrupted one."""

    specs: list[FlowSpec]
    folders: list[str]
    data_dirs: list[Path | None]  # each run's data folder (absolute), None where it has no path
    options: RunOptions
    budget: str  # how the table's title says it: "20 steps", "20m"
    overrides: list[str] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # folder -> a finished run's result

    def write(self, out: Path) -> None:
        runs = [
            {
                "folder": f,
                "file": s.source,
                "data_dir": str(d) if d else None,
                "spec": json.loads(s.model_dump_json()),
            }
            for s, f, d in zip(self.specs, self.folders, self.data_dirs, strict=True)
        ]
        options = {name: getattr(self.options, name) for name in PLANNED}
        text = {"runs": runs, "options": options, "budget": self.budget, "overrides": self.overrides}
        out.mkdir(parents=True, exist_ok=True)
        with replaced_whole(out / PLAN) as partial:
            partial.write_text(json.dumps(text | {"results": self.results}, indent=2) + "\n")

    @classmethod
    def read(cls, out: Path) -> Plan:
        """The plan of the ablation in `out`, to resume it; a `UserError` naming the file when there is none
        or it is damaged, or naming the holder when the ablation goes on in another process."""
        if main_process():  # (the job's other processes would find rank 0's lock)
            check_free(out)
        path = out / PLAN
        if not path.is_file():
            raise UserError(
                f"{out} holds no ablation to resume: expected {path}, which `flowspec ablate` writes before "
                "its first run"
            )
        try:
            with naming(path):
                text = json.loads(path.read_text())
            runs = text["runs"]
            specs = [
                FlowSpec.model_validate_json(json.dumps(run["spec"])).model_copy(
                    update={"source": run["file"]}
                )
                for run in runs
            ]
            return cls(
                specs=specs,
                folders=[run["folder"] for run in runs],
                data_dirs=[Path(run["data_dir"]) if run["data_dir"] else None for run in runs],
                options=RunOptions(**{name: text["options"][name] for name in PLANNED}),
                budget=text["budget"],
                overrides=text["overrides"],
                results=text["results"],
            )
        except (ValueError, KeyError, TypeError) as error:
            problem = f"{type(error).__name__}: {error}"
            raise UserError(f"{path} is damaged ({problem}); the ablation cannot be resumed") from None

    def finished(self, out: Path, folder: str) -> RunResult:
        """The result of a run finished before the ablation was resumed."""
        saved = self.results[folder]
        return RunResult(out / folder, history=read_metrics(out / folder), **saved)


def run_ablation(
    specs: list[FlowSpec],
    options: RunOptions,
    out: Path,
    seed: int,
    stop: StopCheck = never,
    overrides: Sequence[str] = (),
    budget: str = "",
) -> Ablation:
    """Train each spec into `out/<name>` under the same options; write `ablation.json` (each row with
    the spec's file and the `overrides` applied to every spec) and `curves.png`. The budget is
    `options.max_steps` or `options.max_run_time`; `budget` says it in the table's title.

    A stop signal (`stop`, or one that stopped a run) ends it: the runs so far are returned, fewer than
    the specs or with the last one stopped by the signal, and only the finished runs are compared;
    `resume_ablation(out)` finishes it. A run that fails with a `UserError` (it diverged, the disk is full)
    is recorded and the next spec trains.

    Every spec's data is read before the first run, so that a mistake in the last spec's data section is
    reported before hours of training the others; specs with the same data share one copy."""
    folders = folder_names([s.name for s in specs], [s.source for s in specs])
    if main_process():  # an ablation going on there is named first
        check_free(out)
    for planned in (PLAN, "ablation.json"):
        if (out / planned).exists():
            raise UserError(
                f"{out} already holds an ablation ({out / planned}); choose another --out"
                + (f", or finish it with: flowspec ablate --resume {out}" if planned == PLAN else "")
            )
    for spec, folder in zip(specs, folders, strict=True):  # an earlier run there is refused before any trains
        previous_checkpoint(out / folder, spec, resume=False)
    data_dirs = [_absolute(options.data_dir or spec.data.path) for spec in specs]
    seeded = [with_seed(spec, seed) for spec in specs]
    plan = Plan(seeded, folders, data_dirs, replace(options, out=None), budget, list(overrides))
    return _carry_out(plan, out, stop, options, write_plan=True)


def resume_ablation(
    out: Path, options: RunOptions, stop: StopCheck = never, plan: Plan | None = None
) -> Ablation:
    """Finish the interrupted ablation in `out` with its own specs and settings: the runs it finished are
    kept, a run stopped part way goes on from its `last.pt` (to the same budget) and the others start.
    From `options` only how to run is taken: `device`, `threads`, `quiet` and, if set, `data_dir` (the
    data moved). `plan`: `Plan.read(out)` if already read."""
    plan = plan or Plan.read(out)
    if options.data_dir is not None:
        plan.data_dirs = [_absolute(options.data_dir)] * len(plan.specs)
    device = options.device or plan.options.device
    how = {"quiet": options.quiet, "threads": options.threads, "device": device}
    return _carry_out(plan, out, stop, replace(plan.options, **how), write_plan=False)


def _carry_out(plan: Plan, out: Path, stop: StopCheck, options: RunOptions, write_plan: bool) -> Ablation:
    """Train the plan's runs that have no result yet, in order, and write the comparison."""
    todo = [i for i, folder in enumerate(plan.folders) if folder not in plan.results]
    read: dict[str, Datasets] = {}
    datasets = {i: _data_of(plan.specs[i], plan.data_dirs[i], read, options.quiet) for i in todo}
    for i, data in datasets.items():  # found before the others train, not after
        spec = plan.specs[i]
        if len(data["train_set"]) < spec.train.batch:
            raise UserError(
                f"{spec.source or spec.name}: the training set has {len(data['train_set'])} images, fewer "
                f"than one batch ({spec.train.batch})"
            )
    done = Ablation()
    together = False
    lock = RunLock(out) if main_process() else None  # one process carries out an ablation
    try:  # under torchrun the job's process group serves every run, and is left at the end
        if write_plan and lock is not None:
            plan.write(out)
        for i, (spec, folder) in enumerate(zip(plan.specs, plan.folders, strict=True)):
            if folder in plan.results:
                done.runs.append(plan.finished(out, folder))
                continue
            if stop():
                break
            try:
                where = replace(options, out=out / folder, data_dir=plan.data_dirs[i])
                where.resume = (out / folder / LAST).exists()
                run = train(spec, where, keep_group=True, **datasets[i])
            except UserError as error:
                done.failed.append((folder, str(error)))
                continue
            done.runs.append(run)
            if is_signal(run.stopped):
                break
            if lock is not None:
                plan.results[folder] = _result_record(run)
                plan.write(out)
        together = True
    finally:
        if lock is not None:
            lock.release()
        teardown(together=together)
    if not main_process():  # rank 0 writes the comparison
        return done
    files = {folder: spec.source for folder, spec in zip(plan.folders, plan.specs, strict=True)}
    if done.finished or done.failed:  # a run stopped by a signal is not compared
        rows = [dict(zip(COLUMNS, row_values(r), strict=True)) for r in done.finished]
        rows += [{"spec": folder, "error": message} for folder, message in done.failed]
        rows = [row | {"file": files[row["spec"]], "overrides": plan.overrides} for row in rows]
        with replaced_whole(out / "ablation.json") as partial:
            partial.write_text(json.dumps(rows, indent=2) + "\n")
    if done.finished:
        plot_curves({r.run_dir.name: r.history for r in done.finished}, out / "curves.png", "ablation")
    return done


def _absolute(folder: str | Path | None) -> Path | None:
    """A data folder as a resumed ablation will find it from another working directory."""
    return Path(folder).absolute() if folder is not None else None


def _result_record(run: RunResult) -> dict[str, Any]:
    """What the plan keeps of a finished run (its history is in its metrics file)."""
    kept = ("step", "epoch", "stopped", "test_bpd", "best_bpd", "img_s", "parameters", "best_scheduled")
    return {name: getattr(run, name) for name in kept}


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


def is_signal(stopped: str | None) -> bool:
    """Whether a run (or the ablation) was stopped by SIGINT or SIGTERM."""
    return stopped in ("SIGINT", "SIGTERM")


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
