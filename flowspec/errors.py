"""Errors a user can cause. The CLI prints their message and exits with code 2, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad spec, missing data, corrupt checkpoint, bad option).

    `str(error)` is the complete, human-readable message: it names the file (with line and column
    where there is one) or the path involved, and says what to do.
    """

    exit_code = 2
