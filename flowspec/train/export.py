"""Trained models outside their run folder: `.safetensors` exports, and loading any trained model.

An export holds the evaluation (EMA) weights as tensors and, in the file's metadata, the resolved spec
(JSON), its hash, the training step, the precision its run trained in, the flowspec version and a SHA-256
checksum of the tensors (checked when read): everything needed to rebuild the model.
`load_trained` reads a run folder, a checkpoint or an export, and gives the model ready to use, computing
in the precision its run trained in unless told another.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from flowspec.errors import UserError
from flowspec.model import FlowModel
from flowspec.spec import FlowSpec
from flowspec.train.checkpoint import (
    checkpoint_spec,
    checksum,
    ema_weights,
    load_checkpoint,
    resolve,
)
from flowspec.train.class_numbers import EXPORT_RECORDED, RECORDED, written_reading_names
from flowspec.train.files import file_problem, replaced_whole
from flowspec.train.precision import autocast_dtype, resolve_precision

FORMAT = "flowspec"
SUFFIX = ".safetensors"
NUMBER = r"[0-9]{1,20}"  # a step or image count in the metadata: ASCII digits, at most 20


@dataclass
class Trained:
    """A trained model (EMA weights, eval mode) with its spec, training step and where it came from."""

    model: FlowModel
    spec: FlowSpec
    step: int
    path: Path
    data_dir: str | None = None  # the data folder it was trained on (when the run was given one)
    train_images: int | None = None  # the size of its training set (not kept before 0.1.0's end)
    spec_hash: str = ""  # the hash its file stores (of the spec as the flowspec that trained it wrote it)
    spec_json: str = ""  # that spec's text
    data_default: str | None = None  # without a data folder: the FLOWSPEC_DATA_DIR or cache folder it read
    trained_precision: str | None = None  # fp32 or bf16, as its file records it (older ones do not)
    precision: str = "fp32"  # what the model computes in: fp32 or bf16
    precision_note: str = ""  # where that came from: "the run's", auto's reason, the run's when it differs
    data_recorded: bool = True  # whether its file says how its run read numbers in `classes` (class_numbers)


def export(target: Path | str, output: Path | str, command: str | None = None) -> Trained:
    """Write the EMA weights and resolved spec of a run folder or checkpoint to a `.safetensors` file
    (`command`: the `flowspec` command that errors name, as for `load_trained`)."""
    from safetensors.torch import save

    output = Path(output)
    if output.is_dir():
        raise UserError(f"{output} is a folder: name the file to write, e.g. {output / 'model.safetensors'}")
    if any(folder.exists() and not folder.is_dir() for folder in output.parents):
        raise UserError(f"cannot write {output}: a file stands where its folder should be")
    trained = load_trained(target, command=command)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in trained.model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "spec": trained.spec_json,  # as the checkpoint holds it: the export keeps its hash
        "spec_hash": trained.spec_hash,
        "step": str(trained.step),
        "flowspec_version": _version(),
        "checksum": checksum(tensors),
        "checkpoint": str(trained.path.resolve()),  # which weights: a run's last.pt or best.pt
        **({"data_dir": trained.data_dir} if trained.data_dir else {}),
        **({"data_default": trained.data_default} if trained.data_default else {}),
        **({"train_images": str(trained.train_images)} if trained.train_images else {}),
        **({"precision": trained.trained_precision} if trained.trained_precision else {}),
        **({EXPORT_RECORDED: "yes"} if trained.data_recorded else {}),
    }
    encoded = save(tensors, metadata=metadata)  # written by Python: a full disk is an OSError naming the file
    output.parent.mkdir(parents=True, exist_ok=True)
    with replaced_whole(output) as partial:
        partial.write_bytes(encoded)
    return trained


def load_trained(
    target: Path | str,
    device: str | torch.device | None = None,
    images: int = 0,
    allow_large: bool = False,
    precision: str | None = None,
    command: str | None = None,
) -> Trained:
    """The model of a run folder, a checkpoint (`.pt`) or an export (`.safetensors`), with its EMA
    weights, in eval mode, on `device` (default: cpu), computing in `precision` (fp32, bf16 or auto;
    None: the precision its run trained in, fp32 where its file does not record one). Errors a user can
    cause are `UserError`s (one that points to another checkpoint names the `flowspec` `command` reading
    it: eval, sample or export); a model that, with `images` images at once, would not fit the device is
    refused before it is built unless `allow_large`."""
    import flowspec
    from flowspec.devices import check_cuda, parse_device
    from flowspec.inspection.budget import check_size

    path = Path(target)
    where = parse_device(device or "cpu")
    if where.type == "cuda":
        check_cuda(where)
    if path.suffix.lower() == SUFFIX and not path.is_dir():
        stored = _read_export(path)
    else:
        path = resolve(path, exports=True, command=command)
        stored = _read_checkpoint(path, command)
    computes, note = _choose_precision(precision, stored.trained_precision, where)
    check_size(stored.spec, "infer", where, allow_large, images)
    model = flowspec.build(stored.spec)
    try:
        model.load_state_dict(stored.weights)
    except RuntimeError as error:
        raise UserError(f"{path} does not fit the model its spec builds: {error}") from None
    model.set_autocast(autocast_dtype(computes))
    return Trained(
        model.to(where).eval(),
        stored.spec,
        stored.step,
        path,
        stored.data_dir,
        stored.train_images,
        stored.spec_hash,
        stored.spec_json,
        stored.data_default,
        stored.trained_precision,
        computes,
        note,
        stored.data_recorded,
    )


def _choose_precision(asked: str | None, trained: str | None, where: torch.device) -> tuple[str, str]:
    """The precision to compute in (`asked`, `auto` resolved on `where`; None: `trained`, the run's, else
    fp32) and a note on where it came from, naming the run's where it differs."""
    if asked is None:
        return trained or "fp32", "the run's" if trained else "its file records none"
    computes, reason = resolve_precision(asked, where)
    if trained is not None and trained != computes:
        reason = "; ".join(filter(None, (reason, f"the run trained in {trained}")))
    return computes, reason


@dataclass
class Stored:
    """What a checkpoint or an export holds for inference (the fields of `Trained` of the same names)."""

    spec: FlowSpec
    weights: dict[str, torch.Tensor]
    step: int
    data_dir: str | None
    train_images: int | None
    spec_hash: str
    spec_json: str
    data_default: str | None
    trained_precision: str | None
    data_recorded: bool


def _read_checkpoint(path: Path, command: str | None) -> Stored:
    """What the checkpoint `path` holds for inference: its EMA weights, spec and where its data came from
    (`command`: the `flowspec` command that errors name)."""
    payload = load_checkpoint(path, training_state=False, command=command)
    stream = ((payload.get("rng") or [{}])[0] or {}).get("stream") or {}
    return Stored(
        spec=checkpoint_spec(payload, path),
        weights=ema_weights(payload),
        step=payload["step"],
        data_dir=payload.get("data_dir"),
        train_images=stream.get("images"),
        spec_hash=payload["spec_hash"],
        spec_json=payload["spec"],
        data_default=payload.get("data_default"),
        trained_precision=payload.get("precision"),
        data_recorded=RECORDED in payload,
    )


def _read_export(path: Path) -> Stored:
    """What the export `path` holds, checked: its weights against its checksum, its numbers; whether it
    says how its run read numbers in `classes` (`class_numbers`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    problem = file_problem(path)
    if problem:  # does not exist, is a FIFO or a device, a link to nothing or a loop
        raise UserError(f"{path} {problem}: pass a file written by `flowspec export`")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{path} is not a readable .safetensors file ({error})") from None
    missing = [k for k in ("format", "spec", "spec_hash", "step") if k not in metadata]
    if missing or metadata["format"] != FORMAT:
        lacks = ", ".join(missing) or "format=flowspec"
        raise UserError(
            f"{path} is not a flowspec export (its metadata lacks {lacks}): "
            f"write one with `flowspec export RUN -o MODEL.safetensors`"
        )
    if "checksum" not in metadata:
        print(
            f"warning: {path} has no checksum (exported before flowspec stored one): not verified",
            file=sys.stderr,
        )
    elif checksum(weights) != metadata["checksum"]:
        raise UserError(
            f"{path} is corrupt: its tensors do not match the checksum written at export; export it again"
        )
    for key in ("step", "train_images"):
        if key in metadata and not re.fullmatch(NUMBER, metadata[key]):
            raise UserError(
                f"{path} is not a valid flowspec export: its {key} is {metadata[key][:40]!r}, not a number"
            )
    if metadata.get("precision", "fp32") not in ("fp32", "bf16"):
        raise UserError(
            f"{path} is not a valid flowspec export: its precision is {metadata['precision'][:40]!r}, "
            "not fp32 or bf16"
        )
    count = metadata.get("train_images")
    return Stored(
        spec=checkpoint_spec(metadata, path),
        weights=weights,
        step=int(metadata["step"]),
        data_dir=metadata.get("data_dir"),
        train_images=int(count) if count else None,
        spec_hash=metadata["spec_hash"],
        spec_json=metadata["spec"],
        data_default=metadata.get("data_default"),
        trained_precision=metadata.get("precision"),
        data_recorded=metadata.get(EXPORT_RECORDED) == "yes" or written_reading_names(metadata["spec"]),
    )


def _version() -> str:
    import flowspec

    return flowspec.__version__
