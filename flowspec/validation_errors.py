"""Pydantic's validation errors as the diagnostics of a spec: each at the file, line and column where the
offending value was written, in words a spec file's author reads (`unknown setting 'filter' of coupling,
did you mean 'filters'?`), with the mistakes that the first ones hid (found by repairing and validating
again).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, get_args

from pydantic import ValidationError

from flowspec.diagnostics import Diagnostic, did_you_mean
from flowspec.document import REWARM_ARGS, SCHEDULE_ARGS, Call, RawDict
from flowspec.parser import SECTION_NAMES
from flowspec.resolve import OVERRIDE_FILE, model_of
from flowspec.spec import FlowSpec, SourceLoc
from flowspec.steps import KINDS

__all__ = ["after_repair", "error_message", "locate", "pydantic_diagnostics"]

#: Settings whose repair changes the shapes a spec's steps see: no shape check after repairing them (with
#: the step kinds' `shaped` settings).
_SHAPED = {"data", "shape", "kind", "dequantize", "flow"}
REPAIR_ROUNDS = 3  # repairs and validations after the first, each finding what the last one hid


def after_repair(plain: dict, error: ValidationError) -> tuple[list, FlowSpec | None]:
    """The mistakes that the first mistakes hid: each wrong setting falls back to its default (a wrong
    section to its defaults, a step of an unknown kind is left out) and the spec is validated again, so
    the checks between settings (`heads` must divide `filters`) run too. Returns the new pydantic error
    items and the repaired spec for the shape check (None if it failed again or if a repair changed
    shapes). A check that names a repaired setting (its value is not the user's) and a missing setting
    (what a repair removed) are not reported."""
    found: list = []
    repaired: list[tuple] = []
    shaped = False
    shaping = _SHAPED.union(*(kind.shaped for kind in KINDS.values()))
    for _ in range(REPAIR_ROUNDS):
        for item in error.errors(include_url=False):
            removed = _repair(plain, item["loc"], item["type"])
            repaired += removed
            shaped = shaped or any(not loc or loc[-1] in shaping for loc in removed)
        try:
            spec = FlowSpec.model_validate(plain, strict=True)
        except ValidationError as again:
            error = again
            found += [
                item
                for item in again.errors(include_url=False)
                if item["type"] != "missing" and not _names_repaired(item, repaired)
            ]
        else:
            return found, None if shaped else spec
    return found, None


def _untagged(loc: tuple) -> tuple:
    """A pydantic error location without the tags of discriminated unions (the kind after a step index)."""
    return tuple(
        p for i, p in enumerate(loc) if not (isinstance(p, str) and i and isinstance(loc[i - 1], int))
    )


def _repair(plain: dict, loc: tuple, error_type: str) -> list[tuple]:
    """Remove what the error at `loc` blames from the plain document: a setting (its default applies), a
    step of an unknown kind, or every setting of a section or step that is wrong as a whole. Returns the
    paths removed (a removed step's ends with `kind`)."""
    node: Any = plain
    path = _untagged(loc)
    for i, part in enumerate(path):
        found = part in node if isinstance(node, dict) else isinstance(part, int) and part < len(node)
        if not isinstance(node, (dict, list)) or not found:
            return []
        child = node[part]
        # a section or step wrong as a whole loses its settings; a dict where a value belongs goes
        whole = i == len(path) - 1 and isinstance(child, dict) and error_type.startswith(("value", "model"))
        if i == len(path) - 1 and not whole or not isinstance(child, (dict, list)):
            del node[part]
            return [(*path[: i + 1], "kind") if isinstance(part, int) else path[: i + 1]]
        node = child
    if not isinstance(node, dict):
        return []
    keys = [k for k in node if k not in ("kind", "source")]
    for key in keys:
        del node[key]
    return [(*path, key) for key in keys]


def _names_repaired(item: dict, repaired: list[tuple]) -> bool:
    """Whether an error of the repaired spec is about a setting that a repair set to its default."""
    node, text = _untagged(item["loc"]), item.get("msg", "")
    return any(loc[:-1] == node[: len(loc) - 1] and str(loc[-1]) in text for loc in repaired if loc)


_MEMBER_TAG = re.compile(r"(int|float|str|bool|none|(tuple|list|literal|function-\w+)\[.*\])$")


def _one_per_union(items: list) -> list:
    """Pydantic reports a value that fits no member of a union (`int | float`, `str | int`) once per
    member, the member's type name in the location: keep one, with the type name dropped, preferring the
    member of the value's own kind (a number's error for a number). Other errors are kept as they are."""
    kept: dict[Any, dict] = {}
    for i, item in enumerate(items):
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and _MEMBER_TAG.fullmatch(p)))
        if loc == tuple(item["loc"]):
            kept[i] = item
            continue
        fits = isinstance(item.get("input"), int | float) == item["type"].startswith(("int", "float"))
        if loc not in kept or fits:
            kept[loc] = {**item, "loc": loc}
    return list(kept.values())


def pydantic_diagnostics(items: list, doc: RawDict) -> list[Diagnostic]:
    """The diagnostics of pydantic's error `items` about the plain form of `doc`, each where its value was
    written; a value that fits no member of a union, or an invalid default, is reported once."""
    found: list[tuple[str, Diagnostic]] = []
    for item in _one_per_union(items):
        # point an unknown kind at the word, not at the whole section
        kind_word = ("kind",) if item["type"] == "union_tag_invalid" else ()
        fields = getattr(item.get("ctx", {}).get("error"), "fields", ())  # the settings a `Conflict` reads
        path, loc, model, owner, step = locate(doc, (*item["loc"], *kind_word), fields)
        message = error_message(item, path, model, owner)
        if step is not None:
            message += f", on the {step.get('kind')} at {step['source']}"
        found.append((path, Diagnostic(loc, message)))
    # an invalid default shows up again at every step that inherits it: report it once, at `defaults`
    in_defaults = {d.message for path, d in found if path.startswith("defaults")}
    return [d for path, d in found if path.startswith("defaults") or d.message not in in_defaults]


def locate(
    doc: RawDict, loc: tuple, fields: Sequence[str] = ()
) -> tuple[str, SourceLoc | None, Any, Any, RawDict | None]:
    """Follow a pydantic error location through the raw document: the user-facing path, the source
    location of the deepest part written, the model class of the innermost object, what to call that
    object in a message (a step's kind, else its path), and the step to name in it (else None). An error
    about a node as a whole that reads `fields` of it blames the latest `--set` of one of them, else the
    first of them the node wrote itself, else the first it inherits from `defaults`; a step that writes one
    of them itself is named when the blame lies elsewhere (in a `--set`)."""
    node: Any = doc
    annotation: Any = FlowSpec
    where = doc.loc
    names: list[str] = []
    tag_pending = False
    model: Any = FlowSpec
    container: Any = doc
    depth = 0
    complete = True
    for part in loc:
        if tag_pending and isinstance(node, dict) and part == node.get("kind"):
            tag_pending = False
            continue
        tag_pending = False
        if isinstance(node, list) and isinstance(part, int) and part < len(node):
            node, annotation = node[part], _item_annotation(annotation)
            where = getattr(node, "loc", None) or where
            names.append(str(part))
            tag_pending = True
            continue
        if isinstance(node, RawDict):
            model = model_of(annotation, node) or model
            container, depth = node, len(names)
            if isinstance(part, str) and part in node:
                where = node.locs.get(part) or where
                names.append(part)
                annotation = model.model_fields[part].annotation if part in model.model_fields else None
                node = node[part]
                tag_pending = isinstance(node, dict)
                continue
        names.append(str(part))
        complete = False
        break
    step = None
    if isinstance(node, RawDict):
        model = model_of(annotation, node) or model
        written = {f: x for f in fields if (x := node.locs.get(f)) is not None} if complete else {}
        own = [f for f in written if f not in node.inherited]
        overridden = [x for x in written.values() if x.file == OVERRIDE_FILE]
        if overridden:
            where = max(overridden, key=lambda x: x.line)
            step = node if own and "source" in node else None
        elif written:
            where = written[(own or list(written))[0]]
    path = ".".join(SECTION_NAMES.get(n, n) if i == 0 else n for i, n in enumerate(names))
    owner = ".".join(SECTION_NAMES.get(n, n) if i == 0 else n for i, n in enumerate(names[:depth]))
    if container is not doc and isinstance(container, RawDict) and "source" in container:
        owner = str(container.get("kind"))
    return path, where, model, owner, step


def _item_annotation(annotation: Any) -> Any:
    args = get_args(annotation)
    return args[0] if args else None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _show(value: Any) -> str:
    if isinstance(value, bool):  # the file's `on` and `off`
        return "on" if value else "off"
    if isinstance(value, str):
        return value
    if isinstance(value, Call):
        return f"{value.name}(...)"
    if isinstance(value, dict) and set(value) == {"count", "unit"}:
        return f"{value['count']} {value['unit']}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_show(v) for v in value) + ")"
    return str(value)


_WRITTEN = {  # spec field -> the name the file writes
    **{field: arg for arg, field in SCHEDULE_ARGS.items()},
    **{field: f"the second warmup's {arg}" for arg, field in REWARM_ARGS.items()},
    "eval_every": "eval every",
    "save_every": "save every",
    "hflip": "augment",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


@dataclass(frozen=True)
class _Error:
    """One pydantic error item, as its message reads it: `field` is the setting's name as the file writes
    it, `parts` the user-facing path's parts, `owner` what holds the setting (a step's kind, else a path)."""

    kind: str
    ctx: dict
    value: Any
    msg: str
    path: str
    parts: list[str]
    field: str
    owner: str
    model: Any


def error_message(item: dict, path: str, model: Any, owner: str) -> str:
    """The message of one pydantic error `item` about the setting at the user-facing `path`, of `model`,
    held by `owner`."""
    parts = path.split(".")
    field = next((p for p in reversed(parts) if not p.isdigit()), path) or "spec"
    if field == "count":  # name the count by what it counts: a step's kind, else its section
        field = f"{owner} count" if owner in KINDS else parts[-2] if len(parts) > 1 else field
    error = _Error(
        kind=item["type"],
        ctx=item.get("ctx", {}),
        value=item.get("input"),
        msg=item.get("msg", ""),
        path=path,
        parts=parts,
        field=_WRITTEN.get(field, field),
        owner=owner,
        model=model,
    )
    message = _tuple_setting(error)
    handler = _BY_TYPE.get(error.kind)
    if message is None and handler is not None:
        message = handler(error)
    if message is not None:
        return message
    return f"{error.field}: {error.msg[:1].lower()}{error.msg[1:]} (got {_show(error.value)})"


def _tuple_setting(e: _Error) -> str | None:
    """A data shape or Adam's betas of the wrong length."""
    missing_item = e.kind == "missing" and e.parts[-1].isdigit()
    if e.field == "shape" and (e.kind in ("too_long", "too_short") or missing_item):
        return (
            f"shape is C x H x W (channels, height, width), e.g. 3x32x32, got {'x'.join(map(str, e.value))}"
        )
    if e.field == "betas" and (e.kind in ("too_long", "too_short", "tuple_type") or missing_item):
        return f"betas are two values, e.g. (0.9, 0.999), got {_show(e.value)}"
    return None


def _missing(e: _Error) -> str:
    if e.path == "model":
        return "missing model name: add `model NAME`"
    if e.path == "flow":
        return "missing flow: add `flow { ... }` with the model's steps"
    if e.field == "steps" and e.owner.startswith("dequantize"):
        return "`dequantize variational` needs its steps: `dequantize variational { ... }`"
    return f"missing setting '{e.field}'" + (f" of {e.owner}" if e.owner else "")


def _unknown_setting(e: _Error) -> str:
    if e.field in ("steps", "context") and e.owner.startswith("dequantize"):
        return f"uniform dequantization has no {e.field}: write `dequantize uniform` alone"
    allowed = [n for n in getattr(e.model, "model_fields", {}) if n not in ("kind", "source")]
    where = f" of {e.owner}" if e.owner else ""
    return f"unknown setting '{e.field}'{where}{did_you_mean(e.field, allowed)}"


def _unknown_choice(e: _Error) -> str:
    choices = re.findall(r"'([^']*)'", e.ctx.get("expected", ""))
    return f"unknown {e.field} '{_show(e.value)}'{did_you_mean(str(e.value), choices)}"


def _unknown_kind(e: _Error) -> str:
    choices = re.findall(r"'([^']*)'", str(e.ctx.get("expected_tags", "")))
    tag = str(e.ctx.get("tag", ""))
    field = e.parts[-2] if e.parts[-1] == "kind" and len(e.parts) > 1 else e.field
    return f"unknown {field} kind '{tag}'{did_you_mean(tag, choices)}"


def _out_of_bounds(e: _Error) -> str:
    bound = next(iter(e.ctx.values()))
    return f"{e.field} must be {_BOUNDS[e.kind]} {bound}, got {_show(e.value)}"


def _not_whole(e: _Error) -> str:
    return f"{e.field} must be a whole number, got {_show(e.value)}"


def _not_a_number(e: _Error) -> str:
    if e.kind == "int_type" and isinstance(e.value, float):
        return _not_whole(e)
    if isinstance(e.value, str) and _is_number(e.value):
        if not math.isfinite(float(e.value)):  # the words inf and nan
            return f"{e.field} must be a finite number, got {e.value}"
        return f'{e.field} must be a number, got the text "{e.value}": write numbers without quotes'
    return f"{e.field} must be a number, got {_show(e.value)}"


def _not_a_switch(e: _Error) -> str:
    if e.value in ("on", "off"):  # only a quoted on / off reaches here: the words are booleans
        return f'{e.field} must be on or off, got the text "{e.value}": write it without quotes'
    return f"{e.field} must be on or off, got {_show(e.value)}"


def _not_a_count(e: _Error) -> str | None:
    if e.field not in ("length", "eval every", "save every"):
        return None
    return (
        f"{e.field} must be a count of steps or epochs, e.g. `100 steps` or `10 epochs`, got {_show(e.value)}"
    )


def _empty_flow(e: _Error) -> str | None:
    if e.field != "flow":
        return None
    return "flow has no steps: write at least one, e.g. `flow { split stripe { coupling; flip } }`"


def _check_failed(e: _Error) -> str:
    return str(e.ctx.get("error", e.msg))


#: pydantic error type -> its message (None: the plain message of pydantic, with the field and value)
_BY_TYPE: dict[str, Callable[[_Error], str | None]] = {
    "missing": _missing,
    "extra_forbidden": _unknown_setting,
    "literal_error": _unknown_choice,
    "union_tag_invalid": _unknown_kind,
    "union_tag_not_found": _unknown_kind,
    **dict.fromkeys(_BOUNDS, _out_of_bounds),
    "int_from_float": _not_whole,
    **dict.fromkeys(
        ("int_type", "int_parsing", "float_type", "float_parsing", "finite_number"), _not_a_number
    ),
    **dict.fromkeys(("bool_type", "bool_parsing"), _not_a_switch),
    **dict.fromkeys(("model_type", "model_attributes_type", "dict_type"), _not_a_count),
    "too_short": _empty_flow,
    "value_error": _check_failed,
}
