"""The run folder: its name, the refusal to overwrite an old run, the checkpoint a resumed run reads, and
the spec files written at the start."""

from __future__ import annotations

import fnmatch
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from flowspec.errors import UserError, flowspec_command, shell_command
from flowspec.formatter import format_spec
from flowspec.loader import has_run_spec, recorded_spec
from flowspec.spec import FlowSpec
from flowspec.train.checkpoint import (
    BEST,
    LAST,
    check_same_spec,
    checkpoint_spec,
    load_checkpoint,
    names_its_numbers,
    trains_alike,
)
from flowspec.train.distributed import Dist
from flowspec.train.files import file_problem, replaced_whole
from flowspec.train.lock import LOCK, STALE
from flowspec.train.metrics import CURVES, METRICS

RESOLVED_HEADER = "# the resolved spec of a trained run"  # the first line of a run folder's spec.flow
#: what a run writes besides its checkpoints: a new run refuses a folder that holds any of them
RUN_FILES = (BEST, METRICS, CURVES, "spec.json", "samples", "tensorboard")  # and last.pt, spec.flow
#: the files of a folder that a run or an ablation writes, by what marks such a folder: no other command's
#: output may take their names there (nor any name under `samples/` and `tensorboard/`)
_RUN, _ABLATION = (*RUN_FILES, LAST, "spec.flow", LOCK), ("ablation-plan.json", "ablation.json", CURVES, LOCK)
OWN_FILES = {"spec.json": _RUN, LAST: _RUN, "ablation-plan.json": _ABLATION, "ablation.json": _ABLATION}
#: those of them that a run or an ablation reads again (to resume, to check a folder), not only writes
_READ_BACK = ("spec.json", "spec.flow", LAST, METRICS, LOCK, "ablation-plan.json")


def choose(spec: FlowSpec, out: Path | str | None, dist: Dist) -> Path:
    """`out`, or `runs/<model>-<date>-<time>` by rank 0's clock (the same folder on every rank), made by
    rank 0 as a new folder: a run started in the same second elsewhere gets `-2`, `-3`, ..."""
    if out is not None:
        if Path(out).exists() and not Path(out).is_dir():
            raise UserError(f"--out {out} is a file: name a folder for the run")
        return Path(out)
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", spec.name):
        raise UserError(f"the model name {spec.name!r} cannot name a run folder: give the folder with --out")
    made = _new_folder(Path("runs") / f"{spec.name}-{datetime.now():%Y%m%d-%H%M%S}") if dist.main else None
    return Path(dist.gather(str(made))[0])


def check_not_run_file(path: Path, option: str) -> None:
    """Refuse an output path (`eval --out`, `sample -o`, `export -o`) that names a file a run or an ablation
    writes in its folder (its spec, checkpoints, metrics, curves, grids): writing it would damage the run."""
    target = Path(os.path.realpath(path))  # a link is followed when the file is written
    places = [(target.parent, target.name)]
    if target.parent.name in ("samples", "tensorboard"):  # a run's grids and logs
        places.append((target.parent.parent, target.parent.name))
    for folder, name in places:
        marks = [mark for mark in OWN_FILES if (folder / mark).exists()]
        if any(name in OWN_FILES[mark] for mark in marks):
            what = "the run" if {"spec.json", LAST} & set(marks) else "the ablation"
            if folder != target.parent:  # a file in samples/ or tensorboard/
                raise UserError(
                    f"{option} {path} would write {target} into {folder / name}, which {what} in {folder} "
                    f"writes: choose a file outside it"
                )
            again = " and reads again" if name in _READ_BACK else ""
            raise UserError(
                f"{option} {path} would overwrite {target}, which {what} in {folder} writes{again}: choose "
                f"another file name"
            )


def missing_from(folder: Path) -> Path | None:
    """The outermost of `folder` and the folders above it that does not exist (what making `folder` makes;
    links count as there), or None when `folder` exists."""
    missing = None
    for each in (folder, *folder.parents):
        if os.path.lexists(each):
            break
        missing = each
    return missing


def remove_if_empty(run_dir: Path, made: Path | None = None) -> None:
    """Remove `run_dir` if it holds nothing but its lock file, and then the folders above it that are left
    empty, up to `made` (`missing_from`: the outermost that the run made for it). Call it while holding the
    lock: a process waiting for it then locks a new file, see `RunLock`."""
    above = run_dir.parents[: len(run_dir.parents) - len(made.parents)] if made is not None else ()
    try:
        if {p.name for p in run_dir.iterdir()} <= {LOCK}:
            (run_dir / LOCK).unlink(missing_ok=True)
            run_dir.rmdir()
            for folder in above:
                folder.rmdir()
    except OSError:  # gone already, or another process wrote into it meanwhile: leave it
        pass


def _new_folder(base: Path) -> Path:
    """`base`, or `base-2`, `base-3`, ... : the first that this call creates (mkdir is atomic)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        folder = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise UserError(f"{base} and 998 folders like it exist already: give the run folder with --out")


def previous_checkpoint(
    run_dir: Path, spec: FlowSpec, resume: bool, data_dir: Path | str | None = None
) -> dict[str, Any] | None:
    """The checkpoint to resume from (checked against `spec`, the data read from `data_dir` when given);
    None for a new run in a free folder."""
    last = run_dir / LAST
    if resume:
        payload = load_checkpoint(run_dir if run_dir.is_dir() else last)
        check_same_spec(payload, spec, last, data_dir)
        _check_belongs(run_dir, payload, checkpoint_spec(payload, last), data_dir)
        return payload
    if unstarted(run_dir):  # the trainer moves its files aside (`set_aside`) and starts again
        return None
    if last.exists():
        raise UserError(
            f"{run_dir} already holds a run ({last}); continue it with "
            f"`{flowspec_command('train', '--resume', run_dir)}` "
            f"or choose another --out folder"
        )
    if (run_dir / "spec.flow").exists() and not (run_dir / "spec.json").exists():
        raise UserError(
            f"{run_dir / 'spec.flow'} exists, and a run writes its resolved spec there: choose another --out "
            f"folder (a spec file is read from anywhere)"
        )
    earlier = sorted(name for name in (*RUN_FILES, "spec.flow") if (run_dir / name).exists())
    if earlier:  # a run stopped before its first checkpoint, or something else's files
        raise UserError(
            f"{run_dir} already holds {', '.join(earlier)} of an earlier run, with no {LAST} to resume from; "
            f"choose another --out folder, or remove those files first"
        )
    return None


def run_mark(folder: Path) -> Path | None:
    """The file that shows `folder` is a run's: its checkpoint, else a run's spec.json (an unstarted run
    has that alone; another tool's spec.json is no mark)."""
    if os.path.lexists(folder / LAST):
        return folder / LAST
    return folder / "spec.json" if has_run_spec(folder) else None


def enclosing_run(target: Path) -> tuple[Path, Path] | None:
    """The run folder that the resolved path `target` lies inside and the file that marks it, looking two
    levels up at most (a run's samples/, tensorboard/x), so that a stray spec.json far above blocks
    nothing; None when there is none."""
    for folder in target.parents[:2]:
        mark = run_mark(folder)
        if mark is not None:
            return folder, mark
    return None


def check_own_folder(run_dir: Path) -> None:
    """Refuse a new run's folder that lies inside a run's (`enclosing_run`) or holds runs in its subfolders
    (`--out runs` for `--out runs/NAME`): its files would be written among theirs, and the folder of runs
    would become a run (links followed)."""
    target = Path(os.path.realpath(run_dir))
    enclosing = enclosing_run(target)
    if enclosing is not None:
        folder, mark = enclosing
        raise UserError(
            f"{run_dir} lies inside the run folder {folder} (it holds {mark}): a run writes its files "
            f"into a folder of its own; choose another --out, outside it"
        )
    try:
        runs = sorted(sub.name for sub in target.iterdir() if sub.is_dir() and run_mark(sub) is not None)
    except OSError:  # no folder yet
        return
    if runs:
        shown = ", ".join(runs[:3]) + (f" and {len(runs) - 3} more" if len(runs) > 3 else "")
        raise UserError(
            f"{run_dir} holds the run folder{'s' if len(runs) > 1 else ''} {shown}: a run writes its files "
            f"into a folder of its own, not among other runs; choose another --out, e.g. "
            f"{shell_command(run_dir / 'NAME')}"
        )


def unstarted(run_dir: Path) -> list[str]:
    """The files of a run that stopped before its first checkpoint (a crash, a kill, a failed write): a
    `spec.json` that is a spec, no checkpoint, and nothing but a run's files; a new run there may set them
    aside. [] for any other folder."""
    own = (*RUN_FILES, "spec.flow", "nonfinite_batch*.pt", *STALE)
    try:
        names = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)
        if LAST in names or BEST in names or "spec.json" not in names:
            return []
        if not all(any(fnmatch.fnmatchcase(n, pattern) for pattern in own) for n in names):
            return []
    except OSError:  # no folder
        return []
    return names if recorded_spec(run_dir) is not None else []  # a spec.json that is a spec


def aside(run_dir: Path, time: str) -> Path:
    """`<folder>.before-<time>` beside `run_dir`, named from its absolute path (`.` has no name to add to)."""
    folder = Path(os.path.abspath(run_dir))
    return folder.with_name(f"{folder.name}.before-{time}")


def set_aside(run_dir: Path) -> Path | None:
    """Move the files of a run that stopped before its first checkpoint (`unstarted`) into
    `<folder>.before-<time>` beside it, so that a new run starts in the folder; where they went, or None."""
    names = unstarted(run_dir)
    if not names:
        return None
    moved = _new_folder(aside(run_dir, f"{datetime.now():%Y%m%d-%H%M%S}"))
    for name in names:
        (run_dir / name).rename(moved / name)
    return moved


def _check_belongs(
    run_dir: Path, payload: dict[str, Any], trained: FlowSpec, data_dir: Path | str | None
) -> None:
    """Refuse a `last.pt` (`payload`, its spec `trained`) whose spec is not the run folder's `spec.json`
    (copied from another run: resuming would rewrite this run's metrics) nor that spec with its numbered
    classes named (`names_its_numbers`: a resume that named them and saved no checkpoint), and a `spec.json`
    that is not a spec (it cannot tell)."""
    recorded = run_dir / "spec.json"
    if not recorded.exists():  # nothing to compare with
        return
    problem = file_problem(recorded)  # a FIFO would block the read
    if problem is None:
        try:
            theirs = FlowSpec.model_validate_json(recorded.read_text())
        except ValueError:  # not JSON, not UTF-8, or not a spec (an OSError names the file itself)
            problem = "is not the resolved spec of a run (written over?)"
    if problem is not None:
        raise UserError(
            f"{recorded} {problem}, so {run_dir / LAST} cannot be checked to belong to this run; put the "
            f"run's spec.json back, or remove it to resume from {run_dir / LAST} as it is (its spec is "
            f"written there again)"
        )
    if not (trains_alike(theirs, trained) or names_its_numbers(payload, trained, theirs, data_dir)):
        raise UserError(
            f"{run_dir / LAST} does not belong to the run in {run_dir}: it was trained with another spec "
            f"than {recorded} (copied from another run?); resume the run it came from"
        )


def write_spec_files(run_dir: Path, spec: FlowSpec) -> None:
    """`spec.json` and `spec.flow`: the resolved spec (its base files and --set overrides applied), as
    data and in the spec language, so that `show`, `diff` and `train` read the model that was trained."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with replaced_whole(run_dir / "spec.json") as partial:
        partial.write_text(spec.model_dump_json(indent=2) + "\n")
    path, body = run_dir / "spec.flow", format_spec(spec)
    try:
        header, _, old_body = path.read_text().partition("\n")
    except (OSError, UnicodeDecodeError):
        header, old_body = RESOLVED_HEADER, None
    if spec.source or body != old_body:  # a resume of the stored spec (--set aside) keeps where it came from
        origin = f"{RESOLVED_HEADER}, from {spec.source}" if spec.source else header
        with replaced_whole(path) as partial:
            partial.write_text(f"{origin}\n{body}")
