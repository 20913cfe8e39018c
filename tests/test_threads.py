"""The intra-op thread count: by model size and CPU load, overridden by --threads or OMP_NUM_THREADS."""

from __future__ import annotations

import pytest
from conftest import SPECS

from flowspec.cli.app import run
from flowspec.errors import UserError
from flowspec.threads import choose_threads

QUICKSTART, FLOWPP = 43_592, 31_443_440


def test_small_model_gets_one_thread_even_on_an_idle_machine():
    choice = choose_threads(QUICKSTART, cpus=16, load=0.0)
    assert choice.threads == 1
    assert str(choice) == "threads 1 (small model, 0.044M params)"


@pytest.mark.parametrize("load", [1.5, 2.0, 5.4])
def test_busy_cpu_gets_one_thread(load):
    choice = choose_threads(FLOWPP, cpus=2, load=load)
    assert choice.threads == 1
    assert f"busy CPU, load {load:.1f} on 2 cores" in choice.reason


def test_large_model_on_an_idle_machine_uses_every_core():
    assert choose_threads(FLOWPP, cpus=16, load=0.3).threads == 16
    assert "large model, 31M params; all cores" in choose_threads(FLOWPP, cpus=16, load=0.3).reason
    assert choose_threads(FLOWPP, cpus=16, load=None).threads == 16


def test_large_model_on_a_half_busy_machine_uses_the_idle_cores():
    assert choose_threads(FLOWPP, cpus=16, load=6.2).threads == 10


def test_threads_option_wins_over_everything():
    choice = choose_threads(QUICKSTART, cpus=4, load=9.0, env="2", requested=3)
    assert (choice.threads, choice.reason) == (3, "--threads")


def test_more_threads_than_cores_are_refused_before_the_runtime_crashes(capsys):
    with pytest.raises(UserError, match="--threads 5: this machine has 4 CPU cores; ask for at most 4"):
        choose_threads(FLOWPP, cpus=4, load=0.0, requested=5)
    assert run(["inspect", str(SPECS / "quickstart.flow"), "--probe", "--threads", "100000"]) == 2
    assert "--threads 100000: this machine has" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "expected"), [("4", 4), ("1", 1), ("", 16), ("zero", 16), ("0", 16), ("64", 16), ("²", 16)]
)
def test_the_users_omp_num_threads_is_respected_when_valid(env, expected):
    assert choose_threads(FLOWPP, cpus=16, load=0.0, env=env).threads == expected


def test_omp_num_threads_above_the_cores_is_cut_to_them_and_said():
    choice = choose_threads(QUICKSTART, cpus=2, load=0.0, env="8")
    assert str(choice) == "threads 2 (OMP_NUM_THREADS=8, at most the 2 cores)"


def test_a_resumed_run_keeps_its_thread_count_unless_told_otherwise(tmp_path, capsys, monkeypatch):
    """Another thread count sums in another order: a resumed run would not reproduce the straight one."""
    from train_helpers import write_flow

    from flowspec.train.checkpoint import load_checkpoint

    kept = choose_threads(FLOWPP, cpus=16, load=12.0, kept=4)
    assert (kept.threads, kept.reason) == (
        4,
        "as the run trained, so that it resumes exactly; --threads to change",
    )
    assert choose_threads(FLOWPP, cpus=16, load=0.0, requested=8, kept=4).threads == 8  # --threads wins
    assert choose_threads(FLOWPP, cpus=16, load=0.0, env="2", kept=4).threads == 2  # so does OMP_NUM_THREADS
    assert choose_threads(FLOWPP, cpus=2, load=0.0, kept=4).threads == 2  # a machine with fewer cores
    flow, out = write_flow(tmp_path / "tiny.flow", steps=4, eval_every=4), tmp_path / "r"
    args = ["--device", "cpu", "--eval-samples", "0"]
    assert (
        run(["train", str(flow), "--out", str(out), "--threads", "2", "--max-steps", "2", "-q", *args]) == 0
    )
    assert load_checkpoint(out)["threads"] == 2
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the user's setting would win
    assert run(["train", "--resume", str(out), *args]) == 0
    assert "threads 2 (as the run trained" in capsys.readouterr().out


def test_the_streaming_workers_leave_stop_signals_to_the_main_process():
    """A scheduler's SIGTERM to the process group killed the workers, and torch raised in the main process
    wherever it was: training since the last checkpoint was lost."""
    import signal

    from flowspec.train.stream import _worker_init

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        _worker_init(0)
        assert (
            signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        )
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
