"""The Python API of the training stage: `train` (what `flowspec train` runs) and `load`.

import flowspec
result = flowspec.train("specs/quickstart.flow", out="runs/q", max_steps=100)
model = flowspec.load("runs/q")  # a FlowModel: EMA weights, eval mode, `model.spec`
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowspec.errors import RunStopped, UserError, check_bool, flowspec_command
from flowspec.spec import FlowSpec

if TYPE_CHECKING:
    import torch

    from flowspec.model import FlowModel
    from flowspec.train.trainer import RunResult

PathLike = str | os.PathLike[str]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | float, option: str = "--max-time") -> float:
    """Seconds in `90s`, `30m`, `1.5h` or `2d` (a bare number is seconds); a `UserError` naming `option`
    otherwise, or for no time at all."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*", str(text))
    if not match:
        raise UserError(f"{option}: expected a duration like 90s, 30m or 2h, got {text!r}")
    if float(match[1]) <= 0:
        raise UserError(f"{option} must be a duration above 0, like 90s, 30m or 2h, got {text!r}")
    return float(match[1]) * _UNITS[match[2] or "s"]


def parse_size(text: str | int) -> int:
    """Bytes in `512M`, `4G`, `1.5T` or a bare number of bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)i?[bB]?\s*", str(text))
    if not match:
        raise UserError(f"--data-memory: expected a size like 512M or 4G, got {text!r}")
    return int(float(match[1]) * 1024 ** " KMGT".index((match[2] or " ").upper()))


def train(
    spec: FlowSpec | PathLike | None = None,
    data: PathLike | None = None,
    out: PathLike | None = None,
    *,
    sets: Sequence[str] = (),
    resume: PathLike | None = None,
    device: str | torch.device | None = None,
    precision: str | None = None,
    compile: bool = False,
    recompute: str = "auto",
    max_steps: int | None = None,
    max_time: str | float | None = None,
    log_every: int | None = None,
    tensorboard: bool = False,
    quiet: bool = False,
    threads: int | None = None,
    allow_large: bool = False,
    data_memory: str | int | None = None,
    eval: Mapping[str, Any] | None = None,
) -> RunResult:
    """Train a spec (a `FlowSpec` or a `.flow` file) with its recipe, as `flowspec train` does.

    The keywords are the command line's options: `data` (`--data`), `out` (`--out`), `sets` (`--set`
    overrides of a spec file), `resume` (a run folder to continue; `spec` may then be omitted),
    `device`, `precision` (fp32 | bf16 | auto; None: fp32, or the precision a resumed run trained in),
    `compile`, `recompute` (auto | on | off), `max_steps`, `max_time` (seconds or `"30m"`), `log_every`
    (None: 10, or the resumed run's), `tensorboard`, `quiet`, `threads` (None: chosen by model size and
    CPU load), `allow_large` (train a model whose estimated training memory exceeds the device's),
    `data_memory` (bytes or `"4G"`: a training set up to this size is held in memory, a larger one
    streamed from its file) and `eval`
    (settings of the spec's `eval` section, as `--eval-*` give them, e.g. `{"images": 64, "inversion":
    False}`). Returns the run's `RunResult` (run folder, step, bits/dim, the metrics' history). A mistake
    raises `UserError` with the message the command line prints. Ctrl-C or SIGTERM stops the run after
    its step and saves it, then raises `RunStopped` (a `KeyboardInterrupt`, holding the `RunResult`).
    """
    from flowspec.loader import check_overrides
    from flowspec.train.distributed import agreed, join, left_on_error
    from flowspec.train.signals import is_signal
    from flowspec.train.trainer import RunOptions
    from flowspec.train.trainer import train as run_training

    device = str(device) if device is not None else None  # a torch.device as its name, e.g. "cuda:1"
    # under torchrun the job is joined first: a mistake only one process meets (its own copy of the spec
    # or the run folder missing) ends every process at once, each saying why, each out of the job's group
    with left_on_error(), agreed(join(device)):
        check_overrides(sets)
        switches = dict(compile=compile, tensorboard=tensorboard, quiet=quiet, allow_large=allow_large)
        _check_options(switches, threads, max_steps)
        memory = parse_size(data_memory) if data_memory is not None else None
        if resume is not None:
            resume = out = _resumed(resume, out)
        spec = _spec_to_train(spec, sets, resume, data)
        if log_every is not None and not (_whole(log_every) and log_every >= 1):
            raise UserError(f"log_every must be a whole number of steps >= 1, got {log_every!r}")
        from flowspec.train.recompute import check_training

        check_training(spec, device, allow_large, precision, recompute, compile)
        given = dict(eval or {})  # the --eval-* options, which the run records (`--set eval.*`: its spec)
        eval = {**eval_written_by(spec, sets), **given}
        _check_eval(spec, eval)
        options = RunOptions(
            out=Path(out) if out is not None else None,
            data_dir=Path(data) if data is not None else None,
            device=device,
            precision=precision,
            compile=compile,
            recompute=recompute,
            max_steps=max_steps,
            max_time=parse_duration(max_time) if max_time is not None else None,
            quiet=quiet,
            resume=resume is not None,
            log_every=log_every,
            tensorboard=tensorboard,
            data_memory=memory,
            threads=threads,
            eval=eval,
            eval_options=given,
        )
    result = run_training(spec, options)
    if is_signal(result.stopped):
        raise RunStopped(result)
    return result


def _check_options(switches: Mapping[str, object], threads: object, max_steps: object) -> None:
    """A `UserError` unless each of the `switches` is True or False and `threads` and `max_steps` are None
    or whole numbers >= 1 (and `threads` one this machine allows)."""
    from flowspec.threads import check_threads

    for name, value in switches.items():
        check_bool(value, name)
    if threads is not None:
        if not _whole(threads):  # torch refuses True, 1.5 and "2" with a traceback
            raise UserError(f"threads must be a whole number >= 1, got {threads!r}")
        check_threads(threads)
    if max_steps is not None and not (_whole(max_steps) and max_steps >= 1):
        raise UserError(f"max_steps must be a whole number >= 1, got {max_steps!r}")


def _resumed(resume: PathLike, out: PathLike | None) -> PathLike:
    """The run folder that `resume` names (the folder, or its last.pt), where the run goes on: a
    `UserError` for any other file, for an `out` elsewhere, or for a run that another process is writing."""
    from flowspec.train.checkpoint import LAST
    from flowspec.train.lock import check_free

    if Path(resume).is_file():  # RUN_DIR/last.pt stands for its run folder; nothing else resumes
        if Path(resume).name != LAST:
            raise UserError(f"--resume takes a run folder (or its {LAST}), got {resume}")
        resume = Path(resume).parent
    if out is not None and Path(out).resolve() != Path(resume).resolve():
        raise UserError(f"--resume continues the run in {resume}: leave out --out (got {out})")
    check_free(Path(resume))  # a run still writing its first checkpoint: named, not "no checkpoint"
    return resume


def _spec_to_train(
    spec: FlowSpec | PathLike | None, sets: Sequence[str], resume: PathLike | None, data: PathLike | None
) -> FlowSpec:
    """The spec the run trains: `spec` (a spec file with the `sets` overrides, or a `FlowSpec` that may
    start a run), else the stored spec of the run `resume` continues, with the eval settings and `save
    every` its spec.json records (`_recorded_settings`) and the `sets` overrides (eval settings, `save
    every`). A `UserError` when there is none, or `sets` for a `FlowSpec`."""
    from flowspec.loader import check_file_rules, load_spec, stored_with_overrides
    from flowspec.train.checkpoint import LAST, checkpoint_spec, load_checkpoint

    applied = False  # whether `sets` were applied to the stored spec of the run resumed
    if spec is None and resume is not None:
        payload = load_checkpoint(resume, warn=False)  # the run reads it again
        spec = _recorded_settings(payload, checkpoint_spec(payload, resume), Path(resume), data)
        if sets:
            spec = stored_with_overrides(spec, sets, f"{Path(resume) / LAST} (stored spec)")
            applied = True
    if spec is None:
        raise UserError("no spec given: flowspec train SPEC.flow (or --resume RUN_DIR to continue a run)")
    if not isinstance(spec, FlowSpec):
        _not_a_run_folder(Path(spec))
        return load_spec(spec, overrides=tuple(sets))
    if sets and not applied:
        raise UserError("sets= overrides apply to a spec file: pass its path, or change the FlowSpec itself")
    if resume is None:  # what a spec file may not say, a spec made in Python may not start a run with
        check_file_rules(spec)
    return spec


def _recorded_settings(
    payload: dict[str, Any], stored: FlowSpec, run_dir: Path, data: PathLike | None
) -> FlowSpec:
    """The spec `stored` of the checkpoint `payload` with the eval settings and `save every` that the run's
    spec.json records where they differ, and its classes where they name the checkpoint's numbers
    (`names_its_numbers`, on the folder `data` when given): a resume's `--set` of them that saved no
    checkpoint (a finished run, a crash) is in spec.json but in no checkpoint, and a later resume without a
    spec keeps it. Only those: a spec.json that is not a flowspec spec, or that trains otherwise, changes
    nothing."""
    from flowspec.loader import recorded_spec
    from flowspec.train.checkpoint import names_its_numbers, trains_alike

    recorded = recorded_spec(run_dir)
    if recorded is None or recorded == stored:
        return stored
    if names_its_numbers(payload, stored, recorded, data):
        stored = stored.model_copy(update={"data": recorded.data})
    elif not trains_alike(stored, recorded):
        return stored
    saving = stored.train.model_copy(update={"save_every": recorded.train.save_every})
    return stored.model_copy(update={"eval": recorded.eval, "train": saving})


def _whole(value: object) -> bool:
    """Whether `value` is an int (not a bool, which is one too)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _not_a_run_folder(spec: Path) -> None:
    """Refuse a run folder given as the spec: a user who means to continue its run."""
    from flowspec.loader import is_run_spec

    if is_run_spec(spec / "spec.flow"):
        raise UserError(
            f"{spec} is a run folder, not a spec file: continue its run with "
            f"{flowspec_command('train', '--resume', spec)} "
            f"({flowspec_command('train', spec / 'spec.flow')} would start a new run with its spec)"
        )


def eval_written_by(spec: FlowSpec, sets: Sequence[str]) -> dict[str, Any]:
    """The eval settings that `sets` (`--set eval.images=16`) wrote, as `spec` has them: like the
    `--eval-*` options, they hold for a short run's evaluation too."""
    names = {s.split("=", 1)[0].strip().removeprefix("eval.") for s in sets if s.strip().startswith("eval.")}
    return {name: getattr(spec.eval, name) for name in names if name in type(spec.eval).model_fields}


def _check_eval(spec: FlowSpec, settings: Mapping[str, Any]) -> None:
    """A `UserError` unless `settings` are valid settings of the spec's eval section."""
    from pydantic import ValidationError

    from flowspec.spec import EvalSpec

    try:
        EvalSpec.model_validate({**spec.eval.model_dump(), **settings})
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'eval'}: {e['msg']}" for e in error.errors())
        raise UserError(f"eval={dict(settings)!r}: {problems}") from None


def load(path: PathLike, device: str | torch.device | None = None, precision: str | None = None) -> FlowModel:
    """A trained model, ready to use: from a run folder, a checkpoint (`.pt`) or an export
    (`.safetensors`), with the EMA weights, in eval mode, on `device` (default cpu), computing in
    `precision` (fp32 | bf16 | auto; None: the precision its run trained in, fp32 for an export that does
    not record it); `model.spec` is its resolved spec."""
    from flowspec.train.export import load_trained

    return load_trained(path, device, precision=precision).model
