"""Errors a user can cause. The CLI prints their message and exits with code 2, never a traceback."""

from __future__ import annotations

import errno
import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class UserError(Exception):
    """A mistake the user can fix (bad spec, missing data, corrupt checkpoint, bad option).

    `str(error)` is the complete, human-readable message: it names the file (with line and column
    where there is one) or the path involved, and says what to do.
    """

    exit_code = 2


def check_bool(value: object, name: str, error: type[Exception] = UserError) -> None:
    """An `error` naming `name` unless `value` is True or False: a truthy `"no"` or `1` would read as True."""
    if not isinstance(value, bool):
        raise error(f"{name} must be True or False, got {value!r}")


#: what a process of a torchrun job says when another process of the job stopped (on its own error)
PEER_STOPPED = (
    "another process of this torchrun job stopped, so this one cannot go on; the first process to stop "
    "(usually rank 0) says why, above"
)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be so that the same clean-up runs; the CLI exits with 143."""


class RunStopped(KeyboardInterrupt):
    """`flowspec.train` stopped by Ctrl-C or SIGTERM after saving `last.pt`: raised to the caller (a loop of
    runs in a script or notebook stops too); `result` is the run's `RunResult`."""

    def __init__(self, result: Any):
        super().__init__(f"{result.stopped}: stopped after step {result.step}; saved in {result.run_dir}")
        self.result = result


class Interrupted(UserError):
    """A command stopped by Ctrl-C (exit 130) or SIGTERM (exit 143); the message says what was kept."""

    def __init__(self, kept: str, terminated: bool = False):
        super().__init__(f"{'terminated (SIGTERM)' if terminated else 'interrupted (Ctrl-C)'}; {kept}")
        self.exit_code = 143 if terminated else 130


def shell_command(*words: object) -> str:
    """A command line for the user to paste: each word shell-quoted (`--resume 'my run'`)."""
    return " ".join(shlex.quote(str(word)) for word in words)


def job_number(name: str, default: int) -> int:
    """A number torchrun gives its workers (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`), or
    `default` where it is unset or empty; another value (a size below 1) is a `UserError` naming it."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    least = 1 if name.endswith("WORLD_SIZE") else 0
    if not value.isdecimal() or int(value) < least:
        raise UserError(
            f"the environment variable {name}={value!r} is not a whole number >= {least}: torchrun sets it "
            f"for its workers; outside torchrun unset it (unset {name})"
        )
    return int(value)


def torchrun_worker() -> bool:
    """Whether torchrun started this process (it gives each worker a LOCAL_RANK; an empty one is none)."""
    return bool(os.environ.get("LOCAL_RANK", "").strip())


def flowspec_command(*words: object) -> str:
    """`flowspec WORDS` for the user to paste, started as this process was: under a torchrun job of several
    processes by torchrun with as many (a job of several machines: on each, with the job's rendezvous
    options), so that a resumed run goes on as the uninterrupted one would."""
    world = job_number("WORLD_SIZE", 1)
    if world < 2:
        return shell_command("flowspec", *words)
    local = job_number("LOCAL_WORLD_SIZE", world)
    if local == world:
        return shell_command("torchrun", "--nproc_per_node", world, "-m", "flowspec", *words)
    nodes = os.environ.get("GROUP_WORLD_SIZE") or world // local
    command = shell_command(
        "torchrun", "--nnodes", nodes, "--nproc_per_node", local, "-m", "flowspec", *words
    )
    return f"{command} (on every node, with the job's rendezvous options)"


def os_error_message(error: OSError, doing: str | None = None) -> str:
    """One line for an operating-system error on a path: `no space left writing PATH`, `permission
    denied writing PATH`, ... (`doing`: what was being done; default: what `naming` recorded, else
    `accessing`)."""
    doing = doing or getattr(error, "doing", "accessing")
    path = error.filename if error.filename is not None else "a file"
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    reasons = {
        errno.ENOSPC: "no space left",
        errno.EDQUOT: "disk quota exceeded",
        errno.EFBIG: "file too large",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EROFS: "read-only file system",
        errno.EISDIR: "is a directory:",
        errno.ENOTDIR: "not a directory:",
        errno.ENAMETOOLONG: "file name too long:",
    }
    reason = reasons.get(error.errno)
    if reason is None:
        return f"error {doing} {path}: {error.strerror or error}"
    if reason.endswith(":"):
        return f"{reason[:-1]} while {doing} {path}"
    limit = " (a file-size limit: the file system's, or `ulimit -f`)" if error.errno == errno.EFBIG else ""
    return f"{reason} {doing} {path}{limit}"


def named_error(error: OSError, path: str | os.PathLike[str], doing: str = "writing") -> OSError:
    """`error` as an `OSError` on `path` (the file the user knows, not a temporary one), `doing` it."""
    named = OSError(error.errno, error.strerror or str(error), os.fspath(path))
    named.doing = doing  # type: ignore[attr-defined]
    return named


@contextmanager
def naming(path: str | os.PathLike[str], doing: str = "writing") -> Iterator[None]:
    """Give an `OSError` raised while writing (or `doing`) `path` the file's name (a failed write to an open
    file, e.g. a full disk, has none) and what was being done, so that its message can say both. A
    `RuntimeError` raised over one (torch's checkpoint writer reports a full disk so) is that `OSError`."""
    try:
        yield
    except OSError as error:
        if error.filename is None:
            raise named_error(error, path, doing) from error
        if not hasattr(error, "doing"):
            error.doing = doing  # type: ignore[attr-defined]
        raise
    except RuntimeError as error:
        cause = error.__cause__ or error.__context__
        if not (isinstance(cause, OSError) and any(mark in str(error) for mark in TORCH_WRITER)):
            raise
        raise named_error(cause, path, doing) from error


#: what torch's checkpoint writer says when a write under it failed
TORCH_WRITER = ("inline_container", "PytorchStreamWriter", "file write failed")


def one_process(command: str) -> None:
    """Refuse `command` in a torchrun job of several processes: each would run it whole (eval prints
    everything once per process, sample draws a grid with a seed of its own, both write the same file)."""
    world = job_number("WORLD_SIZE", 1)
    if world > 1:
        raise UserError(
            f"{command} runs in one process: run it without torchrun (each of this job's {world} processes "
            f"would run it whole and write the same file)"
        )
