"""One process per run folder: an exclusive lock, and clean-up of what a killed writer left behind.

The lock is `fcntl.flock` on `RUN_DIR/.lock`, which holds the holder's pid and host. The kernel drops a
flock when its process dies, however it dies, so a lock file left by a dead process never blocks: only
a live holder does. Taking the lock also removes the temporary files of writes a killed process did not
finish (`.last.pt.*.tmp` and the like): nobody else can be writing them.
"""

from __future__ import annotations

import fcntl
import os
import socket
from datetime import datetime
from pathlib import Path

from flowspec.errors import UserError, naming

LOCK = ".lock"
#: what `save_atomic`, `replaced_whole`, `truncate_metrics` and `plot_curves` write first
STALE = (".*.tmp", "*.tmp", ".*.tmp.*", "samples/.*.tmp.*")


class RunLock:
    """The exclusive lock on a run folder, taken on construction (a `UserError` naming the holder when
    another live process has it) and held until `release()` or the end of the process."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        path = self.run_dir / LOCK
        self.fd: int | None = None
        while self.fd is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise _in_use(self.run_dir, holder) from None
            if _same_file(fd, path):
                self.fd = fd
            else:  # removed by the run that held it (an empty folder of a run that failed): again
                os.close(fd)
        with naming(path):  # a full disk fails here first
            os.ftruncate(self.fd, 0)
            os.pwrite(
                self.fd,
                f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now():%c}\n".encode(),
                0,
            )
        self.removed = remove_stale_files(self.run_dir)

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_free(run_dir: Path) -> None:
    """A `UserError` naming the holder when a live process holds the run folder's lock (before reading
    what it is still writing); creates nothing."""
    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY)
    except OSError:  # no lock file (or none readable): nobody has held it, or RunLock will say
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(Path(run_dir), _holder(fd)) from None
    finally:
        os.close(fd)  # drops a shared lock taken here


def _holder(fd: int) -> str:
    return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"


def _in_use(run_dir: Path, holder: str) -> UserError:
    return UserError(
        f"run folder {run_dir} is in use by {holder}: two processes cannot write one run; wait for it to "
        f"finish (or stop it), or choose another --out folder"
    )


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def remove_stale_files(run_dir: Path) -> list[Path]:
    """Delete the temporary files of unfinished writes in `run_dir` (call it only while holding its lock)."""
    stale = sorted({p for pattern in STALE for p in run_dir.glob(pattern) if p.is_file()})
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
