"""An ablation's plan: what it trains, with which settings, and the result of each run as it finishes.

Kept in `OUT/ablation-plan.json`, written before the first run, so that an interrupted ablation can be
finished (`flowspec ablate --resume OUT`) with the very specs and settings it started with.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flowspec.errors import UserError, flowspec_command, naming
from flowspec.spec import EvalSpec, FlowSpec
from flowspec.train.files import replaced_whole
from flowspec.train.metrics import read_metrics
from flowspec.train.trainer import RunOptions, RunResult

PLAN = "ablation-plan.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlannedRun(_Strict):
    """One spec of the ablation: its run folder (in OUT), its file, its data folder, the resolved spec."""

    folder: str = Field(min_length=1, pattern=r"^[^/\\]+$")
    file: str | None
    data_dir: str | None  # absolute, so that a resume from another working directory reads the same data
    spec: dict[str, Any]  # FlowSpec's JSON, seed set


class PlannedOptions(_Strict):
    """The options every run trains with; the budget is `max_steps` or `max_run_time`."""

    device: str | None = None
    precision: Literal["fp32", "bf16", "auto"] | None = None
    compile: bool = False
    recompute: Literal["auto", "on", "off"] = "auto"
    data_memory: int | None = Field(default=None, ge=0)  # 0: stream the data
    max_steps: int | None = Field(default=None, ge=1)
    max_run_time: float | None = Field(default=None, gt=0)
    threads: int | None = Field(default=None, ge=1)
    eval: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_budget(self) -> PlannedOptions:
        if (self.max_steps is None) == (self.max_run_time is None):
            raise ValueError("an ablation's budget is one of max_steps and max_run_time")
        return self


class RunRecord(_Strict):
    """What the plan keeps of a finished run (its history is its metrics file)."""

    step: int = Field(ge=0)
    epoch: float
    stopped: str
    test_bpd: float | None
    best_bpd: float | None
    img_s: float
    parameters: int = Field(ge=0)
    best_scheduled: bool


class Plan(_Strict):
    """The plan of one ablation (see the module's docstring)."""

    runs: list[PlannedRun] = Field(min_length=1)
    options: PlannedOptions
    budget: str  # how the table's title says it: "20 steps", "20m"
    overrides: list[str] = Field(default_factory=list)
    results: dict[str, RunRecord] = Field(default_factory=dict)  # by run folder

    @model_validator(mode="after")
    def _folders(self) -> Plan:
        folders = [run.folder for run in self.runs]
        if len(set(folders)) < len(folders):
            raise ValueError(f"two runs share a folder: {folders}")
        if unknown := set(self.results) - set(folders):
            raise ValueError(f"results of runs not planned: {sorted(unknown)}")
        return self

    @classmethod
    def make(
        cls,
        specs: list[FlowSpec],
        folders: list[str],
        data_dirs: list[Path | None],
        options: RunOptions,
        budget: str,
        overrides: list[str],
    ) -> Plan:
        """The plan of `specs` (seed set) trained into `folders` under `options`."""
        runs = [
            PlannedRun(
                folder=folder,
                file=spec.source,
                data_dir=str(data) if data else None,
                spec=json.loads(spec.model_dump_json()),
            )
            for spec, folder, data in zip(specs, folders, data_dirs, strict=True)
        ]
        planned = {name: getattr(options, name) for name in PlannedOptions.model_fields}
        return cls(runs=runs, options=PlannedOptions(**planned), budget=budget, overrides=overrides)

    @classmethod
    def read(cls, out: Path) -> Plan:
        """The plan of the ablation in `out`; a `UserError` naming the file when there is none or it is
        not a plan this flowspec wrote (damaged, edited)."""
        path = out / PLAN
        if not path.is_file() and (out / "ablation.json").is_file():
            raise UserError(
                f"{out} holds an ablation written by an older flowspec (its ablation.json, no {PLAN}, the "
                f"plan a resume reads), which cannot be resumed: {_again(out / 'ablation.json')}"
            )
        if not path.is_file():
            raise UserError(
                f"{out} holds no ablation to resume: expected {path}, which `flowspec ablate` writes before "
                "its first run"
            )
        try:
            with naming(path, "reading"):
                plan = cls.model_validate_json(path.read_text())
            for spec in plan.specs:  # the specs, and the eval settings over each one's
                EvalSpec.model_validate({**spec.eval.model_dump(), **plan.options.eval})
        except ValidationError as error:
            wrong = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'plan'}: {e['msg']}" for e in error.errors()[:3]
            )
            raise UserError(f"{path} is damaged ({wrong}); the ablation cannot be resumed") from None
        return plan

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        with replaced_whole(out / PLAN) as partial:
            partial.write_text(self.model_dump_json(indent=2) + "\n")

    @cached_property
    def specs(self) -> list[FlowSpec]:
        """The resolved specs, each with the file it came from."""
        return [
            FlowSpec.model_validate_json(json.dumps(run.spec)).model_copy(update={"source": run.file})
            for run in self.runs
        ]

    def run_options(self, how: RunOptions) -> RunOptions:
        """`how` (device, threads, quiet, data folder) with the plan's options over it; the device and threads
        are the plan's unless `how` names them."""
        planned = self.options.model_dump()
        planned["device"] = how.device or planned["device"]
        planned["threads"] = how.threads or planned["threads"]
        return replace(how, **planned)

    def record(self, run: RunResult) -> None:
        """Keep the result of a finished run."""
        self.results[run.run_dir.name] = RunRecord(
            **{name: getattr(run, name) for name in RunRecord.model_fields}
        )

    def finished(self, out: Path, folder: str) -> RunResult:
        """The result of a run finished before the ablation was resumed, with its history up to it (not
        what was trained outside the ablation after it)."""
        saved = self.results[folder]
        history = read_metrics(out / folder, after_step=saved.step)
        return RunResult(out / folder, history=history, **saved.model_dump())


def _again(results: Path) -> str:
    """How to run the ablation of an older flowspec's `results` (its ablation.json) again: the command,
    where its rows name their spec files (and the same `--set` overrides), else the models to compare."""
    try:
        rows = json.loads(results.read_text())
        names = [str(row.get("spec") or "") for row in rows]
        files = [row.get("file") for row in rows]
        sets = {tuple(row.get("overrides") or ()) for row in rows}
    except (OSError, ValueError, TypeError, AttributeError):  # not the list of rows it wrote
        names, files, sets = [], [], set()
    if files and all(isinstance(f, str) and f for f in files) and len(sets) == 1:
        words = [word for override in next(iter(sets)) for word in ("--set", override)]
        command = flowspec_command("ablate", *files, *words, "--out", "NEW_FOLDER")
        return f"run it again into another folder, `{command}` (with the --steps and other options it had)"
    models = f" ({', '.join(names)})" if names and all(names) else ""
    return (
        f"run `flowspec ablate` again with the spec files it compared{models} and its options, into another "
        "folder (--out NEW_FOLDER)"
    )
