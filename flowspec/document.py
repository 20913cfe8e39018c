"""The raw document: what a `.flow` file says, as dicts and lists that remember where each part was written.

The parser builds it, `resolve` merges and completes it, pydantic validates it into a `FlowSpec`. The
setting conversions here (`100 steps`, `ema off`, `augment hflip`, ...) are shared by the file syntax and
the `--set` overrides, so both mean the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flowspec.diagnostics import did_you_mean
from flowspec.nodes import SourceLoc


class Word(str):
    """A bare word as written (`dog`, `off`, `stripe`), as opposed to a quoted string."""


@dataclass(frozen=True)
class Call:
    """`name(key=value, ...)`, e.g. `adam(lr=3e-4)` or `step(every=1000, gamma=0.5)`."""

    name: str
    args: RawDict


class RawDict(dict):
    """A dict that remembers where it (`loc`) and each of its keys (`locs`) were written."""

    def __init__(self, loc: SourceLoc | None = None, **items: Any):
        super().__init__()
        self.loc = loc
        self.locs: dict[str, SourceLoc | None] = {}
        self.problems: list = []  # diagnostics of mistakes already dropped from the document
        self.inherited: set[str] = set()  # a step's keys filled in from `defaults`
        for key, value in items.items():
            self.put(key, value, loc)

    def put(self, key: str, value: Any, loc: SourceLoc | None) -> None:
        self[key] = value
        self.locs[key] = loc

    def copy(self) -> RawDict:  # type: ignore[override]
        new = RawDict(self.loc)
        for key, value in self.items():
            new.put(key, value, self.locs.get(key))
        return new


class SettingError(ValueError):
    """A setting value that cannot mean anything (the caller knows where it was written)."""


# user-facing setting names that differ from the spec's field names
TRAIN_ALIASES = {"augment": "hflip", "eval": "eval_every", "save": "save_every", "rewarm": "rewarm_at"}
OPTIMIZER_ARGS = ("lr", "betas", "eps", "tf_eps", "weight_decay")
#: schedule arguments -> TrainSpec fields (`step(every=, gamma=)`, `exponential(hold=, decay=, floor=)`)
SCHEDULE_ARGS = {
    "every": "step_every",
    "gamma": "step_gamma",
    "hold": "exp_hold",
    "decay": "exp_decay",
    "floor": "exp_floor",
}
#: the arguments each schedule uses
SCHEDULE_KIND_ARGS = {
    "constant": (),
    "cosine": (),
    "step": ("every", "gamma"),
    "exponential": ("hold", "decay", "floor"),
}
#: `then warmup(at=, steps=, lr=)` arguments -> TrainSpec fields: a second warmup, from 0 to lr
REWARM_ARGS = {"at": "rewarm_at", "steps": "rewarm_steps", "lr": "rewarm_lr"}
CONVERSIONS = {"all": ("size", "mode", "depth"), "none": ()}  # `convert all`, `convert none`
UNSET_WORDS = {  # `classes all`: every class; `path none`: the source's own place (a folder named so: "none")
    "classes": "all",
    "test_split": "none",
    "test_path": "none",
    "path": "none",
    "name": "none",
}


def interval(count: Any, unit: str) -> RawDict:
    """`100 steps` / `1 epoch` as the raw form of an `Interval`."""
    return RawDict(count=count, unit="steps" if unit.startswith("step") else "epochs")


def convert(section: str, key: str, value: Any) -> dict[str, Any]:
    """The spec fields (and their raw values) that `key value` sets in `section` (`data`, `train`, ...)."""
    if section == "train":
        key = TRAIN_ALIASES.get(key, key)
        if key in ("optimizer", "schedule"):
            return _call_setting(key, value)
        if key == "rewarm_at" and isinstance(value, (Call, Word)):
            return _rewarm(value)  # `then warmup(...)`, `--set train.rewarm=warmup(...)`, `=off`
        if key == "warmup":
            if isinstance(value, dict) and value.get("unit") == "epochs":
                raise SettingError("warmup is counted in steps, e.g. `warmup 2000 steps`")
            return {"warmup": value["count"] if isinstance(value, dict) else value}
        if key == "length" and value == "unbounded":
            return {"length": None}
        if key in ("clip_grad_norm", "ema", "save_every") and value == "off":
            return {key: None}
        if key == "hflip" and isinstance(value, Word):
            if value not in ("hflip", "none", "on", "off"):
                raise SettingError(f"augment is hflip or none, got {value}")
            return {"hflip": {"hflip": True, "none": False}.get(value, value)}
    if section == "eval":
        if key == "images" and value == "all":
            return {"images": None}
        if key == "temperatures" and not isinstance(value, tuple):
            return {"temperatures": (value,)}
    if section == "data":
        if key in UNSET_WORDS and isinstance(value, Word) and value == UNSET_WORDS[key]:  # back to none
            return {key: None}
        if key == "classes" and not isinstance(value, tuple):
            return {"classes": (value,)}
        if key == "convert":
            return {"convert": CONVERSIONS.get(value, (value,)) if isinstance(value, Word) else value}
        if key in ("path", "test_path", "name") and isinstance(value, Word):
            return {key: str(value)}
    return {key: value}


@dataclass(frozen=True)
class Reset:
    """A setting put back to its built-in value by a statement that did not write it (no source location)."""

    value: Any


def placed(fields: dict[str, Any], loc: Any) -> list[tuple[str, Any, Any]]:
    """`convert`'s fields as (name, value, where it was written): a `Reset` value was written nowhere."""
    return [(k, v.value, None) if isinstance(v, Reset) else (k, v, loc) for k, v in fields.items()]


def _schedule_resets(name: str) -> dict[str, Reset]:
    """The settings of the other schedules at their built-in values: a schedule that replaces another (in
    an extending file, or with --set) leaves none of their arguments behind, and keeps its own."""
    from flowspec.spec import TrainSpec

    uses = SCHEDULE_KIND_ARGS.get(name)
    if uses is None:  # an unknown schedule: validation says so
        return {}
    unused = [field for arg, field in SCHEDULE_ARGS.items() if arg not in uses]
    return {field: Reset(TrainSpec.model_fields[field].default) for field in unused}


def _rewarm(value: Any) -> dict[str, Any]:
    """`then warmup(at=N, steps=N, lr=LR)` after the schedule (`off`: none) as the three fields."""
    if value == "off":
        return {field: None for field in REWARM_ARGS.values()}
    if not (isinstance(value, Call) and value.name == "warmup"):
        raise SettingError(
            f"a second warmup is written `warmup(at=STEP, steps=N, lr=LR)` (after the schedule: `then "
            f"warmup(...)`), or `off` for none; got {value.name if isinstance(value, Call) else value}"
        )
    missing = [arg for arg in REWARM_ARGS if arg not in value.args]
    unknown = [arg for arg in value.args if arg not in REWARM_ARGS]
    if unknown:
        hint = did_you_mean(unknown[0], list(REWARM_ARGS))
        raise SettingError(f"unknown setting '{unknown[0]}' of the second warmup{hint}")
    if missing:
        raise SettingError(
            f"the second warmup needs at=STEP, steps=N and lr=LR; {', '.join(missing)} missing"
        )
    return {REWARM_ARGS[arg]: arg_value for arg, arg_value in value.args.items()}


def _call_setting(key: str, value: Any) -> dict[str, Any]:
    """`optimizer adam(lr=...)` and `then step(every=..., gamma=...)`: a name and its flattened arguments."""
    if isinstance(value, Word):
        return {key: value} | (_schedule_resets(value) if key == "schedule" else {})
    if not isinstance(value, Call):
        raise SettingError(f"{key} must be a name, e.g. `{'adam' if key == 'optimizer' else 'cosine'}`")
    allowed = OPTIMIZER_ARGS if key == "optimizer" else tuple(SCHEDULE_ARGS)
    fields: dict[str, Any] = {key: Word(value.name)}
    if key == "schedule":
        fields |= _schedule_resets(value.name)
    for arg, arg_value in value.args.items():
        if arg not in allowed:
            raise SettingError(f"unknown setting '{arg}' of {key} {value.name}{did_you_mean(arg, allowed)}")
        uses = SCHEDULE_KIND_ARGS.get(value.name) if key == "schedule" else None
        if uses is not None and arg not in uses:  # an unknown schedule's name is reported on its own
            takes = f"it takes {', '.join(uses)}" if uses else "it takes no settings"
            raise SettingError(f"the {value.name} schedule has no setting '{arg}': {takes}")
        fields[SCHEDULE_ARGS.get(arg, arg) if key == "schedule" else arg] = arg_value
    return fields
