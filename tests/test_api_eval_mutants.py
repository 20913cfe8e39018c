"""Tests from a mutation audit of the Python API (flowspec/api.py), the likelihood bounds
(train/evaluate.py), the torchrun helpers (train/distributed.py), the spec diagnostics (diagnostics.py),
`inspect --probe` (inspection/probe.py) and `diff` (inspection/diff.py): each test here failed on a mutant
of the code that every other test passed (a count of images per rank, a rank's signal not agreed on, an
input's float32 rounding counted as inversion error, a unit, a case or a limit of the options, a resumed
folder compared by its path as written, the eval options' precedence, a signal's rank, a GPU per process,
a diagnostic's window, tab or order, a repeat's largest error, a pair's second half, a diff's wording). No
training: fakes, tiny specs, one thread."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as td
from conftest import SPECS
from train_helpers import write_flow

import flowspec
from flowspec.api import _resumed, parse_duration, parse_size
from flowspec.cli.app import run
from flowspec.diagnostics import Diagnostic, SpecError, did_you_mean
from flowspec.errors import UserError
from flowspec.inspection import inspect_model, probe
from flowspec.inspection.probe import record_steps
from flowspec.nodes import SourceLoc
from flowspec.train.distributed import Dist, StopVote, read_stop_flags, setup
from flowspec.train.evaluate import inversion_error, single_sample_bpd
from flowspec.train.signals import StoppedBySignal

QUICKSTART = SPECS / "quickstart.flow"


class _Sum(torch.nn.Module):
    """log_prob of an image: minus its pixel sum."""

    def eval(self):
        return self

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return -x.flatten(1).double().sum(1)


# ---------------------------------------------------------------- the bounds


def test_the_progress_of_a_sharded_bound_counts_the_images_of_every_rank():
    """Each rank shows the job's progress: its batch's images times the world (a rank of 2 with 4 of the 7
    images in batches of 3 reports 6 then 2, so the meter reaches the 7 it counts to), not its own."""
    images = torch.arange(7 * 4).view(7, 1, 2, 2) % 5
    seen = []
    single_sample_bpd(
        _Sum(), images, 3, torch.device("cpu"), Dist(rank=0, world=2), lambda n, bpd: seen.append(n)
    )
    assert seen == [6, 2]


def test_a_signal_on_another_rank_stops_this_ranks_bound_too():
    """Under torchrun the ranks agree at each stop point: another rank's SIGTERM stops this one, which got
    none (a mutant asked only its own signals: the ranks parted, one waiting forever in the next
    all-reduce)."""

    class OtherRankStopped(Dist):  # the all-reduce of the flags: another rank adds its SIGTERM
        def all_sum(self, tensor):
            tensor[1] += 1

    with pytest.raises(StoppedBySignal) as stopped:
        single_sample_bpd(
            _Sum(), torch.zeros(4, 1, 2, 2), 2, torch.device("cpu"), OtherRankStopped(0, 2, "gloo")
        )
    assert (stopped.value.signal, stopped.value.done) == ("SIGTERM", "after 0 of 4 test images")


class _Float32Identity:
    """A float32 bijection that inverts exactly: encode and decode are the identity."""

    def eval(self):
        return self

    def encode(self, v):
        return v.float(), None

    def decode(self, z):
        return z


def test_the_inversion_check_measures_the_model_not_the_float32_rounding_of_its_input():
    """The dequantized images are rounded to float32 before they are encoded, so an exact float32 inverse
    measures 0 (a mutant compared with the float64 values: an error of ~1e-6 from the rounding alone)."""
    images = torch.randint(0, 256, (4, 1, 4, 4))
    assert inversion_error(_Float32Identity(), images, torch.device("cpu")) == 0.0


# ---------------------------------------------------------------- torchrun


def test_sigterm_on_any_rank_outranks_sigint():
    """Summed flags with both signals say SIGTERM (the one that exits 143), whichever ranks got them."""
    assert read_stop_flags(torch.tensor([1.0, 1.0, 0.0])) == ("SIGTERM", False)
    assert read_stop_flags(torch.tensor([2.0, 0.0, 1.0])) == ("SIGINT", True)


def test_the_stop_vote_says_nothing_at_the_first_step_even_with_a_flag_up():
    """The first read has no step before it: (None, False) even when its own sum carries a signal (a
    mutant read the step just queued, stopping one step early and waiting on the device)."""
    vote = StopVote(torch.device("cpu"))
    assert vote.read(vote.flags("SIGTERM", True).clone()) == (None, False)
    assert vote.read(torch.zeros(3)) == ("SIGTERM", True)


def test_under_torchrun_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    """`--device cuda:0` under torchrun: the process of LOCAL_RANK 1 trains on GPU 1 (a mutant put every
    process on the GPU the option named)."""
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "x"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", "1")
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(td, "is_initialized", lambda: True)  # the group joined already: no rendezvous
    assert setup("cuda:0") == (Dist(1, 2, "nccl"), torch.device("cuda", 1))
    assert chosen == [1]


# ---------------------------------------------------------------- the API's options


def test_a_duration_of_days_and_a_zero_duration():
    """`2d` is two days; a duration of 0 (which would stop a run before its first step) is refused."""
    assert parse_duration("2d") == 2 * 86400 and parse_duration(" 0.5 d ") == 43200
    for text in ("0", "0s", "0.0h"):
        with pytest.raises(UserError, match="must be a duration above 0, like 90s"):
            parse_duration(text)


def test_a_size_takes_its_unit_in_either_case_with_or_without_ib():
    """`4g`, `4G`, `4GB` and `4GiB` are 4 GiB, `1.5t` 1.5 TiB, `512k` 512 KiB: binary units in any case (a
    mutant took the upper case only: `4g` raised a ValueError, reported as a bug; another refused `GiB`)."""
    GiB = 2**30
    assert [parse_size(t) for t in ("4g", "4G", "4GB", "4GiB", " 4 gib ")] == [4 * GiB] * 5
    assert parse_size("1.5t") == 1.5 * 2**40 and parse_size("512k") == 512 * 2**10
    assert parse_size("100") == 100


def test_max_steps_of_0_is_refused_before_anything_is_written(tmp_path):
    flow = write_flow(tmp_path / "tiny.flow")
    with pytest.raises(UserError, match="max_steps must be a whole number >= 1, got 0$"):
        flowspec.train(flow, out=tmp_path / "x", max_steps=0)
    assert not (tmp_path / "x").exists()


def test_resume_takes_a_run_folder_or_its_last_pt_and_an_out_that_names_it_otherwise(tmp_path, monkeypatch):
    """`resume=RUN/last.pt` stands for RUN, but another checkpoint file is refused (a mutant took any .pt
    for its folder); `out` naming the same folder by another path (relative, `..`) is the same run (a
    mutant compared the paths as written and refused it)."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("last.pt", "best.pt"):
        (run / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert _resumed(run / "last.pt", None) == run
    assert _resumed(run, "run") == run and _resumed("run", tmp_path / "run" / ".." / "run") == "run"
    with pytest.raises(UserError, match=r"--resume takes a run folder \(or its last.pt\), got .*best.pt"):
        _resumed(run / "best.pt", None)
    with pytest.raises(UserError, match="leave out --out"):
        _resumed(run, tmp_path / "other")


def test_the_eval_options_outrank_the_eval_sets_and_a_device_is_passed_on_by_its_name(tmp_path, monkeypatch):
    """`eval={"images": 8}` (the `--eval-*` options) wins over `--set eval.images=16`, which still holds
    for the run (written with a space too); a `torch.device` reaches the run as its name (a mutant passed
    the object on)."""
    from flowspec.train import trainer

    seen = {}

    def fake(spec, options):
        seen["options"] = options
        return trainer.RunResult(
            run_dir=tmp_path, step=1, epoch=0.1, stopped="finished", test_bpd=2.5, best_bpd=None, img_s=1.0,
            parameters=10,
        )  # fmt: skip

    monkeypatch.setattr(trainer, "train", fake)
    flow = write_flow(tmp_path / "tiny.flow")
    sets = ["eval.images=16", " eval.samples=4"]
    flowspec.train(flow, out=tmp_path / "r", sets=sets, eval={"images": 8}, device=torch.device("cpu"))
    options = seen["options"]
    assert options.eval == {"images": 8, "samples": 4} and options.eval_options == {"images": 8}
    assert options.device == "cpu" and isinstance(options.device, str)


# ---------------------------------------------------------------- spec diagnostics

LONG = "".join(chr(ord("a") + i % 26) for i in range(160))  # a line of 160 characters, none alike nearby


def _shown(col: int) -> tuple[str, int]:
    """The line shown under a message at `col` of LONG, and the column its caret points at."""
    text = Diagnostic(SourceLoc(file="s.flow", line=1, col=col), "bad").render({"s.flow": LONG})
    _, line, caret = text.split("\n")
    return line[4:], caret.index("^") - 4 + 1


@pytest.mark.parametrize(("col", "start"), [(3, 0), (80, 29), (150, 60), (160, 60)])
def test_a_long_line_is_shown_as_a_window_of_100_characters_around_the_column(col, start):
    """The window is 100 characters, the column at its middle where it can be: from the start of the line
    near its start (a mutant began before it: a window cut from the line's end), up to the end of the line
    near its end (a mutant ran past it: a shorter window)."""
    line, caret = _shown(col)
    assert line == LONG[start : start + 100]
    assert line[caret - 1] == LONG[col - 1]


def test_a_mistake_found_twice_is_reported_once_after_those_without_a_place():
    loc = SourceLoc(file="s.flow", line=1, col=2)
    error = SpecError(
        [Diagnostic(loc, "bad"), Diagnostic(None, "worse"), Diagnostic(loc, "bad")], {"s.flow": "ab"}
    )
    assert len(error.diagnostics) == 2 and str(error).startswith(
        "2 errors in s.flow:\nworse\ns.flow:1:2: bad"
    )


def test_a_tab_is_shown_as_one_space_so_that_the_caret_stays_under_its_character():
    """A terminal draws a tab as up to 8 columns, the caret line counts it as 1: it is shown as a space."""
    text = Diagnostic(SourceLoc(file="s.flow", line=1, col=3), "bad").render({"s.flow": "\t\tnrom"})
    assert text.split("\n")[1:] == ["      nrom", "      ^"]


def test_a_line_one_past_the_width_is_windowed():
    text = Diagnostic(SourceLoc(file="s.flow", line=1, col=101), "bad").render({"s.flow": LONG[:101]})
    assert text.split("\n")[1] == "    " + LONG[1:101]


def test_errors_in_several_files_name_every_file():
    a, b = SourceLoc(file="b.flow", line=2, col=1), SourceLoc(file="a.flow", line=1, col=1)
    error = SpecError([Diagnostic(a, "bad"), Diagnostic(b, "worse")])
    assert str(error).split("\n")[:3] == [
        "2 errors in a.flow, b.flow:",
        "a.flow:1:1: worse",
        "b.flow:2:1: bad",
    ]


def test_the_choices_offered_are_in_order():
    assert (
        did_you_mean("zzz", ["stripe", "checkerboard", "stripe"])
        == "; expected one of 'checkerboard', 'stripe'"
    )
    assert did_you_mean("zzz", ["norm"]) == "; expected 'norm'" and did_you_mean("zzz", []) == ""


# ---------------------------------------------------------------- the probe

REPEATED_NORM = "model t\ndata digits { shape 1x8x8  levels 17 }\nflow {\n  repeat 2 { norm }\n}\n"


def test_the_probe_keeps_the_largest_inversion_error_of_a_repeats_copies(monkeypatch):
    """The copies of a repeated step share its row: their log-dets add up, and the row shows the largest
    of their inversion errors (a mutant kept the last copy's)."""
    spec = flowspec.parse_spec(REPEATED_NORM)
    model = flowspec.build(spec)
    leaves = {row.path for row in inspect_model(model, spec, measure=False).rows() if row.leaf}
    assert leaves == {"preprocess", "flow.0.body.0"}
    errors = iter([0.5, 0.3, 0.1])  # preprocess, then the norm's two copies
    monkeypatch.setattr(probe, "_max_abs_diff", lambda x, y: next(errors))
    with torch.no_grad(), record_steps(model, leaves) as records:
        model.encode(torch.rand(2, 1, 8, 8) * 16)
    assert records.inverse_error == {"preprocess": 0.5, "flow.0.body.0": 0.3}


def test_a_probed_container_of_steps_without_a_log_det_has_none():
    """A container whose steps have no log-det (none ran as a bijection) shows none, not 0 bits/dim."""
    child = SimpleNamespace(path="a.0", children=[], logdet_bpd=None, inverse_error=None)
    row = SimpleNamespace(path="a", children=[child], logdet_bpd=None, inverse_error=None)
    assert probe._fill(row, probe.StepRecords(), 1.0) is None and row.logdet_bpd is None


def test_the_inversion_error_of_a_pair_is_the_larger_of_its_halves():
    """A step inside a split inverts a pair: its error is the larger of both halves' (a mutant measured
    only the first half, where a coupling copies its input exactly)."""
    same, off = torch.zeros(2, 3), torch.full((2, 3), 0.25)
    assert probe._max_abs_diff((same, off), (same, same)) == 0.25
    assert probe._max_abs_diff((off, same), (same, same)) == 0.25


# ---------------------------------------------------------------- diff


def test_diff_counts_one_setting_in_the_singular(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    assert run(["diff", str(QUICKSTART), "--set", "train.lr=0.0123"]) == 0
    assert "\n1 setting differs\n" in capsys.readouterr().out
