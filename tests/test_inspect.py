"""`flowspec inspect`: the step tree, parameters, FLOPs, formats, --depth, and clean errors."""

from __future__ import annotations

import io
import json
import re
from dataclasses import replace
from functools import cache

import pytest
import torch
from conftest import ALL_SPECS, SPECS
from rich.console import Console
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import flowspec
from flowspec.cli.app import run
from flowspec.inspection import Report, inspect_model
from flowspec.inspection.flops import example_batch, forward_flops, step_flops
from flowspec.inspection.memory import estimate_memory, measure_memory
from flowspec.inspection.render import RENDERERS, fit_columns, fmt_flops, render_json, render_rich, to_json
from flowspec.inspection.report import ProbeSummary
from flowspec.inspection.tree import coupling_halves
from flowspec.steps import KINDS, walk
from flowspec.steps.coupling import CouplingStep
from flowspec.steps.flip import FlipStep
from flowspec.steps.norm import NormStep
from flowspec.steps.repeat import RepeatStep
from flowspec.steps.split import SplitStep


def _cpu_attention_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


# torch counts the CUDA attention kernels but not the CPU one: count it the same way
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
SMALL = ("defaults.coupling.filters=8", "defaults.coupling.components=4", "data.shape=3x8x8")


@cache
def built(
    name: str, overrides: tuple[str, ...] = (), device: str | None = None
) -> tuple[torch.nn.Module, Report]:
    """A shipped spec (path relative to specs/) built once per test session, and its report."""
    spec = flowspec.load_spec(SPECS / name, overrides=overrides)
    torch.manual_seed(0)
    model = flowspec.build(spec, device)
    return model, inspect_model(model, spec)


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = run(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- every shipped spec


@pytest.mark.parametrize("path", ALL_SPECS, ids=lambda p: str(p.relative_to(SPECS)))
def test_every_spec_in_every_format(path):
    model, report = built(str(path.relative_to(SPECS)), device="meta")  # counting needs no weights
    doc = to_json(report)
    leaves = [s for s in doc["steps"] if s["leaf"]]
    assert sum(s["params"] for s in leaves) == doc["params"]["total"] == trainable(model)
    assert doc["params"]["flow"] + doc["params"]["dequantize"] + doc["params"]["unassigned"] == trainable(
        model
    )
    flops = doc["flops_per_image"]
    assert flops["flow"] > 0 and sum(s["flops"] for s in leaves) == flops["flow"] + flops["dequantize"]
    assert doc["train_memory_bytes"] > 0
    if report.spec.target_params is not None:  # flowpp_cifar and the ablations carry their golden counts
        assert doc["target_delta"] == 0, f"{path.name}: {doc['params']['total']} != {doc['target_params']}"
    for fmt, render in RENDERERS.items():
        text = render(report)
        assert report.spec.name in text or fmt == "mermaid", fmt
        if fmt in ("dot", "mermaid"):
            for row in report.rows():
                if row.leaf:
                    assert "n_" + row.path.replace(".", "_") in text, (fmt, row.path)
    assert json.loads(render_json(report)) == json.loads(json.dumps(doc))


def test_flowpp_golden_tree_and_footer():
    model, report = built("flowpp_cifar.flow")
    assert (report.total, report.branch("flow").params, report.branch("dequantize").params) == (
        31_443_440,
        27_976_464,
        3_466_976,
    )
    rows = {row.path: row for row in report.rows()}
    assert rows["dequantize.context"].params == 167_936
    assert rows["flow.0.body.0.body.2"].params == 4 * 2_805_990  # four copies of one main coupling at C = 3
    assert rows["flow.0.body.0.body.2"].settings == "mixlogistic k32 f96 b10 h4 p0.2"
    assert rows["flow.0.body.0.body.2"].source == "flowpp_cifar.flow:21"
    assert rows["flow.0.body.0.body.2"].halves == "a>b,b>a"  # flips alternate the conditioning half
    assert rows["flow.1"].shape_out == "12x16x16"
    assert rows["flow.3.body.0.body.2"].shape_in == "(12x16x8, 12x16x8)"
    assert report.couplings == {"flow": 9, "dequantize": 4}
    # a training step is ~3 forward passes: 77.6 GFLOP per image, so 25.9 GFLOP forward
    assert sum(forward_flops(step_flops(model, report))) == 25_851_936_768


def test_factor_out_shows_the_latent_of_its_scale():
    _, report = built("realnvp_cifar.flow")
    rows = {row.path: row for row in report.rows()}
    factor = rows["flow.3"]
    assert (factor.kind, factor.settings, factor.latent) == ("factor_out", "z 6x16x16", "6x16x16")
    assert (factor.shape_in, factor.shape_out) == ("12x16x16", "6x16x16")
    assert rows["flow.4.body.0.body.0"].shape_in == "(6x16x8, 6x16x8)"


def test_flowpp_default_view_fits_120_columns():
    _, report = built("flowpp_cifar.flow")
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(render_rich(report))
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120
    row = next(line for line in lines if "coupling mixlogistic k32 f96 b10" in line)
    assert "L21" in row and "11,223,960" in row and "a>b,b>a" in row and "…" not in row
    assert re.search(r"target\s+31,443,440: match", text)
    assert "25.9 GFLOP per image" in text
    assert re.search(r"couplings\s+13 \(flow 9, dequantizer 4\)", text)


def test_cli_inspect_at_120_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    code, out, _ = cli(capsys, "inspect", str(SPECS / "flowpp_cifar.flow"))
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= 120
    assert "dequantize variational" in out and "31,443,440" in out


def rich_text(report: Report, width: int) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(render_rich(report))
    return console.export_text()


@pytest.mark.parametrize("width", [80, 100, 120])
@pytest.mark.parametrize("path", ALL_SPECS, ids=lambda p: str(p.relative_to(SPECS)))
def test_rich_view_never_cuts_a_number_or_a_line_label(path, width):
    _, report = built(str(path.relative_to(SPECS)))
    text = rich_text(report, width)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width and "…" not in text
    doc = to_json(report)
    counts = {s["params"] for s in doc["steps"] if s["params"]} | set(doc["params"].values()) - {0}
    for n in counts:  # every parameter count whole: not cut, not broken over two lines
        assert re.search(rf"(?<![\d,]){n:,}(?![\d,])", text), f"{n:,} missing at width {width}"
    flat = " ".join(text.split())
    for n in doc["flops_per_image"].values():
        assert n is None or fmt_flops(n) in flat
    header = next(line for line in lines if line.startswith("step "))
    shown = re.split(r"\s{2,}", header.strip())
    assert shown[0] == "step" and "params" in shown
    if "line" in shown:  # every step's line, as `L12`, the file named once in the title
        written = {int(s["source"].rpartition(":")[2]) for s in doc["steps"] if s.get("source")}
        assert {int(n) for n in re.findall(r"(?<!\S)L(\d+)(?!\S)", text)} == written
        assert ".flow:" not in text
    legend = flat[flat.index("couplings ") :]
    assert ("cond: a>b" in legend) == ("cond" in shown)
    assert ("Coupling: " in legend) == any(s["kind"] == "coupling" for s in doc["steps"])


def test_the_legend_explains_only_what_the_rows_shown_use(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("COLUMNS", "100")

    def legend(*args: str) -> str:
        assert run(["inspect", *args]) == 0
        flat = " ".join(capsys.readouterr().out.split())
        return flat[flat.rindex("couplings") :]

    full = legend(str(SPECS / "flowpp_cifar.flow"))
    assert "Coupling: k components, f filters, b blocks, h attention heads, p dropout." in full
    assert "cond: a>b" in full and "inside a repeat" in full and "3x3" not in full and "Context" not in full
    stages = legend(str(SPECS / "flowpp_cifar.flow"), "--depth", "1")  # no coupling, cond or repeat shown
    assert (
        stages.endswith("Context: f filters, b blocks.") and "Coupling" not in stages and "cond" not in stages
    )
    realnvp = legend(str(SPECS / "realnvp_cifar.flow"))
    assert "Coupling: f filters, b blocks, bn batch-normalized." in realnvp and "k components" not in realnvp
    plain = tmp_path / "plain.flow"  # no coupling at all
    plain.write_text(
        (SPECS / "quickstart.flow").read_text().replace("pointwise; coupling; flip", "pointwise; flip")
    )
    assert "Coupling" not in legend(str(plain)) and "Coupling" not in legend(str(plain), "--format", "md")


def test_narrow_terminals_drop_the_least_wanted_columns_first():
    widths = {"step": 40, "line": 3, "cond": 7, "shape": 18, "params": 10, "share": 5}
    assert fit_columns(widths, 200) == ["step", "line", "cond", "shape", "params", "share"]
    assert fit_columns(widths, 90) == ["step", "line", "cond", "shape", "params"]
    assert fit_columns(widths, 80) == ["step", "line", "shape", "params"]
    assert fit_columns(widths, 72) == ["step", "shape", "params"]  # line comes before cond and share
    assert fit_columns(widths, 68) == ["step", "line", "cond", "params"]  # shape does not fit: the next do
    assert fit_columns(widths, 60) == ["step", "line", "params"]
    assert fit_columns(widths, 20) == ["step", "params"]
    assert fit_columns(dict(widths, cond=0), 200) == ["step", "line", "shape", "params", "share"]  # empty


def test_probe_columns_come_before_the_others_and_the_legend_follows(monkeypatch):
    _, report = built("quickstart.flow")
    rows = report.rows()
    for row in rows:
        row.logdet_bpd, row.inverse_error = -0.25, 3e-7
    report.probe = ProbeSummary(
        batch=4, data="random images", bpd=4.0, logdet_bpd=-2.0, max_inverse_error=1e-6
    )
    try:
        text = rich_text(report, 80)
    finally:
        report.probe = None
        for row in rows:
            row.logdet_bpd = row.inverse_error = None
    header = next(line for line in text.splitlines() if line.startswith("step "))
    assert "logdet b/d" in header and "inv err" in header and "share" not in header
    flat = " ".join(text.split())
    assert "logdet b/d: the step's log-det" in flat and "inv err: the largest" in flat
    assert ("cond: a>b" in flat) == ("cond" in header)


# ---------------------------------------------------------------- FLOPs, depth, target


def test_flops_match_torch_flop_counter():
    for overrides in (SMALL, (*SMALL, "defaults.coupling.attention=off")):
        model, report = built("flowpp_cifar.flow", overrides)
        counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
        model.eval()
        with torch.no_grad(), counter:
            model.log_prob(torch.randint(0, 256, (1, 3, 8, 8)))
        assert sum(forward_flops(step_flops(model, report))) == counter.get_total_flops()


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("flowpp_cifar.flow", (*SMALL, "defaults.coupling.blocks=2")),  # 2 blocks of 10: 3 times faster
        (  # all 10 blocks, attention's included
            "flowpp_cifar.flow",
            ("defaults.coupling.filters=8", "data.shape=3x16x16", "defaults.coupling.dropout=0"),
        ),
        ("ablations/affine_coupling.flow", SMALL),
        ("ablations/no_attention.flow", SMALL),
        ("ablations/no_attention.flow", (*SMALL, "defaults.coupling.nin=off")),  # c2 a 3x3 conv: kept
        ("imagenet32.flow", (*SMALL, "defaults.coupling.blocks=1", "dequantize.context.blocks=2")),
        ("realnvp_cifar.flow", ("data.shape=3x8x8",)),
        # small affine couplings: their network's output (kept by none of the transform's ops) is most
        (
            "realnvp_cifar.flow",
            ("data.shape=3x16x16", "defaults.coupling.filters=8", "defaults.coupling.blocks=1"),
        ),
        ("quickstart.flow", ("defaults.coupling.coupling=additive",)),
    ],
)
def test_memory_estimate_matches_what_autograd_keeps(name, overrides):
    """The analytic activations agree with the tensors a training-mode pass keeps for backward."""
    model, report = built(name, overrides)
    spec = flowspec.load_spec(SPECS / name, overrides=overrides)
    measured = measure_memory(model, spec, example_batch(spec, 2))
    estimated = estimate_memory(model, spec, report)
    assert estimated.state == measured.state
    assert estimated.activations == pytest.approx(measured.activations, rel=0.03)
    assert report.footer.memory_bytes == estimated.total


def test_the_flop_and_memory_rules_get_one_halfs_shape_and_the_count_of_halves(monkeypatch):
    """A layer without parameters (flip) tells from its rules' arguments how many halves it runs on."""
    seen = set()

    def flops(layer, shape, halves):
        seen.add(("flops", shape, halves))
        return halves * shape[0] * shape[1] * shape[2]

    def memory(layer, shape, halves, itemsize):
        seen.add(("memory", shape, halves, itemsize))
        return 0

    monkeypatch.setitem(KINDS, "flip", replace(KINDS["flip"], flops=flops, memory=memory))
    model, report = built("quickstart.flow")
    spec = flowspec.load_spec(SPECS / "quickstart.flow")
    assert step_flops(model, report)["flow.0.body.0.body.3"] == 2 * 2 * 1 * 8 * 4  # 2 copies of 1x8x8
    estimate_memory(model, spec, report)
    halves = {((1, 8, 4), 2), ((2, 4, 4), 2)}  # a 1x8x8 checkerboard split, a 4x4x4 channel split
    assert seen == {("flops", *h) for h in halves} | {("memory", *h, 4) for h in halves}


def test_depth_one_is_one_row_per_stage(capsys):
    _, report = built("flowpp_cifar.flow", SMALL)
    steps = to_json(report, depth=1)["steps"]
    assert [s["path"] for s in steps] == [
        "dequantize.context",
        "dequantize.0",
        "dequantize.1",
        "preprocess",
        "flow.0",
        "flow.1",
        "flow.2",
        "flow.3",
    ]
    assert all(s["leaf"] for s in steps) and sum(s["params"] for s in steps) == report.total
    deeper = to_json(report, depth=2)["steps"]
    assert {s["depth"] for s in deeper} == {0, 1} and sum(
        s["params"] for s in deeper if s["leaf"]
    ) == report.total
    code, out, _ = cli(capsys, "inspect", str(SPECS / "quickstart.flow"), "--depth", "1", "--format", "md")
    assert code == 0 and "`repeat" not in out and "`split checkerboard`" in out


def test_target_params_option(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    args = ("inspect", str(SPECS / "quickstart.flow"), "--format", "json")
    code, out, _ = cli(capsys, *args, "--target-params", "200000")
    doc = json.loads(out)
    assert code == 0 and doc["target_params"] == 200_000
    assert doc["target_delta"] == doc["params"]["total"] - 200_000 != 0
    code, out, _ = cli(capsys, *args[:-2], "--target-params", "200000")
    delta = doc["target_delta"]
    assert re.search(rf"target\s+200,000: {delta:+,} \({100 * delta / 200_000:+.2f}%\)", out)


def test_coupling_halves_follow_flips():
    def halves(body: list, copies: int = 1) -> dict[str, list[str]]:
        split = SplitStep(mask="channel", body=body)
        steps = [RepeatStep(count=copies, body=[split])] if copies > 1 else [split]
        return coupling_halves(walk(steps, (4, 2, 2), unroll=True).all())

    c = CouplingStep
    assert halves([RepeatStep(count=4, body=[NormStep(), c(), FlipStep()])]) == {
        "flow.0.body.0.body.1": ["a>b", "b>a", "a>b", "b>a"]
    }
    assert halves([RepeatStep(count=2, body=[c(), FlipStep(), c(), FlipStep()])]) == {
        "flow.0.body.0.body.0": ["a>b", "a>b"],
        "flow.0.body.0.body.2": ["b>a", "b>a"],
    }
    # each split starts again with its mask's first half conditioning
    assert halves([FlipStep(), c()], copies=2) == {"flow.0.body.0.body.1": ["b>a", "b>a"]}


def test_every_format_from_the_cli(capsys):
    spec = str(SPECS / "quickstart.flow")
    outputs = {}
    for fmt in ("rich", "json", "md", "dot", "mermaid"):
        code, outputs[fmt], err = cli(capsys, "inspect", spec, "--format", fmt)
        assert code == 0, err
    assert json.loads(outputs["json"])["name"] == "quickstart"
    assert outputs["md"].count("\n| ") >= 10 and "| step | source |" in outputs["md"]
    assert outputs["dot"].startswith('digraph "quickstart"') and outputs["dot"].count("{") == outputs[
        "dot"
    ].count("}")
    mermaid = outputs["mermaid"]
    assert mermaid.startswith("flowchart TB") and mermaid.count("subgraph") == mermaid.count(
        "\n  end"
    ) + mermaid.count("\n    end") + mermaid.count("\n      end")


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "specs/nope.flow"], "nope.flow"),
        (["inspect", "specs/quickstart.flow", "--format", "xml"], "xml"),
        (["inspect", "specs/quickstart.flow", "--depth", "0"], "depth"),
        (["inspect", "specs/quickstart.flow", "--batch", "0"], "batch"),
        (["inspect", "specs/quickstart.flow", "--data", "somewhere"], "--probe"),
        (["inspect", "specs/quickstart.flow", "--set", "defaults.coupling.filters=-3"], "filters"),
    ],
)
def test_bad_options_and_specs_exit_2(capsys, monkeypatch, argv, message):
    monkeypatch.chdir(SPECS.parent)
    code, out, err = cli(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err + out


def test_bad_spec_file_exit_2(capsys, tmp_path):
    bad = tmp_path / "bad.flow"
    bad.write_text("model bad\nflow {\n  squeeze\n  coupling\n}\n")
    code, out, err = cli(capsys, "inspect", str(bad))
    assert code == 2 and "bad.flow:4:" in err and "two halves" in err and "Traceback" not in err


def test_file_names_are_not_markup_nor_table_syntax_and_a_zero_target_has_no_percentage(tmp_path, capsys):
    folder = tmp_path / "[red]runs"
    folder.mkdir()
    base = folder / "base[bold] |x.flow"
    base.write_text(
        "model b\ndata digits { shape 1x8x8 levels 17 }\nflow { split stripe { coupling(filters=4) } }\n"
    )
    kid = folder / "kid[b].flow"
    kid.write_text(f'extends "{base.name}"\nmodel k\neval {{ images 10 }}\n')
    assert run(["inspect", str(kid), "--target-params", "0"]) == 0
    out = capsys.readouterr().out
    assert "base[bold] |x.flow" in out  # the heading names the file the steps are written in
    assert re.search(r"target\s+0: \+\d[\d,]*\s*$", out, re.M)  # no division by the zero target
    assert run(["inspect", str(kid), "-f", "md"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| &nbsp;")]
    assert rows and all(line.count(" | ") == 5 for line in rows) and "base[bold] \\|x.flow:3" in rows[1]
    assert run(["diff", str(base), str(kid)]) == 0
    out = capsys.readouterr().out
    assert "kid[b].flow:2" in out and re.search(r"eval\.images\s+all\s+10", out)


def test_the_memory_estimate_counts_the_micro_batch_of_accumulate(capsys):
    """With `accumulate 4` a step holds the activations of batch/4 images at once, not of the batch."""
    from flowspec.inspection.budget import measure

    whole = measure(flowspec.load_spec(SPECS / "quickstart.flow"))
    micro = measure(flowspec.load_spec(SPECS / "quickstart.flow", overrides=["train.accumulate=4"]))
    assert whole.per_image == micro.per_image > 0
    from flowspec.inspection.memory import peak_factor

    assert whole.train - micro.train == pytest.approx(peak_factor(True) * whole.per_image * (32 - 8), abs=2)
    assert run(["inspect", str(SPECS / "quickstart.flow"), "--set", "train.accumulate=4"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "to train at batch 32 in 4 micro-batches of 8:" in shown
    assert "with --recompute off (~" in shown and "in bf16), which auto picks where that fits" in shown


def test_the_estimate_is_the_peak_of_a_training_step_not_the_kept_tensors(capsys):
    """Measured peaks (bench/RESULTS.md): flowpp_cifar at batch 16, fp32 recomputing, 2.46 GiB resident and
    at batch 8 keeping every activation 2.78 GiB (1.91 and 2.32 GiB estimated before the backward pass's
    peak was counted); imagenet32 at batch 1, 4.12 GiB (3.35 before the optimizer step's temporaries). The
    estimate bounds each within 25%."""
    from flowspec.inspection.budget import measure, training_bytes

    for name, batch, recompute, measured in [
        ("flowpp_cifar", 16, True, 2.46),
        ("flowpp_cifar", 8, False, 2.78),
        ("imagenet32", 1, True, 4.12),
        ("realnvp_cifar", 32, True, 1.10),
    ]:
        spec = flowspec.load_spec(SPECS / f"{name}.flow", [f"train.batch={batch}"])
        estimated = training_bytes(measure(spec), spec, recompute=recompute) / 2**30
        assert measured <= estimated <= 1.25 * measured, name
    shown = " ".join(cli(capsys, "inspect", str(SPECS / "flowpp_cifar.flow"))[1].split())
    assert (
        "peak of a training step with --recompute on" in shown
        and "x2.15 at the backward pass's peak" in shown
    )


def test_a_coupling_label_shows_every_network_option_away_from_its_default():
    from flowspec.steps.coupling import CouplingSettings, label

    assert (
        label(CouplingSettings(components=4, filters=96, blocks=16, heads=4)) == "mixlogistic k4 f96 b16 h4"
    )
    changed = CouplingSettings(
        components=4, filters=96, blocks=16, heads=4, final_elu=True, layernorm=False, nin=False
    )
    assert label(changed) == "mixlogistic k4 f96 b16 h4 noln 3x3 elu"


@pytest.mark.parametrize(
    "steps",
    ["split checkerboard { norm; coupling; flip } sigmoid", "norm; pointwise; sigmoid"],
    ids=["split", "no-split"],
)
def test_the_context_row_has_the_shape_the_context_network_returns(steps):
    """inspect's context row and the built context network agree on its output (channels last: N H W F),
    with a split in the dequantizer and, in a stored spec from before the rule that refuses it, without."""
    text = (
        "model m\ndata digits { shape 1x8x8  levels 17 }\n"
        "defaults { coupling(filters=4, blocks=1, heads=1, components=2) }\n"
        f"dequantize variational {{ context(filters=8, blocks=1) {steps} }}\n"
        "flow { split stripe { coupling; flip } }\n"
    )
    spec = flowspec.parse_spec(text, stored=True)
    model = flowspec.build(spec)
    seen = []
    model.dequantizer.context_net.register_forward_hook(lambda m, i, out: seen.append(tuple(out.shape)))
    model.log_prob(torch.randint(0, 17, (4, 1, 8, 8)))
    (row,) = [r for r in inspect_model(model, spec).rows() if r.path == "dequantize.context"]
    n, h, w, f = seen[0]
    assert row.state_out == (f, h, w) == (8, 8, 4)


def test_the_note_gives_the_recompute_off_figures_where_the_choice_changes_something():
    """Flow++ blocks recompute: the note says what keeping every activation would take, in fp32 and bf16;
    RealNVP has nothing to recompute, and its note says so rather than naming --recompute."""
    from flowspec.inspection import inspect_spec
    from flowspec.inspection.budget import measure, training_bytes
    from flowspec.units import fmt_bytes

    spec = flowspec.load_spec(SPECS / "flowpp_cifar.flow")
    size = measure(spec)
    off, off_bf16 = (training_bytes(size, spec, recompute=False, precision=p) for p in ("fp32", "bf16"))
    note = inspect_spec(spec).footer.memory_note
    assert f"; ~{fmt_bytes(off)} with --recompute off (~{fmt_bytes(off_bf16)} in bf16), which auto" in note
    plain = inspect_spec(flowspec.load_spec(SPECS / "realnvp_cifar.flow")).footer.memory_note
    assert plain.startswith("peak of a training step (no layer to recompute): ")
    assert "--recompute off" not in plain
