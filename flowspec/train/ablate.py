"""Ablations: several specs trained for the same budget on the same data and seed, then compared."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from flowspec.errors import UserError
from flowspec.spec import FlowSpec
from flowspec.train.data import ImageSet, load_split
from flowspec.train.datacache import quietly
from flowspec.train.distributed import main_process, teardown
from flowspec.train.files import replaced_whole
from flowspec.train.metrics import is_eval, plot_curves
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
) -> Ablation:
    """Train each spec into `out/<name>` under the same options; write `ablation.json` (each row with
    the spec's file and the `overrides` applied to every spec) and `curves.png`.

    A stop signal (`stop`, or one that stopped a run) ends it: the runs so far are returned, fewer than
    the specs or with the last one stopped by the signal, and only the finished runs are compared. A run
    that fails with a `UserError` (it diverged, the disk is full) is recorded and the next spec trains.

    Every spec's data is read before the first run, so that a mistake in the last spec's data section is
    reported before hours of training the others; specs with the same data share one copy."""
    folders = folder_names([s.name for s in specs], [s.source for s in specs])
    files = {folder: spec.source for folder, spec in zip(folders, specs, strict=True)}
    if (out / "ablation.json").exists():
        raise UserError(f"{out} already holds an ablation ({out / 'ablation.json'}); choose another --out")
    for spec, folder in zip(specs, folders, strict=True):  # an earlier run there is refused before any trains
        previous_checkpoint(out / folder, spec, resume=False)
    read: dict[str, Datasets] = {}
    datasets = [_data_of(spec, options.data_dir, read, options.quiet) for spec in specs]
    for spec, data in zip(specs, datasets, strict=True):  # found before the others train, not after
        if len(data["train_set"]) < spec.train.batch:
            raise UserError(
                f"{spec.source or spec.name}: the training set has {len(data['train_set'])} images, fewer "
                f"than one batch ({spec.train.batch})"
            )
    done = Ablation()
    together = False
    try:  # under torchrun the job's process group serves every run, and is left at the end
        for spec, folder, data in zip(specs, folders, datasets, strict=True):
            if stop():
                break
            try:
                where = replace(options, out=out / folder)
                run = train(with_seed(spec, seed), where, keep_group=True, **data)
            except UserError as error:
                done.failed.append((folder, str(error)))
                continue
            done.runs.append(run)
            if is_signal(run.stopped):
                break
        together = True
    finally:
        teardown(together=together)
    if not main_process():  # rank 0 writes the comparison
        return done
    if done.finished or done.failed:  # a run stopped by a signal is not compared
        rows = [dict(zip(COLUMNS, row_values(r), strict=True)) for r in done.finished]
        rows += [{"spec": folder, "error": message} for folder, message in done.failed]
        rows = [row | {"file": files[row["spec"]], "overrides": list(overrides)} for row in rows]
        out.mkdir(parents=True, exist_ok=True)
        with replaced_whole(out / "ablation.json") as partial:
            partial.write_text(json.dumps(rows, indent=2) + "\n")
    if done.finished:
        plot_curves({r.run_dir.name: r.history for r in done.finished}, out / "curves.png", "ablation")
    return done


def _data_of(
    spec: FlowSpec, data_dir: Path | None, read: dict[str, Datasets], quiet: bool = False
) -> Datasets:
    """The train and test sets of `spec`, from `read` when an earlier spec had the same data section; a
    data error names the spec it belongs to."""
    key = spec.data.model_dump_json()
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
