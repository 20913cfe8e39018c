"""`flowspec diff A B`: settings that differ, step by step, and the parameter deltas per stage."""

from __future__ import annotations

import re

from conftest import SPECS

import flowspec
from flowspec.cli.app import run
from flowspec.inspection import inspect_spec
from flowspec.inspection.diff import parameter_deltas, spec_differences

FLOWPP = SPECS / "flowpp_cifar.flow"
UNIFORM = SPECS / "ablations" / "uniform_dequant.flow"


def test_ablation_differences_name_paths_and_sources():
    a, b = flowspec.load_spec(FLOWPP), flowspec.load_spec(UNIFORM)
    diffs = {d.path: d for d in spec_differences(a, b)}
    assert set(diffs) == {
        "name",
        "target_params",
        "dequantize",
        "defaults.coupling.filters",
        "flow.0.body.0.body.2.filters",
        "flow.2.body.0.body.2.filters",
        "flow.3.body.0.body.2.filters",
    }
    assert (diffs["dequantize"].a, diffs["dequantize"].b) == ("variational", "uniform")
    coupling = diffs["flow.2.body.0.body.2.filters"]
    assert (coupling.a, coupling.b, coupling.source_a) == ("96", "104", "flowpp_cifar.flow:23")
    assert spec_differences(a, flowspec.load_spec(FLOWPP)) == []


def test_added_and_removed_steps():
    a = flowspec.load_spec(SPECS / "realnvp_cifar.flow")
    b = flowspec.load_spec(SPECS / "seed_realnvp_cifar.flow")
    diffs = {d.path: d for d in spec_differences(a, b)}
    assert diffs["flow.3"].a == "factor_out" and diffs["flow.3"].b is None
    assert diffs["flow.0.body.0.count"].a == "3" and diffs["flow.0.body.0.count"].b == "8"


def test_parameter_deltas_per_stage():
    a, b = flowspec.load_spec(FLOWPP), flowspec.load_spec(UNIFORM)
    deltas = {
        s.stage: s for s in parameter_deltas(inspect_spec(a, measure=False), inspect_spec(b, measure=False))
    }
    assert (deltas["total"].a, deltas["total"].b, deltas["total"].delta) == (31_443_440, 32_324_408, 880_968)
    assert deltas["dequantize (all)"].delta == -3_466_976 and deltas["dequantize.context"].b is None
    assert deltas["flow (all)"].delta == 32_324_408 - 27_976_464
    stages = [s for name, s in deltas.items() if name.startswith("flow.")]
    assert sum(s.delta for s in stages) == deltas["flow (all)"].delta


def test_cli_diff_with_set_and_equal_specs(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    quick = str(SPECS / "quickstart.flow")
    spec = flowspec.load_spec(quick)
    assert run(["diff", quick, "--set", "train.lr=0.0123", "--set", "defaults.coupling.blocks=7"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"train\.lr\s+{spec.train.lr}\s+0\.0123", out)
    line = spec.flow[0].body[0].body[2].source.line
    assert "flow.0.body.0.body.2.blocks" in out and f"quickstart.flow:{line}" in out
    assert "total" in out and "+" in out
    assert run(["diff", quick, quick]) == 0
    assert "the specs are equal" in capsys.readouterr().out


def test_cli_diff_bad_spec_exit_2(capsys):
    assert run(["diff", str(FLOWPP), str(SPECS / "missing.flow")]) == 2
    err = capsys.readouterr().err
    assert "missing.flow" in err and "Traceback" not in err
