"""The training loop: the spec's recipe, evaluation and checkpoints, resumable and interruptible.

One `Trainer` per process. It puts the parts together (the run folder, the data's batches, the model and
its `Updater`, the `Evaluator`, the metrics `Window`) and `run` is the loop: step, log, save and evaluate
at each interval, stop at the length, a limit or a signal. The checkpoint is written before each
evaluation, so a signal (or a crash) during one loses no training.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import flowspec
from flowspec.errors import UserError, flowspec_command, os_error_message, shell_command
from flowspec.model import compile_scope
from flowspec.spec import EvalSpec, FlowSpec, Interval
from flowspec.threads import set_threads
from flowspec.train import rng, rundir
from flowspec.train.batches import BatchStream, check_batch, training_batches
from flowspec.train.checkpoint import LAST, save_atomic, save_run, spec_record
from flowspec.train.class_numbers import RECORDED, check_class_numbers
from flowspec.train.data import ImageSet, default_folder, fingerprint, load_split
from flowspec.train.datacache import quietly
from flowspec.train.distributed import (
    StopVote,
    agree_to_stop,
    agreed,
    broadcast_module,
    setup,
    teardown,
)
from flowspec.train.evaluation import SMOKE, Evaluator, describe
from flowspec.train.lock import RunLock
from flowspec.train.metrics import (
    Window,
    append_metrics,
    check_writable,
    is_eval,
    read_metrics,
    record,
    truncate_metrics,
)
from flowspec.train.precision import autocast_dtype, check_precision, resolve_precision
from flowspec.train.progress import Reporter
from flowspec.train.recompute import resolve_recompute
from flowspec.train.signals import StoppedBySignal, StopSignals
from flowspec.train.tensorboard import TensorBoard, require_tensorboard
from flowspec.train.update import Updater


@dataclass
class RunOptions:
    """How to run a spec (everything the command line adds to it)."""

    out: Path | None = None  # run folder; None: runs/<name>-<timestamp>
    data_dir: Path | None = None
    device: str | None = None  # cpu | cuda; None: cuda when available
    precision: str | None = None  # fp32 | bf16 | auto (see flowspec.train.precision); None: fp32, or
    # the precision a resumed run trained in
    compile: bool = False
    recompute: str = "auto"  # auto | on | off (see flowspec.train.recompute)
    max_steps: int | None = None  # stop at this global step (a resumed run counts from its start)
    max_time: float | None = None  # seconds of training in this process
    max_run_time: float | None = None  # seconds of training of the whole run, earlier processes' too
    continue_with: str | None = None  # the command a stopped run names (default: train --resume RUN_DIR)
    quiet: bool = False
    resume: bool = False  # continue the run in `out` from its last checkpoint
    eval: dict[str, Any] = field(default_factory=dict)  # eval settings over the spec's (and a short run's)
    eval_options: dict[str, Any] = field(default_factory=dict)  # of them, the --eval-* options: recorded
    threads: int | None = None  # intra-op CPU threads; None: chosen by model size and CPU load
    max_bad_steps: int = 20  # non-finite steps in a row before the run stops (checked when logging)
    log_every: int | None = None  # read the loss from the device (progress, divergence) every N steps;
    # None: 10, or the resumed run's (its checkpoints record it)
    handle_signals: bool = True
    tensorboard: bool = False  # also log to RUN_DIR/tensorboard (needs the tensorboard package)
    data_memory: int | None = None  # bytes of training images held in memory (default 4 GiB); larger stream


@dataclass
class RunResult:
    """What a training run ended with: where and when it stopped, its test bits/dim and its history."""

    run_dir: Path
    step: int
    epoch: float
    stopped: str  # finished | max-steps | max-time | SIGINT | SIGTERM
    test_bpd: float | None
    best_bpd: float | None
    img_s: float
    parameters: int
    history: list[dict[str, Any]] = field(default_factory=list)
    best_scheduled: bool = True  # best_bpd is a scheduled evaluation's (else a short run's stop's)


def resume_command(run_dir: Path, max_steps: int | None) -> str:
    """How to go on after a stop: to the same --max-steps, if the run had one."""
    limit = ("--max-steps", max_steps) if max_steps else ()
    return flowspec_command("train", "--resume", run_dir, *limit)


def stop_line(signal_name: str, step: int, run_dir: Path, go_on: str) -> str:
    """What a run that a signal stopped, and that saved, says: `go_on` is the command that continues."""
    return f"{signal_name}: stopped after step {step}; saved {run_dir / LAST}. Continue with: {go_on}"


class Trainer:
    """Train one spec in one process (one of `world` under torchrun)."""

    def __init__(
        self,
        spec: FlowSpec,
        options: RunOptions,
        train_set: ImageSet | None = None,
        test_set: ImageSet | None = None,
    ):
        self.spec, self.options, self.t = spec, options, spec.train
        if options.tensorboard:  # before the data is read
            require_tensorboard()
        self.dist, self.device = setup(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if options.precision is not None:
            check_precision(options.precision)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every step has the same shapes: time cuDNN's kernels once
        made = rundir.missing_from(Path(options.out)) if options.out is not None else None  # --out a/b/c
        fresh = options.out is None or made is not None
        self.run_dir = rundir.choose(spec, options.out, self.dist)
        self.lock: RunLock | None = None
        try:
            self._setup(train_set, test_set)
        except BaseException:
            if fresh and self.dist.main:  # a run that never started leaves no folder (removed while locked)
                rundir.remove_if_empty(self.run_dir, made)  # nor the folders it made above it
            if self.lock is not None:
                self.lock.release(refused=True)  # nor a lock file it made
            raise

    def _setup(self, train_set: ImageSet | None, test_set: ImageSet | None) -> None:
        spec, options = self.spec, self.options
        with agreed(self.dist):  # what one process may meet alone (its lock, checkpoint, data) stops all
            # before anything reads or writes; what a killed run left is removed once the folder is accepted
            if not options.resume:  # (before the lock makes its folder)
                rundir.check_own_folder(self.run_dir)
            self.lock = RunLock(self.run_dir, clean=False) if self.dist.main else None
            payload = rundir.previous_checkpoint(self.run_dir, spec, options.resume, options.data_dir)
            if self.lock is not None:
                self.lock.remove_stale()
            train_set, test_set = self._read_data(payload, train_set, test_set)
        if payload is not None:  # the --eval-* options the run was given hold unless given again
            kept = {**payload.get("eval_options", {}), **options.eval_options}
            self.options = options = replace(options, eval={**kept, **options.eval}, eval_options=kept)
        # and so does its --log-every (its train rows), 10 in checkpoints from before it was kept
        kept_log_every = payload.get("log_every") if payload is not None else None
        log_every = options.log_every if options.log_every is not None else kept_log_every or 10
        self.options = options = replace(options, log_every=log_every)
        self.saved_step: int | None = payload["step"] if payload is not None else None
        # training seconds of the processes before this one (0 in checkpoints from before they were kept)
        self.trained_before = float(payload.get("train_seconds", 0.0)) if payload is not None else 0.0
        self._choose_precision(payload)
        self.train_set, self.test_size = train_set, len(test_set)
        self.fingerprints = {"train": fingerprint(train_set.images), "test": fingerprint(test_set.images)}
        self.data_note: str | None = None  # said after the banner: the data changed since the checkpoint
        # cifar10 from FLOWSPEC_DATA_DIR or the cache: that folder is recorded to tell other data apart,
        # but a resume reads the place of its own time (the variable names where the data is on this machine)
        self.data_default = default_folder(spec.data) if self.data_dir is None else None
        check_batch(
            self.t.batch, self.dist.world, len(train_set), self.t.accumulate, spec.source or spec.name
        )
        self.batches = training_batches(train_set, self.t, self.dist, self.device, options.data_memory)
        self.total_steps = self._steps(self.t.length) if self.t.length else None
        self.eval_every = self._steps(self.t.eval_every)
        self.save_every = self._steps(self.t.save_every) if self.t.save_every else None

        rng.seed_all(self.t.seed + self.dist.rank)
        model = flowspec.build(spec).to(self.device)
        self.parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.threads = set_threads(
            self.parameters, options.threads, payload.get("threads") if payload else None
        )
        if payload is None:
            self._initialize(model)
        model.set_autocast(autocast_dtype(self.precision))
        networks_compiled = options.compile and compile_scope(self.device) == "networks"
        self.recompute, self.recompute_reason = resolve_recompute(
            options.recompute, self.device, networks_compiled, spec, self.dist.world, self.precision
        )
        model.set_recompute(self.recompute)
        self.updater = Updater(model, self.t, self.total_steps, self.dist, self.device, options.compile)
        self.evaluate = Evaluator(
            test_set.images, self._eval_settings(spec.eval), self.device, self.dist, self.run_dir,
            spec.data.levels, self.t.seed,
        )  # fmt: skip
        self.window = Window(self.device)
        self.best: float | None = None  # of the scheduled evaluations
        self.stop_bpd: float | None = None  # of an evaluation at a --max-steps or --max-time stop
        self.stop_row = False  # resumed at such a stop, whose row goes once training goes on
        self.stop_row_at: int | None = None  # the step of that row, dropped with the next row written
        self.spec_files_due = False  # a resumed run writes its spec files with its first write
        self.rows_after: int | None = None  # and drops the rows after its checkpoint's step then
        self.world_note = ""  # said in the header: the checkpoint was written by another number of processes
        if payload is not None:
            self._restore(payload)
        self.board: TensorBoard | None = None  # opened before the run's first write (`_open_board`)
        self.board_due: tuple[int, bool, float] | None = None  # to open: the step it starts at, `again`, and
        # the latest train bits/dim then

    def _read_data(
        self, payload: dict[str, Any] | None, train_set: ImageSet | None, test_set: ImageSet | None
    ) -> tuple[ImageSet, ImageSet]:
        """The train and test sets, those not given read from `self.data_dir`: a resumed run reads the
        data folder it was trained on unless --data says otherwise; a new one records the spec's path as
        read from here, so that a run elsewhere (resume, eval) reads the same."""
        data = self.spec.data
        self.data_dir = self.options.data_dir or (payload.get("data_dir") if payload else None) or data.path
        if payload is not None and (train_set is None or test_set is None):  # read here: classes clear?
            data = check_class_numbers(data, RECORDED in payload, self.data_dir, self.run_dir / LAST)
            self.spec = self.spec.model_copy(update={"data": data})  # numbers only positions read: named
        with quietly(self.options.quiet):
            if train_set is None:
                train_set = load_split(data, "train", self.data_dir)
            if test_set is None:
                test_set = load_split(data, "test", self.data_dir)
        return train_set, test_set

    # ------------------------------------------------------------ the loop

    def run(self) -> RunResult:
        """Train to the spec's length, --max-steps, --max-time or a signal; evaluate and save at the end.
        A file operation that fails (a full disk, a read-only folder, a read error) stops the run with a
        `UserError` saying which checkpoint is kept; the run folder is released at the end."""
        try:
            return self._run()
        except OSError as error:
            if error.filename is None:
                raise
            doing = getattr(error, "doing", "writing")  # as `naming` recorded it
            raise UserError(f"{os_error_message(error, doing)}; {self._kept(doing)}") from None
        finally:
            self.close()

    def close(self) -> None:
        """Release the run folder (`run` does at its end)."""
        if self.lock is not None:
            self.lock.release()

    def _kept(self, doing: str) -> str:
        """What is kept after an OS error `doing` a file (writing, reading), and how to go on."""
        if self.saved_step is None:
            if self.options.continue_with:
                return f"no checkpoint was written yet; {self.options.continue_with} starts the run again"
            return (
                f"no checkpoint was written yet; the same command with --out {shell_command(self.run_dir)} "
                f"starts the run again there, setting this run's files aside (into "
                f"{rundir.aside(self.run_dir, '<time>').name} beside it)"
            )
        advice = "free space or make the folder writable, then " if doing == "writing" else ""
        return (
            f"the last good checkpoint {self.run_dir / LAST} (step {self.saved_step}) is kept; {advice}"
            f"continue with: {self._continue_with()}"
        )

    def _continue_with(self) -> str:
        """The command that continues this run after a stop."""
        return self.options.continue_with or resume_command(self.run_dir, self.options.max_steps)

    def _run(self) -> RunResult:
        aside = None
        if self.dist.main and self.saved_step is None:
            aside = rundir.set_aside(self.run_dir)
            rundir.write_spec_files(self.run_dir, self.spec)
        # a resumed run changes nothing in its folder until it writes a row or a checkpoint, or ends: a
        # resume that fails (at its first step, say) leaves the run as it was
        self.spec_files_due = self.dist.main and self.saved_step is not None
        announce = (
            f"finishing the step or evaluation batch in progress, then saving {self.run_dir / LAST} "
            f"(the same signal again stops at once, without saving)"
        )
        with StopSignals(self.options.handle_signals, announce if self.dist.main else None) as signals:
            quiet = self.options.quiet or not self.dist.main
            reporter = Reporter.auto(quiet, self._horizon(), self.step, notes=self.dist.main)
            try:
                reporter.message(self._banner())
                for note in (self.data_note, self.updater.note):
                    if note:
                        reporter.note(note)
                if aside is not None:
                    reporter.note(
                        f"note: {self.run_dir} held a run that stopped before its first checkpoint: this one "
                        f"starts afresh; its files are in {aside}"
                    )
                self.started = started = time.monotonic()
                self.not_training = 0.0  # seconds since `started` spent evaluating (and saving around it)
                self.paused_at: float | None = None
                stopped = self._limit_reached(self._run_time_up(0.0))
                if self.options.max_steps is not None and self.step > self.options.max_steps:
                    reporter.note(
                        f"note: the run is already at step {self.step}, past --max-steps "
                        f"{self.options.max_steps}: it trains no further"
                    )
                self.vote = StopVote(self.device) if self.dist.active else None  # stops agreed under torchrun
                if self.options.tensorboard and self.dist.main:  # opened with the first write
                    self.board_due = (self.step, stopped is None and self.stop_row, self.window.latest())
                self.window.restart_clock()
                resumed_at = self._resumed_at_evaluation(stopped)
                if resumed_at == "missed":
                    stopped = self._evaluate(reporter, signals, stopped) or stopped
                elif resumed_at == "done" and self._scheduled():
                    self.window.reset()  # the checkpoint may hold the sums from before it
                while stopped is None:
                    if self.stop_row:  # training goes on past a stop: the row of its evaluation goes,
                        # with the next row written (a step that fails first leaves it)
                        self.stop_row_at, self.stop_row, self.stop_bpd = self.step, False, None
                    x = next(self.batches)
                    flags = self._stop_flags(signals, started)
                    self.window.add(*self.updater(x, flags), images=len(x) * self.dist.world)
                    if self.step % self.options.log_every == 0 or self.step == 1:
                        self._log(reporter, x)
                    received, time_up = self._should_stop(signals, started)
                    stopped = received or self._limit_reached(time_up)
                    if received:
                        self._save(best=False)
                        line = stop_line(received, self.step, self.run_dir, self._continue_with())
                        reporter.message(line, keep=True)
                    elif self._scheduled() or stopped is not None:
                        stopped = self._evaluate(reporter, signals, stopped) or stopped
                    elif self.save_every and self.step % self.save_every == 0:
                        with self._not_training():
                            self._save(best=False)
                if self.dist.main:  # a resume with nothing to train: its --set eval settings are kept
                    self._before_writing(board=False)
            finally:
                reporter.close()
                if self.board is not None:
                    self.board.close()
        return self._result(stopped)

    # ------------------------------------------------------------ parts of the loop

    @property
    def step(self) -> int:
        return self.updater.step

    def _steps(self, interval: Interval) -> int:
        return interval.count * (self.batches.steps_per_epoch if interval.unit == "epochs" else 1)

    def _horizon(self) -> int | None:
        limits = [s for s in (self.total_steps, self.options.max_steps) if s is not None]
        return min(limits) if limits else None

    def _open_board(self) -> None:
        """The TensorBoard log, opened before the run's first write (row, checkpoint or point), so that a
        resume that writes nothing leaves it as it was, as metrics.jsonl: without what came after the
        checkpoint; `again` (training goes on past a stop's evaluation) without the checkpoint's step's
        points either, and the latest train bits/dim at it logged anew."""
        if self.board_due is None:
            return
        (start, again, latest), self.board_due = self.board_due, None
        self.board = TensorBoard(self.run_dir, start, again)
        if again and (start % self.options.log_every == 0 or start == 1):
            self.board.train(start, latest)

    def _log(self, reporter: Reporter, x: torch.Tensor) -> None:
        """Every `log_every` steps, the loop's one wait for the device between evaluations: the progress
        line, and the stop after too many non-finite steps in a row."""
        last_bpd = self.window.read()[2]
        if self.updater.bad_in_row >= self.options.max_bad_steps:
            self._diverged(x)
        if self.dist.main and self.window.recent_bpd is not None:  # the training curve of curves.png
            lr = self.updater.applied_lr
            epoch = round(self.batches.epochs_done, 4)
            row = {"kind": "train", "step": self.step, "epoch": epoch, "train_bpd": self.window.recent_bpd}
            self._before_writing()
            append_metrics(self.run_dir, row | {"lr": lr}, self._take_stop_row())
        reporter.step(self.step, last_bpd, self.window.img_s())
        self._open_board()
        if self.board is not None:
            self.board.train(self.step, last_bpd)

    def _stop_flags(self, signals: StopSignals, started: float) -> torch.Tensor | None:
        """Under torchrun, this rank's stop flags for the step's all-reduce; else None."""
        return self.vote.flags(signals.received, self._time_up(started)) if self.vote is not None else None

    def _time_up(self, started: float) -> bool:
        """Whether --max-time (or an ablation's budget) is up (training time: evaluations do not count;
        under torchrun rank 0's clock decides)."""
        elapsed = time.monotonic() - started - self.not_training
        limit = self.options.max_time
        up = limit is not None and elapsed >= limit
        return self.dist.main and (up or self._run_time_up(elapsed))

    def _run_time_up(self, elapsed: float) -> bool:
        """Whether the run's training time (`elapsed` in this process, after its earlier processes')
        reached `max_run_time`."""
        limit = self.options.max_run_time
        return limit is not None and self.trained_before + elapsed >= limit

    def _train_seconds(self) -> float:
        """Seconds this run has trained, in this process and the ones before it (what a checkpoint keeps)."""
        now = self.paused_at if self.paused_at is not None else time.monotonic()
        return self.trained_before + now - self.started - self.not_training

    def _should_stop(self, signals: StopSignals, started: float) -> tuple[str | None, bool]:
        """A signal received and whether --max-time is up, after a step. Under torchrun the ranks agree
        through each step's all-reduce, read a step late (`StopVote`): every rank stops after the same
        step, at most two after the one a signal came in (torchrun kills its workers 30 s after
        forwarding a signal: its --shutdown_timeout)."""
        if self.vote is None:
            return signals.received, self._time_up(started)
        return self.vote.read(self.updater.summed_flags)

    def _limit_reached(self, time_up: bool = False) -> str | None:
        if self.total_steps is not None and self.step >= self.total_steps:
            return "finished"
        if self.options.max_steps is not None and self.step >= self.options.max_steps:
            return "max-steps"
        return "max-time" if time_up else None

    def _eval_settings(self, base: EvalSpec) -> EvalSpec:
        """`base` with the command line's eval settings over it; its batch set (default: the train batch)."""
        settings = EvalSpec.model_validate({**base.model_dump(), **self.options.eval})
        return settings.model_copy(update={"batch": settings.batch or self.spec.eval.batch or self.t.batch})

    def _scheduled(self) -> bool:
        """Whether the uninterrupted run evaluates at this step: every `eval every` steps and at the spec's
        length. An evaluation at another step (a --max-steps or --max-time stop) is the run's last, recorded
        but not a candidate for best.pt, and a resumed run leaves it out."""
        return self.step > 0 and (self.step % self.eval_every == 0 or self.step == self.total_steps)

    def _resumed_at_evaluation(self, stopped: str | None) -> str | None:
        """For a run resumed at an evaluation point, or at a stop with nothing left to train (`stopped`):
        "done" if its evaluation finished, "missed" if not (a signal during it or just before it, a crash;
        it then runs first, as in the uninterrupted run)."""
        if not (self.options.resume and (self._scheduled() or stopped is not None)):
            return None
        done = False
        if self.dist.main:
            done = any(row["step"] == self.step and is_eval(row) for row in read_metrics(self.run_dir))
        return "done" if self.dist.gather(done)[0] else "missed"

    def _evaluate(self, reporter: Reporter, signals: StopSignals, stopped: str | None) -> str | None:
        """Save, evaluate, record, and save again when the test bits/dim improved. A signal during the
        evaluation ends it between batches and is returned (the checkpoint is already written).

        A run stopped by --max-steps or --max-time before its first evaluation interval (a smoke run)
        gets a small evaluation (`SMOKE`, under the command line's settings) and says so.

        Its time is not training: neither the throughput nor --max-time counts it. A signal after its last
        check (while grids, checkpoints or the row are written) is returned too, before another step."""
        with self._not_training():
            received = self._evaluate_and_save(reporter, signals, stopped)
        if received is None and stopped is None:
            received, _ = agree_to_stop(self.dist, self.device, signals.received, False)
            if received:  # last.pt of this step was written before the evaluation
                line = stop_line(received, self.step, self.run_dir, self._continue_with())
                reporter.message(line, keep=True)
        return received

    @contextlib.contextmanager
    def _not_training(self) -> Iterator[None]:
        """Evaluating or saving: its time counts in neither the throughput nor --max-time."""
        self.window.pause()
        self.paused_at = time.monotonic()
        try:
            yield
        finally:
            self.not_training += time.monotonic() - self.paused_at
            self.paused_at = None
            self.window.restart_clock()

    def _evaluate_and_save(self, reporter: Reporter, signals: StopSignals, stopped: str | None) -> str | None:
        self._save(best=False)
        evaluate = self.evaluate
        if stopped in ("max-steps", "max-time") and self.step < self.eval_every:
            evaluate = replace(evaluate, settings=self._eval_settings(SMOKE))
            reporter.message(
                f"a short run (step {self.step}, before the first evaluation at step {self.eval_every}) "
                f"evaluates {describe(evaluate.settings, self.test_size)} "
                f"(more with --eval-images N, --eval-samples N, --eval-inversion)"
            )
        interrupted: StoppedBySignal | None = None
        try:
            done = evaluate(self.updater.eval_model, self.step, reporter.meter, signals.check)
        except StoppedBySignal as stop:
            interrupted = stop
        received, _ = agree_to_stop(self.dist, self.device, interrupted and interrupted.signal, False)
        if received:
            where = interrupted.done if interrupted else "on another process"
            reporter.message(
                f"{received}: the evaluation at step {self.step} stopped {where}; {self.run_dir / LAST} "
                f"was saved before it. Continue with: {self._continue_with()}",
                keep=True,
            )
            return received
        train_bpd, grad_norm, _ = self.window.read()
        row = {
            "step": self.step,
            "epoch": round(self.batches.epochs_done, 4),
            "train_bpd": train_bpd,
            "test_bpd": done.test_bpd,
            "test_images": done.images,
            "inversion_error": done.inversion_error,
            "lr": self.updater.applied_lr,
            "grad_norm": grad_norm,
            "img_s": self.window.img_s(),
            "skipped": self.updater.skipped,
            "eval_seconds": round(done.seconds, 2),
        }
        finite = math.isfinite(done.test_bpd)
        if self._scheduled():
            improved = finite and (self.best is None or done.test_bpd < self.best)
            self.best = done.test_bpd if improved else self.best
        else:  # a stop's evaluation: best.pt only while there is none, last.pt as it was before it
            improved, self.stop_bpd = finite and self.best is None, done.test_bpd
        if improved:  # before the row: a resumed run takes an evaluation with a row as done, and one
            self._save(best=True, last=self._scheduled())  # without a row again from these sums
        if self._scheduled():
            self.window.reset()
        if self.dist.main:
            record(self.run_dir, row, self.spec.name)  # after `_save`: the spec files, no stop's row
            reporter.evaluation(row)
            reporter.message(f"  evaluated {done.images} test images in {done.seconds:.1f} s, {done.memory}")
            self._open_board()
            if self.board is not None:
                self.board.evaluation(row, done.grids)
        return None

    def _save(self, best: bool, last: bool = True) -> None:
        """The checkpoints (`last.pt` unless not `last`, `best.pt` when `best`), from rank 0, with every
        rank's RNG and data position and the running means of the training loss."""
        position = self.batches.state_dict() if hasattr(self.batches, "state_dict") else None
        states = self.dist.gather(dict(rng.capture(self.device), stream=position))
        if not self.dist.main:
            return
        self._before_writing()
        if self.stop_row_at is not None:  # no checkpoint past a stop while its row is there
            truncate_metrics(self.run_dir, self._take_stop_row(), drop_evaluation=True)
        payload = {
            **self.updater.state_dict(),
            "epoch": self.batches.epochs_done,
            "best_bpd": self.best,
            "window": self.window.state_dict(),
            "rng": states,
            "data_dir": str(Path(self.data_dir).resolve()) if self.data_dir else None,
            "data_default": str(self.data_default) if self.data_default else None,
            "data_fingerprints": self.fingerprints,
            "precision": self.precision,
            "precision_asked": self.precision_asked,
            "threads": self.threads.threads,  # a resume keeps them: another count sums in another order
            "eval_options": dict(self.options.eval_options),  # a resume keeps them too
            "log_every": self.options.log_every,  # and this
            "train_seconds": self._train_seconds(),
            **spec_record(self.spec),
        }
        modules = [m for m in (self.updater.model, self.updater.ema) if m is not None]
        if save_run(self.run_dir, payload, best, *modules, last=last) and last:
            self.saved_step = self.step

    def _before_writing(self, board: bool = True) -> None:
        """On rank 0 of a resumed run, before its first row or checkpoint (or at its end, when it wrote
        none): metrics.jsonl without the rows after the checkpoint (the run writes them again); the spec
        files (the spec it trains now, --set overrides included), which `_check_belongs` compares the next
        checkpoint with; and the TensorBoard log, as metrics.jsonl (unless not `board`)."""
        if self.rows_after is not None:
            truncate_metrics(self.run_dir, self.rows_after)
            self.rows_after = None
        if board:
            self._open_board()
        if self.spec_files_due:
            rundir.write_spec_files(self.run_dir, self.spec)
            self.spec_files_due = False

    def _take_stop_row(self) -> int | None:
        """The step of a stop's evaluation row to drop with the row now written (once), or None."""
        step, self.stop_row_at = self.stop_row_at, None
        return step

    def _diverged(self, x: torch.Tensor) -> None:
        suffix = f"_rank{self.dist.rank}" if self.dist.active else ""
        path = self.run_dir / f"nonfinite_batch{suffix}.pt"
        save_atomic({"step": self.step, "images": x.cpu()}, path)
        batch = (
            f"each process's last batch is saved in {path.with_stem('nonfinite_batch_rank*')}"
            if self.dist.active
            else f"the last batch is saved in {path}"
        )
        if not self.dist.main:  # rank 0 writes the checkpoints, and says which is kept
            kept = "rank 0 says which checkpoint is kept"
        elif self.saved_step is not None:
            kept = f"the last good checkpoint {self.run_dir / LAST} (step {self.saved_step}) is kept"
        else:
            kept = (
                f"no checkpoint was written before it (a new run with --out {shell_command(self.run_dir)} "
                f"sets these files aside)"
            )
        raise UserError(
            f"training stopped: {self.updater.bad_in_row} steps in a row had a non-finite loss or gradient "
            f"(at step {self.step}); {batch}, and {kept}. Lower train.lr, set clip_grad_norm, or check the "
            "data"
        )

    # ------------------------------------------------------------ setup

    def _initialize(self, model: flowspec.FlowModel) -> None:
        """Data-dependent init on `init_batch` random training images, on rank 0, then broadcast."""
        if self.dist.main:
            images = self.train_set.images
            generator = torch.Generator().manual_seed(self.t.seed)
            pick = torch.randperm(len(images), generator=generator)[: self.t.init_batch]
            try:
                model.initialize(images[pick].to(self.device))
            except ValueError as error:  # e.g. images that are all alike
                failed = f"data-dependent initialisation on {len(pick)} training images failed"
                raise UserError(f"{failed}: {error}") from None
        broadcast_module(model, self.dist)

    def _choose_precision(self, payload: dict[str, Any] | None) -> None:
        """--precision if given, else the one a resumed run asked for (`auto` is resolved again on this
        device), else fp32 (a new run, or a checkpoint from before it was kept); the reason says where a
        resumed run's came from, and that it changed."""
        trained = payload.get("precision") if payload is not None else None
        asked = payload.get("precision_asked", trained) if payload is not None else None
        self.precision_asked = self.options.precision or asked or "fp32"
        self.precision, reason = resolve_precision(self.precision_asked, self.device)
        if asked is not None and self.options.precision is None:
            reason = ", ".join(filter(None, ("the run's", reason)))
        if trained is not None and trained != self.precision:
            reason = "; ".join(
                filter(None, (reason, f"the run trained in {trained} until step {payload['step']}"))
            )
        self.precision_reason = reason

    def _restore(self, payload: dict[str, Any]) -> None:
        self.updater.load_state_dict(payload)
        saved = payload.get("data_fingerprints", self.fingerprints)  # absent from older checkpoints
        changed = [split for split in ("train", "test") if saved.get(split) != self.fingerprints[split]]
        if changed:
            self.data_note = (
                f"note: the {' and '.join(changed)} images are not those this run was trained on before "
                f"(a sample of them differs); "
                + ("its best test bits/dim so far was measured on other test images" if "test" in changed else
                   "training goes on with these")
            )  # fmt: skip
        self.best = payload["best_bpd"]
        states = payload["rng"]
        same_world = len(states) == self.dist.world
        if same_world:
            rng.restore(states[self.dist.rank], self.device)
        else:  # a different number of processes: the same data position, fresh per-rank randomness
            rng.seed_all(self.t.seed + self.dist.rank + 7 * self.step)
            self.world_note = (
                f"the checkpoint of step {self.step} was written by {len(states)} "
                f"{'process' if len(states) == 1 else 'processes'}: the data "
                f"position carries over, the per-process randomness is reseeded"
            )
        if hasattr(self.batches, "load_state_dict"):
            self.batches.load_state_dict(states[self.dist.rank if same_world else 0]["stream"])
        if "window" in payload:  # absent from checkpoints written before it was kept
            self.window.load_state_dict(payload["window"])
        rows = []
        if self.dist.main:  # the rows after the checkpoint go with the first write (`_before_writing`)
            try:
                check_writable(self.run_dir)
            except OSError as error:  # a read-only folder: before anything was written
                raise UserError(
                    f"{os_error_message(error)}; the run was not resumed and nothing in {self.run_dir} was "
                    f"changed ({LAST} of step {self.step} is kept): make the folder writable, "
                    f"then continue with: {self._continue_with()}"
                ) from None
            rows = read_metrics(self.run_dir, after_step=self.step)
            self.rows_after = self.step
        if not self._scheduled():  # a stop between evaluations: an evaluation there is not the run's
            self.stop_row = True  # dropped from the metrics if training goes on
            evaluated = [r for r in rows if is_eval(r) and r.get("test_bpd") is not None]
            self.stop_bpd = next((r["test_bpd"] for r in evaluated if r["step"] == self.step), None)
            # the best of the scheduled evaluations (older checkpoints counted a stop's as well); without
            # metrics to read, the checkpoint's
            best = min((r["test_bpd"] for r in evaluated if r["step"] < self.step), default=None)
            best = best if rows else self.best
            self.best, self.stop_bpd = self.dist.gather((best, self.stop_bpd))[0]

    def _banner(self) -> str:
        verb = "resuming" if self.options.resume else "training"
        held = "held in memory" if isinstance(self.batches, BatchStream) else "streamed from its file"
        return (
            f"{verb} {self.spec.name} ({self.parameters:,} parameters) on {self.train_set.source} "
            f"({len(self.train_set)} train / {self.test_size} test images, {held}), device {self.device}, "
            f"{self.threads}, "
            f"precision {self.precision}{f' ({self.precision_reason})' if self.precision_reason else ''}, "
            f"recompute {'on' if self.recompute else 'off'}"
            f"{f' ({self.recompute_reason})' if self.recompute_reason else ''}, "
            f"{self.dist.describe(self.world_note)}; run folder {self.run_dir}"
        )

    def _result(self, stopped: str) -> RunResult:
        history = read_metrics(self.run_dir) if self.dist.main else []
        return RunResult(
            self.run_dir,
            self.step,
            self.batches.epochs_done,
            stopped,
            next((r["test_bpd"] for r in reversed(history) if is_eval(r)), None),
            self.best if self.best is not None else self.stop_bpd,
            self.window.overall_img_s(),
            self.parameters,
            history,
            self.best is not None,
        )


def train(spec: FlowSpec, options: RunOptions, keep_group: bool = False, **data: ImageSet) -> RunResult:
    """Train `spec` with `options` in this process (joining torchrun's job if there is one). The job's
    process group is left at the end unless `keep_group` (more runs follow in this job: an ablation)."""
    finished = False
    try:
        result = Trainer(spec, options, **data).run()
        finished = True
        return result
    finally:
        if not keep_group:
            teardown(together=finished)
