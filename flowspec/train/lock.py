"""One process per run folder: an exclusive lock, and clean-up of what a killed writer left behind.

The lock is `fcntl.flock` on `RUN_DIR/.lock`, which holds the holder's pid and host. The kernel drops a
flock when its process dies, however it dies, so a lock file left by a dead process never blocks: only
a live holder does. Once the folder is accepted (a new run, or one to resume), the holder removes the
temporary files of its own kind of writes that a killed process did not finish (`.last.pt.*.tmp.pt` and
the like): nobody else can be writing them. Other files are never touched (an `eval` writing its JSON
into the folder meanwhile, the user's own `*.tmp` files).
"""

from __future__ import annotations

import fcntl
import os
import socket
from datetime import datetime
from pathlib import Path

from flowspec.errors import UserError, naming

LOCK = ".lock"
WRITE_ONE = "two processes cannot write one run; wait for it to finish (or stop it)"
WRITERS = f"{WRITE_ONE}, or choose another --out folder"  # for a new run or ablation
FIRST_CHECKPOINT = "it has not written its first checkpoint yet; wait for that (or stop it)"  # for readers
_HELD: set[str] = set()  # the folders this process holds: `check_free` passes them (no other process has)
#: the temporary names of what a run or an ablation writes: `save_atomic` and `replaced_whole` (checkpoints,
#: a nonfinite batch, the spec files, sample grids, the ablation's plan and table), `truncate_metrics` and
#: `plot_curves`
STALE = (
    ".last.pt.*.tmp.pt",
    ".best.pt.*.tmp.pt",
    ".nonfinite_batch*.pt.*.tmp.pt",
    ".spec.json.*.tmp.json",
    ".spec.flow.*.tmp.flow",
    "samples/.step*_t*.png.*.tmp.png",
    ".ablation-plan.json.*.tmp.json",
    ".ablation.json.*.tmp.json",
    "metrics.jsonl.tmp",
    ".curves.tmp.png",
)


def holder_line() -> str:
    """Who holds a lock: this process's pid and host, and since when."""
    return f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now():%c}\n"


def no_locks(path: Path, advice: str) -> UserError:
    """The error for a file system without `flock` (Lustre without `-o flock`, NFS without lockd)."""
    return UserError(
        f"cannot lock {path}: the file system does not support file locks (flock), which keep two "
        f"processes from writing one folder; {advice}"
    )


class RunLock:
    """The exclusive lock on a run folder, taken on construction (a `UserError` naming the holder when
    another live process has it) and held until `release()` or the end of the process. `created`: whether
    this lock made the lock file. With `clean` (a folder accepted before it is locked), `remove_stale` runs
    at once."""

    def __init__(self, run_dir: Path, clean: bool = True):
        self.run_dir = Path(run_dir)
        path = self.run_dir / LOCK
        self.fd: int | None = None
        while self.fd is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.created = not path.exists()
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise _in_use(self.run_dir, holder, WRITERS) from None
            except OSError:
                os.close(fd)
                if self.created:
                    path.unlink(missing_ok=True)
                raise no_locks(path, "choose an --out folder on a local disk") from None
            if _same_file(fd, path):
                self.fd = fd
                _HELD.add(os.path.realpath(self.run_dir))
            else:  # removed by the run that held it (an empty folder of a run that failed): again
                os.close(fd)
        with naming(path):  # a full disk fails here first
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, holder_line().encode(), 0)
        if clean:
            self.remove_stale()

    def remove_stale(self) -> list[Path]:
        """Delete the temporary files of unfinished writes (once the folder is accepted); those deleted."""
        stale = sorted({p for pattern in STALE for p in self.run_dir.glob(pattern) if p.is_file()})
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def release(self, refused: bool = False) -> None:
        """Unlock; when `refused` (the folder was not taken), remove the lock file if this lock made it."""
        if self.fd is not None:
            if refused and self.created:
                (self.run_dir / LOCK).unlink(missing_ok=True)  # one waiting then locks a new file
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
            _HELD.discard(os.path.realpath(self.run_dir))

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_free(run_dir: Path, advice: str = WRITE_ONE) -> None:
    """A `UserError` naming the holder (and ending with `advice`) when another live process holds the run
    folder's lock (before reading what it is still writing); creates nothing. On a file system without locks
    nobody can hold one."""
    if os.path.realpath(run_dir) in _HELD:  # this process (a run reading its own folder)
        return
    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY)
    except OSError:  # no lock file (or none readable): nobody has held it, or RunLock will say
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(Path(run_dir), _holder(fd), advice) from None
    except OSError:
        pass
    finally:
        os.close(fd)  # drops a shared lock taken here


def _holder(fd: int) -> str:
    return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"


def _in_use(run_dir: Path, holder: str, advice: str) -> UserError:
    return UserError(f"run folder {run_dir} is in use by {holder}: {advice}")


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False
