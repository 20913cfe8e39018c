"""Raw document -> complete raw document: `extends` merge, `--set` overrides, then `defaults` resolution.

Each step works on `RawDict`s and keeps every value's source location, so that validation errors still
point at the line (in the extended file, or in the `--set` option) where the value was written.
"""

from __future__ import annotations

import re
import types
from collections.abc import Sequence
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel

from flowspec.diagnostics import Diagnostic, SpecError, did_you_mean
from flowspec.document import TRAIN_ALIASES, RawDict, SettingError, Word, convert, placed
from flowspec.nodes import StepNode
from flowspec.parser import SECTION_KEYS, parse_value
from flowspec.spec import CouplingSettings, FlowSpec, Interval, SourceLoc
from flowspec.steps.coupling import unused_settings

MERGED_SECTIONS = ("data", "preprocess", "train", "eval", "defaults")
COUPLING_FIELDS = tuple(CouplingSettings.model_fields)
OVERRIDE_FILE = "--set"

# ---------------------------------------------------------------- extends


def merge(base: RawDict, child: RawDict) -> RawDict:
    """`child` written over `base`: `data`, `preprocess`, `train`, `eval` and `defaults` (and
    `defaults.coupling`) merge setting by setting; every other section is replaced whole."""
    out = base.copy()
    out.loc = child.loc
    out.pop("extends", None)
    out.problems = base.problems + child.problems
    for key, value in child.items():
        if key == "extends":
            continue
        if key in MERGED_SECTIONS and isinstance(value, RawDict) and isinstance(base.get(key), RawDict):
            section = base[key].copy()
            section.loc = value.loc
            for name, setting in value.items():
                if key == "defaults" and name == "coupling" and isinstance(section.get(name), RawDict):
                    setting = _merge_flat(section[name], setting)
                section.put(name, setting, value.locs.get(name))
            value = section
        out.put(key, value, child.locs.get(key))
    return out


def _merge_flat(base: RawDict, child: Any) -> Any:
    if not isinstance(child, RawDict):
        return child
    merged = base.copy()
    merged.loc = child.loc
    for name, setting in child.items():
        merged.put(name, setting, child.locs.get(name))
    return merged


# ---------------------------------------------------------------- --set overrides


def apply_overrides(doc: RawDict, overrides: Sequence[str]) -> RawDict:
    """Apply `KEY=VALUE` overrides in order (line N of the file `--set` is the N-th override).

    An override that names no setting, or whose value cannot be read, is left out and listed in
    `doc.problems`; values are checked later, like those of the file.
    """
    for line, text in enumerate(overrides, start=1):
        try:
            _apply_override(doc, text, line)
        except SpecError as error:
            doc.problems += error.diagnostics
    return doc


def _fail(line: int, col: int, message: str) -> SpecError:
    return SpecError([Diagnostic(SourceLoc(file=OVERRIDE_FILE, line=line, col=col), message)])


def override_key(text: str) -> str:
    """The KEY of a `KEY=VALUE` override, without the spaces around it."""
    return text.partition("=")[0].strip()


def _apply_override(doc: RawDict, text: str, line: int) -> None:
    written, equals, value_text = text.partition("=")
    key = override_key(text)
    if not equals or not key:
        raise _fail(line, 1, "an override must read KEY=VALUE, e.g. defaults.coupling.filters=64")
    value = parse_value(value_text, OVERRIDE_FILE, line, len(written) + 2)  # spaces around it are skipped
    parts = key.split(".")
    start = 1 + len(written) - len(written.lstrip())
    cols = [start + sum(len(p) + 1 for p in parts[:i]) for i in range(len(parts))]
    if len(parts) > 1 and parts[0] == "dequantize" and parts[1].isdigit():  # the path inspect shows
        dequantize = doc.get("dequantize")
        if not (isinstance(dequantize, RawDict) and isinstance(dequantize.get("steps"), list)):
            raise _fail(line, cols[1], "this dequantizer has no steps: only `dequantize variational` has")
        parts.insert(1, "steps")
        cols.insert(1, cols[1])
    node: Any = doc
    annotation: Any = FlowSpec
    where = ""
    unwritten: list[tuple[RawDict, str, RawDict, SourceLoc]] = []  # sections made only if the set succeeds
    for i, part in enumerate(parts):
        loc = SourceLoc(file=OVERRIDE_FILE, line=line, col=cols[i])
        if isinstance(node, list):
            if not re.fullmatch(r"[0-9]{1,9}", part) or int(part) >= len(node):
                count = f"steps 0 to {len(node) - 1}" if node else "no steps"
                raise _fail(line, cols[i], f"{where} has {count}, no step '{part}'")
            if i == len(parts) - 1:
                raise _fail(line, cols[i], f"set a setting of the step, e.g. {where}.{part}.SETTING=VALUE")
            node, annotation = node[int(part)], get_args(annotation)[0]
            where = f"{where}.{part}"
            continue
        model = model_of(annotation, node)
        if not isinstance(node, RawDict) or model is None:
            raise _fail(line, cols[i], f"{where} has no setting '{part}'")
        field = _field_name(model, where, part)
        if field is None:
            owner = f" of {where}" if where else ""
            allowed = _setting_names(model, where)
            if issubclass(model, StepNode) or where == "dequantize":  # name the kind (a default one too)
                kind = node.get("kind") or model.model_fields["kind"].default
                owner += f" ({kind})" if allowed else f" ({kind} has no settings)"
            raise _fail(line, cols[i], f"unknown setting '{part}'{owner}{did_you_mean(part, allowed)}")
        annotation = model.model_fields[field].annotation
        if i == len(parts) - 1:
            dotted = f"{where}.{part}" if where else part
            if get_origin(annotation) is list:
                raise _fail(
                    line,
                    cols[i],
                    f"'{dotted}' is a list of steps: set a step's setting, e.g. {dotted}.0.SETTING=VALUE",
                )
            if (
                isinstance(annotation, type)
                and issubclass(annotation, BaseModel)
                and annotation is not Interval  # validation says what an interval is
                and not isinstance(value, dict)
            ):
                # (an interval such as `3 epochs` is the one dict a value can be)
                raise _fail(
                    line,
                    cols[i],
                    f"'{dotted}' is a section: set one of its settings, e.g. {dotted}.SETTING=VALUE",
                )
            _set(node, where, field, value, loc)
            for parent, name, section, written in unwritten:
                parent.put(name, section, written)
            return
        child = node.get(field)
        if child is None and model_of(annotation, None) is not None:
            child = RawDict(loc)
            unwritten.append((node, field, child, loc))
        if child is None:
            raise _fail(line, cols[i], f"{where or 'the spec'} has no '{part}' to set a setting of")
        node = child
        where = f"{where}.{part}" if where else part


def _set(node: RawDict, where: str, field: str, value: Any, loc: SourceLoc) -> None:
    if where == "" and field == "dequantize":
        if not isinstance(value, Word):
            raise SpecError([Diagnostic(loc, "dequantize must be `uniform` or `variational`")])
        current = node.get(field)
        if not (isinstance(current, RawDict) and current.get("kind") == value):
            node.put(field, RawDict(loc, kind=value), loc)
        return
    if where == "" and field == "name":  # as `model NAME` in a file: a word, `on` too, never quoted
        if not isinstance(value, Word):
            message = (
                "the model name must be a word of letters, digits and _ that starts with a letter or _, "
                "unquoted as in a file: model=tiny"
            )
            raise SpecError([Diagnostic(loc, message)])
        node.put(field, str(value), loc)
        return
    section = where.split(".")[-1] if where else ""
    try:
        fields = convert(section, field, value)
    except SettingError as error:
        raise SpecError([Diagnostic(loc, str(error))]) from None
    for name, setting, written in placed(fields, loc):
        node.put(name, setting, written)


def _field_name(model: type[BaseModel], where: str, part: str) -> str | None:
    if where == "":
        part = SECTION_KEYS.get(part, part)
    if where == "train":
        part = TRAIN_ALIASES.get(part, part)
    if where == "defaults.coupling" and part == "kind":
        part = "coupling"
    if part in ("source", "kind") or part not in model.model_fields:
        return None
    return part


def _setting_names(model: type[BaseModel], where: str) -> list[str]:
    names = [n for n in model.model_fields if n not in ("source", "kind")]
    if where == "":
        names = ["model" if n == "name" else n for n in names]
    if where == "train":
        names += list(TRAIN_ALIASES)
    return names


def model_of(annotation: Any, node: Any) -> type[BaseModel] | None:
    """The pydantic model that validates `node` under `annotation` (a union: the one of its `kind`)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return model_of(get_args(annotation)[0], node)
    if origin in (Union, types.UnionType):
        models = [m for m in (model_of(a, node) for a in get_args(annotation)) if m is not None]
        kind = node.get("kind") if isinstance(node, dict) else None
        if kind is None:
            return models[0] if models else None
        return next(
            (m for m in models if m.model_fields.get("kind") and m.model_fields["kind"].default == kind), None
        )
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


# ---------------------------------------------------------------- defaults


def unused_coupling_settings(doc: RawDict) -> list[Diagnostic]:
    """A diagnostic for each setting written on a coupling step that the kind, network or attention
    written on the same step, in the same file, makes unused, e.g. `coupling(network=resnet,
    weight_norm=on)`: it would change nothing. Likewise a setting in `defaults` that the kind, network or
    attention written beside it makes unused for every coupling that inherits it. What a step inherits is
    not judged, nor a setting made unused by another file or a `--set` (an ablation of a base file that
    writes it). Values that are not valid are left to validation."""
    found: list[Diagnostic] = []
    defaults = doc.get("defaults")
    inherited = defaults.get("coupling") if isinstance(defaults, RawDict) else None
    inherited = inherited if isinstance(inherited, RawDict) else RawDict()
    couplings: list[tuple[RawDict, bool]] = []  # every coupling step, and whether it is the dequantizer's

    def collect(steps: Any, in_dequantizer: bool) -> None:
        for step in steps if isinstance(steps, list) else ():
            if isinstance(step, RawDict):
                if step.get("kind") == "coupling":
                    couplings.append((step, in_dequantizer))
                collect(step.get("body"), in_dequantizer)

    collect(doc.get("flow"), False)
    dequantize = doc.get("dequantize")
    if isinstance(dequantize, RawDict):
        collect(dequantize.get("steps"), True)

    def unused_by(settings: RawDict, in_dequantizer: bool, fallback: RawDict | None = None) -> dict:
        def get(name: str) -> Any:
            return settings[name] if name in settings else (fallback or {}).get(name)

        attention = get("attention")
        valid = isinstance(attention, bool) or attention in ("on", "off")
        unused = unused_settings(
            str(get("coupling")) if get("coupling") is not None else None,
            str(get("network")) if get("network") is not None else None,
            attention not in ("off", False) if valid else None,  # an invalid one: validation's
        )
        if in_dequantizer:  # the context network takes the highest dropout of these couplings
            unused.pop("dropout", None)
        return unused

    def written_beside(settings: RawDict, unused: dict) -> list[tuple[str, str]]:
        """(setting, why) for the unused settings whose cause is written in the same file."""
        out = []
        for name in (n for n in settings if n in unused):
            cause, why = unused[name]
            where, decided = settings.locs.get(name), settings.locs.get(cause)
            if where is not None and decided is not None and where.file == decided.file:
                out.append((name, why))
        return out

    for step, in_dequantizer in couplings:
        for name, why in written_beside(step, unused_by(step, in_dequantizer)):
            found.append(Diagnostic(step.locs[name], f"{name} does nothing here: {why}; remove it"))
    for name, why in written_beside(inherited, unused_by(inherited, False)):
        heirs = [(step, deq) for step, deq in couplings if name not in step]
        if heirs and all(name in unused_by(step, deq, inherited) for step, deq in heirs):
            found.append(Diagnostic(inherited.locs[name], f"{name} does nothing here: {why}; remove it"))
    return found


def apply_defaults(doc: RawDict) -> RawDict:
    """Give every coupling the `defaults` settings it does not set itself, every norm its granularity."""
    defaults = doc.get("defaults")
    defaults = defaults if isinstance(defaults, RawDict) else RawDict()
    coupling = defaults.get("coupling")
    coupling = coupling if isinstance(coupling, RawDict) else RawDict()

    def fill(steps: Any) -> None:
        if not isinstance(steps, list):
            return
        for step in steps:
            if not isinstance(step, RawDict):
                continue
            if step.get("kind") == "coupling":
                for name in COUPLING_FIELDS:
                    if name in coupling and name not in step:
                        step.put(name, coupling[name], coupling.locs.get(name))
                        step.inherited.add(name)
            elif step.get("kind") == "norm" and "granularity" not in step and "norm" in defaults:
                step.put("granularity", defaults["norm"], defaults.locs.get("norm"))
                step.inherited.add("granularity")
            fill(step.get("body"))

    fill(doc.get("flow"))
    dequantize = doc.get("dequantize")
    if isinstance(dequantize, RawDict):
        fill(dequantize.get("steps"))
    return doc
