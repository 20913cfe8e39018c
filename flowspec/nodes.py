"""Base classes of the validated spec's pydantic models: source locations, frozen nodes, steps."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class SourceLoc(BaseModel):
    """Where a spec node was written: file, 1-based line and column."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    @property
    def short(self) -> str:
        """`name.flow:12`: the file's name and the line, as `inspect` and `diff` show them."""
        return f"{Path(self.file).name}:{self.line}"


class Node(BaseModel):
    """Base of all spec nodes: frozen, strict about unknown fields, equal by value (not by source)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.model_dump() == other.model_dump()  # type: ignore[union-attr]

    __hash__ = None  # type: ignore[assignment]


class StepNode(Node):
    """Base of the validated settings of a step; each kind adds `kind: Literal[NAME]` and its settings."""

    source: SourceLoc | None = Field(default=None, exclude=True, repr=False)


class Conflict(ValueError):
    """A check between settings of one node that fails: `fields` names the settings it reads, so that the
    error blames where one of them was written (a `--set` of another setting of the node is not to blame)."""

    def __init__(self, message: str, *fields: str):
        super().__init__(message)
        self.fields = fields
