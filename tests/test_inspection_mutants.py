"""Figures of `inspect` and the budget checked against values worked out by hand (or by torch's own FLOP
counter) on tiny specs, and the command line's option ranges, defaults and exit codes: each test kills a
mutant (a wrong factor, a dropped term, an off-by-one limit) that every other test passed."""

from __future__ import annotations

import pytest
import torch
from test_inspect import CPU_ATTENTION, cli
from torch.utils.flop_counter import FlopCounterMode

import flowspec
from flowspec import devices
from flowspec.errors import UserError
from flowspec.inspection import inspect_model, inspect_spec
from flowspec.inspection.budget import check_size, measure
from flowspec.inspection.memory import RUNTIME, estimate_memory, training_peak
from flowspec.units import fmt_bytes

DIGITS = "model t\ndata digits { shape 1x8x8  levels 17 }\n"
TINY_COUPLING = "defaults { coupling(components=2, filters=4, blocks=1, heads=1) }\n"


def tiny(flow: str, head: str = "") -> flowspec.FlowSpec:
    return flowspec.parse_spec(DIGITS + TINY_COUPLING + head + "flow {\n  " + flow + "\n}\n")


def test_weights_are_four_bytes_per_parameter_and_a_norm_keeps_its_output():
    """An element norm on 1x8x8: a log-scale and a bias per element, 2 x 64 = 128 parameters of 4 bytes;
    it keeps its output for backward, 64 float32s = 256 bytes per image."""
    size = measure(tiny("norm"))
    assert (size.parameters, size.weights, size.per_image, size.largest_step) == (128, 512, 256, 256)


def test_the_largest_step_is_the_largest_not_the_last():
    """A norm (256 bytes per image) after a coupling does not make the norm the largest step."""
    coupling = measure(tiny("split stripe { coupling }")).largest_step
    assert coupling > 256
    both = measure(tiny("split stripe { coupling }\n  norm"))
    assert both.largest_step == coupling and both.per_image == coupling + 256


def test_advice_of_an_inference_refusal_depends_on_whether_the_weights_fit(monkeypatch):
    """Only the images at once need to change when the weights (512 bytes) fit; else the model is too
    large whatever the batch."""
    spec = tiny("norm")
    monkeypatch.setattr(devices, "device_memory", lambda device="cpu": 600)
    with pytest.raises(UserError, match=r"Take fewer images at once \(--batch\)"):
        check_size(spec, "infer", images=4)  # 512 + 4 x 256 > 600
    monkeypatch.setattr(devices, "device_memory", lambda device="cpu": 500)
    with pytest.raises(UserError) as refused:
        check_size(spec, "infer", images=4)
    assert "Take fewer images" not in str(refused.value) and "Lower the settings" in str(refused.value)


def test_training_peak_adds_the_terms_it_names():
    """state + runtime + (bf16: one copy of the weights) + the larger of the backward pass's peak
    (kept x the factor of bench/RESULTS.md) and the optimizer's temporaries (1.3 x the weights)."""
    state, weights, kept = 1000, 100, 10_000
    assert training_peak(state, weights, kept, True, False, "bf16") == state + RUNTIME + weights + 24_000
    assert training_peak(state, weights, kept, True, False, "fp32") == state + RUNTIME + 47_000
    assert training_peak(state, weights, kept, True, True, "bf16") == state + RUNTIME + weights + 9_000
    assert training_peak(state, weights, kept, False) == state + RUNTIME + 14_500
    big = 100_000  # the optimizer's temporaries are the larger
    assert training_peak(state, big, kept, True, True, "bf16") == state + RUNTIME + big + 130_000


def test_fmt_bytes_changes_unit_at_exactly_one_unit():
    assert [fmt_bytes(n) for n in (1023, 1024, 2**20, 2**30, 3 * 2**29)] == [
        "1023 B",
        "1.0 KiB",
        "1.0 MiB",
        "1.0 GiB",
        "1.5 GiB",
    ]


def test_the_final_concat_elu_keeps_no_more_than_its_input():
    """With `final_elu` the output conv reads concat_elu(h) (2F channels), but backward keeps h (F
    channels), as without it: the estimate (and autograd) keep the same bytes either way."""
    head = "defaults { coupling(components=2, filters=8, blocks=1, heads=1, final_elu=on) }\n"
    flow = "split stripe { coupling }"
    on = flowspec.parse_spec(DIGITS + head + "flow {\n  " + flow + "\n}\n")
    off = flowspec.parse_spec(DIGITS + head.replace("on)", "off)") + "flow {\n  " + flow + "\n}\n")
    kept = []
    for spec in (on, off):
        model = flowspec.build(spec, "meta")
        kept.append(estimate_memory(model, spec, inspect_model(model, spec, measure=False)).activations)
    assert kept[0] == kept[1] > 0


def test_the_dequantizer_flops_include_its_context_network():
    """The footer's dequantizer FLOPs are what torch counts for the dequantizer alone, context included."""
    spec = flowspec.parse_spec(
        DIGITS + TINY_COUPLING + "dequantize variational { context(filters=8, blocks=1) "
        "split checkerboard { norm; coupling; flip } sigmoid }\nflow { split stripe { coupling; flip } }\n"
    )
    torch.manual_seed(0)
    model = flowspec.build(spec)
    report = inspect_model(model, spec)
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
    with torch.no_grad(), counter:
        model.dequantizer(torch.randint(0, 17, (1, 1, 8, 8)).float())
    assert report.footer.flops_dequantize == counter.get_total_flops() > 0
    whole = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
    with torch.no_grad(), whole:
        model.log_prob(torch.randint(0, 17, (1, 1, 8, 8)))
    assert report.footer.flops_flow == whole.get_total_flops() - counter.get_total_flops()


def test_exactly_max_steps_is_built_and_one_more_is_refused():
    """A split (1 layer) around `repeat a { repeat b { flip } }` (a x b layers) unrolls to a x b + 1."""
    from flowspec.inspection.unroll import MAX_STEPS, check_steps

    assert MAX_STEPS == 10_000 == 99 * 101 + 1
    check_steps(tiny("split stripe { repeat 99 { repeat 101 { flip } } }"))
    with pytest.raises(UserError, match="unrolls to 10,001 steps"):
        check_steps(tiny("split stripe { repeat 100 { repeat 100 { flip } } }"))


def test_the_refusal_names_the_repeat_that_unrolls_to_the_most_steps():
    from flowspec.inspection.unroll import check_steps

    spec = tiny("split stripe { repeat 2 { flip } }\n  split stripe { repeat 100 { repeat 200 { flip } } }")
    with pytest.raises(UserError) as refused:
        check_steps(spec)
    assert "unrolls to 20,004 steps (repeat 100 at flow.1.body.0 and the repeats it holds" in str(
        refused.value
    )


def test_the_probe_runs_8_images_unless_told(tmp_path, capsys):
    """`--batch` defaults to 8, as its help says."""
    import json

    path = tmp_path / "tiny.flow"
    path.write_text(
        DIGITS + TINY_COUPLING + "train { init_batch 8 }\nflow {\n  split stripe { coupling }\n}\n"
    )
    code, out, _ = cli(capsys, "inspect", str(path), "--probe", "--format", "json")
    assert code == 0 and json.loads(out)["probe"]["batch"] == 8


@pytest.mark.parametrize("budget", [[], ["--steps", "1", "--budget", "1m"]], ids=["none", "both"])
def test_ablate_takes_exactly_one_budget(budget, tmp_path, capsys):
    from conftest import SPECS

    out = tmp_path / "ablation"
    code, _, err = cli(capsys, "ablate", str(SPECS / "quickstart.flow"), *budget, "--out", str(out))
    assert code == 2 and not out.exists()
    assert err == "error: ablate needs exactly one budget: --steps N or --budget DURATION (e.g. 20m)\n"


def test_the_cond_column_lists_orientations_in_the_order_the_copies_run():
    """A flip before the coupling: the first copy runs b>a, the second (flipped back) a>b."""
    report = inspect_spec(tiny("split stripe { repeat 2 { flip; coupling } }"), measure=False)
    (row,) = [r for r in report.rows() if r.kind == "coupling"]
    assert row.halves == "b>a,a>b"


def test_eval_holds_the_importance_samples_of_its_images_at_once():
    """`eval --iw K` draws K samples of each image in one pass: 10 images with K=4 hold 40 at once, up to
    the batch."""
    from flowspec.cli.inference import _at_once

    assert [_at_once(256, 10, 4), _at_once(32, 10, 4), _at_once(256, 10, 1)] == [40, 32, 10]


def test_eval_takes_up_to_16384_importance_samples(tmp_path, capsys):
    """Four times the official 4096: 16384 passes the option's check (the missing run is what is refused),
    16385 is a usage error naming the range."""
    missing = str(tmp_path / "no_run")
    code, _, err = cli(capsys, "eval", missing, "--iw", "16384")
    assert code == 2 and "--iw" not in err and "no_run" in err
    code, _, err = cli(capsys, "eval", missing, "--iw", "16385")
    assert code == 2 and "Invalid value for '--iw'" in err and "16384" in err


def test_sample_takes_temperature_zero_and_refuses_a_negative_one(tmp_path, capsys):
    missing = str(tmp_path / "no_run")
    code, _, err = cli(capsys, "sample", missing, "--temperature", "0")
    assert code == 2 and "--temperature" not in err and "no_run" in err
    code, _, err = cli(capsys, "sample", missing, "--temperature", "-0.5")
    assert code == 2 and err == "error: --temperature must be a finite number >= 0, got -0.5\n"


def test_an_output_suffix_is_matched_whatever_its_case(tmp_path):
    from flowspec.cli.inference import _check_output

    _check_output(tmp_path / "grid.PNG", "--out", (".png",), tmp_path / "run")  # accepted
    with pytest.raises(UserError, match=r"unknown file type '\.txt'; use one of \.png"):
        _check_output(tmp_path / "grid.txt", "--out", (".png",), tmp_path / "run")


def test_the_footer_gives_each_branch_its_share_of_the_total():
    spec = flowspec.parse_spec(
        DIGITS + TINY_COUPLING + "dequantize variational { context(filters=8, blocks=1) "
        "split checkerboard { norm; coupling; flip } sigmoid }\nflow { split stripe { coupling; flip } }\n"
    )
    from flowspec.inspection.render import footer_lines

    report = inspect_spec(spec, measure=False)
    flow, deq = report.branch("flow").params, report.branch("dequantize").params
    assert flow > 0 and deq > 0 and report.unassigned == 0
    total = flow + deq
    expected = (
        f"{total:,} trainable: flow {flow:,} ({100 * flow / total:.1f}%), "
        f"dequantizer {deq:,} ({100 * deq / total:.1f}%)"
    )
    assert dict(footer_lines(report))["parameters"] == expected


def test_the_memory_line_names_micro_batches_only_with_accumulate():
    from flowspec.inspection.render import footer_lines

    for accumulate, batch in ((1, "batch 32:"), (4, "batch 32 in 4 micro-batches of 8:")):
        spec = tiny("norm", f"train {{ batch 32  accumulate {accumulate} }}\n")
        memory = dict(footer_lines(inspect_spec(spec)))["memory"]
        assert memory.startswith("~") and f" to train at {batch} peak of a training step" in memory


def test_running_out_of_memory_is_exit_2_with_advice(monkeypatch, capsys):
    from flowspec.cli import inspecting
    from flowspec.cli.app import OUT_OF_MEMORY

    def exhausted(*args):
        raise MemoryError

    monkeypatch.setattr(inspecting, "load_cli_spec", exhausted)
    code, _, err = cli(capsys, "inspect", "any.flow")
    assert code == 2 and err == f"error: {OUT_OF_MEMORY}\n"


def test_export_names_the_file_type_it_writes(tmp_path, capsys):
    code, _, err = cli(capsys, "export", str(tmp_path / "run"), "-o", str(tmp_path / "model.txt"))
    assert (
        code == 2 and err == f"error: the export must be a .safetensors file, got {tmp_path / 'model.txt'}\n"
    )


def test_a_column_is_shown_only_where_it_fits_with_its_gap():
    from flowspec.inspection.render import fit_columns

    widths = {"step": 10, "params": 6, "share": 5}  # 10 + 2 + 6, then 2 + 5 more for share: 25
    assert fit_columns(widths, 24) == ["step", "params"]
    assert fit_columns(widths, 25) == ["step", "params", "share"]


def test_graphs_at_depth_one_draw_each_stage_as_one_node():
    from flowspec.inspection.render import render_dot, render_mermaid

    report = inspect_spec(tiny("split stripe { coupling }"), measure=False)
    assert "cluster_n_flow_0 " not in render_dot(report, 1) and "  n_flow_0 [label=" in render_dot(report, 1)
    assert "subgraph cluster_n_flow_0 {" in render_dot(report, 2)
    assert "subgraph n_flow_0[" not in render_mermaid(report, 1) and "n_flow_0[" in render_mermaid(report, 1)
    assert "subgraph n_flow_0[" in render_mermaid(report, 2)


def test_parameters_outside_every_step_are_counted_and_said():
    """A model made in Python may hold parameters no step owns: they count in the total, and are named."""
    from flowspec.inspection.render import footer_lines
    from flowspec.inspection.report import make_report

    report = make_report(tiny("norm"), {"flow.0": 128, "": 7})
    assert (report.total, report.unassigned) == (135, 7)
    assert dict(footer_lines(report))["parameters"] == (
        "135 trainable: flow 128 (94.8%), dequantizer 0 (0.0%), outside any step 7"
    )


def test_an_os_error_on_no_path_is_a_bug_not_the_users_mistake(monkeypatch, capsys):
    from flowspec.cli import language

    def failing(path, sets):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(language, "load_cli_spec", failing)
    code, _, err = cli(capsys, "validate", "any.flow")
    assert code == 1 and "Traceback" in err and "this is a bug in flowspec" in err


@pytest.mark.parametrize("command", ["train", "ablate"])
def test_recompute_defaults_to_auto(command):
    import typer

    from flowspec.cli.app import app

    group = typer.main.get_command(app)
    params = group.commands[command].make_context(command, ["x.flow"]).params  # type: ignore[attr-defined]
    assert params["recompute"].value == "auto"


def test_a_setting_written_at_one_place_on_both_sides_names_it_once():
    from flowspec.inspection.diff import Difference, _written_at

    assert _written_at(Difference("train.lr", "1e-3", "2e-3", "base.flow:4", "base.flow:4")) == "base.flow:4"
    assert (
        _written_at(Difference("train.lr", "1e-3", "2e-3", "a.flow:4", "b.flow:9")) == "a.flow:4 / b.flow:9"
    )
    assert _written_at(Difference("train.lr", "1e-3", "2e-3", None, "default")) == "- / default"
