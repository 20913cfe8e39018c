"""Datasets as in-memory integer image tensors: CIFAR-10, folders of `.npz` shards, scikit-learn's digits.

Every source ends up as an `ImageSet`: uint8 images N x C x H x W with their labels, filtered to the
spec's class subset and checked against the spec's shape and levels. Nothing here downloads unless
`load_split` is allowed to (CIFAR-10 only, into a cache folder, and never when `FLOWSPEC_OFFLINE=1`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from flowspec.errors import UserError
from flowspec.spec import DataSpec

Split = Literal["train", "test"]

DIGITS_TEST = 297  # the last 297 of scikit-learn's 1,797 digits are the test split
CIFAR_FOLDER = "cifar-10-batches-py"


@dataclass(frozen=True)
class ImageSet:
    """Integer images (uint8, N x C x H x W), their labels (long, N) and where they were read from."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str

    def __len__(self) -> int:
        return len(self.images)


def cache_dir() -> Path:
    """Where CIFAR-10 is looked for (and downloaded to) when no folder is given."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flowspec" / "cifar10"


def load_split(
    data: DataSpec, split: Split, data_dir: Path | str | None = None, download: bool = True
) -> ImageSet:
    """The `split` of the spec's dataset, filtered to its classes and checked against its shape and levels.

    `data_dir` (the command line's `--data`) overrides the spec's `path`: a torchvision
    `cifar-10-batches-py` folder (or its parent) or a folder of `.npz` shards.
    """
    folder = Path(data_dir) if data_dir is not None else (Path(data.path) if data.path else None)
    if data.dataset == "npy":
        raise UserError(_npy_needed(data, folder))
    if data.dataset == "digits" and data_dir is None:
        images, labels, source = _digits(split)
    elif folder is not None:
        images, labels, source = _from_folder(folder, split)
    elif data.dataset == "cifar10":
        images, labels, source = _cifar10_default(split, download)
    else:
        raise UserError(
            "the spec's dataset is `npz` but names no folder: pass the shard folder with --data DIR"
        )
    if data.classes is not None:
        keep = torch.isin(labels, torch.tensor(data.class_indices))
        images, labels = images[keep], labels[keep]
        if len(images) == 0:
            raise UserError(f"no {split} images of classes {list(data.classes)} in {source}")
    _check(images, data, source)
    return ImageSet(images.contiguous(), labels, source)


def _npy_needed(data: DataSpec, folder: Path | None) -> str:
    """What an `npy` spec needs (its reader is not part of this version)."""
    what = (
        f"a folder of uint8 N x H x W x C arrays (.npy or .npz, the official Flow++ ImageNet and CelebA "
        f"files) of {'x'.join(map(str, data.shape))} images with values 0..{data.levels - 1}"
    )
    if folder is None or not folder.is_dir():
        where = f"{folder} does not exist" if folder is not None else "the spec names no path"
        return f"the spec's dataset `npy` needs {what}; {where}: pass the folder with --data DIR"
    return f"this version of flowspec cannot read `npy` data ({what}) from {folder}"


def _check(images: torch.Tensor, data: DataSpec, source: str) -> None:
    got = tuple(images.shape[1:])
    if got != tuple(data.shape):
        raise UserError(
            f"the images in {source} are {'x'.join(map(str, got))} but the spec's data shape is "
            f"{'x'.join(map(str, data.shape))}"
        )
    if len(images) and int(images.max()) >= data.levels:
        raise UserError(
            f"the images in {source} have values up to {int(images.max())} but the spec says "
            f"{data.levels} levels (values 0..{data.levels - 1})"
        )


def _digits(split: Split) -> tuple[torch.Tensor, torch.Tensor, str]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.uint8))[:, None]
    labels = torch.from_numpy(digits.target.astype(np.int64))
    part = slice(None, -DIGITS_TEST) if split == "train" else slice(-DIGITS_TEST, None)
    return images[part], labels[part], "scikit-learn's bundled digits"


def _from_folder(folder: Path, split: Split) -> tuple[torch.Tensor, torch.Tensor, str]:
    if not folder.is_dir():
        raise UserError(
            f"data folder {folder} does not exist: pass --data DIR with a torchvision "
            f"`{CIFAR_FOLDER}` folder or a folder of .npz shards"
        )
    if folder.name == CIFAR_FOLDER:
        return _torchvision_cifar(folder.parent, split)
    if (folder / CIFAR_FOLDER).is_dir():
        return _torchvision_cifar(folder, split)
    pattern = "train_*.npz" if split == "train" else "test*.npz"
    shards = sorted(folder.glob(pattern))
    if not shards:
        raise UserError(
            f"no {split} data in {folder}: expected a torchvision `{CIFAR_FOLDER}` folder or .npz shards "
            f"named {pattern} (arrays `x`: uint8 N x H x W x C, `y`: labels); pass the right folder with "
            f"--data DIR"
        )
    return _npz(shards)


def _npz(shards: list[Path]) -> tuple[torch.Tensor, torch.Tensor, str]:
    xs, ys = [], []
    for shard in shards:
        try:
            with np.load(shard) as arrays:
                x, y = arrays["x"], arrays["y"]
        except (OSError, ValueError, KeyError, EOFError) as error:
            raise UserError(f"cannot read {shard} (a .npz shard with arrays `x` and `y`): {error}") from None
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or len(x) != len(y):
            raise UserError(
                f"{shard}: `x` must be uint8 N x H x W x C (or N x H x W) with one label in `y` per image, "
                f"got {x.dtype} {'x'.join(map(str, x.shape))} and {len(y)} labels"
            )
        xs.append(x if x.ndim == 4 else x[..., None])
        ys.append(np.asarray(y, dtype=np.int64).reshape(-1))
    images = torch.from_numpy(np.concatenate(xs)).permute(0, 3, 1, 2)
    where = str(shards[0].parent / f"{{{','.join(s.name for s in shards)}}}")
    return images, torch.from_numpy(np.concatenate(ys)), where


def _torchvision_cifar(
    root: Path, split: Split, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor, str]:
    from torchvision.datasets import CIFAR10

    try:
        dataset = CIFAR10(str(root), train=split == "train", download=download)
    except (
        Exception
    ) as error:  # torchvision raises RuntimeError for missing/corrupt files, others when offline
        raise UserError(
            f"cannot read CIFAR-10 from {root / CIFAR_FOLDER}: {error}; pass --data DIR with a torchvision "
            f"`{CIFAR_FOLDER}` folder or a folder of .npz shards"
        ) from None
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2)
    return images, torch.tensor(dataset.targets, dtype=torch.int64), str(root / CIFAR_FOLDER)


def _has_data(folder: Path) -> bool:
    return (folder / CIFAR_FOLDER).is_dir() or folder.name == CIFAR_FOLDER or any(folder.glob("test*.npz"))


def _cifar10_default(split: Split, download: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    """FLOWSPEC_DATA_DIR, then the cache folder; else a download into the cache when online."""
    env = os.environ.get("FLOWSPEC_DATA_DIR")
    candidates = ([Path(env)] if env else []) + [cache_dir()]
    for folder in candidates:
        if folder.is_dir() and _has_data(folder):
            return _from_folder(folder, split)
    looked = ", ".join(str(c) for c in candidates)
    if download and os.environ.get("FLOWSPEC_OFFLINE") != "1":
        try:
            return _torchvision_cifar(cache_dir(), split, download=True)
        except UserError:
            pass
    raise UserError(
        f"CIFAR-10 not found (looked in {looked}; downloading was not possible): pass --data DIR with a "
        f"torchvision `{CIFAR_FOLDER}` folder or a folder of .npz shards, or set FLOWSPEC_DATA_DIR"
    )
