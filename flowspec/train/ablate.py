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
    the specs or with the last one stopped by the signal, and only the finished runs are compared."""
    names = [s.name for s in specs]
    folders = [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]
    results: list[RunResult] = []
    for spec, folder in zip(specs, folders, strict=True):
        if stop():
            break
        results.append(train(with_seed(spec, seed), replace(options, out=out / folder)))
        if is_signal(results[-1].stopped):
            break
    finished = [r for r in results if not is_signal(r.stopped)]
    if finished:  # a run stopped by a signal is not compared
        rows = [dict(zip(COLUMNS, row_values(r), strict=True)) for r in finished]
        (out / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
        plot_curves({r.run_dir.name: r.history for r in finished}, out / "curves.png", "ablation")
    return results


def is_signal(stopped: str | None) -> bool:
    """Whether a run (or the ablation) was stopped by SIGINT or SIGTERM."""
    return stopped in ("SIGINT", "SIGTERM")


def row_values(result: RunResult) -> tuple:
    """A row of the comparison: the run's folder name, parameters, last and best test bits/dim, steps and
    training images per second (3 significant digits: slow models train at a fraction of an image)."""
    rate = float(f"{result.img_s:.3g}")
    return (result.run_dir.name, result.parameters, result.test_bpd, result.best_bpd, result.step, rate)


def fmt_rate(img_s: float) -> str:
    """`1,234`, `45.6`, `0.312` img/s."""
    return f"{img_s:,.0f}" if img_s >= 100 else f"{img_s:.3g}"
