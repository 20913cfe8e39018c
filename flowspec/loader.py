"""Load a spec: read -> parse -> extends -> `--set` overrides -> defaults -> validate -> shape check.

Every mistake becomes a `SpecError` whose diagnostics point at the file, line and column where the
offending value was written (in an extended file, or in a `--set` option, where that is where it came from).
"""

from __future__ import annotations

import copy
import os
import re
import stat
import sys
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flowspec.diagnostics import Diagnostic, SpecError
from flowspec.document import SCHEDULE_ARGS, SCHEDULE_KIND_ARGS, RawDict, Word
from flowspec.errors import UserError, check_bool
from flowspec.parser import SECTION_KEYS, parse_document
from flowspec.resolve import (
    OVERRIDE_FILE,
    apply_defaults,
    apply_overrides,
    merge,
    override_key,
    unused_coupling_settings,
)
from flowspec.shapes import misplaced_sigmoids, shape_issues
from flowspec.spec import FlowSpec, SourceLoc, TrainSpec
from flowspec.steps import KINDS, kind_of, written
from flowspec.validation_errors import after_repair, locate, pydantic_diagnostics

__all__ = ["SpecError", "load_spec", "parse_spec", "read_spec_file", "setting_sources"]

MAX_SPEC_BYTES = 2**20  # a spec is a few kilobytes; this cap keeps a wrong path from filling memory
NOT_UTF8 = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, as `surrogateescape` keeps it
#: the first lines a run folder's spec.flow has had since it holds the resolved spec (`rundir.RESOLVED_HEADER`
#: now, `# resolved from PATH` before): without one, it may be an older flowspec's copy of the spec file
RESOLVED_HEADERS = ("# the resolved spec of a trained run", "# resolved from ")


#: files whose presence beside a spec.json that is not a flowspec spec still says the folder is a run's
RUN_EVIDENCE = ("last.pt", "metrics.jsonl")


def recorded_spec(folder: Path) -> FlowSpec | None:
    """The spec in `folder`'s spec.json when it is a flowspec spec (a run's), else None (another tool's
    file, a damaged one, one too large for a spec, one that is not a regular file)."""
    recorded = folder / "spec.json"
    try:
        status = recorded.stat()
        if not stat.S_ISREG(status.st_mode) or status.st_size > MAX_SPEC_BYTES:
            return None
        return FlowSpec.model_validate_json(recorded.read_bytes())
    except (OSError, ValueError):
        return None


def has_run_spec(folder: Path) -> bool:
    """Whether `folder` holds a run's spec.json: one that is a flowspec spec, or one that is not but beside
    a run's `last.pt` or `metrics.jsonl` (a run whose spec.json was damaged). Another tool's spec.json
    alone does not make a folder a run's."""
    if not (folder / "spec.json").is_file():
        return False
    if any((folder / name).exists() for name in RUN_EVIDENCE):
        return True
    return recorded_spec(folder) is not None


def is_run_spec(path: Path) -> bool:
    """Whether `path` is a run folder's spec.flow (`has_run_spec`). It is a spec that was valid when the
    run trained it, read as a checkpoint's stored spec is (the rules for spec files made since, and the
    unused settings check, apply only to what --set changes). A copy elsewhere, or a user's own spec.flow
    beside another tool's spec.json, is a spec file like any."""
    return path.name == "spec.flow" and has_run_spec(path.parent)


def older_run_spec(path: Path) -> FlowSpec | None:
    """For a run folder's spec.flow that a flowspec before the resolved spec files wrote, a copy of the spec
    file its run started from (without the run's `--set` overrides; an `extends` relative to where that
    file was) that does not resolve to the spec the run trained: that spec, from the run's spec.json.
    None for any other spec file, and for a copy that does resolve to it."""
    if not is_run_spec(path):
        return None
    try:
        text = read_spec_file(path)
    except SpecFileError:  # `_load` says why
        return None
    if text.startswith(RESOLVED_HEADERS):
        return None
    recorded = path.parent / "spec.json"
    stored = recorded_spec(path.parent)
    if stored is None:  # a run's (`is_run_spec`: its last.pt or metrics.jsonl), damaged
        raise UserError(
            f"{path} may be an older flowspec's copy of the spec file its run started from (without the "
            f"run's --set overrides), and {recorded}, the spec the run trained, cannot be read to tell: pass "
            f"the spec file the run started from, with the --set options it was trained with"
        )
    try:
        copied = _finish(_load(path, {}, chain=(), at=None), (), {}, source=None, file_rules=False)
    except SpecError:  # an `extends` that names a file beside the original, a rule of a newer flowspec
        return stored
    return None if copied.model_dump_json() == stored.model_dump_json() else stored


def _older_note(path: Path) -> None:
    print(
        f"note: {path} was written by an older flowspec: it is a copy of the spec file the run started from, "
        f"without the run's --set overrides; reading the spec the run trained from "
        f"{path.parent / 'spec.json'}",
        file=sys.stderr,
        flush=True,
    )


def load_spec(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> FlowSpec:
    """Load, resolve and validate the spec file at `path`, with `KEY=VALUE` overrides applied. A run
    folder's spec.flow that an older flowspec copied from the spec file it started from (`older_run_spec`)
    is read from the run's spec.json instead, with a note.

    Raises `SpecError` (a `UserError`) listing every mistake with its file, line and column.
    """
    stored = older_run_spec(Path(path))
    if stored is not None:
        _older_note(Path(path))
        check_overrides(overrides)
        recorded = f"{Path(path).parent / 'spec.json'} (the spec the run trained)"
        return stored_with_overrides(stored, overrides, recorded).model_copy(update={"source": str(path)})
    texts: dict[str, str] = {}
    doc = _load(Path(path), texts, chain=(), at=None)
    return _finish(doc, overrides, texts, source=str(path), file_rules=not is_run_spec(Path(path)))


def parse_spec(
    text: str, source: str = "<string>", overrides: Sequence[str] = (), stored: bool = False
) -> FlowSpec:
    """Parse and validate spec text; `source` names it in error messages (and anchors `extends`).
    `stored`: the text of a spec a checkpoint holds, which the rules for spec files made since may not
    fit (`_file_rules`): they apply only to what `overrides` write."""
    if not isinstance(text, str):
        raise TypeError(
            f"parse_spec takes spec text (str), got {type(text).__name__}; read a file with "
            "flowspec.load_spec(path)"
        )
    check_bool(stored, "parse_spec(stored)", TypeError)  # a truthy "no" would skip the rules for files
    text = _unix_line_ends(text)
    texts = {source: text}
    doc = _extend(parse_document(text, source), source, texts, chain=())
    return _finish(doc, overrides, texts, source=None, file_rules=not stored)


def stored_with_overrides(spec: FlowSpec, overrides: Sequence[str], source: str) -> FlowSpec:
    """A checkpoint's spec with `--set` overrides, through its canonical text read as a stored spec; a
    name that a spec file could not write (a run started from Python) is kept unless `model=` sets one."""
    from flowspec.formatter import format_spec

    placeholder = spec.model_copy(update={"name": "stored"})
    changed = parse_spec(format_spec(placeholder), source=source, overrides=overrides, stored=True)
    renamed = any(SECTION_KEYS.get(key, key) == "name" for key in map(override_key, overrides))
    return changed if renamed else changed.model_copy(update={"name": spec.name})


def setting_sources(
    path: str | os.PathLike[str], overrides: Sequence[str] = ()
) -> dict[str, SourceLoc | str]:
    """Where each setting of the spec at `path` was written, by dotted path (`train.lr`, `flow.0.mask`):
    in the file, in an extended file, in `defaults` (a step's inherited settings) or in a `--set` option.
    Settings left at their built-in defaults are absent. For a spec that `load_spec` accepts; of an older
    run's spec.flow that it reads from spec.json (`older_run_spec`), a setting not set by `overrides` was
    written at `FOLDER/spec.json` (a string, not a `SourceLoc`)."""
    check_overrides(overrides)
    stored = older_run_spec(Path(path))
    if stored is None:
        doc = _load(Path(path), {}, chain=(), at=None)
    else:
        from flowspec.formatter import format_spec

        doc = parse_document(format_spec(stored.model_copy(update={"name": "stored"})), "<stored>")
    doc = apply_defaults(apply_overrides(doc, overrides))
    found: dict[str, SourceLoc | str] = {}
    recorded = f"{Path(os.path.abspath(path)).parent.name}/spec.json"

    def walk(node: Any, prefix: str) -> None:
        items = (
            node.items() if isinstance(node, RawDict) else enumerate(node) if isinstance(node, list) else ()
        )
        for key, value in items:
            path = f"{prefix}.{key}" if prefix else str(key)
            loc = node.locs.get(key) if isinstance(node, RawDict) else getattr(value, "loc", None)
            if loc is not None:
                found[path] = loc if stored is None or loc.file == OVERRIDE_FILE else recorded
            walk(value, path)

    walk(doc, "")
    return found


# ---------------------------------------------------------------- files and extends


def _shipped_hint(name: str) -> str:
    """For a missing spec named like one flowspec ships (`specs/quickstart.flow` in a folder that has no
    copy of them), how to get the shipped ones."""
    shipped = resources.files("flowspec") / "specs"
    parts = Path(name).parts
    tails = ("/".join(parts[start:]) for start in range(len(parts)))
    tail = next((tail for tail in tails if tail and (shipped / tail).is_file()), None)
    if tail is None:
        return ""
    return f" (flowspec ships {tail}: `flowspec specs specs` copies the shipped specs into ./specs)"


def read_spec_file(path: str | os.PathLike[str]) -> str:
    """The text of a spec file: a regular file of at most `MAX_SPEC_BYTES`, UTF-8.

    Raises `SpecFileError` with the reason otherwise (never blocks on a FIFO or reads a device forever).
    """
    name = os.fspath(path)
    if "\0" in name:
        raise SpecFileError("has a NUL byte in its path")
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens without waiting for a writer
    except FileNotFoundError:
        raise SpecFileError(f"not found{_shipped_hint(name)}") from None
    except OSError as error:
        raise SpecFileError(f"cannot be read ({error.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "a folder" if stat.S_ISDIR(mode) else "a device, FIFO or socket"
        inside = os.path.join(name, "spec.flow")
        hint = f" (a run folder's spec is {inside})" if os.path.isfile(inside) else ""
        raise SpecFileError(f"is {what}, not a spec file{hint}")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(MAX_SPEC_BYTES + 1)
        except OSError as error:
            raise SpecFileError(f"cannot be read ({error.strerror})") from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecFileError(f"is larger than {MAX_SPEC_BYTES // 2**20} MiB, too large for a spec file")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark, as some Windows editors write, is dropped
    except UnicodeDecodeError:
        torch_zip = data.startswith(b"PK\x03\x04") and b"data.pkl" in data[:4096]  # torch.save's format
        if torch_zip or name.lower().endswith((".pt", ".pth", ".safetensors")):
            raise SpecFileError(
                "is a checkpoint or an export, not a spec file (a run folder's spec is its spec.flow)"
            ) from None
        raise NotUtf8(data) from None
    return _unix_line_ends(text)


def _unix_line_ends(text: str) -> str:
    """Windows (CR LF) and old Mac (CR) line ends as LF, so that errors name the right line."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


class SpecFileError(Exception):
    """Why a spec file cannot be read (the caller adds which file it is)."""


class NotUtf8(SpecFileError):
    """A spec file whose bytes are not UTF-8 text: the `line` and `col` of the first byte that is not (as the
    parser counts them), and the `text` with each such byte as `?`, to show that line."""

    def __init__(self, data: bytes):
        text = _unix_line_ends(data.decode("utf-8-sig", errors="surrogateescape"))
        first = NOT_UTF8.search(text)
        assert first is not None, "bytes that are not UTF-8 decode to at least one escaped byte"
        self.line = text.count("\n", 0, first.start()) + 1
        self.col = first.start() - text.rfind("\n", 0, first.start())
        self.text = NOT_UTF8.sub("?", text)
        super().__init__(f"byte 0x{ord(first[0]) - 0xDC00:02x} is not UTF-8 text: save the file as UTF-8")


def _load(path: Path, texts: dict[str, str], chain: tuple[Path, ...], at: SourceLoc | None) -> RawDict:
    what = "spec file" if at is None else "extended spec"
    file = os.path.normpath(path)
    try:
        text = read_spec_file(file)
    except NotUtf8 as error:  # said where it is, in the file itself
        texts[file] = error.text
        where = SourceLoc(file=file, line=error.line, col=error.col)
        raise SpecError([Diagnostic(where, str(error))], texts) from None
    except SpecFileError as error:
        shown = file if file.isprintable() else repr(file)
        raise SpecError([Diagnostic(at, f"{what} {shown} {error}")], texts) from None
    real = Path(file).resolve()
    if real in chain:
        cycle = " -> ".join(os.path.relpath(p) for p in (*chain[chain.index(real) :], real))
        raise SpecError([Diagnostic(at, f"extends cycle: {cycle}")], texts)
    texts[file] = text
    return _extend(parse_document(text, file), file, texts, (*chain, real))


def _extend(doc: RawDict, file: str, texts: dict[str, str], chain: tuple[Path, ...]) -> RawDict:
    if "extends" not in doc:
        return doc
    base_path = Path(os.path.dirname(file)) / doc["extends"]
    if not chain:
        chain = (Path(file).resolve(),)
    base = _load(base_path, texts, chain, at=doc.locs["extends"])
    return merge(base, doc)


# ---------------------------------------------------------------- validation


def check_overrides(overrides: object) -> None:
    """A TypeError unless `overrides` is a list (or tuple) of `KEY=VALUE` strings: a single string would
    be read as one override per character."""
    if (
        isinstance(overrides, str | bytes | Mapping)
        or not isinstance(overrides, Iterable)
        or not all(isinstance(o, str) for o in overrides)
    ):
        raise TypeError(
            f'overrides are a list of KEY=VALUE strings, e.g. ["train.lr=1e-3"], got {overrides!r}'
        )


def _finish(
    doc: RawDict, overrides: Sequence[str], texts: dict[str, str], source: str | None, file_rules: bool = True
) -> FlowSpec:
    check_overrides(overrides)
    texts[OVERRIDE_FILE] = "\n".join(overrides)
    doc = apply_overrides(doc, overrides)
    unused = unused_coupling_settings(doc) if file_rules else []  # a stored spec is one file: origins lost
    doc = apply_defaults(doc)
    if source is not None:
        doc["source"] = source
    diagnostics = list(doc.problems) + unused
    plain = _plain(doc)
    try:
        spec = FlowSpec.model_validate(plain, strict=True)
    except ValidationError as error:
        items, spec = after_repair(copy.deepcopy(plain), error)  # the errors keep the user's values
        found = pydantic_diagnostics([*error.errors(include_url=False), *items], doc)
        found += _shape_diagnostics(spec, doc) + _rules(spec, doc, file_rules) if spec is not None else []
        diagnostics += [d for i, d in enumerate(found) if d not in found[:i]]
    else:
        diagnostics += _shape_diagnostics(spec, doc) + _rules(spec, doc, file_rules)
    if diagnostics:
        raise SpecError(diagnostics, texts)
    return spec


def _owner(arg: str) -> str:
    return next(kind for kind, args in SCHEDULE_KIND_ARGS.items() if arg in args)


def _rules(spec: FlowSpec, doc: RawDict, file_rules: bool) -> list[Diagnostic]:
    """`_file_rules` of a spec file; of a stored spec, only those that a `--set` broke."""
    rules = _file_rules(spec, doc)
    return rules if file_rules else [d for d in rules if d.loc is not None and d.loc.file == OVERRIDE_FILE]


def check_file_rules(spec: FlowSpec) -> None:
    """A `UserError` when a spec made in Python is not valid (`check_valid`) or breaks a rule that a spec
    file must follow (`_file_rules`), for a new run: a stored spec from before a rule still loads."""
    check_valid(spec)
    named = spec.model_copy(update={"name": "m"})  # a name is judged where it names a folder (`out=`)
    problems = [d.message for d in _file_rules(named, RawDict())]
    if problems:
        raise UserError(f"the spec {spec.name!r} cannot start a run: {'; '.join(problems)}")


def check_valid(spec: FlowSpec) -> None:
    """A `UserError` naming the wrong settings of a spec made in Python that `FlowSpec` would refuse
    (`model_copy(update=...)` skips validation), or the steps that cannot run on their input."""
    import warnings

    try:
        with warnings.catch_warnings():  # pydantic's serializer warns of the wrong types it is handed
            warnings.simplefilter("ignore")
            FlowSpec.model_validate(spec.model_dump())
    except ValidationError as error:
        wrong = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e['input']!r})" for e in error.errors()[:5]
        )
        raise UserError(f"the spec {spec.name!r} is not valid: {wrong}") from None
    issues = shape_issues(spec)
    if issues:
        wrong = "; ".join(f"{i.path}: {i.message}" for i in issues[:5])
        shape = "x".join(map(str, spec.data.shape))
        raise UserError(f"the spec {spec.name!r} does not fit its data shape {shape}: {wrong}")


def _file_rules(spec: FlowSpec, doc: RawDict) -> list[Diagnostic]:
    """Rules for what a spec file may say that `FlowSpec` itself does not enforce, so that the specs
    stored in checkpoints written before the rules still load."""
    found = []
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,99}", spec.name):
        found.append(
            Diagnostic(
                locate(doc, ("name",))[1],
                f"the model name must be a word of letters, digits and _ (at most 100; it names the run "
                f"folder), got {spec.name!r}",
            )
        )
    uses = SCHEDULE_KIND_ARGS[spec.train.schedule]
    for arg, field in SCHEDULE_ARGS.items():  # set directly (--set train.exp_hold=...) for another schedule
        if arg not in uses and getattr(spec.train, field) != TrainSpec.model_fields[field].default:
            found.append(
                Diagnostic(
                    locate(doc, ("train", field))[1],
                    f"{arg} is a setting of the {_owner(arg)} schedule; this spec's schedule is "
                    f"{spec.train.schedule}",
                )
            )
    for what, message in spec.data.mistakes():
        found.append(Diagnostic(locate(doc, ("data", what))[1], message))
    found += [Diagnostic(issue.source, issue.message) for issue in misplaced_sigmoids(spec)]
    deq = spec.dequantize
    if deq.kind == "variational" and deq.steps and not any(kind_of(s).couples for _, s in written(deq.steps)):
        found.append(
            Diagnostic(
                locate(doc, ("dequantize",), ("kind", "steps"))[1],
                "the variational dequantizer has no coupling, so nothing would use its context network (its "
                "parameters would be counted and never trained): add a coupling in a split, or write "
                "`dequantize uniform`",
            )
        )
    if spec.train.init_batch < 2:
        found.append(
            Diagnostic(
                locate(doc, ("train", "init_batch"))[1],
                f"init_batch must be >= 2 (the data-dependent init takes statistics over the images), got "
                f"{spec.train.init_batch}",
            )
        )
    return found


def _shape_diagnostics(spec: FlowSpec, doc: RawDict) -> list[Diagnostic]:
    """The shape issues, each at its step; one that a `--set` of a setting it reads (the step's own, the
    data shape, a repeat count before it) caused is blamed on the latest such `--set`, naming the step."""
    found = []
    for issue in shape_issues(spec):
        where = issue.source or doc.locs.get(issue.path.split(".")[0]) or doc.locs.get("flow") or doc.loc
        message = issue.message
        read = [_setting_loc(doc, path) for path in issue.reads]
        read += _shape_inputs(doc, issue.path) if issue.sized else []
        overridden = [x for x in read if x is not None and x.file == OVERRIDE_FILE]
        if overridden:
            where = max(overridden, key=lambda x: x.line)
            step = _raw_node(doc, issue.path)
            if issue.source is not None and isinstance(step, RawDict):
                message += f", on the {step.get('kind')} at {issue.source}"
        found.append(Diagnostic(where, message))
    return found


def _raw_node(doc: RawDict, path: str) -> Any:
    """The raw step (or list of steps) at a path of the shape check: `flow.0.body.2`, `dequantize.1`."""
    where, *parts = path.split(".")
    node: Any = doc.get(where)
    if where == "dequantize":
        node = node.get("steps") if isinstance(node, RawDict) else None
    for part in parts:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, RawDict) and part in node:
            node = node[part]
        else:
            return None
    return node


def _setting_loc(doc: RawDict, path: str) -> SourceLoc | None:
    """Where the step setting at `path` (`flow.0.mask`) was written."""
    step, _, name = path.rpartition(".")
    node = _raw_node(doc, step)
    return node.locs.get(name) if isinstance(node, RawDict) else None


def _shape_inputs(doc: RawDict, path: str) -> list[SourceLoc | None]:
    """Where the settings that decide the shape the step at `path` receives were written: the data shape,
    the shape-deciding settings (`StepKind.shaped`) of the steps around it, and those of the steps before
    it (not in the bodies of splits before it, which hand on the shape they get)."""
    data = doc.get("data")
    found = [data.locs.get("shape") if isinstance(data, RawDict) else None]
    where, *parts = path.split(".")
    steps = _raw_node(doc, where)
    for index in (int(part) for part in parts if part.isdigit()):
        if not isinstance(steps, list) or index >= len(steps):
            break
        found += [loc for step in steps[:index] for loc in _handed_on(step)]
        found += _shaped_locs(steps[index])
        steps = steps[index].get("body") if isinstance(steps[index], RawDict) else None
    return found


def _handed_on(step: Any) -> list[SourceLoc | None]:
    """Where the settings that decide the shape a step hands on were written: its own shape-deciding
    settings and those of the steps it runs (none for a step that runs its body once inside its own layer,
    a split: that body hands on the shape it gets)."""
    kind = KINDS.get(step.get("kind")) if isinstance(step, RawDict) else None
    if kind is None or kind.body and kind.copies is None:
        return []
    body = step.get("body")
    return [*_shaped_locs(step), *(loc for child in body or () for loc in _handed_on(child))]


def _shaped_locs(step: Any) -> list[SourceLoc | None]:
    """Where a raw step's shape-deciding settings (its kind's `shaped`) were written."""
    kind = KINDS.get(step.get("kind")) if isinstance(step, RawDict) else None
    return [step.locs.get(name) for name in kind.shaped] if kind is not None else []


def _plain(value: Any) -> Any:
    """The raw document as plain dicts, lists, strings, numbers and booleans (what pydantic should see,
    in strict mode: a quoted "8" is not a number, and only the words `on` and `off` are booleans)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if isinstance(value, Word):
        return {"on": True, "off": False}.get(value, str(value))
    return value
