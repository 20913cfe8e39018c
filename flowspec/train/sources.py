"""Datasets read from files: a folder of images, `.npy`/`.npz` arrays, the downsampled-ImageNet batches and
torchvision datasets on disk; prepared once into the cache (or, for an `.npy` that needs nothing, used as
it is) and handed out as memory-mapped `ImageSet`s.

Naming rules. `npy`: `path` is one array file (the training set), or a folder whose array files starting
with `train` are the training set and those starting with `test` or `val` the test set (a folder with
neither kind of name: all its array files are the training set). `folder`: `path` holds `train` and
`test` (or `val`, `valid`) subfolders, or is itself the training set. `imagenet`: `train_data_batch_*.npz`
and `val_data.npz` in `path` or its subfolders. `test_path` names the test split's file or folder;
without a test split, `test_split` holds out a seeded count or fraction of the training images.
"""

from __future__ import annotations

import inspect
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from flowspec.diagnostics import did_you_mean
from flowspec.errors import UserError
from flowspec.spec import DataSpec
from flowspec.train import arrays, images
from flowspec.train.arrays import ArrayFile
from flowspec.train.datacache import Progress, cache_root, cached
from flowspec.train.files import regular_file, stamps
from flowspec.train.prepare import prepare

if TYPE_CHECKING:
    from torchvision.datasets import VisionDataset

SPLIT_SEED = 0  # which images `test_split` holds out does not depend on the training seed
Read = Callable[[np.ndarray, DataSpec], Iterator[tuple[np.ndarray, torch.Tensor]]]


@dataclass
class Reader:
    """One split as the source stores it: labels known up front, prepared images read in order.

    `read(keep, data)` yields (indices, images N x C x H x W uint8) for the kept indices, in order."""

    count: int
    labels: np.ndarray
    read: Read
    files: list[Path] = field(default_factory=list)
    direct: ArrayFile | None = None  # an .npy file that is already the prepared split


@dataclass
class SourcePlan:
    """A data source found on disk: its readers of the train and test images, and where its cache goes."""

    source: str  # what the messages call the data
    near: Path  # where the cache goes by default
    train: Reader
    test: Reader | None
    classes: tuple[str, ...] = ()  # class names, where the source has them


def prepared(data: DataSpec, path: Path) -> tuple[dict, str]:
    """Both splits of a file-based dataset, memory-mapped: {"train": (ArrayFile, labels), "test": ...}."""
    plan = _plan(data, path)
    wanted = _class_indices(data, plan)
    keep = {
        s: np.isin(r.labels, wanted) if wanted is not None else np.ones(r.count, dtype=bool)
        for s, r in (("train", plan.train), ("test", plan.test))
        if r
    }
    route = _routes(plan, keep, data)
    direct = _direct(plan, data)
    if direct is not None:
        return direct, plan.source
    files = plan.train.files + (plan.test.files if plan.test else [])
    what = {
        "data": data.model_dump(exclude={"path", "test_path"}),
        "files": [str(f.resolve()) for f in files],
    }
    if wanted is not None:  # the labels they select, however the spec orders or spells them: one cache
        what["data"]["classes"] = sorted(set(wanted))
    if data.dataset == "npy":  # not a cache of arrays read channels-last whenever their width allowed it
        what["layout"] = "the spec's shape"
    if data.classes is not None and data.test_split is not None:  # held out before the class filter
        what["split"] = "whole set"  # not the caches made when the split was drawn from the class's images
    folder = cached(cache_root(plan.near), what, stamps(files), lambda tmp: _build(tmp, plan, route, data))
    out = {}
    for split in ("train", "test"):
        member = arrays.members(folder / f"{split}.npy")[""]
        labels = folder / f"{split}_labels.npy"
        try:
            out[split] = (ArrayFile(member.path, member.offset, member.shape, False), np.load(labels))
        except (OSError, ValueError) as error:  # damaged with its size and time kept: rare, but no traceback
            raise UserError(
                f"cannot read the prepared {labels} ({error}): delete {folder} to rebuild it"
            ) from None
    return out, f"{plan.source} (prepared in {folder})"


# ---------------------------------------------------------------- which files make each split


def _plan(data: DataSpec, path: Path) -> SourcePlan:
    if not path.exists():
        raise UserError(f"data path {path} does not exist: pass the data with --data PATH or the spec's path")
    test_path = Path(data.test_path) if data.test_path else None
    if test_path is not None and not test_path.exists():
        raise UserError(f"the test path {test_path} does not exist: fix the data section's test_path")
    if test_path is not None and data.dataset == "folder" and not test_path.is_dir():
        raise UserError(f"the test path {test_path} is not a folder of images (the dataset is `folder`)")
    if data.dataset == "npy":
        return _npy_plan(path, test_path, data)
    if data.dataset == "imagenet":
        return _imagenet_plan(path, data)
    if data.dataset == "folder":
        return _folder_plan(path, test_path, data)
    return _torchvision_plan(data, path)


def _npy_plan(path: Path, test_path: Path | None, data: DataSpec) -> SourcePlan:
    if path.is_dir():
        found = sorted((p for p in path.iterdir() if p.suffix in (".npy", ".npz")), key=_natural)
        train = [p for p in found if p.name.startswith("train")]
        test = [p for p in found if p.name.startswith(("test", "val"))]
        if not train and not test:
            train = [p for p in found if not p.name.startswith(".")]
        if not train:
            raise UserError(
                f"no training arrays in {path}: expected .npy/.npz files whose names start with `train` "
                f"(and `test` or `val` for the test set)"
            )
    else:
        train, test = [path], []
    if test_path is not None:
        test = sorted(test_path.glob("*.np[yz]"), key=_natural) if test_path.is_dir() else [test_path]
        if not test:
            raise UserError(f"the test path {test_path} holds no .npy/.npz arrays")
    return SourcePlan(str(path), path, _arrays(train, data), _arrays(test, data) if test else None)


def _imagenet_plan(path: Path, data: DataSpec) -> SourcePlan:
    def find(pattern: str) -> list[Path]:
        return sorted([*path.glob(pattern), *path.glob(f"*/{pattern}")], key=_natural)

    train, test = find("train_data_batch_*.npz"), find("val_data.npz")
    if not train:
        raise UserError(f"no downsampled-ImageNet batches in {path}: expected train_data_batch_*.npz files")
    tests = _arrays(test, data, flat=True) if test else None
    return SourcePlan(str(path), path, _arrays(train, data, flat=True), tests)


def _folder_plan(path: Path, test_path: Path | None, data: DataSpec) -> SourcePlan:
    if not path.is_dir():
        raise UserError(f"data folder {path} is not a folder of images")
    root = path
    subfolders = {p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")}
    tests = [path / name for name in ("test", "val", "valid") if name in subfolders]
    if "train" in subfolders and (tests or subfolders == {"train"}):  # a split layout, not classes
        if tests and test_path is not None:
            raise UserError(f"{path} has its own test folder ({tests[0].name}/): remove test_path")
        path, test_path = path / "train", tests[0] if tests else test_path
    seen: dict[tuple[int, int], Path] = {}  # no folder of the training split is read for the test split
    train_files, train_labels, classes = images.list_folder(path, seen)
    train = _image_files(train_files, train_labels, data)
    test = None
    if test_path is not None:
        test_files, test_labels, test_classes = images.list_folder(test_path, seen)
        if test_classes != classes and max(len(classes), len(test_classes)) > 1:
            raise UserError(
                f"the test folder {test_path} has classes {test_classes}, the training folder {classes}"
            )
        test = _image_files(test_files, test_labels, data)
    return SourcePlan(str(root), root, train, test, classes)


def _torchvision_plan(data: DataSpec, path: Path) -> SourcePlan:
    files = _tree_files(path)
    train = _torchvision(data.name, path, "train")
    test = _torchvision(data.name, path, "test")
    if train is None:
        raise UserError(f"torchvision's {data.name} has no training split")
    classes = tuple(str(c) for c in getattr(train, "classes", ()) or ())
    where = f"torchvision {data.name} in {path}"
    return SourcePlan(
        where,
        path.parent,  # not inside the root: torchvision's ImageFolder would take the cache for a class
        _items(train, data, where, files, bool(data.classes)),
        _items(test, data, where, files, bool(data.classes)) if test is not None else None,
        classes,
    )


def _natural(path: Path) -> list:
    return [int(t) if t.isdecimal() else t for t in re.split(r"(\d+)", path.name)]


# ---------------------------------------------------------------- readers


def _arrays(paths: list[Path], data: DataSpec, flat: bool = False) -> Reader:
    """The images of array files, concatenated, each read in the layout that `data`'s shape tells."""
    parts, labels, labelled = [], [], []
    for path in paths:
        found = arrays.members(path)
        member = arrays.pick(found, arrays.IMAGE_KEYS, path, "images")
        if flat:
            count, levels, channels, channels_last, shape = _flat_layout(member)
        else:
            count, levels, channels, channels_last = arrays.image_layout(member, data)
            shape = None
        label_member = arrays.pick(found, arrays.LABEL_KEYS, path, "labels")
        labelled.append((path, label_member is not None))
        part_labels = arrays.read_labels(label_member, count, member)
        if flat and label_member is not None:  # ImageNet labels count from 1
            if len(part_labels) and part_labels.min() < 1:
                raise UserError(
                    f"{label_member}: downsampled-ImageNet labels count from 1, got {part_labels.min()}"
                )
            part_labels = part_labels - 1
        labels.append(part_labels)
        parts.append((member, levels, channels_last, shape))
    arrays.check_labelled(labelled, data.classes is not None)

    def read(keep: np.ndarray, data: DataSpec) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        start = 0
        for member, levels, channels_last, shape in parts:
            for chunk in arrays.chunks(member, channels_last, shape):
                index = np.arange(start, start + len(chunk))
                start += len(chunk)
                kept = keep[index]
                if kept.any():
                    yield index[kept], prepare(chunk[torch.from_numpy(kept)], levels, data, str(member))

    total = np.concatenate(labels)
    direct = _direct_file(parts) if len(parts) == 1 else None
    return Reader(len(total), total, read, list(paths), direct)


def _flat_layout(member: arrays.Member) -> tuple[int, int, int, bool, tuple[int, int, int]]:
    """Downsampled-ImageNet rows: N x (3 * S * S) uint8, the red, green and blue planes in turn."""
    side = int(round((member.shape[-1] / 3) ** 0.5)) if len(member.shape) == 2 else 0
    if member.dtype != np.uint8 or side < 1 or 3 * side * side != member.shape[1]:
        raise UserError(
            f"{member}: expected uint8 rows of 3 x S x S values (downsampled ImageNet), got "
            f"{member.dtype} {'x'.join(map(str, member.shape))}"
        )
    return member.shape[0], 256, 3, False, (3, side, side)


def _direct_file(parts: list) -> ArrayFile | None:
    member, levels, channels_last, shape = parts[0]
    if member.key is not None or levels != 256 or shape is not None:
        return None
    full = member.shape if len(member.shape) == 4 else None
    return ArrayFile(member.path, member.offset, full, channels_last) if full else None


def _image_files(paths: list[Path], labels: np.ndarray, data: DataSpec) -> Reader:
    return _decoding(labels, lambda i: images.decode_file(paths[i], data), paths)


def _items(dataset, data: DataSpec, where: str, files: list[Path], need_labels: bool) -> Reader:
    """A torchvision dataset's (image, label) items."""
    targets = next(
        (getattr(dataset, a) for a in ("targets", "labels", "_labels") if hasattr(dataset, a)), None
    )
    try:
        labels = np.asarray(targets, dtype=np.int64).reshape(len(dataset))
    except (TypeError, ValueError):
        if need_labels:
            raise UserError(f"{where}: no class labels to select classes by") from None
        labels = np.zeros(len(dataset), dtype=np.int64)

    def load(i: int) -> torch.Tensor:
        try:
            image = dataset[i][0]
        except Exception as error:  # a file that cannot be decoded: PIL, OSError, torchvision's own
            raise UserError(f"{where}, item {i} cannot be read: {type(error).__name__}: {error}") from None
        return images.image_tensor(image, data, f"{where}, item {i}")

    return _decoding(labels, load, files)


def _decoding(labels: np.ndarray, load: Callable[[int], torch.Tensor], files: list[Path]) -> Reader:
    def read(keep: np.ndarray, data: DataSpec) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        index = np.flatnonzero(keep)
        workers = min(8, os.cpu_count() or 1) if len(index) >= 2000 else 0
        start = 0
        for batch in images.decode_all(index.tolist(), load, workers):
            yield index[start : start + len(batch)], batch
            start += len(batch)

    return Reader(len(labels), labels, read, list(files))


def _tree_files(root: Path) -> list[Path]:
    """Every file under `root` (for the cache key); refuses FIFOs and devices (a reader would block)."""
    if not root.is_dir():
        raise UserError(f"torchvision data folder {root} is not a folder")
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d != ".flowspec-cache")
        for name in names:
            path = Path(folder) / name
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except OSError:
                regular = False
            if not regular:
                regular_file(path)  # raises, naming what it is
            found.append(path)
    return sorted(found)


def _torchvision(name: str | None, root: Path, split: str) -> VisionDataset | None:
    import torchvision.datasets as tvd

    cls = getattr(tvd, name or "", None)
    if not (isinstance(cls, type) and issubclass(cls, tvd.VisionDataset)):
        known = [
            n
            for n in dir(tvd)
            if isinstance(getattr(tvd, n), type) and issubclass(getattr(tvd, n), tvd.VisionDataset)
        ]
        raise UserError(f"torchvision has no dataset {name!r}{did_you_mean(name or '', known)}")
    params = inspect.signature(cls).parameters
    if "root" not in params:
        raise UserError(
            f"torchvision's {name} reads no folder (it has no root): it cannot be a dataset on disk"
        )
    options = {"download": False} if "download" in params else {}
    if "train" in params:
        attempts = [{"train": split == "train"}]
    elif "split" in params:
        attempts = [{"split": s} for s in (("train",) if split == "train" else ("test", "val", "valid"))]
    else:
        attempts = [{}] if split == "train" else []
    for attempt in attempts:
        try:
            return cls(str(root), **attempt, **options)
        except ValueError as error:
            if "split" in attempt and "split" in str(error):
                continue
            raise UserError(f"cannot read torchvision's {name} from {root}: {error}") from None
        except Exception as error:  # torchvision raises RuntimeError for missing data, others for bad files
            raise UserError(f"cannot read torchvision's {name} from {root}: {error}") from None
    return None


# ---------------------------------------------------------------- classes, test split, building


def _class_indices(data: DataSpec, plan: SourcePlan) -> list[int] | None:
    """The labels of the spec's classes in the source (None: all of them)."""
    if data.classes is None:
        return None
    wanted = []
    for c in data.classes:
        numbered = bool(plan.classes) and all(name.isdigit() for name in plan.classes)
        if isinstance(c, int) and (numbered or str(c) in plan.classes):  # folders named by numbers: names
            c = str(c)
        if isinstance(c, str):
            if c not in plan.classes:
                raise UserError(f"{plan.source} has no class '{c}'{did_you_mean(c, plan.classes)}")
            c = plan.classes.index(c)
        elif plan.classes and not 0 <= c < len(plan.classes):
            names = ", ".join(plan.classes[:10]) + (", ..." if len(plan.classes) > 10 else "")
            raise UserError(
                f"{plan.source} has no class {c}: its {len(plan.classes)} classes are 0 to "
                f"{len(plan.classes) - 1} ({names})"
            )
        wanted.append(c)
    return wanted


def _routes(plan: SourcePlan, keep: dict[str, np.ndarray], data: DataSpec) -> list[np.ndarray]:
    """Per reader (train, then test), where each image goes: 0 nowhere, 1 train, 2 test."""
    train = keep["train"].astype(np.int8)
    if plan.test is not None:
        if data.test_split is not None:
            raise UserError(f"{plan.source} has a test split: remove test_split from the data section")
        test = keep["test"].astype(np.int8) * 2
        if not test.any():
            raise UserError(f"the test split of {plan.source} has no images{_of_classes(data)}")
        routes = [train, test]
    else:
        if data.test_split is None:
            raise UserError(
                f"{plan.source} has no test split: add `test_split 0.02` (a fraction) or `test_split 1000` "
                f"(a count) to the data section, or name the test data with test_path"
            )
        # held out of all the images, then filtered: a class's test images are those of the whole set
        count = len(train)
        n = data.test_split if isinstance(data.test_split, int) else round(data.test_split * count)
        if n < 1 or n >= count:
            raise UserError(
                f"test_split {data.test_split} of the {count} images in {plan.source} leaves "
                f"{'an empty test split' if n < 1 else 'no training images'}"
            )
        held = np.zeros(count, dtype=bool)
        held[np.random.default_rng(SPLIT_SEED).permutation(count)[:n]] = True
        train[held & (train == 1)] = 2
        if not (train == 2).any():
            raise UserError(
                f"the test split ({data.test_split}) of {plan.source} has no images{_of_classes(data)}"
            )
        routes = [train]
    if not (routes[0] == 1).any():
        raise UserError(f"no training images{_of_classes(data)} in {plan.source}")
    return routes


def _of_classes(data: DataSpec) -> str:
    return f" of classes {list(data.classes)}" if data.classes is not None else ""


def _direct(plan: SourcePlan, data: DataSpec) -> dict | None:
    """An `.npy` pair that already is what the spec asks for is used in place, without a copy."""
    readers = [plan.train, plan.test]
    if data.classes is not None or data.test_split is not None or plan.test is None or data.levels != 256:
        return None
    if any(r.direct is None or r.direct.image_shape != tuple(data.shape) for r in readers):
        return None
    return {split: (r.direct, r.labels) for split, r in zip(("train", "test"), readers, strict=False)}


def _allocated(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A uint8 .npy file of `shape`, memory-mapped for writing, with its disk space reserved first: writing
    a memory map past a full disk kills the process (SIGBUS) instead of raising an error."""
    array = np.lib.format.open_memmap(path, "w+", np.uint8, shape)
    if not hasattr(os, "posix_fallocate"):  # macOS: nothing to reserve the space with
        return array
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    except OSError as error:
        raise UserError(
            f"no room for the prepared data in {path.parent} ({error.strerror}; it needs "
            f"{array.nbytes / 2**30:.2f} GiB): free space there, or set FLOWSPEC_CACHE_DIR to another folder"
        ) from None
    return array


def _build(folder: Path, plan: SourcePlan, routes: list[np.ndarray], data: DataSpec) -> dict:
    counts = {s: int(sum((r == code).sum() for r in routes)) for code, s in ((1, "train"), (2, "test"))}
    out = {s: _allocated(folder / f"{s}.npy", (n, *data.shape)) for s, n in counts.items()}
    labels = {s: np.empty(n, dtype=np.int64) for s, n in counts.items()}
    filled = dict.fromkeys(counts, 0)
    progress = Progress(f"preparing {plan.source}", sum(int((r > 0).sum()) for r in routes))
    done = ""
    try:
        for reader, route in zip([plan.train, plan.test], routes, strict=False):
            for index, batch in reader.read(route > 0, data):
                for code, split in ((1, "train"), (2, "test")):
                    mine = route[index] == code
                    n = int(mine.sum())
                    if n:
                        at = filled[split]
                        out[split][at : at + n] = batch[torch.from_numpy(mine)].numpy()
                        labels[split][at : at + n] = reader.labels[index[mine]]
                        filled[split] += n
                progress.advance(len(index))
        done = f"prepared {counts['train']} train and {counts['test']} test images of {plan.source}"
    finally:
        progress.close(done)
    for split, array in out.items():
        if "depth" in data.convert and len(array) and not _any_nonzero(array):
            raise UserError(
                f"every {split} image of {plan.source} is black after `convert depth` to {data.levels} "
                f"levels: were its values already small (8-bit values in a 16-bit file, to be saved as "
                f"8-bit, or values already below levels, which need no `convert depth`)?"
            )
    for split, array in out.items():
        array.flush()
        np.save(folder / f"{split}_labels.npy", labels[split])
    return counts


NONZERO_CHUNK = 1024  # images `_any_nonzero` reads at a time


def _any_nonzero(images: np.ndarray) -> bool:
    """Whether any value is not 0, reading `NONZERO_CHUNK` images at a time and stopping at the first that
    has one."""
    step = NONZERO_CHUNK
    return any(images[i : i + step].any() for i in range(0, len(images), step))
