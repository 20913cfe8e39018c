"""The prepared-data caches of a cache folder, as `flowspec cache` lists and removes them: the data each
holds, its size, when it was built and last used, and whether it can be used again."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowspec.train.datacache import IN_USE, LOCK, META, cache_root, default_root

NAME = re.compile(r"[0-9a-f]{20}")
UNFINISHED = re.compile(r"([0-9a-f]{20})\.tmp-\d+(-old)?")

READY = "ready"
SOURCES_GONE = "sources gone"  # a source file is gone: the cache can never be used again
DAMAGED = "damaged"  # a file of it changed or is gone since it was written: a use rebuilds it
UNFINISHED_BUILD = "unfinished"  # left by a build that was killed
BEING_BUILT = "being built"
UNUSABLE = (SOURCES_GONE, DAMAGED, UNFINISHED_BUILD)  # what `--clean` removes


@dataclass(frozen=True)
class Cache:
    """One cache folder."""

    folder: Path
    state: str
    size: int  # bytes
    data: dict[str, Any]  # the data settings it was prepared with ({}: not known)
    sources: tuple[str, ...]  # the files its images were read from
    images: tuple[int, int] | None  # (train, test)
    built: float | None  # a time stamp
    used: float | None  # the last time a process read it (None: not since flowspec recorded it)

    @property
    def name(self) -> str:
        return self.folder.name


def roots(path: Path | None) -> tuple[list[Path], Path | None]:
    """The cache folders to look in for `path` (a data folder or file, or a cache folder itself; None: the
    default cache folder), and the data path their caches must hold images of (None: any)."""
    if path is None:
        return [default_root()], None
    if path.is_dir() and (path.name == ".flowspec-cache" or any(_caches_in(path))):
        return [path], None
    places = [cache_root(path), cache_root(path.parent)]  # a torchvision root's cache is beside it
    found = [root for i, root in enumerate(places) if root.is_dir() and root not in places[:i]]
    return found or places[:1], Path(os.path.realpath(path))


def _caches_in(root: Path) -> Iterator[Path]:
    for child in root.iterdir():
        if child.is_dir() and (NAME.fullmatch(child.name) or UNFINISHED.fullmatch(child.name)):
            yield child


def find(root: Path, of: Path | None = None) -> list[Cache]:
    """The caches in `root`, those with images of the data at `of` (and unfinished builds) when given."""
    out = []
    for folder in sorted(_caches_in(root)):
        cache = _read(folder)
        if of is None or cache.state in (UNFINISHED_BUILD, BEING_BUILT) or _holds(cache, of):
            out.append(cache)
    return out


def _holds(cache: Cache, data: Path) -> bool:
    return any(Path(f) == data or data in Path(f).parents for f in cache.sources)


def _read(folder: Path) -> Cache:
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    unfinished = UNFINISHED.fullmatch(folder.name)
    if unfinished:
        state = BEING_BUILT if _held(folder.parent / f"{unfinished.group(1)}{LOCK}") else UNFINISHED_BUILD
        return Cache(folder, state, size, {}, (), None, None, None)
    try:
        meta = json.loads((folder / META).read_text())
        what, written = meta["what"], meta["files"]
        files = tuple(str(f) for f in what["files"])
        data = dict(what["data"])
        images = (int(meta["train"]), int(meta["test"]))
    except (OSError, ValueError, KeyError, TypeError):
        return Cache(folder, DAMAGED, size, {}, (), None, _time(folder), _used(folder))
    if not all(os.path.exists(f) for f in files):
        state = SOURCES_GONE
    elif not all(_stamp(folder / f) == stamp for f, stamp in written.items()):
        state = DAMAGED
    else:
        state = READY
    return Cache(folder, state, size, data, files, images, _time(folder / META), _used(folder))


def _stamp(path: Path) -> list[int] | None:
    try:
        state = path.stat()
    except OSError:
        return None
    return [state.st_size, state.st_mtime_ns]


def _time(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _used(folder: Path) -> float | None:
    return _time(folder.parent / f"{folder.name}{IN_USE}")


def _held(lock: Path) -> bool:
    """Whether a process holds the lock file `lock` (False where it is missing or cannot be read)."""
    try:
        with _exclusively(lock, "r") as got:
            return not got
    except OSError:
        return False


@contextmanager
def _exclusively(path: Path, mode: str = "a+") -> Iterator[bool]:
    """An exclusive lock on `path` (made if missing, in mode "a+"; an OSError if it cannot be) while in the
    block, unless another process holds one: whether it was got (True where the file system has no locks:
    none is held)."""
    with open(path, mode) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError:
            yield True
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove(cache: Cache) -> str | None:
    """Delete `cache`'s folder unless a process builds or reads it: None when deleted, else why not (an
    OSError naming the file when it cannot be). Its lock files stay (empty): a process may wait on one."""
    name = cache.name[:20]
    root = cache.folder.parent
    with _exclusively(root / f"{name}{LOCK}") as building_free:
        if not building_free:
            return "being built"
        if UNFINISHED.fullmatch(cache.name):  # no process reads a build's temporary folder
            shutil.rmtree(cache.folder)
            return None
        with _exclusively(root / f"{name}{IN_USE}") as reading_free:  # made for an older cache: a process
            if not reading_free:  # may start to read it now
                return "in use"
            shutil.rmtree(cache.folder)
    return None
