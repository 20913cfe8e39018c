"""A resolved `FlowSpec` as canonical `.flow` text, which parses back to an equal spec.

No `extends`: the output stands alone. The `defaults` block lists the coupling settings that differ from
the built-in ones; each step then writes only what differs from `defaults`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from flowspec.document import SCHEDULE_ARGS, SCHEDULE_KIND_ARGS
from flowspec.nodes import Node
from flowspec.spec import ContextSpec, CouplingSettings, EvalSpec, FlowSpec, Interval, TrainSpec
from flowspec.steps import KINDS, StepKind, kind_of
from flowspec.steps.coupling import held_at_builtin

WIDTH = 100
INDENT = "  "


def format_spec(spec: FlowSpec) -> str:
    """Canonical `.flow` text for `spec`."""
    defaults = spec.defaults
    out = [f"model {spec.name}"]
    if spec.target_params is not None:
        out.append(f"target_params {spec.target_params}")
    out += ["", _data(spec), f"preprocess {spec.preprocess.kind}(alpha={_value(spec.preprocess.alpha)})", ""]
    coupling = _head(KINDS["coupling"], defaults.coupling, CouplingSettings().model_dump(), always=True)
    out += ["defaults {", f"{INDENT}{coupling}"]
    out += [f"{INDENT}norm {defaults.norm}", "}", ""]
    deq = spec.dequantize
    if deq.kind == "uniform":
        out.append("dequantize uniform")
    else:
        context = f"context({_context_args(deq.context)})"
        out += ["dequantize variational {", INDENT + context, *_steps(deq.steps, spec, 1), "}"]
    out += ["", "flow {", *_steps(spec.flow, spec, 1), "}", "", f"prior {spec.prior}", "", *_train(spec), ""]
    return "\n".join(out + _eval(spec.eval))


_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # the grammar's NAME


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}e{int(exponent)}"
        return text
    if isinstance(value, tuple):
        return "(" + ", ".join(_value(v) for v in value) + ")"
    if isinstance(value, Interval):
        return f"{value.count} {value.unit[:-1] if value.count == 1 else value.unit}"
    if isinstance(value, str) and (not _WORD.fullmatch(value) or value in ("on", "off", "all", "none")):
        return f'"{value}"'  # not a word of the language (non-ASCII), or a word that means something else
    return str(value)


def _context_args(context: ContextSpec) -> str:
    """`filters=F, blocks=B`, then the other settings that differ from the built-in ones."""
    plain = ContextSpec()
    args = [f"filters={context.filters}", f"blocks={context.blocks}"]
    args += [
        f"{name}={_value(getattr(context, name))}"
        for name in ContextSpec.model_fields
        if name not in ("filters", "blocks") and getattr(context, name) != getattr(plain, name)
    ]
    return ", ".join(args)


def _items(value: tuple) -> str:
    """A list setting of one item as the item: `classes 3`, `convert size`."""
    return _value(value[0] if len(value) == 1 else value)


#: Settings written otherwise than `_value` writes their (set) value.
_WORDS: dict[str, Callable[[Any], str]] = {
    "data.shape": lambda shape: "x".join(map(str, shape)),
    "data.classes": _items,
    "data.convert": lambda kinds: _items(kinds) if kinds else "none",
    **{f"data.{key}": lambda text: f'"{text}"' for key in ("name", "path", "test_path")},
    "train.schedule": str,  # a word, or the schedule with its arguments (`schedule_text`)
    "train.warmup": lambda steps: f"{steps} step" if steps == 1 else f"{steps} steps",
    "train.hflip": lambda hflip: "hflip" if hflip else "none",
}
#: The word for a setting left unset (`none` for the others).
_UNSET = {
    "data.classes": "all",
    "eval.images": "all",
    "train.clip_grad_norm": "off",
    "train.ema": "off",
    "train.length": "unbounded",
    "train.save_every": "off",
    **{f"train.rewarm_{arg}": "off" for arg in ("at", "steps", "lr")},
}


def setting_text(path: str, value: Any) -> str:
    """The value of the setting at dotted `path` as a `.flow` file writes it: `1x8x8` (`data.shape`),
    `20 steps` (`train.warmup`), `on`/`off`, `3e-4`, `(0.9, 0.999)`; `off`, `all`, `none` when unset."""
    if value is None:
        return _UNSET.get(path, "none")
    return _WORDS[path](value) if path in _WORDS else _value(value)


def _data(spec: FlowSpec) -> str:
    data = spec.data
    parts = [f"{key} {setting_text(f'data.{key}', getattr(data, key))}" for key in ("shape", "levels")]
    for key in ("classes", "convert", "test_split", "name", "path", "test_path"):
        if getattr(data, key) not in (None, ()):  # `convert none` is not written
            parts.append(f"{key} {setting_text(f'data.{key}', getattr(data, key))}")
    return f"data {data.dataset} {{ {'  '.join(parts)} }}"


def _head(kind: StepKind, node: Node, base: dict[str, Any], always: bool = False) -> str:
    """`NAME POSITIONAL... (key=value, ...)` with the settings of `node` that differ from `base` (and
    from the built-in defaults); required settings always, positional ones too with `always`."""
    fields = type(node).model_fields
    head = [kind.name]
    args = []
    held = held_at_builtin(node) if isinstance(node, CouplingSettings) else set()
    for name, field in fields.items():
        if name in ("kind", "source", "body") or name in held:  # unused, held at its built-in value
            continue
        value = getattr(node, name)
        if name in kind.positional:
            if always or field.is_required() or value != base.get(name, field.default):
                head.append(_value(value))
        elif value != base.get(name, field.default):
            args.append(f"{name}={_value(value)}")
    return " ".join(head) + (f"({', '.join(args)})" if args else "")


def _inherited(kind: StepKind, spec: FlowSpec) -> dict[str, Any]:
    """The settings a step of `kind` takes from the `defaults` block (its entry named as the kind: a
    settings node, or the value of the kind's first positional setting). The entry is looked up among
    the block's fields, not its attributes: a kind named as a pydantic method (`copy`) has none."""
    fields = type(spec.defaults).model_fields
    entry = getattr(spec.defaults, kind.name) if kind.name in fields else None
    if isinstance(entry, Node):
        return entry.model_dump()
    return {} if entry is None else {kind.positional[0]: entry}


def _step(step: Any, spec: FlowSpec) -> str:
    """One step on one line."""
    kind = kind_of(step)
    head = _head(kind, step, _inherited(kind, spec))
    return f"{head} {{ {'; '.join(_step(s, spec) for s in step.body)} }}" if kind.body else head


def _steps(steps: list[Any], spec: FlowSpec, depth: int) -> list[str]:
    """Each step on a line of its own; a step with a body on one line when it fits."""
    indent = INDENT * depth
    lines: list[str] = []
    for step in steps:
        line = _step(step, spec)
        kind = kind_of(step)
        if not kind.body or len(indent + line) <= WIDTH:
            lines.append(indent + line)
            continue
        head = _head(kind, step, _inherited(kind, spec))
        lines += [f"{indent}{head} {{", *_steps(step.body, spec, depth + 1), f"{indent}}}"]
    return lines


def schedule_text(train: TrainSpec) -> str:
    """The schedule with its own arguments (it takes no other): `cosine`, `step(every=1000, gamma=0.5)`."""
    args = [
        f"{arg}={_value(getattr(train, field))}"
        for arg, field in SCHEDULE_ARGS.items()
        if arg in SCHEDULE_KIND_ARGS.get(train.schedule, ())
    ]
    return train.schedule + (f"({', '.join(args)})" if args else "")


def _train(spec: FlowSpec) -> list[str]:
    t = spec.train
    optimizer = f"lr={_value(t.lr)}, betas={_value(t.betas)}, eps={_value(t.eps)}"
    if t.tf_eps:
        optimizer += ", tf_eps=on"
    if t.weight_decay:
        optimizer += f", weight_decay={_value(t.weight_decay)}"
    schedule = schedule_text(t)
    if t.rewarm_at is not None:
        rewarm = f"at={t.rewarm_at}, steps={t.rewarm_steps}, lr={_value(t.rewarm_lr)}"
        schedule += f", then warmup({rewarm})"
    recipe = [
        f"batch {t.batch}" + (f"  accumulate {t.accumulate}" if t.accumulate > 1 else ""),
        *(f"{key} {setting_text(f'train.{key}', getattr(t, key))}" for key in ("clip_grad_norm", "ema")),
        f"init_batch {t.init_batch}",
        f"seed {t.seed}",
    ]
    return [
        "train {",
        f"{INDENT}optimizer {t.optimizer}({optimizer})",
        f"{INDENT}warmup {setting_text('train.warmup', t.warmup)}, then {schedule}",
        INDENT + "  ".join(recipe),
        f"{INDENT}length {setting_text('train.length', t.length)}",
        f"{INDENT}eval every {_value(t.eval_every)}",
        f"{INDENT}save every {setting_text('train.save_every', t.save_every)}",
        f"{INDENT}augment {setting_text('train.hflip', t.hflip)}",
        "}",
    ]


def _eval(settings: EvalSpec) -> list[str]:
    """The `eval` section with the settings that differ from the built-in ones (none: no section)."""
    plain = EvalSpec()
    parts = [
        f"{name} {setting_text(f'eval.{name}', value)}"
        for name, value in settings.model_dump().items()
        if value != getattr(plain, name)
    ]
    return [f"eval {{ {'  '.join(parts)} }}", ""] if parts else []
