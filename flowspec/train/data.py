"""The spec's dataset, split and prepared: `load_split` gives an `ImageSet` of uint8 N x C x H x W images.

CIFAR-10, `.npz` shards (`npz`) and scikit-learn's digits are read into memory. File datasets (`folder`,
`npy`, `imagenet`, `torchvision`, see `sources`) are prepared once into a memory-mapped cache and handed out
as views of it, so a set larger than memory can be streamed. Every source is filtered to the spec's class
subset, converted where the spec's `convert` asks and checked against its shape and levels. Nothing here
downloads unless `load_split` is allowed to (CIFAR-10 only, into a cache folder, never with
`FLOWSPEC_OFFLINE=1`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from flowspec.errors import UserError
from flowspec.spec import DataSpec
from flowspec.train import arrays
from flowspec.train.arrays import ArrayFile
from flowspec.train.files import regular_file
from flowspec.train.prepare import prepare

Split = Literal["train", "test"]

DIGITS_TEST = 297  # the last 297 of scikit-learn's 1,797 digits are the test split
CIFAR_FOLDER = "cifar-10-batches-py"
FILE_DATASETS = ("folder", "npy", "imagenet", "torchvision")


@dataclass(frozen=True)
class ImageSet:
    """Integer images (uint8, N x C x H x W), their labels (long, N) and where they were read from.

    `file` is the memory-mapped array behind `images` for file datasets (then `images` is a view of it).
    """

    images: torch.Tensor
    labels: torch.Tensor
    source: str
    file: ArrayFile | None = None

    def __len__(self) -> int:
        return len(self.images)


def cache_dir() -> Path:
    """Where CIFAR-10 is looked for (and downloaded to) when no folder is given."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flowspec" / "cifar10"


def load_split(
    data: DataSpec, split: Split, data_dir: Path | str | None = None, download: bool = True
) -> ImageSet:
    """The `split` of the spec's dataset, filtered to its classes, converted where it asks and checked
    against its shape and levels.

    `data_dir` (the command line's `--data`) overrides the spec's `path`.
    """
    path = Path(data_dir) if data_dir is not None else (Path(data.path) if data.path else None)
    if data.dataset in FILE_DATASETS:
        if path is None:
            raise UserError(
                f'the spec\'s dataset is `{data.dataset}` but names no data: add path "..." to its data '
                f"section or pass --data PATH"
            )
        from flowspec.train.sources import prepared

        splits, source = prepared(data, path)
        file, labels = splits[split]
        return ImageSet(file.tensor(), torch.from_numpy(labels), source, file)
    if data.dataset == "digits":
        if data_dir is not None:
            raise UserError(
                f"the spec's dataset is digits (scikit-learn's bundled images), which reads no files: drop "
                f"--data {data_dir}, or set the dataset kind of those files (--set data.dataset=...)"
            )
        images, labels, source, levels = _digits(split)
    elif path is not None:
        images, labels, source, levels = _from_folder(path, split, data)
    elif data.dataset == "cifar10":
        images, labels, source, levels = _cifar10_default(split, download, data)
    else:
        raise UserError(
            "the spec's dataset is `npz` but names no folder: pass the shard folder with --data DIR"
        )
    if data.classes is not None:
        keep = torch.isin(labels, torch.tensor(data.class_indices))
        images, labels = images[keep], labels[keep]
        if len(images) == 0:
            raise UserError(f"no {split} images of classes {list(data.classes)} in {source}")
    if len(images) == 0:
        raise UserError(f"the {split} split of {source} has no images")
    images = prepare(images, levels, data, source)
    return ImageSet(images.contiguous(), labels, source)


Loaded = tuple[torch.Tensor, torch.Tensor, str, int]  # images, labels, where, levels of the source


def _digits(split: Split) -> Loaded:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.uint8))[:, None]
    labels = torch.from_numpy(digits.target.astype(np.int64))
    part = slice(None, -DIGITS_TEST) if split == "train" else slice(-DIGITS_TEST, None)
    return images[part], labels[part], "scikit-learn's bundled digits", 17


def _from_folder(folder: Path, split: Split, data: DataSpec) -> Loaded:
    if not folder.is_dir():
        raise UserError(
            f"data folder {folder} {'is not a folder' if folder.exists() else 'does not exist'}: pass "
            f"--data DIR with a torchvision `{CIFAR_FOLDER}` folder or a folder of .npz shards"
        )
    if folder.name == CIFAR_FOLDER:
        return _torchvision_cifar(folder.parent, split)
    if (folder / CIFAR_FOLDER).is_dir():
        return _torchvision_cifar(folder, split)
    pattern = "train_N.npz" if split == "train" else "test*.npz"
    shards = sorted(folder.glob("train_*.npz" if split == "train" else pattern))
    if split == "train":
        shards = _numbered(folder, shards)
    if not shards:
        held = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        raise UserError(
            f"no {split} data in {folder} ({f'it holds {_listed(held)}' if held else 'it is empty'}): "
            f"expected a torchvision `{CIFAR_FOLDER}` folder or .npz shards named {pattern} (arrays `x`: "
            f"uint8 N x H x W x C, `y`: labels); pass the right folder with --data DIR"
        )
    return _npz(shards, data)


def _numbered(folder: Path, found: list[Path]) -> list[Path]:
    """The shards `train_<N>.npz` of `found` (in name order), refused unless numbered 1, 2, ... in turn and
    unless every name in `found` is one (another would silently not be read)."""
    shards = [p for p in found if re.fullmatch(r"train_\d+\.npz", p.name)]
    others = [p.name for p in found if p not in shards]
    numbers = sorted(int(p.stem[len("train_") :]) for p in shards)
    problems = []
    if numbers != list(range(1, len(numbers) + 1)):
        present = sorted({n for n in numbers if n >= 1})
        count = (present[-1] if present else 0) - len(present)  # counted, not listed: N may be a date
        gaps = ", ".join(f"train_{n}.npz" for n in islice(_gaps(present), 5)) + ", ..." * (count > 5)
        missing = f"; missing {count:,} shard{'s' * (count > 1)}: {gaps}" if count else ""
        problems.append(
            f"are not numbered 1, 2, ... in turn: found {_listed([p.name for p in shards])}{missing}"
        )
    if others:
        problems.append(
            f"include {_listed(others)}, not named train_N.npz and so never read: rename or move them"
        )
    if problems:
        raise UserError(f"the train shards of {folder} {'; and they '.join(problems)}")
    return shards


def _gaps(numbers: list[int]) -> Iterator[int]:
    """The whole numbers from 1 up to the last of `numbers` (sorted, positive) that are not in it, lazily."""
    previous = 0
    for n in numbers:
        yield from range(previous + 1, n)
        previous = n


def _listed(names: list[str]) -> str:
    """The first five of `names`, and how many there are when there are more."""
    return ", ".join(names[:5]) + (f", ... ({len(names):,} in all)" if len(names) > 5 else "")


def _npz(shards: list[Path], data: DataSpec) -> Loaded:
    """Shards with arrays `x` (uint8 images N x H x W x C or N x H x W) and `y` (labels), each prepared."""
    xs, ys, labelled = [], [], []
    for shard in shards:
        found = arrays.members(shard)
        member = arrays.pick(found, ("x",), shard, "images")
        count, levels, _, channels_last = arrays.image_layout(member, data)
        label_member = arrays.pick(found, ("y",), shard, "labels")
        labelled.append((shard, label_member is not None))
        labels = arrays.read_labels(label_member, count, member)
        if count == 0:
            raise UserError(f"{member} holds no images")
        xs.append(prepare(torch.cat(list(arrays.chunks(member, channels_last))), levels, data, str(shard)))
        ys.append(torch.from_numpy(labels))
    arrays.check_labelled(labelled, data.classes is not None)
    where = str(shards[0].parent / f"{{{','.join(s.name for s in shards)}}}")
    return torch.cat(xs), torch.cat(ys), where, data.levels


class CifarUnreadable(UserError):
    """torchvision could not read (or download) CIFAR-10 into `folder`; `reason`: its error."""

    def __init__(self, folder: Path, error: Exception):
        self.reason = str(error) or type(error).__name__
        super().__init__(
            f"cannot read CIFAR-10 from {folder}: {self.reason}; pass --data DIR with a torchvision "
            f"`{CIFAR_FOLDER}` folder or a folder of .npz shards"
        )


def _torchvision_cifar(root: Path, split: Split, download: bool = False) -> Loaded:
    from torchvision.datasets import CIFAR10

    folder = root / CIFAR_FOLDER
    for path in folder.iterdir() if folder.is_dir() else ():
        regular_file(path, "CIFAR-10 file")  # torchvision would block on a FIFO
    try:
        dataset = CIFAR10(str(root), train=split == "train", download=download)
    except Exception as error:  # torchvision raises RuntimeError for missing/corrupt files, others offline
        raise CifarUnreadable(folder, error) from None
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2)
    return images, torch.tensor(dataset.targets, dtype=torch.int64), str(folder), 256


def _has_data(folder: Path) -> bool:
    return (folder / CIFAR_FOLDER).is_dir() or folder.name == CIFAR_FOLDER or any(folder.glob("test*.npz"))


FINGERPRINT_SAMPLES = 64  # images a fingerprint reads


def fingerprint(images: torch.Tensor) -> str:
    """A digest of a set of images from its shape and `FINGERPRINT_SAMPLES` evenly spaced images: cheap at
    any size; other images in their place change it (an edit between the sampled images may not)."""
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    if len(images):
        picks = torch.linspace(0, len(images) - 1, min(FINGERPRINT_SAMPLES, len(images))).round().long()
        digest.update(images[picks].cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def default_folder(data: DataSpec) -> Path | None:
    """The folder that a cifar10 spec without a path reads now (FLOWSPEC_DATA_DIR when set, else the cache
    folder once it holds the data); None for other specs, and where none holds CIFAR-10."""
    if data.dataset != "cifar10" or data.path is not None:
        return None
    env = os.environ.get("FLOWSPEC_DATA_DIR")
    folder = Path(env) if env else cache_dir()
    return folder.resolve() if folder.is_dir() and _has_data(folder) else None


def _cifar10_default(split: Split, download: bool, data: DataSpec) -> Loaded:
    """FLOWSPEC_DATA_DIR when set (a folder without CIFAR-10 is an error, not passed over); else the cache
    folder, or a download into it when online."""
    env = os.environ.get("FLOWSPEC_DATA_DIR")
    if env:
        if not (Path(env).is_dir() and _has_data(Path(env))):
            raise UserError(
                f"FLOWSPEC_DATA_DIR is {env}, which holds no CIFAR-10 (a torchvision `{CIFAR_FOLDER}` folder "
                f"or .npz shards): fix it, pass --data DIR, or unset it to read {cache_dir()}"
            )
        return _from_folder(Path(env), split, data)
    if cache_dir().is_dir() and _has_data(cache_dir()):
        return _from_folder(cache_dir(), split, data)
    if os.environ.get("FLOWSPEC_OFFLINE") == "1":
        why = "downloading is off: FLOWSPEC_OFFLINE=1"
    elif not download:
        why = "not downloaded here"
    else:
        inner = cache_dir() / CIFAR_FOLDER
        made = [folder for folder in (inner, *inner.parents) if not folder.exists()]  # innermost first
        try:
            return _torchvision_cifar(cache_dir(), split, download=True)
        except CifarUnreadable as error:
            why = f"the download failed: {error.reason}"
            for folder in made:  # those the attempt made, each while empty; none that was there before
                with contextlib.suppress(OSError):
                    folder.rmdir()
    raise UserError(
        f"CIFAR-10 not found (looked in {cache_dir()}; {why}): pass --data DIR with a torchvision "
        f"`{CIFAR_FOLDER}` folder or a folder of .npz shards, or set FLOWSPEC_DATA_DIR"
    )
