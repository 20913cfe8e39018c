"""Spec errors that point at the line: `path:line:col: message`, the source line and a caret."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from flowspec.errors import UserError
from flowspec.nodes import SourceLoc

SHOWN_WIDTH = 100  # characters of a long source line shown under a message
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters but tab: none is in a line shown


@dataclass(frozen=True)
class Diagnostic:
    """One mistake in a spec: where it is (None when it has no place, e.g. a missing file) and what it is."""

    loc: SourceLoc | None
    message: str

    def render(self, texts: Mapping[str, str]) -> str:
        if self.loc is None:
            return self.message
        head = f"{self.loc}: {self.message}"
        text = texts.get(self.loc.file)
        lines = text.split("\n") if text is not None else []  # as the parser counts them
        if not 1 <= self.loc.line <= len(lines):
            return head
        line = CONTROL.sub("?", lines[self.loc.line - 1].rstrip().replace("\t", " "))
        col = self.loc.col
        if len(line) > SHOWN_WIDTH:  # a window of the line around the column
            start = max(0, min(col - 1 - SHOWN_WIDTH // 2, len(line) - SHOWN_WIDTH))
            line, col = line[start : start + SHOWN_WIDTH], col - start
        return f"{head}\n    {line}\n    {' ' * (col - 1)}^"


class SpecError(UserError):
    """Every mistake found in a spec, each rendered with its file, line, column, source line and caret."""

    def __init__(self, diagnostics: Iterable[Diagnostic], texts: Mapping[str, str] | None = None):
        unique: list[Diagnostic] = []
        for diagnostic in diagnostics:
            if diagnostic not in unique:
                unique.append(diagnostic)
        self.diagnostics = sorted(unique, key=_order)
        self.texts = dict(texts or {})
        super().__init__(self.render())

    def render(self) -> str:
        parts = [d.render(self.texts) for d in self.diagnostics]
        if len(parts) == 1:
            return parts[0]
        files = sorted({d.loc.file for d in self.diagnostics if d.loc is not None})
        where = f" in {', '.join(files)}" if files else ""
        return f"{len(parts)} errors{where}:\n" + "\n".join(parts)


def _order(d: Diagnostic) -> tuple:
    if d.loc is None:
        return ("", 0, 0)
    return (d.loc.file, d.loc.line, d.loc.col)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`; did you mean 'x'?` for the closest choice, or the list of valid choices when none is close."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    if len(choices) == 1:
        return f"; expected '{choices[0]}'"
    if choices:
        return "; expected one of " + ", ".join(f"'{c}'" for c in choices)
    return ""
