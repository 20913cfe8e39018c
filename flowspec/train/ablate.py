"""Ablations: several specs trained for the same budget on the same data and seed, then compared."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from flowspec.spec import FlowSpec
from flowspec.train.metrics import plot_curves
from flowspec.train.signals import StopCheck, never
from flowspec.train.trainer import RunOptions, RunResult, train

COLUMNS = ("spec", "parameters", "test bits/dim", "best bits/dim", "steps", "img/s")


def with_seed(spec: FlowSpec, seed: int) -> FlowSpec:
    return spec.model_copy(update={"train": spec.train.model_copy(update={"seed": seed})})


def run_ablation(
    specs: list[FlowSpec], options: RunOptions, out: Path, seed: int, stop: StopCheck = never
) -> list[RunResult]:
    """Train each spec into `out/<name>` under the same options; write `ablation.json` and `curves.png`.

    A stop signal (`stop`, or one that stopped a run) ends it: the runs so far are returned, fewer than
    the specs or with the last one stopped by the signal, and nothing is compared."""
    names = [s.name for s in specs]
    folders = [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]
    results: list[RunResult] = []
    for spec, folder in zip(specs, folders, strict=True):
        if stop():
            return results
        results.append(train(with_seed(spec, seed), replace(options, out=out / folder)))
        if results[-1].stopped in ("SIGINT", "SIGTERM"):
            return results
    rows = [dict(zip(COLUMNS, row_values(r, f), strict=True)) for r, f in zip(results, folders, strict=True)]
    (out / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot_curves({f: r.history for r, f in zip(results, folders, strict=True)}, out / "curves.png", "ablation")
    return results


def row_values(result: RunResult, name: str) -> tuple:
    return (name, result.parameters, result.test_bpd, result.best_bpd, result.step, round(result.img_s, 1))
