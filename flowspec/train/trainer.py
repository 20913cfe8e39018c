"""The training loop: the spec's recipe, evaluation and checkpoints, resumable and interruptible.

One `Trainer` per process. It builds the model from the spec, runs data-dependent init on rank 0 and
broadcasts it, then steps Adam (warmup, schedule, clipping) on batches from a resumable stream while
an EMA of the weights (`torch.optim.swa_utils`) is kept for evaluation and sampling. Every evaluation
interval it writes test bits/dim, the inversion error, sample grids, `metrics.jsonl`, `curves.png` and
the `last`/`best` checkpoints. SIGINT/SIGTERM finish the current step, save and stop.
"""

from __future__ import annotations

import math
import signal
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import flowspec
from flowspec.errors import UserError
from flowspec.spec import FlowSpec, Interval
from flowspec.threads import set_threads
from flowspec.train import rng
from flowspec.train.batches import BatchStream
from flowspec.train.checkpoint import (
    BEST,
    LAST,
    check_same_spec,
    is_finite,
    load_checkpoint,
    save_atomic,
    spec_hash,
)
from flowspec.train.data import ImageSet, load_split
from flowspec.train.distributed import broadcast_module, setup
from flowspec.train.evaluate import inversion_error, single_sample_bpd
from flowspec.train.metrics import (
    CURVES,
    TrainLog,
    append_metrics,
    is_eval,
    plot_curves,
    read_metrics,
    truncate_metrics,
)
from flowspec.train.progress import Reporter
from flowspec.train.sampling import grid_name, save_grid
from flowspec.train.schedule import build_optimizer, build_scheduler

SAMPLE_TEMPERATURES = (1.0, 0.8)
SAMPLES_PER_GRID = 64
INVERSION_IMAGES = 64


@dataclass
class RunOptions:
    """How to run a spec (everything the command line adds to it)."""

    out: Path | None = None  # run folder; None: runs/<name>-<timestamp>
    data_dir: Path | None = None
    device: str | None = None  # cpu | cuda; None: cuda when available
    precision: str = "fp32"  # fp32 | bf16 (autocast of the coupling networks)
    compile: bool = False
    max_steps: int | None = None  # stop at this global step (a resumed run counts from its start)
    max_time: float | None = None  # seconds of training in this process
    quiet: bool = False
    resume: bool = False  # continue the run in `out` from its last checkpoint
    eval_batch: int | None = None  # default: the spec's batch
    threads: int | None = None  # intra-op CPU threads; None: chosen by model size and CPU load
    max_bad_steps: int = 20  # non-finite steps in a row before the run stops
    handle_signals: bool = True


@dataclass
class RunResult:
    run_dir: Path
    step: int
    epoch: float
    stopped: str  # finished | max-steps | max-time | SIGINT | SIGTERM
    test_bpd: float | None
    best_bpd: float | None
    img_s: float
    parameters: int
    history: list[dict[str, Any]] = field(default_factory=list)


class Objective(nn.Module):
    """Mean bits/dim of a batch: the module DDP wraps, so its backward all-reduces the gradients."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.bpd(x).mean()


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
        if options.precision not in ("fp32", "bf16"):
            raise UserError(f"unknown precision {options.precision!r}: use fp32 or bf16")
        device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dist, self.device = setup(device)
        self.run_dir = self._run_dir(options)
        payload = self._existing_checkpoint()

        # a resumed run reads the data folder it was trained on unless --data says otherwise
        self.data_dir = options.data_dir or (payload.get("data_dir") if payload else None)
        if train_set is None:
            train_set = load_split(spec.data, "train", self.data_dir)
        if test_set is None:
            test_set = load_split(spec.data, "test", self.data_dir)
        self.train_images = train_set.images.to(self.device)
        self.test_images = test_set.images.to(self.device)
        self.data_source = train_set.source
        self.stream = BatchStream(
            self.train_images, self.t.batch, self.t.seed, self.dist.rank, self.dist.world, self.t.hflip
        )
        self.total_steps = self._steps(self.t.length) if self.t.length else None
        self.eval_every = self._steps(self.t.eval_every)
        self.eval_batch = options.eval_batch or self.t.batch

        rng.seed_all(self.t.seed + self.dist.rank)
        self.model = flowspec.build(spec).to(self.device)
        self.parameters = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.threads = set_threads(self.parameters, options.threads)
        if payload is not None:
            self.model.load_state_dict(payload["model"])
        else:
            self._initialize()
        self.model.set_autocast(torch.bfloat16 if options.precision == "bf16" else None)
        self.ema = None
        if self.t.ema:
            self.ema = AveragedModel(
                self.model, multi_avg_fn=get_ema_multi_avg_fn(self.t.ema), use_buffers=True
            )
            self.ema.update_parameters(self.model)  # the average starts from the initialised weights
        if options.compile:
            self.model.compile_networks()
        self.objective: nn.Module = Objective(self.model)
        if self.dist.active:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.objective = nn.parallel.DistributedDataParallel(self.objective, device_ids=ids)
        self.optimizer = build_optimizer(self.model.parameters(), self.t)
        self.scheduler = build_scheduler(self.optimizer, self.t, self.total_steps)

        self.step, self.skipped, self.bad_in_row = 0, 0, 0
        self.best: float | None = None
        self._signal: int = 0
        self._window = _Window()
        if payload is not None:
            self._restore(payload)

    # ------------------------------------------------------------ setup

    def _run_dir(self, options: RunOptions) -> Path:
        if options.out is not None:
            return Path(options.out)
        stamp = self.dist.gather(datetime.now().strftime("%Y%m%d-%H%M%S"))[0]  # rank 0's clock names the run
        return Path("runs") / f"{self.spec.name}-{stamp}"

    def _existing_checkpoint(self) -> dict[str, Any] | None:
        last = self.run_dir / LAST
        if self.options.resume:
            payload = load_checkpoint(self.run_dir if self.run_dir.is_dir() else last)
            check_same_spec(payload, self.spec, last)
            return payload
        if last.exists():
            raise UserError(
                f"{self.run_dir} already holds a run ({last}); continue it with --resume {self.run_dir} "
                f"or choose another --out folder"
            )
        return None

    def _steps(self, interval: Interval) -> int:
        return interval.count * (self.stream.steps_per_epoch if interval.unit == "epochs" else 1)

    def _initialize(self) -> None:
        """Data-dependent init on `init_batch` random training images, on rank 0, then broadcast."""
        if self.dist.main:
            generator = torch.Generator().manual_seed(self.t.seed)
            pick = torch.randperm(len(self.train_images), generator=generator)[: self.t.init_batch]
            with torch.no_grad():
                self.model.initialize(self.train_images[pick.to(self.device)])
        broadcast_module(self.model, self.dist)

    def _restore(self, payload: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(payload["ema"])
        self.step, self.skipped, self.best = payload["step"], payload["skipped"], payload["best_bpd"]
        states = payload["rng"]
        if len(states) == self.dist.world:
            rng.restore(states[self.dist.rank], self.device)
            self.stream.load_state_dict(states[self.dist.rank]["stream"])
        else:  # a different number of processes: same data position, fresh per-rank randomness
            rng.seed_all(self.t.seed + self.dist.rank + 7 * self.step)
            position = dict(states[0]["stream"], flips=self.stream.flips.get_state())
            self.stream.load_state_dict(position)
        if self.dist.main:
            truncate_metrics(self.run_dir, self.step)

    # ------------------------------------------------------------ the loop

    def run(self) -> RunResult:
        """Train to the spec's length, --max-steps, --max-time or a signal; evaluate and save at the end."""
        if self.dist.main:
            self._write_run_files()
        reporter = Reporter.auto(self.options.quiet or not self.dist.main, self._horizon(), self.step)
        previous = self._install_signals() if self.options.handle_signals else {}
        started = time.monotonic()
        stopped = self._limit_reached()
        train_log = TrainLog(self.run_dir)
        verb = "resuming" if self.options.resume else "training"
        reporter.message(
            f"{verb} {self.spec.name} ({self.parameters:,} parameters) on {self.data_source} "
            f"({len(self.train_images)} train / {len(self.test_images)} test images), device {self.device}, "
            f"{self.threads}, "
            f"{self.dist.world} process(es); run folder {self.run_dir}"
        )
        try:
            while stopped is None:
                x = next(self.stream)
                self._train_step(x)
                if self.dist.main:
                    lr = self.scheduler.get_last_lr()[0]
                    train_log.add(self.step, self._window.last_bpd, lr, self.stream.epochs_done, self.skipped)
                reporter.step(self.step, self._window.last_bpd, self._window.img_s())
                signalled, time_up = self._agree(time.monotonic() - started)
                stopped = self._limit_reached(time_up)
                if signalled:
                    stopped = signalled
                    self._save(best=False)
                    reporter.message(
                        f"{stopped}: stopped after step {self.step}; saved {self.run_dir / LAST}. "
                        f"Continue with: flowspec train --resume {self.run_dir}"
                    )
                elif self.step % self.eval_every == 0 or stopped is not None:
                    self._evaluate(reporter)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            reporter.close()
        history = read_metrics(self.run_dir) if self.dist.main else []
        test = next((r["test_bpd"] for r in reversed(history) if is_eval(r)), None)
        return RunResult(
            self.run_dir,
            self.step,
            self.stream.epochs_done,
            stopped,
            test,
            self.best,
            self._window.overall_img_s(),
            self.parameters,
            history,
        )

    def _horizon(self) -> int | None:
        limits = [s for s in (self.total_steps, self.options.max_steps) if s is not None]
        return min(limits) if limits else None

    def _agree(self, elapsed: float) -> tuple[str | None, bool]:
        """One collective per step, so every rank stops after the same step: a signal any rank received,
        and whether rank 0's clock has passed --max-time."""
        flags = torch.tensor(
            [
                self._signal == signal.SIGINT,
                self._signal == signal.SIGTERM,
                self.dist.main and self.options.max_time is not None and elapsed >= self.options.max_time,
            ],
            dtype=torch.float32,
            device=self.device,
        )
        self.dist.all_sum(flags)
        received = "SIGTERM" if flags[1] > 0 else "SIGINT" if flags[0] > 0 else None
        return received, bool(flags[2] > 0)

    def _limit_reached(self, time_up: bool = False) -> str | None:
        if self.total_steps is not None and self.step >= self.total_steps:
            return "finished"
        if self.options.max_steps is not None and self.step >= self.options.max_steps:
            return "max-steps"
        return "max-time" if time_up else None

    def _train_step(self, x: torch.Tensor) -> None:
        tick = time.monotonic()
        self.model.train()
        loss = self.objective(x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.t.clip_grad_norm or math.inf)
        bad = (~torch.isfinite(loss.detach()) | ~torch.isfinite(norm)).float()
        shared = torch.stack([torch.nan_to_num(loss.detach().float(), 0.0, 0.0, 0.0), bad.float()])
        self.dist.all_sum(shared)
        if shared[1] == 0:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            self.bad_in_row = 0
            self._window.add(float(shared[0]) / self.dist.world, float(norm))
        else:
            self.skipped += 1
            self.bad_in_row += 1
            if self.bad_in_row >= self.options.max_bad_steps:
                self._diverged(x)
        with warnings.catch_warnings():  # a skipped first step makes torch warn about the order of the two
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`", UserWarning)
            self.scheduler.step()
        self.step += 1
        self._window.timed(len(x) * self.dist.world, time.monotonic() - tick)

    def _diverged(self, x: torch.Tensor) -> None:
        suffix = f"_rank{self.dist.rank}" if self.dist.active else ""
        path = self.run_dir / f"nonfinite_batch{suffix}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic({"step": self.step, "images": x.cpu()}, path)
        raise UserError(
            f"training stopped: {self.bad_in_row} steps in a row had a non-finite loss or gradient (at step "
            f"{self.step}); the last batch is saved in {path} and the last good checkpoint "
            f"{self.run_dir / LAST} is kept. Lower train.lr, set clip_grad_norm, or check the data"
        )

    # ------------------------------------------------------------ evaluation and checkpoints

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _evaluate(self, reporter: Reporter) -> None:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # evaluation never moves the training RNG
            torch.manual_seed(self.t.seed + 1)
            test_bpd = single_sample_bpd(
                self.eval_model, self.test_images, self.eval_batch, self.device, self.dist
            )
            inverse = float("nan")
            if self.dist.main:
                inverse = inversion_error(self.eval_model, self.test_images[:INVERSION_IMAGES], self.device)
                for temperature in SAMPLE_TEMPERATURES:
                    path = self.run_dir / "samples" / grid_name(self.step, temperature)
                    save_grid(
                        self.eval_model,
                        SAMPLES_PER_GRID,
                        temperature,
                        path,
                        self.spec.data.levels,
                        self.t.seed,
                    )
        train_bpd, grad_norm = self._window.means()
        row = {
            "step": self.step,
            "epoch": round(self.stream.epochs_done, 4),
            "train_bpd": train_bpd,
            "test_bpd": test_bpd,
            "inversion_error": inverse,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "img_s": self._window.img_s(),
            "skipped": self.skipped,
        }
        self._window.reset()
        improved = math.isfinite(test_bpd) and (self.best is None or test_bpd < self.best)
        if improved:
            self.best = test_bpd
        if self.dist.main:
            append_metrics(self.run_dir, row)
            plot_curves({self.spec.name: read_metrics(self.run_dir)}, self.run_dir / CURVES, self.spec.name)
            reporter.evaluation(row)
        self._save(best=improved)

    def _save(self, best: bool) -> None:
        states = self.dist.gather(dict(rng.capture(self.device), stream=self.stream.state_dict()))
        if not self.dist.main:
            return
        if not is_finite(self.model) or (self.ema is not None and not is_finite(self.ema)):
            print(
                f"warning: the model has non-finite weights at step {self.step}: not checkpointed", flush=True
            )
            return
        payload = {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.stream.epochs_done,
            "skipped": self.skipped,
            "best_bpd": self.best,
            "rng": states,
            "data_dir": str(Path(self.data_dir).resolve()) if self.data_dir else None,
            "spec": self.spec.model_dump_json(),
            "spec_hash": spec_hash(self.spec),
            "versions": {"flowspec": flowspec.__version__, "torch": str(torch.__version__)},
        }
        save_atomic(payload, self.run_dir / LAST)
        if best:
            save_atomic(payload, self.run_dir / BEST)

    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "spec.json").write_text(self.spec.model_dump_json(indent=2) + "\n")
        if self.spec.source and Path(self.spec.source).is_file():
            (self.run_dir / "spec.flow").write_text(Path(self.spec.source).read_text())

    def _install_signals(self) -> dict[int, Any]:
        def finish_step(signum: int, frame: Any) -> None:
            self._signal = signum
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

        try:
            return {s: signal.signal(s, finish_step) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: leave signals alone
            return {}


class _Window:
    """Running means of train bits/dim and gradient norm since the last evaluation, and throughput."""

    def __init__(self) -> None:
        self.reset()
        self.total_images, self.total_seconds = 0, 0.0
        self.first: tuple[int, float] | None = None
        self.last_bpd = float("nan")

    def reset(self) -> None:
        self.bpd_sum, self.norm_sum, self.count, self.images, self.seconds = 0.0, 0.0, 0, 0, 0.0

    def add(self, bpd: float, norm: float) -> None:
        self.bpd_sum, self.norm_sum, self.count, self.last_bpd = (
            self.bpd_sum + bpd,
            self.norm_sum + norm,
            self.count + 1,
            bpd,
        )

    def timed(self, images: int, seconds: float) -> None:
        self.images, self.seconds = self.images + images, self.seconds + seconds
        if self.first is None:  # the first step warms up (allocations, lazy init): not the run's rate
            self.first = (images, seconds)
        else:
            self.total_images, self.total_seconds = self.total_images + images, self.total_seconds + seconds

    def means(self) -> tuple[float | None, float | None]:
        if not self.count:
            return None, None
        return self.bpd_sum / self.count, self.norm_sum / self.count

    def img_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def overall_img_s(self) -> float:
        """Images per second of training steps, the first one left out unless it is the only one."""
        images, seconds = (
            (self.total_images, self.total_seconds) if self.total_seconds else self.first or (0, 0)
        )
        return images / seconds if seconds else 0.0


def train(spec: FlowSpec, options: RunOptions, **data: ImageSet) -> RunResult:
    """Train `spec` with `options` in this process (joining torchrun's job if there is one)."""
    from flowspec.train.distributed import teardown

    try:
        return Trainer(spec, options, **data).run()
    finally:
        teardown()
