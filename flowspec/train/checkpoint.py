"""Checkpoints: written atomically, read with checks, and never overwritten when they cannot be read.

A checkpoint is one `torch.save` file holding the model, EMA, optimizer and scheduler states, the
training position and RNG states, the resolved spec (JSON) with its hash, and the flowspec and torch
versions. Writing goes to a temporary file in the same folder, then `os.replace`, so a crash leaves
either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from flowspec.errors import UserError
from flowspec.spec import FlowSpec

LAST, BEST = "last.pt", "best.pt"
REQUIRED = ("model", "spec", "spec_hash", "step", "versions")


def spec_hash(spec: FlowSpec) -> str:
    """SHA-256 of the resolved spec's JSON: two specs hash equal exactly when their settings are."""
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """`torch.save` to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_run(run_dir: Path, payload: dict[str, Any], best: bool, *modules: torch.nn.Module) -> bool:
    """Write `last.pt` (and `best.pt` when `best`) unless a module has non-finite weights (then warn)."""
    if not all(is_finite(m) for m in modules):
        print(
            f"warning: the model has non-finite weights at step {payload['step']}: not checkpointed",
            flush=True,
        )
        return False
    save_atomic(payload, run_dir / LAST)
    if best:
        save_atomic(payload, run_dir / BEST)
    return True


def spec_record(spec: FlowSpec) -> dict[str, Any]:
    """What a checkpoint keeps of the spec and the software: the resolved spec, its hash, the versions."""
    import flowspec

    return {
        "spec": spec.model_dump_json(),
        "spec_hash": spec_hash(spec),
        "versions": {"flowspec": flowspec.__version__, "torch": str(torch.__version__)},
    }


def resolve(path: Path | str) -> Path:
    """A checkpoint file, or a run folder's `last.pt`; a clear error when there is none."""
    path = Path(path)
    if path.is_dir():
        if (path / LAST).is_file():
            return path / LAST
        raise UserError(
            f"no checkpoint in {path}: expected {path / LAST} (a run folder written by `flowspec train`)"
        )
    if not path.is_file():
        raise UserError(
            f"checkpoint {path} does not exist: pass a run folder or a .pt file written by `flowspec train`"
        )
    return path


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint (a file or a run folder); a `UserError` naming the path if unusable."""
    path = resolve(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, garbage bytes, unpickling errors
        raise UserError(
            f"checkpoint {path} is corrupt or truncated and cannot be read ({type(error).__name__}); "
            f"it was left untouched: resume from another run folder or start a new run"
        ) from None
    missing = [k for k in REQUIRED if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise UserError(f"{path} is not a flowspec checkpoint (missing {', '.join(missing)})")
    return payload


def checkpoint_spec(payload: dict[str, Any], path: Path | str) -> FlowSpec:
    """The resolved spec stored in a checkpoint, validated again."""
    from pydantic import ValidationError

    try:
        spec = FlowSpec.model_validate_json(payload["spec"])
    except ValidationError as error:
        raise UserError(
            f"the spec stored in checkpoint {path} is not valid for this flowspec: {error}"
        ) from None
    if hashlib.sha256(payload["spec"].encode()).hexdigest() != payload["spec_hash"]:
        raise UserError(f"checkpoint {path} is inconsistent: its stored spec does not match its spec hash")
    return spec


def check_same_spec(payload: dict[str, Any], spec: FlowSpec, path: Path | str) -> None:
    """Refuse to resume a run with a spec other than the one it was trained with."""
    if payload["spec_hash"] != spec_hash(spec):
        stored = checkpoint_spec(payload, path)  # settings added since it was written take their defaults
        if stored == spec:
            return
        diff = _differences(stored.model_dump(), spec.model_dump())
        raise UserError(
            f"checkpoint {path} was trained with a different spec (differences: {'; '.join(diff[:5])}); "
            f"resume with the same spec and --set options, or omit the spec to use the stored one"
        )


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{prefix}.{i}")
        ]
    return [] if a == b else [f"{prefix or 'spec'}: {a!r} -> {b!r}"]


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
