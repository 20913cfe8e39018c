"""Arrays of images in `.npy` files and `.npz` archives: their shapes without reading them, their rows in
chunks, their labels, each checked with a message that names the file and what is wrong with it."""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flowspec.errors import UserError
from flowspec.spec import DataSpec
from flowspec.train.files import regular_file

IMAGE_KEYS = ("x", "data", "images")  # the array of images in a .npz, by the first name present
LABEL_KEYS = ("y", "labels", "targets")
CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class ArrayFile:
    """A C-ordered uint8 `.npy` array of images, memory-mappable: N x C x H x W, or N x H x W x C."""

    path: Path
    offset: int
    shape: tuple[int, ...]
    channels_last: bool

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = (self.shape[3], self.shape[1], self.shape[2]) if self.channels_last else self.shape[1:]
        return c, h, w

    def tensor(self) -> torch.Tensor:
        """All images as N x C x H x W, a view of the memory map (nothing is read until used)."""
        size, needed = os.stat(self.path).st_size, self.offset + math.prod(self.shape)
        if size < needed:
            raise UserError(f"{self.path} is truncated: {size} bytes, its header describes {needed}")
        array = np.load(self.path, mmap_mode="c")  # copy-on-write: writable for torch, never written back
        images = torch.from_numpy(array)
        return images.permute(0, 3, 1, 2) if self.channels_last else images


@dataclass(frozen=True)
class Member:
    """One array of a `.npy` file (`key` None) or of a `.npz` archive: its shape and type, unread."""

    path: Path
    key: str | None
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int = 0  # where an .npy file's data starts

    def __str__(self) -> str:
        return f"{self.path}" + (f" (array `{self.key}`)" if self.key else "")

    def load(self) -> np.ndarray:
        """The whole array, read into memory (an `.npy` stays memory-mapped)."""
        try:
            if self.key is None:
                return np.load(self.path, mmap_mode="r")
            with np.load(self.path) as archive:
                return archive[self.key]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            raise UserError(f"cannot read {self}: {error}") from None


def members(path: Path) -> dict[str, Member]:
    """The arrays of a `.npy` (key "") or `.npz` file, from their headers (nothing else is read)."""
    regular_file(path)
    try:
        if path.suffix == ".npy":
            with open(path, "rb") as f:
                shape, dtype = _header(f)
                return {"": Member(path, None, shape, dtype, f.tell())}
        found = {}
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith(".npy"):
                    with archive.open(name) as f:
                        shape, dtype = _header(f)
                    found[name[:-4]] = Member(path, name[:-4], shape, dtype)
        return found
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise UserError(f"cannot read {path} (an .npy or .npz array file): {error}") from None


def _header(f) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran and len(shape) > 1:
        raise ValueError("the array is stored in Fortran order; save it C-ordered (np.ascontiguousarray)")
    return tuple(shape), dtype


def pick(found: dict[str, Member], keys: tuple[str, ...], path: Path, what: str) -> Member | None:
    """The member named by the first of `keys` present (an `.npy` file's only array for images)."""
    if "" in found:
        return found[""] if what == "images" else None
    for key in keys:
        if key in found:
            return found[key]
    if what == "images":
        raise UserError(
            f"{path} has no array of images: expected one named {' or '.join(f'`{k}`' for k in keys)}, "
            f"found {', '.join(f'`{k}`' for k in found) or 'none'}"
        )
    return None


def image_layout(member: Member, data: DataSpec) -> tuple[int, int, int, bool]:
    """(N, source levels, channels, channels_last) of an image array; refuses other shapes and types.

    A 4-D array is read N x H x W x C or N x C x H x W, whichever gives the spec's C x H x W; where neither
    does (images to convert), the reading of 1 to 4 channels, the spec's count first; a 3-D one N x H x W.
    An array that either reading fits, or that holds the spec's sides in another order, is refused unless
    `convert` asks for the change: its images would be scrambled."""
    shape, want = member.shape, tuple(data.shape)
    if member.dtype not in (np.uint8, np.uint16):
        raise UserError(f"{member}: images must be uint8 (or uint16), got {member.dtype}")
    levels = 256 if member.dtype == np.uint8 else 65536
    readings = {True: (shape[3], *shape[1:3]), False: shape[1:]} if len(shape) == 4 else {}
    if len(shape) == 3:
        readings = {True: (1, *shape[1:])}
    fits = [last for last, chw in readings.items() if chw == want]
    if not fits:
        fits = [last for last, chw in readings.items() if chw[0] <= 4]
        fits = [last for last in fits if readings[last][0] == want[0]] or fits
    if not fits:
        raise UserError(
            f"{member}: expected images N x H x W x C or N x C x H x W (C of 1 to 4, or the spec's) or "
            f"N x H x W, got {_dims(shape) or 'a scalar'}"
        )
    if len(fits) == 2 and max(shape[1:]) > 1:  # of 1x1x1 images, both readings are the same array
        raise UserError(
            f"{member}: an array of {_dims(shape)} holds images of {_dims(readings[True])} read "
            f"channels-last (N x H x W x C) and of {_dims(readings[False])} read channels-first "
            f"(N x C x H x W), for the spec's {_dims(want)}: its shape cannot tell which layout it has, and "
            f"the other one scrambles the images; save them as image files and read those with `data folder`"
        )
    chw = readings[fits[0]]
    needs = {k for k, differs in (("mode", chw[0] != want[0]), ("size", chw[1:] != want[1:])) if differs}
    c, h, w = want
    if len(shape) == 3 and chw[0] == c and chw[1:] == (w, h) and not needs <= set(data.convert):
        raise UserError(
            f"{member}: an array of {_dims(shape)} holds the spec's {_dims(want)} images with their height "
            f"and width swapped: read N x H x W they are {_dims(chw)}; reorder its axes (np.transpose) to "
            f"N x {h} x {w}"
        )
    if len(shape) == 4 and sorted(chw) == sorted(want) and not needs <= set(data.convert):
        raise UserError(
            f"{member}: an array of {_dims(shape)} holds the spec's {_dims(want)} images in neither layout: "
            f"read channels-last (N x H x W x C) they are {_dims(readings[True])}, channels-first "
            f"(N x C x H x W) {_dims(readings[False])}; reorder its axes (np.transpose) to N x {h} x {w} x "
            f"{c} or N x {c} x {h} x {w}"
        )
    return shape[0], levels, chw[0], fits[0]


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def read_labels(member: Member | None, count: int, images: Member) -> np.ndarray:
    """One integer label per image (zeros where the file has none), checked."""
    if member is None:
        return np.zeros(count, dtype=np.int64)
    if len(member.shape) != 1:
        kind = "a scalar" if not member.shape else f"an array of {'x'.join(map(str, member.shape))}"
        raise UserError(f"{member}: labels must be a list of one integer per image, got {kind}")
    if member.dtype.kind not in "iubf":
        raise UserError(f"{member}: labels must be integers, got {member.dtype} values")
    if member.shape[0] != count:
        more = "more" if member.shape[0] > count else "fewer"
        raise UserError(f"{member}: {member.shape[0]} labels, {more} than the {count} images of {images}")
    values = member.load()
    if member.dtype.kind == "f" and not np.array_equal(values, np.floor(values)):
        raise UserError(
            f"{member}: labels must be whole numbers, got fractions such as {values[values % 1 != 0][0]}"
        )
    labels = np.asarray(values, dtype=np.int64)
    if len(labels) and labels.min() < 0:
        raise UserError(f"{member}: labels must be 0 or more, got {labels.min()}")
    return labels


def check_labelled(files: list[tuple[Path, bool]], classes: bool) -> None:
    """Refuses array files of which some have labels and others not, and `classes` on files without any:
    `files` are (path, whether it has labels)."""
    without = [path for path, has in files if not has]
    if without and len(without) < len(files):
        having = next(path for path, has in files if has)
        raise UserError(
            f"{having} has labels but {without[0]} has none ({len(without)} of {len(files)} files without): "
            f"give every file of the set its labels, or none"
        )
    if without and classes:
        raise UserError(f"{without[0]} has no labels, so `classes` cannot select from it")


def chunks(
    member: Member, channels_last: bool, flat_shape: tuple[int, ...] | None = None
) -> Iterator[torch.Tensor]:
    """The images of `member` as N x C x H x W tensors, about CHUNK_BYTES at a time.

    `flat_shape` (C, H, W) reads rows stored flattened (the downsampled-ImageNet batches).
    """
    array = member.load()
    if flat_shape is not None:
        array = array.reshape(len(array), *flat_shape)
    rows = max(1, CHUNK_BYTES // max(1, array[:1].nbytes))
    for start in range(0, len(array), rows):
        rows_read = np.array(array[start : start + rows])
        part = torch.from_numpy(rows_read.astype(np.int32) if rows_read.dtype == np.uint16 else rows_read)
        if part.ndim == 3:
            part = part[..., None]
        yield part.permute(0, 3, 1, 2) if channels_last else part
