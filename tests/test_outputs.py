"""What a run leaves to look at: the training curves and the sample grids."""

from __future__ import annotations

import io
import math
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from flowspec.train.metrics import Window, append_metrics, curves_figure, plot_curves, read_metrics, smooth
from flowspec.train.progress import Reporter
from flowspec.train.sampling import grid_image, grid_name, save_grid


def synthetic_run(run_dir, steps=200, every=10, eval_every=100):
    """metrics.jsonl as a 200-step run writes it: train rows after step 1 and every 10, evals every 100."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for step in range(1, steps + 1):
        lr = 1e-3 * min(1.0, step / 20)
        if step == 1 or step % every == 0:
            append_metrics(run_dir, {"kind": "train", "step": step, "train_bpd": 5.0 - step / 100, "lr": lr})
        if step % eval_every == 0:
            row = {"step": step, "epoch": step / 50, "train_bpd": 4.0, "test_bpd": 4.5 - step / 400, "lr": lr}
            append_metrics(run_dir, row)
    return read_metrics(run_dir)


def test_the_window_gives_the_mean_since_its_last_read_and_leaves_the_warm_up_out_of_the_rate():
    window = Window(torch.device("cpu"))
    yes, no = torch.tensor(True), torch.tensor(False)
    window.add(torch.tensor(3.0), torch.tensor(1.0), yes, images=4)
    window.read()
    assert window.recent_bpd == 3.0  # the first step alone
    window.add(torch.tensor(2.0), torch.tensor(1.0), yes, images=4)
    window.add(torch.tensor(9.0), torch.tensor(1.0), no, images=4)  # a skipped step is not counted
    window.add(torch.tensor(4.0), torch.tensor(1.0), yes, images=4)
    assert window.read()[0] == 3.0 and window.recent_bpd == 3.0  # (2 + 4) / 2 since the last read
    assert window.read() and window.recent_bpd is None  # nothing new
    assert window.first[0] == 4 and window.total_images == 12  # the first read's step is the warm-up
    window.reset()
    window.add(torch.tensor(1.0), torch.tensor(1.0), yes, images=4)
    window.read()
    assert window.recent_bpd == 1.0


def test_curves_show_the_training_curve_from_the_start_with_tests_on_top_and_lr_below(tmp_path):
    rows = synthetic_run(tmp_path)
    train_rows = [r for r in rows if r.get("kind") == "train"]
    assert len(train_rows) == 21  # step 1, then 10, 20, ..., 200
    fig = curves_figure({"tiny": rows})
    bits, lr = fig.axes
    lines = {line.get_gid(): line for line in bits.lines}
    raw, smoothed, test = lines["tiny train raw"], lines["tiny train"], lines["tiny test"]
    assert list(raw.get_xdata()) == [r["step"] for r in train_rows]
    assert list(raw.get_ydata()) == pytest.approx([r["train_bpd"] for r in train_rows])
    assert len(smoothed.get_xdata()) == len(train_rows)
    assert raw.get_alpha() < 0.5 and smoothed.get_alpha() is None  # raw faint, smoothed solid
    assert list(test.get_xdata()) == [100, 200] and test.get_zorder() > smoothed.get_zorder()
    assert [t.get_text() for t in bits.get_legend().get_texts()] == ["train", "test"]
    (lr_line,) = lr.lines
    assert len(lr_line.get_xdata()) == len(rows) and max(lr_line.get_ydata()) == pytest.approx(1e-3)
    assert lr.get_ylabel() == "learning rate" and lr.get_xlabel() == "step"
    plot_curves({"tiny": rows}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_curves_of_older_runs_without_train_rows_use_the_evaluations(tmp_path):
    rows = [
        {"step": s, "train_bpd": 5.0 - s / 100, "test_bpd": 5.1 - s / 100, "lr": 1e-3} for s in (100, 200)
    ]
    fig = curves_figure({"a": rows, "b": rows})
    assert {line.get_gid() for line in fig.axes[0].lines} >= {"a train", "b train", "a test", "b test"}
    assert "a train" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_smoothing_keeps_a_straight_trend_and_its_ends_and_removes_noise():
    line = [5.0 - 0.01 * i for i in range(100)]
    assert smooth(line) == pytest.approx(line)
    noisy = [v + (0.3 if i % 2 else -0.3) for i, v in enumerate(line)]
    smoothed = smooth(noisy)
    assert (smoothed[0], smoothed[-1]) == pytest.approx((noisy[0], noisy[-1]))
    assert max(abs(a - b) for a, b in zip(smoothed[5:-5], line[5:-5], strict=True)) < 0.05


@pytest.mark.parametrize(
    ("n", "size", "scale"), [(64, 8, 4), (64, 32, 1), (16, 8, 8), (2, 8, 16), (3, 8, 16)]
)
def test_grids_are_enlarged_by_a_whole_factor_to_at_least_256_pixels(n, size, scale):
    images = torch.randint(0, 17, (n, 1, size, size))
    grid = grid_image(images, levels=17)
    nrow = math.ceil(math.sqrt(n))
    columns, rows = min(nrow, n), math.ceil(n / nrow)
    assert grid.shape[-1] == columns * (size * scale + 2) + 2 >= 256
    assert grid.shape[-2] == rows * (size * scale + 2) + 2
    first = grid[0, 2 : 2 + size * scale, 2 : 2 + size * scale]  # nearest neighbour: blocks of one value
    expected = images[0, 0].float().repeat_interleave(scale, 0).repeat_interleave(scale, 1) / 16
    assert torch.equal(first, expected)
    if scale > 1:  # the smallest such factor
        assert columns * (size * (scale - 1) + 2) + 2 < 256


def test_grid_names_carry_step_and_temperature():
    assert grid_name(400, 0.8) == "step0000400_t0.8.png"
    assert grid_name(12, 1.0) == "step0000012_t1.0.png"


def test_saved_grid_has_the_enlarged_size(tmp_path):
    class Sampler(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def sample(self, n, temperature, generator=None):
            return torch.randint(0, 17, (n, 1, 8, 8), generator=generator)

    path = save_grid(Sampler(), 64, 0.8, tmp_path / "samples" / grid_name(400, 0.8), levels=17, seed=0)
    from PIL import Image

    assert path.name == "step0000400_t0.8.png"
    assert Image.open(path).size == (8 * (32 + 2) + 2, 8 * (32 + 2) + 2)


def test_a_single_logged_step_shows_as_points_in_both_panels():
    rows = [
        {"kind": "train", "step": 1, "train_bpd": 5.0, "lr": 1e-4},
        {"step": 1, "test_bpd": 5.1, "lr": 1e-4},
    ]
    bits, lr = curves_figure({"tiny": rows}).axes
    train = next(line for line in bits.lines if line.get_gid() == "tiny train")
    assert train.get_marker() == "o" and lr.lines[0].get_marker() == "o"
    many = curves_figure({"tiny": synthetic_run(Path(tempfile.mkdtemp()))})
    assert many.axes[1].lines[0].get_marker() == "None"  # lines, not points, once there are two


def test_progress_messages_on_a_terminal_are_printed_as_written(monkeypatch):
    """Not read as rich markup (`[lr=3e-3]` in a run folder's name), nor broken at the terminal's width
    (a resume command is copied whole)."""
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    reporter = Reporter("bar", None, 0, train=False)
    line = "saved sw[lr=3e-3]/last.pt. Continue with: flowspec train --resume sw[lr=3e-3] and tty[/x]"
    try:
        reporter.message(line)
    finally:
        reporter.close()
    assert line in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", sys.stdout.getvalue())
