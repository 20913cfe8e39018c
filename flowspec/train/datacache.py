"""The prepared-data cache: a dataset decoded and prepared once, kept as memory-mappable uint8 `.npy` files.

A cache folder is named by what it holds (the source's files and the preparation) and records the files'
sizes and modification times: it is reused while they are unchanged and rebuilt when one changes. It is
built in a temporary folder and renamed into place, under a lock, so a killed build never leaves half a
cache and concurrent processes (torchrun) build it once. A process that reads a cache holds a shared lock on
its `.use` file (touched at each use) until it ends: `flowspec cache` (`caches.py`) removes no cache that is
read or built. Location: `FLOWSPEC_CACHE_DIR`, else a
`.flowspec-cache` folder beside the data when it (or, before it exists, the data's folder) is writable,
else `~/.cache/flowspec/prepared`.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from flowspec.errors import UserError
from flowspec.train.lock import holder_line, no_locks

FORMAT = 2  # bump when the files' layout or the preparation's meaning changes (2: numbered class folders)
META = "meta.json"
IN_USE = ".use"  # beside a cache folder: shared-locked by every process that reads it, touched at each use
LOCK = ".lock"  # beside a cache folder: held by the process that builds it
_reading: dict[Path, Any] = {}  # the IN_USE files this process holds, kept open (and locked) until it ends


def _read_from(path: Path) -> None:
    """Mark the cache of the IN_USE file `path` as read by this process until it ends (a shared lock, under
    which `flowspec cache` removes no cache; the file is never deleted) and as used now (its modification
    time). Best effort: where files cannot be locked or written, the cache is read all the same."""
    if path in _reading:
        return
    try:
        handle = open(path, "a+")
    except OSError:
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_SH)
        os.utime(handle.fileno())
    except OSError:
        pass
    _reading[path] = handle


def release_reads() -> None:
    """Let go of every cache this process marked as read (`_read_from`), as its end does: for a process
    done with its data that goes on, such as a test run."""
    for handle in _reading.values():
        handle.close()
    _reading.clear()


def cache_root(near: Path) -> Path:
    """Where prepared datasets of data at `near` (a folder or file) are kept."""
    override = os.environ.get("FLOWSPEC_CACHE_DIR")
    if override:
        return Path(override)
    folder = near if near.is_dir() else near.parent
    beside = folder / ".flowspec-cache"
    if os.access(beside if beside.exists() else folder, os.W_OK | os.X_OK):  # e.g. made by another user
        return beside
    return default_root()


def default_root() -> Path:
    """Where prepared datasets are kept when not beside the data: FLOWSPEC_CACHE_DIR, else the user's
    cache folder."""
    override = os.environ.get("FLOWSPEC_CACHE_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flowspec" / "prepared"


def digest(value: Any) -> str:
    """A SHA-256 hex digest of a JSON-able value (keys sorted, anything else by its `str`)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def cached(root: Path, what: dict[str, Any], stamp: Any, build: Callable[[Path], dict[str, Any]]) -> Path:
    """The cache folder for `what`, built by `build(folder)` unless a current one exists.

    `what` names the content (source paths and preparation), `stamp` the sources' state (sizes, times);
    `build` fills the (temporary) folder and returns facts recorded in its meta.json.
    """
    name = digest({"format": FORMAT, **what})[:20]
    final = root / name
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        advice = "to another folder" if os.environ.get("FLOWSPEC_CACHE_DIR") else "to a writable folder"
        raise UserError(
            f"cannot create the data cache folder {root}: {error.strerror}; set FLOWSPEC_CACHE_DIR {advice}"
        ) from None
    _read_from(root / f"{name}{IN_USE}")
    stamp_digest = digest(stamp)
    if _current(final, stamp_digest):
        return final
    with _locked(root / f"{name}{LOCK}", final):
        if _current(final, stamp_digest):  # another process built it while we waited
            return final
        for stale in root.glob(f"{name}.tmp-*"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f"{name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            facts = build(tmp)
            written = {f.name: _file_stamp(f) for f in tmp.iterdir()}
            (tmp / META).write_text(
                json.dumps({"stamp": stamp_digest, "what": what, "files": written, **facts}, default=str)
                + "\n"
            )
        except BaseException as error:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(error, OSError) and _writing(error, tmp):
                raise _unwritable(root, error) from None
            raise
        if final.exists():
            old = root / f"{name}.tmp-{os.getpid()}-old"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    return final


def _writing(error: OSError, tmp: Path) -> bool:
    """Whether `error` came from writing the cache in `tmp` (not from reading a source file it names)."""
    return error.filename is None or Path(os.fsdecode(error.filename)).is_relative_to(tmp)


def _unwritable(root: Path, error: OSError) -> UserError:
    """The error for a failed write in the cache folder `root` (a full disk, a file-size limit, ...)."""
    why = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return UserError(
            f"no room for the prepared data in {root} ({why}): free space there, or set FLOWSPEC_CACHE_DIR "
            f"to another folder"
        )
    return UserError(
        f"cannot write the prepared data in {root} ({why}): set FLOWSPEC_CACHE_DIR to another folder"
    )


def _file_stamp(path: Path) -> list[int]:
    """A cache file's size and modification time: a write to it, in place or by replacing it, changes them."""
    state = path.stat()
    return [state.st_size, state.st_mtime_ns]


def _current(folder: Path, stamp_digest: str) -> bool:
    """Whether `folder` holds a finished cache of the sources as they are now, its files as they were
    written (a file truncated, overwritten, replaced or deleted since makes it be rebuilt; so does a cache
    from before the files' times were recorded)."""
    try:
        meta = json.loads((folder / META).read_text())
        written = meta["files"]
        return (
            meta["stamp"] == stamp_digest
            and bool(written)
            and all(_file_stamp(folder / f) == stamp for f, stamp in written.items())
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


@contextmanager
def _locked(path: Path, folder: Path) -> Iterator[None]:
    """Hold the lock `path` on preparing `folder`; when another process holds it, say so (unless quiet) and
    wait for it."""
    try:
        handle = open(path, "a+")
    except OSError as error:
        raise UserError(f"cannot write to the data cache folder {path.parent}: {error.strerror}") from None
    with handle:
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if SHOW_PROGRESS.get():
                    handle.seek(0)
                    holder = handle.read(200).strip() or "another process"
                    print(f"waiting for {holder}, which prepares {folder}", file=sys.stderr, flush=True)
                fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            raise no_locks(path, "set FLOWSPEC_CACHE_DIR to a folder on a local disk") from None
        try:
            handle.truncate(0)
            os.pwrite(handle.fileno(), holder_line().encode(), 0)  # unbuffered: close cannot fail on it again
        except OSError as error:
            raise _unwritable(path.parent, error) from None
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


#: whether the preparation shows its progress (`train --quiet` turns it off)
SHOW_PROGRESS: ContextVar[bool] = ContextVar("show_progress", default=True)


@contextmanager
def quietly(quiet: bool = True) -> Iterator[None]:
    """Prepare data without progress output while in the block (when `quiet`)."""
    token = SHOW_PROGRESS.set(not quiet)
    try:
        yield
    finally:
        SHOW_PROGRESS.reset(token)


class Progress:
    """A rich progress bar on a terminal (stderr), else a line at the start and one at the end; nothing
    inside `quietly()`."""

    def __init__(self, title: str, total: int):
        self.title, self.total = title, total
        self._bar = None
        self._shown = SHOW_PROGRESS.get()
        if not self._shown:
            return
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(
                "[bold]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._task = self._bar.add_task(title, total=total)
            self._bar.start()
        else:
            print(f"{title}: {total} images ...", file=sys.stderr, flush=True)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def close(self, message: str = "") -> None:
        """Stop the bar; print `message` (nothing when the work failed)."""
        if self._bar is not None:
            self._bar.stop()
        if message and self._shown:
            print(message, file=sys.stderr, flush=True)
