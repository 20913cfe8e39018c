"""Checkpoints: written atomically, read with checks, and never overwritten when they cannot be read.

A checkpoint is one `torch.save` file holding the model, EMA, optimizer and scheduler states, the
training position and RNG states, the resolved spec (JSON) with its hash, and the flowspec and torch
versions. Writing goes to a temporary file in the same folder, then `os.replace`, so a crash leaves
either the old file or the new one, never a torn one. Every file written carries a SHA-256 `checksum`
of its content (tensors by their bytes); reading checks it, then the structure of the payload and the
shapes of its tensors against the model its spec builds. Files written before checksums existed are
read with a warning. Reading never runs pickled code (`weights_only=True`).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import torch

from flowspec.errors import UserError, shell_command
from flowspec.spec import FlowSpec
from flowspec.train.files import file_problem, replaced_whole
from flowspec.train.lock import FIRST_CHECKPOINT, check_free

LAST, BEST = "last.pt", "best.pt"
REQUIRED = ("model", "spec", "spec_hash", "step", "versions")
TRAINING_STATE = ("optimizer", "scheduler", "ema", "skipped", "best_bpd", "rng", "epoch")
CHECKSUM = "checksum"


def spec_hash(spec: FlowSpec) -> str:
    """SHA-256 of the resolved spec's JSON: two specs hash equal exactly when their settings are."""
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()


def checksum(payload: Any) -> str:
    """SHA-256 of a payload's content: every tensor's dtype, shape and bytes, every other value's repr, in
    a fixed order (dict keys sorted), the `checksum` entry itself left out."""
    digest = hashlib.sha256()

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{tensor.dtype}{tuple(value.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        elif isinstance(value, dict):
            keys = sorted((key for key in value if key != CHECKSUM), key=repr)
            digest.update(f"D{len(keys)}".encode())
            for key in keys:
                digest.update(repr(key).encode())
                visit(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                visit(item)
        else:
            digest.update(f"V{value!r}".encode())

    visit(payload)
    return digest.hexdigest()


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """`torch.save` the payload and its checksum to a temporary file beside `path`, flush it to disk, then
    rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**payload, CHECKSUM: checksum(payload)}
    with replaced_whole(path) as partial, open(partial, "wb") as file:
        torch.save(payload, file)  # through Python's writes: a full disk is an OSError under torch's error


def save_run(
    run_dir: Path, payload: dict[str, Any], best: bool, *modules: torch.nn.Module, last: bool = True
) -> bool:
    """Write `last.pt` (unless not `last`) and `best.pt` (when `best`) unless a module has non-finite
    weights (then warn)."""
    if not all(is_finite(m) for m in modules):
        print(
            f"warning: the model has non-finite weights at step {payload['step']}: not checkpointed",
            flush=True,
        )
        return False
    if best:  # first: a last.pt saying this is the best must not stand beside an older best.pt
        save_atomic(payload, run_dir / BEST)
    if last:
        save_atomic(payload, run_dir / LAST)
    return True


def spec_record(spec: FlowSpec) -> dict[str, Any]:
    """What a checkpoint keeps of the spec and the software: the resolved spec, its hash, the versions."""
    import flowspec

    return {
        "spec": spec.model_dump_json(),
        "spec_hash": spec_hash(spec),
        "versions": {"flowspec": flowspec.__version__, "torch": str(torch.__version__)},
    }


def resolve(path: Path | str, exports: bool = False, command: str | None = None) -> Path:
    """A checkpoint file, or a run folder's `last.pt`; a clear error when there is none (naming its `best.pt`
    if it has one, with the `flowspec` `command` that reads it, and `.safetensors` exports among what may be
    passed where the caller reads them)."""
    from flowspec.train.rundir import unstarted  # (rundir imports this module)

    path = Path(path)
    if path.is_dir():
        if (path / LAST).is_file():
            return path / LAST
        check_free(path, FIRST_CHECKPOINT)  # a run still writing its first checkpoint is named
        if (path / BEST).is_file():
            raise UserError(
                f"no {LAST} in {path} (the checkpoint a run resumes from); its {BEST} is there: "
                f"{_used_by(path / BEST, command)}"
            )
        if unstarted(path):
            raise UserError(
                f"no checkpoint in {path}: its run stopped before writing {LAST}, so there is nothing to use "
                f"or resume; `flowspec train SPEC --out {shell_command(path)}` (the run's command) starts "
                f"it again there, setting these files aside"
            )
        raise UserError(
            f"no checkpoint in {path}: expected {path / LAST} (a run folder written by `flowspec train`)"
        )
    problem = file_problem(path)
    if problem:  # does not exist, is a FIFO or a device, a link to nothing or a loop
        export = " or a .safetensors file written by `flowspec export`" if exports else ""
        raise UserError(
            f"checkpoint {path} {problem}: pass a run folder or a .pt file written by `flowspec train`"
            + export
        )
    return path


def load_checkpoint(
    path: Path | str, training_state: bool = True, warn: bool = True, command: str | None = None
) -> dict[str, Any]:
    """Read and check a checkpoint (a file or a run folder), onto the CPU: its checksum, its structure (with
    `training_state`, also what resuming needs) and its tensors' shapes. A `UserError` naming the path
    and what is wrong if it is unusable (and the `flowspec` `command` reading it, eval, sample or export, on
    another checkpoint of its run that it may use). Without `warn`, no warning that it has no checksum (a
    caller that reads it again says it then)."""
    path = resolve(path, command=command)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise UserError(f"checkpoint {path} cannot be read: permission denied") from None
    except Exception as error:  # truncated zip, garbage bytes, unpickling errors
        if path.suffix == ".flow":
            raise UserError(f"{path} is a spec, not a checkpoint: pass a run folder or its {LAST}") from None
        if path.suffix != ".pt":
            raise UserError(
                f"{path} is not a checkpoint (a .pt file that flowspec train writes): pass a run folder "
                f"or its {LAST}"
            ) from None
        raise UserError(
            f"checkpoint {path} is corrupt or truncated and cannot be read ({type(error).__name__}); "
            f"it was left untouched: {_elsewhere(path, training_state, command)}"
        ) from None
    missing = [k for k in REQUIRED if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise UserError(f"{path} is not a flowspec checkpoint (missing {', '.join(missing)})")
    stored = payload.get(CHECKSUM)
    if stored is None:
        if warn:
            print(
                f"warning: checkpoint {path} has no checksum (written before flowspec stored one): "
                f"loaded without checking it",
                file=sys.stderr,
            )
    elif stored != checksum(payload):
        raise UserError(
            f"checkpoint {path} is corrupt: its content does not match the checksum stored when it was "
            f"written; it was left untouched: {_elsewhere(path, training_state, command)}"
        )
    wrong = _structure_problems(payload, training_state)
    if not wrong:
        wrong = _shape_problems(payload, path)
    if wrong:
        shown = "; ".join(wrong[:3]) + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        raise UserError(f"checkpoint {path} is not a usable flowspec checkpoint: {shown}")
    return payload


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_STRUCTURE: dict[str, tuple[Any, str]] = {
    "model": (_is_state_dict, "a state dict (names to tensors)"),
    "spec": (lambda v: isinstance(v, str), "the spec's JSON text"),
    "spec_hash": (lambda v: isinstance(v, str), "a hash"),
    "step": (_count, "a step count (an integer >= 0)"),
    "versions": (lambda v: isinstance(v, dict), "a dict of versions"),
    "optimizer": (
        lambda v: (
            isinstance(v, dict)
            and isinstance(v.get("state"), dict)
            and isinstance(v.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in v["param_groups"])
        ),
        "an optimizer state (state and param_groups)",
    ),
    "scheduler": (lambda v: isinstance(v, dict) and _count(v.get("last_epoch")), "a scheduler state"),
    "ema": (lambda v: v is None or (_is_state_dict(v) and "n_averaged" in v), "none or an EMA state dict"),
    "skipped": (_count, "a count of skipped steps"),
    "best_bpd": (lambda v: v is None or isinstance(v, float), "none or a number"),
    "rng": (
        lambda v: (
            isinstance(v, list)
            and len(v) > 0
            and all(isinstance(s, dict) and {"torch", "numpy", "python", "stream"} <= s.keys() for s in v)
        ),
        "a list of RNG states, one per process",
    ),
    "epoch": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, "an epoch"),
    # what a resume carries over (absent from older checkpoints)
    "threads": (lambda v: _count(v) and v >= 1, "a thread count"),
    "log_every": (lambda v: _count(v) and v >= 1, "a logging interval (an integer >= 1)"),
    "precision": (lambda v: v in ("fp32", "bf16"), "fp32 or bf16"),
    "precision_asked": (lambda v: v in ("fp32", "bf16", "auto"), "fp32, bf16 or auto"),
    "train_seconds": (
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
        "seconds",
    ),
    "eval_options": (
        lambda v: (
            isinstance(v, dict)
            and all(
                (k == "inversion" and isinstance(x, bool))
                or (k in ("images", "batch", "samples") and _count(x))
                for k, x in v.items()
            )
        ),
        "the --eval-* options given",
    ),
}


def _structure_problems(payload: dict[str, Any], training_state: bool) -> list[str]:
    keys = REQUIRED + (TRAINING_STATE if training_state else ())
    problems = [f"no {key}" for key in keys if key not in payload]
    for key, (valid, what) in _STRUCTURE.items():
        if key in payload and not valid(payload[key]):
            problems.append(f"{key} is not {what} (got {type(payload[key]).__name__})")
    return problems


def _shape_problems(payload: dict[str, Any], path: Path) -> list[str]:
    """Tensors whose names or shapes differ from those of the model the stored spec builds (built on
    the meta device: nothing is allocated), in the model, the EMA and Adam's moments."""
    from flowspec.inspection.budget import meta_model

    spec = checkpoint_spec(payload, path)
    model = meta_model(spec)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    problems = _state_dict_problems("model", payload["model"], expected)
    if "ema" in payload and payload["ema"] is None and spec.train.ema is not None:
        problems.append(f"no EMA weights, though the spec keeps an EMA (ema {spec.train.ema})")
    if payload.get("ema"):
        ema = {k.removeprefix("module."): v for k, v in payload["ema"].items() if k.startswith("module.")}
        problems += _state_dict_problems("ema", ema, expected)
    optimizer = payload.get("optimizer")
    if optimizer and not problems:
        shapes = [tuple(p.shape) for p in model.parameters()]
        ids = [i for group in optimizer["param_groups"] for i in group["params"]]
        if not all(_count(i) for i in ids) or sorted(ids) != list(range(len(shapes))):
            problems.append(f"optimizer has {len(ids)} parameters, the model {len(shapes)}")
        for i, state in optimizer["state"].items():
            for key, value in state.items() if isinstance(state, dict) else [("state", state)]:
                bad = not isinstance(value, torch.Tensor) or (
                    value.dim() > 0 and (not _count(i) or i >= len(shapes) or tuple(value.shape) != shapes[i])
                )
                if bad:
                    problems.append(f"optimizer state {i}.{key} does not fit parameter {i}")
    return problems


def _state_dict_problems(what: str, got: dict[str, torch.Tensor], expected: dict[str, tuple]) -> list[str]:
    problems = [f"{what} lacks {name}" for name in expected if name not in got]
    problems += [f"{what} has an unknown tensor {name}" for name in got if name not in expected]
    problems += [
        f"{what}.{name} has shape {tuple(t.shape)}, the model {expected[name]}"
        for name, t in got.items()
        if name in expected and tuple(t.shape) != expected[name]
    ]
    return problems


def _used_by(path: Path, command: str | None) -> str:
    """Which command uses the checkpoint `path`: `command` (eval, sample or export: the one run), or any
    of them (where no such command reads it: training, Python)."""
    if command is None:
        return f"`{shell_command('flowspec', 'eval', path)}` uses it (so do sample and export)"
    return f"`{shell_command('flowspec', command, path)}` uses it"


def _elsewhere(path: Path, training: bool, command: str | None) -> str:
    """What to do instead of using the damaged checkpoint `path`: resume another run (training), else use
    the other checkpoint of its run (`last.pt` and `best.pt`) where it can be read (by `command`), or
    another."""
    if training:
        return "resume from another run folder or start a new run"
    other = {LAST: BEST, BEST: LAST}.get(path.name)
    if other and _readable(path.with_name(other)):
        return f"its run's {other} can be read, and {_used_by(path.with_name(other), command)}"
    return "use another checkpoint"


def _readable(path: Path) -> bool:
    """Whether the file `path` reads as a checkpoint whose checksum (where it has one) matches."""
    if file_problem(path):
        return False
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # as load_checkpoint: truncated zip, garbage bytes, unpickling errors
        return False
    return isinstance(payload, dict) and payload.get(CHECKSUM) in (None, checksum(payload))


def checkpoint_spec(payload: dict[str, Any], path: Path | str) -> FlowSpec:
    """The resolved spec stored in a checkpoint, validated again."""
    from pydantic import ValidationError

    try:
        spec = FlowSpec.model_validate_json(payload["spec"])
    except ValidationError as error:
        wrong = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in error.errors()[:3])
        raise UserError(f"the spec stored in {path} is not valid for this flowspec: {wrong}") from None
    if hashlib.sha256(payload["spec"].encode()).hexdigest() != payload["spec_hash"]:
        raise UserError(f"checkpoint {path} is inconsistent: its stored spec does not match its spec hash")
    return spec


def trains_alike(a: FlowSpec, b: FlowSpec) -> bool:
    """Whether two specs train the same model the same way: they may differ in what changes no training
    (the evaluation settings, `save every`)."""
    saving = a.train.model_copy(update={"save_every": b.train.save_every})
    return a.model_copy(update={"eval": b.eval, "train": saving}) == b


def names_its_numbers(
    payload: dict[str, Any], stored: FlowSpec, spec: FlowSpec, data_dir: Path | str | None = None
) -> bool:
    """Whether `spec` is the stored spec of a checkpoint that does not record how its run read numbers in
    `classes` (`class_numbers`) but for those classes, named as one of their readings selects them in the
    folder read (`data_dir`, as `--data` gives it, else the one the run read): what its refusal asks for."""
    from flowspec.train.class_numbers import RECORDED, names_numbers

    folder = data_dir or payload.get("data_dir")
    if RECORDED in payload or not names_numbers(stored.data, spec.data, folder):
        return False
    named = stored.model_copy(update={"data": stored.data.model_copy(update={"classes": spec.data.classes})})
    return trains_alike(named, spec)


def check_same_spec(
    payload: dict[str, Any], spec: FlowSpec, path: Path | str, data_dir: Path | str | None = None
) -> None:
    """Refuse to resume a run with a spec other than the one it was trained with (but for numbered classes
    named, `names_its_numbers`, on the folder `data_dir` when given)."""
    if payload["spec_hash"] != spec_hash(spec):
        stored = checkpoint_spec(payload, path)  # settings added since it was written take their defaults
        if trains_alike(stored, spec) or names_its_numbers(payload, stored, spec, data_dir):
            return
        raise UserError(
            f"checkpoint {path} was trained with a different spec ({_training_differences(stored, spec)}); "
            f"a resume may change only the eval settings and `save every`: resume with the spec it was "
            f"trained with (or none, for the stored one) and --set only those"
        )


def _training_differences(stored: FlowSpec, spec: FlowSpec, shown: int = 5) -> str:
    """The settings other than the eval settings and `save every` in which `spec` differs from `stored`,
    worded as `flowspec diff` words them (`data.shape: 1x8x8 -> 3x32x32`): the first `shown`, then how
    many more."""
    from flowspec.inspection.diff import spec_differences

    saving = spec.train.model_copy(update={"save_every": stored.train.save_every})
    training = spec.model_copy(update={"eval": stored.eval, "train": saving})  # what a resume may change
    diffs = [f"{d.path}: {d.a or '-'} -> {d.b or '-'}" for d in spec_differences(stored, training)]
    if not diffs:
        unused = ", ".join(_changed_settings(stored.model_dump(), training.model_dump()))
        return f"it differs only in settings it does not use: {unused}"
    more = f"; and {len(diffs) - shown} more" if len(diffs) > shown else ""
    return f"differences: {'; '.join(diffs[:shown])}{more}"


def _changed_settings(a: Any, b: Any, path: str = "") -> list[str]:
    """The dotted paths at which two spec dumps differ (a list of steps counts as one setting)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [*a, *(key for key in b if key not in a)]
        return [
            p for key in keys for p in _changed_settings(a.get(key), b.get(key), f"{path}.{key}".lstrip("."))
        ]
    return [] if a == b else [path]


def ema_weights(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights to evaluate and sample with: the EMA's when the run kept one, else the model's."""
    ema = payload.get("ema")
    if not ema:
        return payload["model"]
    return {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}


def is_finite(module: torch.nn.Module) -> bool:
    """Whether every floating-point parameter and buffer is finite (non-finite models are never saved)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
