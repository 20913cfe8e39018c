"""Image files and decoded images: a folder of PNG/JPEG/WebP files (subfolders as classes, as torchvision's
`ImageFolder`), and decoding in worker processes into the spec's images, each fault naming its file."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowspec.errors import UserError
from flowspec.spec import DataSpec
from flowspec.train.files import regular_file
from flowspec.train.prepare import prepare

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
BATCH = 64


def list_folder(
    folder: Path, seen: dict[tuple[int, int], Path] | None = None
) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    """The image files of `folder` (sorted), their labels and the class names.

    When a subfolder holds images, every subfolder (sorted by name, empty ones too) is a class holding
    images at any depth (links followed, no folder read twice); when none does, the folder's images are one
    class. A folder with both is refused (its own images would be ignored). Hidden files and other suffixes
    are skipped; an image name that is not a regular file (a FIFO, a device) is refused. `seen`: the
    folders another listing read (the training split's, for the test split's), none of which is read again.
    """
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    seen = {} if seen is None else seen  # every folder listed, for all classes
    _visit(folder, seen)
    groups = [(name, sorted(_images(folder / name, seen))) for name in subfolders]
    loose = sorted(p for p in folder.iterdir() if _is_image_name(p))
    held = [name for name, found in groups if found]
    if held and loose:
        names = ", ".join(f"{name}/" for name in held[:5]) + (", ..." if len(held) > 5 else "")
        raise UserError(
            f"{folder} holds both images of its own and class subfolders of images ({names}): its "
            f"{len(loose)} own images would be ignored; move them into a class subfolder, or the "
            f"subfolders out"
        )
    if not held:
        groups = [(folder.name, loose)]
    paths = [regular_file(p, "image") for _, found in groups for p in found]
    labels = np.concatenate([np.full(len(found), i, dtype=np.int64) for i, (_, found) in enumerate(groups)])
    if not paths:
        raise UserError(
            f"no images in {folder}: expected {', '.join(SUFFIXES)} files, or class subfolders of them"
        )
    return paths, labels, tuple(name for name, _ in groups)


def _images(folder: Path, seen: dict[tuple[int, int], Path]) -> Iterator[Path]:
    """The image files under `folder`, at any depth, linked folders followed, hidden files and folders
    skipped; a folder that cannot be read is an error (its images would otherwise be silently missing), and
    so is one reached twice (a loop, or two links to one folder). `seen`: (device, inode) of the folders
    listed so far, and where; `folder` is added."""
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as error:
        raise UserError(f"cannot read the folder {folder}: {error.strerror}") from None
    _visit(folder, seen)
    for entry in entries:
        path = Path(entry.path)
        if entry.name.startswith("."):
            continue
        if entry.is_dir():  # a link to a folder too
            yield from _images(path, seen)
        elif _is_image_name(path):
            yield path


def _visit(folder: Path, seen: dict[tuple[int, int], Path]) -> None:
    """Add `folder` to the folders listed; a `UserError` when it is one of them already (a loop of links,
    two links to one folder, or a test folder within the training folder)."""
    info = os.stat(folder)
    here = (info.st_dev, info.st_ino)
    first = seen.get(here)
    if first is not None and folder != first and folder.is_relative_to(first):
        raise UserError(f"the link {folder} leads to a folder it is in ({os.path.realpath(folder)}): a loop")
    if first is not None:
        also = "" if folder == first else f" (as {first})"
        raise UserError(
            f"{folder} was read already{also}: its images would be read twice; remove the link, or give the "
            f"test split a folder of its own"
        )
    seen[here] = folder


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES and not path.name.startswith(".") and not path.is_dir()


def image_tensor(image: Any, data: DataSpec, where: str) -> torch.Tensor:
    """A decoded image (PIL) as the spec's 1 x C x H x W uint8 image (converted where the spec asks)."""
    mode = image.mode
    if mode in ("1", "P", "CMYK", "YCbCr", "LAB", "HSV", "PA", "F", "RGBX", "RGBa", "La"):
        if "mode" not in data.convert:
            raise UserError(
                f"{where}: a {mode} image, not grey or RGB; add `convert mode` to the data section "
                f"to convert it"
            )
        image = image.convert("RGBA" if "transparency" in image.info or mode in ("PA", "RGBa") else "RGB")
    array = np.array(image)
    levels = 256
    if array.dtype != np.uint8:  # 16-bit grey ("I;16", or "I" from older Pillow)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise UserError(f"{where}: a {mode} image with values outside 16 bits")
        if "depth" not in data.convert:  # whatever its values: small ones are a dark image, not 8-bit data
            raise UserError(
                f"{where}: a 16-bit image ({mode}) but the spec says {data.levels} levels (values "
                f"0..{data.levels - 1}); add `convert depth` to the data section to reduce the colour depth "
                f"(or save the image as 8-bit if it holds 8-bit values)"
            )
        array, levels = array.astype(np.int32), 65536
    x = torch.from_numpy(array if array.ndim == 3 else array[..., None]).permute(2, 0, 1)[None]
    return prepare(x, levels, data, where)


def decode_file(path: Path, data: DataSpec) -> torch.Tensor:
    """The image file `path` as the spec's 1 x C x H x W uint8 image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image_tensor(image, data, str(path))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise UserError(f"cannot decode image {path}: {error}") from None
    except Image.DecompressionBombError as error:
        raise UserError(f"refusing image {path}: {error}") from None


class Decoded(torch.utils.data.Dataset):
    """Item i: the prepared image `load(i)` as a numpy array or, if it cannot be, the message saying why (a
    string, so that a worker process hands it back intact). Arrays, not tensors: a worker sends a tensor
    through a shared-memory handle that it serves from a thread, which printed a traceback when the main
    process stopped (SIGTERM) mid-transfer; an array is copied through the worker's pipe."""

    def __init__(self, indices: Sequence[int], load: Callable[[int], torch.Tensor]):
        self.indices, self.load = indices, load

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray | str:
        try:
            return self.load(self.indices[i]).numpy()
        except UserError as error:
            return str(error)


def decode_all(
    indices: Sequence[int], load: Callable[[int], torch.Tensor], workers: int
) -> Iterator[torch.Tensor]:
    """The images `load(i)` for `indices`, in order, BATCH at a time, decoded by `workers` processes."""
    loader = torch.utils.data.DataLoader(
        Decoded(indices, load), batch_size=BATCH, num_workers=workers, collate_fn=list
    )
    for items in loader:
        for item in items:
            if isinstance(item, str):
                raise UserError(item)
        yield torch.from_numpy(np.concatenate(items))
