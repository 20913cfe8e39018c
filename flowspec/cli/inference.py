"""Commands that use a trained model: eval, sample, export."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import tempfile
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flowspec.cli.app import app
from flowspec.cli.examples import epilog
from flowspec.cli.options import (
    AllowLargeOption,
    CompileOption,
    DataOption,
    Device,
    DeviceOption,
    InferencePrecisionOption,
    Precision,
    SampleSetOption,
    StoredSetOption,
    ThreadsOption,
    device_name,
    valid_seed,
)
from flowspec.cli.stopping import stoppable
from flowspec.errors import UserError, one_process, os_error_message
from flowspec.spec import CLASS_NAMES, MAX_SEED

if TYPE_CHECKING:
    from flowspec.spec import FlowSpec
    from flowspec.train.export import Trained


MAX_IW = 16384  # importance samples per image: four times the official Flow++ evaluation's 4096


class SplitChoice(str, Enum):
    """The data splits `eval --split` takes."""

    train = "train"
    test = "test"


MODEL_SECTIONS = ("flow", "dequantize", "preprocess", "prior", "defaults")  # what the checkpoint fixes


def _with_overrides(spec: FlowSpec, sets: list[str] | None, path: Path, command: str) -> FlowSpec:
    """The stored spec with `--set` overrides of what `eval` (its data settings and the model's name) and
    `sample` (the name: the model is unconditional) read; a train, eval or model setting would change
    nothing, or the trained model."""
    if not sets:
        return spec
    from flowspec.diagnostics import SpecError
    from flowspec.loader import stored_with_overrides
    from flowspec.resolve import override_key

    if any("=" not in override or not override_key(override) for override in sets):
        stored_with_overrides(spec, sets, f"{path} (stored spec)")  # says "must read KEY=VALUE", as show does
    readable = ("data", "model") if command == "eval" else ("model",)
    for override in sets:
        key = override.split("=", 1)[0].strip()
        if key.split(".")[0] not in readable and not _sets_model(override):  # the model's: refused below
            if command == "eval":
                what = "only the data settings (and the model name)"
                hint = "; e.g. --set data.classes=3 (the evaluation's own options: --images, --batch, --seed)"
            else:
                what, hint = "only the model name (it names the grid)", "; samples come from the model alone"
            raise UserError(
                f"--set {override}: {command} reads {what} of the spec stored in {path}, so {key} would "
                f"change nothing here{hint}"
            )
    try:
        changed = stored_with_overrides(spec, sets, f"{path} (stored spec)")
    except SpecError:  # model settings the stored model cannot take change it: not the checkpoint's fault
        others = [override for override in sets if not _sets_model(override)]
        if len(others) == len(sets):
            raise
        stored_with_overrides(spec, others, f"{path} (stored spec)")  # a mistake of their own is theirs
        changed = None
    if changed is None or not _same_model(changed, spec):
        allowed = (
            "only data settings that keep the model's shape and levels (e.g. --set data.classes=3)"
            if command == "eval"
            else "only the model name (--set model=NAME)"
        )
        raise UserError(
            f"--set {' '.join(sets)} would change the model stored in {path}; with a trained checkpoint "
            f"{command} takes {allowed}"
        )
    return changed


def _sets_model(override: str) -> bool:
    """Whether a `--set` writes a setting the trained model depends on: its sections, data shape or levels."""
    parts = override.split("=", 1)[0].strip().split(".")
    return parts[0] in MODEL_SECTIONS or parts[:2] in (["data", "shape"], ["data", "levels"])


def _same_model(changed: FlowSpec, spec: FlowSpec) -> bool:
    """Whether two specs build the same model (its sections, data shape and levels)."""
    return all(getattr(changed, f) == getattr(spec, f) for f in MODEL_SECTIONS) and (
        changed.data.shape,
        changed.data.levels,
    ) == (spec.data.shape, spec.data.levels)


def _load_for_inference(
    command: str,
    target: Path,
    device: Device | None,
    sets: list[str] | None,
    images: int,
    allow_large: bool,
    threads: int | None = None,
    compile_networks: bool = False,
    precision: Precision | None = None,
) -> tuple[Trained, FlowSpec]:
    """The model of a run folder, checkpoint or export with the EMA weights, computing in `precision`
    (None: the run's), and its spec with the `--set` that `command` (eval or sample) reads (refused before
    it is built when it and `images` images at once do not fit the device); torch's thread count chosen for
    it, the precision and, with `compile_networks`, what was compiled (said in the header line)."""
    import torch

    from flowspec.threads import set_threads
    from flowspec.train.export import load_trained

    where = device_name(device) or ("cuda" if torch.cuda.is_available() else "cpu")
    asked = precision.value if precision else None
    trained = load_trained(
        target, where, images=images, allow_large=allow_large, precision=asked, command=command
    )
    spec = _with_overrides(trained.spec, sets, trained.path, command)
    choice = set_threads(sum(p.numel() for p in trained.model.parameters() if p.requires_grad), threads)
    compiled = f", compiled ({trained.model.compile_for_device()})" if compile_networks else ""
    note = f" ({trained.precision_note})" if trained.precision_note else ""
    computes = f"precision {trained.precision}{note}"
    print(f"{spec.name}, step {trained.step}, device {where}, {choice}, {computes}{compiled}")
    return trained, spec


def _precision_suffix(trained: Trained) -> str:
    """`_bf16` or `_fp32` for an output file name where the model computes in another precision than its
    run trained in, else nothing (a run's own precision keeps the name it always had)."""
    return f"_{trained.precision}" if trained.precision != (trained.trained_precision or "fp32") else ""


def _check_output(path: Path, option: str, suffixes: tuple[str, ...], reads: Path) -> None:
    """Refuse an output path that is a folder, names an unknown kind of file or lies where no folder can be
    made, is something else than a file (a FIFO, a device, a link that leads nowhere), would overwrite the
    file the command `reads` (a run folder: its last.pt) or a file of a run or an ablation, before any work
    (the folder is made when the file is written)."""
    from flowspec.train.checkpoint import LAST
    from flowspec.train.rundir import check_not_run_file

    if path.is_dir():
        raise UserError(f"{option} {path} is a folder: give a file name, e.g. {path / ('out' + suffixes[0])}")
    _check_replaceable(path, option)
    read = reads / LAST if reads.is_dir() else reads
    if os.path.exists(read) and _same_file(path, read):  # (a missing one is said when it is read)
        what = "is" if os.path.abspath(path) == os.path.abspath(read) else f"leads to {read},"
        raise UserError(
            f"{option} {path} {what} the file this command reads: writing it would destroy what it reads; "
            "choose another file name"
        )
    if path.suffix.lower() not in suffixes:
        raise UserError(
            f"{option} {path}: unknown file type {path.suffix or '(no extension)'!r}; use one of "
            f"{', '.join(suffixes)}"
        )
    existing = next(folder for folder in path.absolute().parents if os.path.lexists(folder))  # links too
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        if existing.is_symlink() and not existing.exists():
            what = f"a link to {os.readlink(existing)}, which does not exist"
        else:
            what = "a file, not a folder" if not existing.is_dir() else "a folder this user cannot write"
        raise UserError(f"{option} {path}: its folder cannot be made there ({existing} is {what})")
    try:  # what the permissions allow, the file system may still refuse (/proc, for root too)
        os.rmdir(tempfile.mkdtemp(prefix=".flowspec-probe-", dir=existing))
    except OSError as error:
        reason = os.strerror(error.errno).lower() if error.errno else str(error)
        raise UserError(
            f"{option} {path}: its folder cannot be made there ({existing} refuses new files: {reason})"
        ) from None
    check_not_run_file(path, option)


def _check_replaceable(path: Path, option: str) -> None:
    """Refuse an existing output path that is not a regular file (a FIFO, a device, a socket) or a link
    that leads nowhere (to nothing, or a loop): writing would silently replace it or write elsewhere."""
    from flowspec.train.files import file_problem

    problem = file_problem(path) if os.path.lexists(path) else None
    if problem:
        raise UserError(
            f"{option} {path} {problem}: only a new file or a regular one is written; choose another file "
            "name"
        )


def _same_file(path: Path, other: Path) -> bool:
    """Whether `path` is `other` (through links, or a hard link) or would be written over it."""
    try:
        return os.path.samefile(path, other)
    except OSError:  # one of them does not exist
        return os.path.realpath(path) == os.path.realpath(other)


def _image_suffixes() -> tuple[str, ...]:
    """The image file extensions Pillow can write, .png first."""
    from PIL import Image

    Image.init()
    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    common = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
    return tuple(ext for ext in common if ext in writable)


TrainedArgument = Annotated[  # what eval and sample read
    Path,
    typer.Argument(metavar="RUN_DIR|CKPT|EXPORT", help="A run folder, checkpoint or .safetensors export."),
]


@app.command("eval", epilog=epilog("eval"))
def evaluate(
    target: TrainedArgument,
    data: DataOption = None,
    iw: Annotated[
        int,
        typer.Option(
            "--iw",
            min=1,
            max=MAX_IW,
            metavar="K",
            help="Importance samples per image (1: single-sample only).",
        ),
    ] = 1,
    split: Annotated[
        SplitChoice, typer.Option("--split", help="The data split to evaluate.")
    ] = SplitChoice.test,
    batch: Annotated[int, typer.Option("--batch", min=1, metavar="N", help="Images per forward pass.")] = 256,
    limit: Annotated[
        int | None,
        typer.Option("--images", "--limit", min=1, metavar="N", help="Evaluate the first N images only."),
    ] = None,
    seed: Annotated[
        int,
        typer.Option("--seed", metavar="SEED", callback=valid_seed, help="Seed of the dequantization noise."),
    ] = 0,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            metavar="FILE",
            help="JSON file; default: named by what it measured (split, classes, images, K, seed, precision, "
            "weights), beside the checkpoint.",
        ),
    ] = None,
    device: DeviceOption = None,
    precision: InferencePrecisionOption = None,
    sets: StoredSetOption = None,
    threads: ThreadsOption = None,
    compile_networks: CompileOption = False,
    allow_large: AllowLargeOption = False,
) -> None:
    """Test bits/dim with EMA weights: the single-sample bound and the importance-weighted bound (--iw K)."""
    import time

    import torch
    from rich.console import Console
    from rich.table import Table

    import flowspec
    from flowspec.inspection.budget import check_size
    from flowspec.train.checkpoint import LAST
    from flowspec.train.class_numbers import check_class_numbers
    from flowspec.train.data import load_split
    from flowspec.train.evaluate import bounds
    from flowspec.train.files import replaced_whole
    from flowspec.train.memory import PeakMemory
    from flowspec.train.progress import Reporter

    one_process("eval")
    if out is not None:
        _check_output(out, "--out", (".json",), target)
    with stoppable("the evaluation") as signals:
        trained, spec = _load_for_inference(  # its weights checked; the images at once when read
            "eval", target, device, sets, 0, allow_large, threads, compile_networks, precision
        )
        folder = _data_folder(data, trained, sets)
        data_read = check_class_numbers(spec.data, trained.data_recorded, folder, trained.path)
        source = load_split(data_read, split.value, folder)
        images = source.images[:limit] if limit else source.images
        check_size(trained.spec, "infer", trained.model.device, allow_large, _at_once(batch, len(images), iw))
        # (before the work: --batch, or fewer when fewer images are evaluated, however many --images asked)
        print(f"the {split.value} split of {source.source}: {len(images)} of its {len(source)} images")
        _note_changed_split(trained, folder)
        where = trained.model.device
        reporter = Reporter.auto(False, None, 0, train=False)
        started, memory = time.monotonic(), PeakMemory(where)
        meter = reporter.meter(f"eval {split.value}", len(images), "images")
        try:
            result = bounds(trained.model, images, iw, batch, where, seed, meter, signals.check)
        finally:
            meter.close()
            reporter.close()
    print(f"evaluated {len(images)} images in {time.monotonic() - started:.1f} s, {memory}")
    record = {  # what it measured, and all it takes to measure it again
        "checkpoint": str(trained.path.resolve()),
        "spec": spec.name,
        "trained_spec_hash": trained.spec_hash,
        "step": trained.step,
        "split": split.value,
        "iw_samples": iw,
        "seed": seed,
        "batch": batch,
        "limit": limit,
        "device": str(where),
        "precision": trained.precision,
        "overrides": list(sets or ()),
        "source": source.source,
        "data_folder": _data_read(folder, spec)[0],
        "data": data_read.model_dump(mode="json", exclude={"source"}),
        "versions": {"flowspec": flowspec.__version__, "torch": str(torch.__version__)},
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        **result,
    }
    if out is None:  # one file per evaluation: a partial one, another seed, precision or best.pt's apart
        weights = "" if trained.path.name == LAST else f"_{trained.path.stem}"
        part = f"_first{result['images']}" if result["images"] < len(source) else ""
        iw_part = f"_iw{iw}" if iw > 1 else ""
        seed_part = f"_seed{seed}" if seed else ""
        read = _data_read(folder, spec)
        own = _data_read(trained.data_dir or trained.data_default, trained.spec)
        data_part = f"_data{_short_hash(*read)}" if read != own else ""
        what = f"{_classes_suffix(spec)}{data_part}{part}{iw_part}{seed_part}{_precision_suffix(trained)}"
        name = f"eval_{split.value}{what}{weights}.json"
        out = trained.path.parent / name
    caption = f"{split.value}: {result['images']} images"
    table = Table(title=f"{spec.name}, step {trained.step}", caption=caption)
    table.add_column("bound")
    table.add_column("bits/dim", justify="right")
    table.add_row("single sample", f"{result['bpd']:.4f}")
    if iw > 1:
        table.add_row(f"importance weighted, K={iw}", f"{result[f'iw{iw}_bpd']:.4f}")
    Console().print(table)  # before writing: the results are shown even when they cannot be written
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with replaced_whole(out) as partial:
            partial.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as error:
        raise UserError(
            f"{os_error_message(error, 'writing')}; the results are in the table above (--out FILE writes "
            f"them elsewhere)"
        ) from None
    print(f"wrote {out}")


def _at_once(batch: int, images: int, iw: int) -> int:
    """The most images one forward pass of `eval` holds: `batch`, or fewer when there are fewer images (with
    their `iw` importance samples each, as `bounds` draws them)."""
    return min(batch, images * iw)


def _data_read(folder: Path | str | None, spec: FlowSpec) -> tuple[str | None, dict]:
    """What an evaluation reads: the absolute folder or file (`folder`, else the spec's path, else the
    dataset's own place as it is now; None: none holds it), and the data settings but the classes (which
    name the file by themselves)."""
    from flowspec.train.data import default_folder

    path = folder if folder is not None else spec.data.path or default_folder(spec.data)
    where = str(Path(path).resolve()) if path is not None else None
    return where, spec.data.model_dump(mode="json", exclude={"source", "classes"})


def _short_hash(*values: object) -> str:
    """Six hex digits that tell other data apart in a file name."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:6]


def _data_folder(data: Path | None, trained: Trained, sets: list[str] | None) -> Path | str | None:
    """The data to evaluate on: --data, else the spec's path when --set names one or another dataset, else
    the folder the run trained on while it is there (None: the spec's path); for a cifar10 run without one,
    where FLOWSPEC_DATA_DIR is unset (set, it says where), the folder it read while it is there."""
    from flowspec.train.data import cache_dir

    # --set data.path or data.dataset names other data: not the folder the run trained on
    if data is not None or any(
        s.split("=", 1)[0].strip() in ("data.path", "data.dataset") for s in sets or ()
    ):
        return data
    if trained.data_dir and not Path(trained.data_dir).exists():
        print(f"note: the run's data folder {trained.data_dir} is gone; reading the data its spec names here")
        return None
    read = trained.data_default  # recorded without a data_dir
    if (
        os.environ.get("FLOWSPEC_DATA_DIR")
        or not read
        or not Path(read).exists()
        or Path(read) == cache_dir().resolve()
    ):
        return trained.data_dir
    print(
        f"note: FLOWSPEC_DATA_DIR is unset here: reading {read}, the folder the run read, not {cache_dir()}"
    )
    return read


def _note_changed_split(trained: Trained, data: Path | str | None) -> None:
    """Say so when the run's `test_split` is now held out of another set of images than it trained on:
    its test images then differ, and some were trained on."""
    from flowspec.train.class_numbers import ambiguous
    from flowspec.train.data import load_split

    if trained.spec.data.test_split is None or trained.train_images is None:
        return
    if ambiguous(trained.spec.data, trained.data_recorded, data):  # which classes it read is not known
        return
    now = len(load_split(trained.spec.data, "train", data))
    if now != trained.train_images:
        print(
            f"note: the data has {now:,} training images now and had {trained.train_images:,} when the run "
            f"trained: its test_split holds out other images, some of which the model trained on"
        )


def _classes_suffix(spec: FlowSpec) -> str:
    """`_dog`, `_3-5` for an evaluation of some classes, `_12_classes` when their names would make a long
    or odd file name; "" for all of them. The classes are named in the dataset's order (numbers, then
    names), as they select the same images in any order."""
    if not spec.data.classes:
        return ""
    names = CLASS_NAMES.get(spec.data.dataset)  # CIFAR-10's `5` is `dog`: one file for both spellings
    keys = {names.index(c) if names and c in names else c for c in spec.data.classes}
    ordered = sorted(keys, key=lambda c: (0, c, "") if isinstance(c, int) else (1, 0, c))
    named = "-".join(str(names[c] if names and isinstance(c, int) and c < len(names) else c) for c in ordered)
    if len(named) <= 40 and re.fullmatch(r"[A-Za-z0-9_.-]+", named):
        return f"_{named}"
    return f"_{len(ordered)}_classes"


@app.command(epilog=epilog("sample"))
def sample(
    target: TrainedArgument,
    n: Annotated[int, typer.Option("--count", "-n", min=1, metavar="N", help="Number of images.")] = 64,
    temperature: Annotated[
        float,
        typer.Option("--temperature", "-t", metavar="T", help="Prior temperature (a finite number >= 0)."),
    ] = 1.0,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            metavar="FILE",
            help="The image grid (.png, .jpg, .gif, .tiff); default samples_<model>_stepN_tT_seedS.png here.",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            metavar="SEED",
            callback=valid_seed,
            help="Seed of the samples (default: a fresh one, printed).",
        ),
    ] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, metavar="N", help="Images drawn per pass.")] = 64,
    device: DeviceOption = None,
    precision: InferencePrecisionOption = None,
    sets: SampleSetOption = None,
    threads: ThreadsOption = None,
    compile_networks: CompileOption = False,
    allow_large: AllowLargeOption = False,
) -> None:
    """Draw a grid of samples with the EMA weights of a trained run."""
    from flowspec.devices import device_memory
    from flowspec.train.sampling import check_grid_memory, grid_name, save_grid

    one_process("sample")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"--temperature must be a finite number >= 0, got {temperature}")
    if out is not None:
        _check_output(out, "--out", _image_suffixes(), target)
    with stoppable("sampling") as signals:
        trained, spec = _load_for_inference(
            "sample", target, device, sets, min(n, batch), allow_large, threads, compile_networks, precision
        )
        if not allow_large:
            check_grid_memory(n, spec.data.shape, device_memory("cpu"))
        if seed is None:  # a fresh one, said below, so that the grid can be drawn again
            seed = secrets.randbelow(MAX_SEED + 1)
        grid = grid_name(trained.step, temperature).removesuffix(".png")
        # another seed's, or another precision's than the run's, replaces none
        out = out or Path(f"samples_{spec.name}_{grid}_seed{seed}{_precision_suffix(trained)}.png")
        try:
            save_grid(trained.model, n, temperature, out, spec.data.levels, seed, batch, signals.check)
        except ValueError as error:  # samples that are not finite
            raise UserError(f"{error}: nothing was written (a lower --temperature may do)") from None
    print(f"wrote {n} samples of {spec.name} (step {trained.step}, T={temperature}, seed {seed}) to {out}")


@app.command("export", epilog=epilog("export"))
def export_model(
    target: Annotated[
        Path, typer.Argument(metavar="RUN_DIR|CKPT", help="A run folder or a checkpoint file.")
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            metavar="FILE",
            help="The .safetensors file; default model.safetensors beside it (model_best... for best.pt).",
        ),
    ] = None,
) -> None:
    """Write the EMA weights and the resolved spec to a .safetensors file (for load, eval and sample)."""
    from flowspec.train.checkpoint import resolve
    from flowspec.train.export import SUFFIX, export

    one_process("export")
    if output is None:  # model.safetensors of last.pt, model_best.safetensors of best.pt
        checkpoint = resolve(target, command="export")
        weights = "" if checkpoint.name == "last.pt" else f"_{checkpoint.stem}"
        output = checkpoint.parent / f"model{weights}{SUFFIX}"
    if output.suffix.lower() != SUFFIX:
        raise UserError(f"the export must be a {SUFFIX} file, got {output}")
    _check_output(output, "--out", (SUFFIX,), target)
    trained = export(target, output, command="export")
    print(f"wrote {trained.spec.name} (step {trained.step}, EMA weights and spec) to {output}")
