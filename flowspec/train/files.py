"""Files: checks on data files before they are opened (a FIFO or a device would block or never end), and
outputs written whole or not at all."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flowspec.errors import UserError, named_error, naming

#: the kinds of file that are not regular ones, by the `stat` test that tells them
KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def regular_file(path: Path, what: str = "data file") -> Path:
    """`path` if it is a readable regular file (links followed); a `UserError` naming it otherwise.

    Only `stat` is called: nothing is opened, so a FIFO or a device never blocks.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except OSError as error:
        raise UserError(f"cannot read {what} {path}: {error.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in KINDS if test(mode)), "not a regular file")
        raise UserError(f"{what} {path} is {kind}, not a regular file")
    if not os.access(path, os.R_OK):
        raise UserError(f"cannot read {what} {path}: permission denied")
    return path


def file_problem(path: Path | str) -> str | None:
    """Why `path` is not a regular file (links followed), said after its name: `does not exist`, `is a link
    to X, which does not exist`, `is a symlink loop`, `is a FIFO (named pipe), not a regular file`, ...;
    None when it is one. Only `stat` is called: nothing is opened, so a FIFO or a device never blocks."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"is a link to {os.path.realpath(path)}, which does not exist"
        return "does not exist"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symlink loop (a link that leads back to itself)"
        return f"cannot be looked at ({error.strerror})"
    if stat.S_ISREG(mode):
        return None
    return (
        f"is {next((name for test, name in KINDS if test(mode)), 'not a regular file')}, not a regular file"
    )


def stamps(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    """(path, size, modification time in ns) of each file: what a prepared cache is keyed by."""
    out = []
    for path in paths:
        info = os.stat(path)
        out.append((str(path), info.st_size, info.st_mtime_ns))
    return out


@contextmanager
def replaced_whole(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (the target of a link; same suffix) for the block to write; flushed
    to disk and renamed over `path` when the block ends, removed if it fails: a crash leaves the old file
    or the new one, never a part of one. The file gets the permissions a new file gets (the umask's)."""
    path = Path(os.path.realpath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    except OSError as error:  # it names the temporary file: name the one being written
        raise named_error(error, path) from None
    os.close(fd)
    try:
        with naming(path):
            yield Path(tmp)
            _settle(Path(tmp))
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _settle(path: Path) -> None:
    """Flush `path` to disk and give it a new file's permissions (`mkstemp` makes it owner-only)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
