"""Differences between two resolved specs, setting by setting, and what they change in parameters."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from flowspec.document import SCHEDULE_ARGS, SCHEDULE_KIND_ARGS
from flowspec.formatter import schedule_text, setting_text
from flowspec.inspection.report import Report
from flowspec.nodes import StepNode
from flowspec.resolve import OVERRIDE_FILE
from flowspec.spec import CouplingSettings, DataSpec, FlowSpec, Interval, SourceLoc, TrainSpec
from flowspec.steps import KINDS, kind_of
from flowspec.steps.coupling import unused_settings

if TYPE_CHECKING:
    from rich.console import Group


@dataclass(frozen=True)
class Difference:
    """One setting (or whole node) that differs; `None` on a side where it does not exist."""

    path: str
    a: str | None
    b: str | None
    source_a: str | None
    source_b: str | None


@dataclass(frozen=True)
class StageDelta:
    """Parameters of one stage (a top-level step of a branch, or a branch total) in A and in B."""

    stage: str
    a: int | None
    b: int | None

    @property
    def delta(self) -> int:
        return (self.b or 0) - (self.a or 0)


def describe(value: Any) -> str:
    """A short text for a value or a whole node: a step by its kind and count, a list by its length."""
    if isinstance(value, StepNode):
        kind = kind_of(value)
        return f"{kind.name} {kind.label(value)} ({_steps(len(value.body))})" if kind.body else kind.name
    if isinstance(value, BaseModel):
        kind = getattr(value, "kind", None)
        return str(kind) if kind is not None else type(value).__name__
    if isinstance(value, list):
        return _steps(len(value))
    return setting_text("", value)


def _steps(count: int) -> str:
    return f"{count} step" if count == 1 else f"{count} steps"


#: Settings written after a step's head word, before the others (each kind's first positional setting), and
#: that word: `coupling mixlogistic`, `split stripe`.
HEAD_WORDS = {kind.positional[0]: name for name, kind in KINDS.items() if kind.positional}
#: Spec fields the language names otherwise (as `--set` accepts them).
KEY_WORDS = {
    "name": "model",
    "train.hflip": "train.augment",
    "train.eval_every": "train.eval",
    "train.save_every": "train.save",
}


def setting_words(path: str, value: Any) -> tuple[str, str]:
    """A differing setting's key and value as the language writes them (`setting_text`): `train.ema` `off`,
    not `None`; `defaults.coupling` `coupling affine`, not `defaults.coupling.coupling` `affine`."""
    parent, _, field = path.rpartition(".")
    text = "(the train batch)" if path == "eval.batch" and value is None else setting_text(path, value)
    if parent and field in HEAD_WORDS and (parent[-1].isdigit() or parent == "defaults.coupling"):
        return parent, f"{HEAD_WORDS[field]} {text}"
    return KEY_WORDS.get(path, path), text


def _loc(node: Any, inherited: SourceLoc | None) -> SourceLoc | None:
    """Where `node` was written, else `inherited`."""
    loc = getattr(node, "source", None)
    return loc if isinstance(loc, SourceLoc) else inherited


def _file_names(files: set[str]) -> dict[str, str]:
    """Each file's name with as many of its folders as tell it apart from the other files (`r1/spec.flow`
    beside `r2/spec.flow`); two names of one file are one file."""
    parts = {file: Path(os.path.abspath(file)).parts for file in files}
    names = {}
    for file, own in parts.items():
        others = [p for p in parts.values() if p != own]
        n = 1
        while n < len(own) and any(p[-n:] == own[-n:] for p in others):
            n += 1
        names[file] = str(Path(*own[-n:]))
    return names


def _idle(x: BaseModel, y: BaseModel, path: str) -> set[str]:
    """The settings of two nodes of one type left out of their differences, as `show` leaves them out: the
    coupling settings unused on both sides (but a dequantizer coupling's dropout, its context network's
    too), the schedule arguments unless both sides run one schedule that takes them (a schedule that
    differs is worded with its arguments: `schedule_text`), classes named on one side and numbered on the
    other (`dog`, `5`)."""
    if isinstance(x, DataSpec) and isinstance(y, DataSpec):
        return {"classes"} if x.classes != y.classes and x.class_keys == y.class_keys else set()
    if isinstance(x, CouplingSettings) and isinstance(y, CouplingSettings):
        unused = set(unused_settings(x.coupling, x.network, x.attention))
        unused &= set(unused_settings(y.coupling, y.network, y.attention))
        return unused - {"dropout"} if path.startswith("dequantize") else unused
    if isinstance(x, TrainSpec) and isinstance(y, TrainSpec):
        taken = SCHEDULE_KIND_ARGS.get(x.schedule, ()) if x.schedule == y.schedule else ()
        return {field for arg, field in SCHEDULE_ARGS.items() if arg not in taken}
    return set()


def _latest(sources: dict[str, SourceLoc | str], paths: list[str]) -> SourceLoc | str | None:
    """Where the last of `paths` was written: a `--set` after the files, a later `--set` after an earlier
    one (an interval's `count` or `unit` may be set apart from it: `--set train.length.count=16`)."""
    found = [sources[path] for path in paths if path in sources]
    return max(
        found, key=lambda loc: loc.line if getattr(loc, "file", None) == OVERRIDE_FILE else 0, default=None
    )


def spec_differences(
    a: FlowSpec,
    b: FlowSpec,
    sources_a: dict[str, SourceLoc | str] | None = None,
    sources_b: dict[str, SourceLoc | str] | None = None,
) -> list[Difference]:
    """Every setting that differs between `a` and `b`, in the order of the spec, worded as the language
    writes it (`setting_words`). With `sources_*` (`loader.setting_sources`), a setting's location is
    where that side wrote it, or `default`; without, the location of the step that holds it."""

    def source(
        sources: dict[str, SourceLoc | str] | None, path: str, step: SourceLoc | None, interval: bool
    ) -> SourceLoc | str | None:
        if sources is None:
            return step
        loc = _latest(sources, [path, f"{path}.count", f"{path}.unit"] if interval else [path])
        return "default" if loc is None else loc

    out: list[tuple[str, str | None, str | None, SourceLoc | str | None, SourceLoc | str | None]] = []

    def compare(x: Any, y: Any, path: str, src_a: SourceLoc | None, src_b: SourceLoc | None) -> None:
        src_a, src_b = _loc(x, src_a), _loc(y, src_b)
        if isinstance(x, BaseModel) and type(x) is type(y) and not isinstance(x, Interval):
            idle = _idle(x, y, path)
            for name in (n for n in type(x).model_fields if n != "source" and n not in idle):
                x_value, y_value = getattr(x, name), getattr(y, name)
                if isinstance(x, TrainSpec) and name == "schedule" and x_value != y_value:
                    x_value, y_value = schedule_text(x), schedule_text(y)  # with the arguments it takes
                compare(x_value, y_value, f"{path}.{name}" if path else name, src_a, src_b)
        elif isinstance(x, list) and isinstance(y, list):
            for i in range(max(len(x), len(y))):
                xi = x[i] if i < len(x) else None
                yi = y[i] if i < len(y) else None
                if xi is None or yi is None:
                    out.append(
                        (
                            f"{path}.{i}",
                            None if xi is None else describe(xi),
                            None if yi is None else describe(yi),
                            _loc(xi, None),
                            _loc(yi, None),
                        )
                    )
                else:
                    compare(xi, yi, f"{path}.{i}", src_a, src_b)
        elif x != y:
            interval = isinstance(x, Interval) or isinstance(y, Interval)
            where_a, where_b = (
                source(sources_a, path, src_a, interval),
                source(sources_b, path, src_b, interval),
            )
            if any(isinstance(v, BaseModel) and not isinstance(v, Interval) for v in (x, y)):
                out.append((path, describe(x), describe(y), where_a, where_b))  # a whole node
            else:
                key, text_a = setting_words(path, x)
                out.append((key, text_a, setting_words(path, y)[1], where_a, where_b))

    compare(a, b, "", None, None)
    names = _file_names({w.file for row in out for w in row[3:] if isinstance(w, SourceLoc)})

    def shown(where: SourceLoc | str | None) -> str | None:  # `file:line`, the file named apart
        return f"{names[where.file]}:{where.line}" if isinstance(where, SourceLoc) else where

    return [Difference(key, x, y, shown(where_a), shown(where_b)) for key, x, y, where_a, where_b in out]


def _alike(a: FlowSpec, b: FlowSpec) -> bool:
    """Whether two specs are equal, classes named on one side and numbered on the other (`dog`, `5`: one
    CIFAR-10 class, no difference to `_idle`) counted as the same."""
    if a.data.classes != b.data.classes and a.data.class_keys == b.data.class_keys:
        b = b.model_copy(update={"data": b.data.model_copy(update={"classes": a.data.classes})})
    return a == b


def parameter_deltas(a: Report, b: Report) -> list[StageDelta]:
    """Parameters per stage (top-level steps of each branch, then the branch) in A and B, and the total."""
    rows: list[StageDelta] = []
    for branch_a, branch_b in zip(a.branches, b.branches, strict=False):
        tops_a = {row.path: row for row in branch_a.rows}
        tops_b = {row.path: row for row in branch_b.rows}
        for path in dict.fromkeys([*tops_a, *tops_b]):
            ra, rb = tops_a.get(path), tops_b.get(path)
            kinds = list(dict.fromkeys(row.kind for row in (ra, rb) if row is not None))
            kind = " -> ".join(kinds)  # `split -> factor_out`: other steps at the same place
            name = path if kinds[0] in ("context", "preprocess") else f"{path} {kind}"
            rows.append(StageDelta(name, ra.params if ra else None, rb.params if rb else None))
        rows.append(StageDelta(f"{branch_a.name} (all)", branch_a.params, branch_b.params))
    rows.append(StageDelta("total", a.total, b.total))
    return rows


def _written_at(d: Difference) -> str:
    """`file:line`, once when both sides wrote the setting at the same place (files of one name are told
    apart by their folders: `_file_names`), else `A / B`."""
    return d.source_a or "" if d.source_a == d.source_b else f"{d.source_a or '-'} / {d.source_b or '-'}"


def _longest_word(texts: list[str]) -> int:
    return max((len(word) for text in texts for word in text.split()), default=0)


class SettingsView:
    """The differing settings: a table where it fits with no word broken, else one block per setting
    (its key, then A and B, each with where that side wrote it)."""

    def __init__(self, diffs: list[Difference]):
        self.diffs = diffs

    def __rich_console__(self, console, options):
        from rich.table import Table
        from rich.text import Text

        cells = [(d.path, d.a or "-", d.b or "-", _written_at(d)) for d in self.diffs]
        heads = ("setting", "A", "B", "written at (A / B)")
        key_width = max(len(c[0]) for c in [heads, *cells])
        words = [max(len(heads[i].split()[0]), _longest_word([c[i] for c in cells])) for i in (1, 2, 3)]
        if key_width + sum(words) + 6 <= options.max_width:
            table = Table(box=None, pad_edge=False, header_style="bold")
            table.add_column(heads[0], no_wrap=True)
            for head, width in zip(heads[1:], words, strict=True):
                table.add_column(head, min_width=width)  # wraps at spaces only
            for row in cells:
                table.add_row(*map(Text, row))  # Text: file names are not markup
            yield table
            return
        for d in self.diffs:
            yield Text(d.path, style="bold")
            for side, value, where in (("A", d.a, d.source_a), ("B", d.b, d.source_b)):
                line = Text(f"  {side}  {value or '-'}")
                if where:
                    line.append(f"  ({where})", style="dim")
                yield line


def render_diff(
    a: FlowSpec,
    b: FlowSpec,
    report_a: Report,
    report_b: Report,
    sources_a: dict[str, SourceLoc | str] | None = None,
    sources_b: dict[str, SourceLoc | str] | None = None,
) -> Group:
    """A rich renderable: the differing settings (located with `sources_*`, see `spec_differences`), then
    the parameter deltas by stage."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    name_a, name_b = a.source or a.name, b.source or b.name
    diffs = spec_differences(a, b, sources_a, sources_b)
    params = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("parameters", "A", "B", "delta"):
        params.add_column(column, justify="left" if column == "parameters" else "right", no_wrap=True)
    for s in parameter_deltas(report_a, report_b):
        params.add_row(
            s.stage,
            "-" if s.a is None else f"{s.a:,}",
            "-" if s.b is None else f"{s.b:,}",
            f"{s.delta:+,}" if s.delta else "0",
            style="bold" if s.stage == "total" else None,
        )
    head = Text.assemble(("A ", "bold"), name_a, ("   B ", "bold"), name_b)
    equal = "the specs are equal" if _alike(a, b) else "the specs differ only in settings they do not use"
    count = {0: equal, 1: "1 setting differs"}.get(len(diffs), f"{len(diffs)} settings differ")
    return Group(head, Text(count), *([SettingsView(diffs)] if diffs else []), Text(""), params)
