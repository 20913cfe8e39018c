"""Multi-process training under `torchrun`: the process group, and the few collectives the loop needs.

A plain process has no group and skips every collective. Under `torchrun` (RANK, WORLD_SIZE and
LOCAL_RANK in the environment) every process joins the default group, even a job of one: NCCL on CUDA,
gloo on CPU, and the model is wrapped in DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as td

from flowspec.devices import check_cuda, parse_device
from flowspec.errors import PEER_STOPPED, UserError, job_number, torchrun_worker


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    backend: str | None = None  # the process group's, under torchrun

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.backend is not None

    def describe(self, note: str = "") -> str:
        """`1 process` or `4 processes (torchrun, nccl)` for the run header, `note` in the parentheses."""
        processes = f"{self.world} process{'es' if self.world > 1 else ''}"
        said = "; ".join(filter(None, (f"torchrun, {self.backend}" if self.active else "", note)))
        return f"{processes} ({said})" if said else processes

    def all_sum(self, tensor: torch.Tensor) -> None:
        if self.active:
            td.all_reduce(tensor, op=td.ReduceOp.SUM)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (on every rank)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            td.barrier()


def main_process() -> bool:
    """Whether this process writes a job's shared outputs: rank 0 of torchrun's job, or the only one."""
    return job_number("RANK", 0) == 0


def job_size() -> int:
    """The number of processes of torchrun's job (1 without torchrun)."""
    return job_number("WORLD_SIZE", 1)


#: what torchrun gives each worker, all of which joining its job reads
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """Whether this process is a worker of a torchrun job: a `UserError` where the environment holds only
    some of what torchrun sets (a LOCAL_RANK, RANK or WORLD_SIZE left in a shell)."""
    rank = job_number("RANK", 0)
    if not (torchrun_worker() or job_size() > 1 or rank > 0):
        return False
    missing = [name for name in TORCHRUN_VARIABLES if not os.environ.get(name, "").strip()]
    if missing:
        given = [name for name in TORCHRUN_VARIABLES if name not in missing]
        raise UserError(
            f"the environment has {', '.join(given)} but not {', '.join(missing)}: torchrun sets all of them "
            f"for its workers; run under torchrun, or outside it unset {' '.join(given)}"
        )
    if rank >= job_size():
        raise UserError(
            f"the environment has RANK={rank} in a job of WORLD_SIZE={job_size()} processes (ranks 0 to "
            f"{job_size() - 1}): torchrun sets them for its workers; outside torchrun unset them"
        )
    return True


def setup(device: str) -> tuple[Dist, torch.device]:
    """Join the job torchrun started (if any) and pick this process's device: the CPU, or a CUDA device
    (`cuda:N` picks one; under torchrun each process takes the one of its LOCAL_RANK)."""
    world = job_size()
    rank, local_rank = job_number("RANK", 0), job_number("LOCAL_RANK", 0)
    torchrun = under_torchrun()
    where = parse_device(device)
    if where.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: flowspec trains on cpu or cuda (cuda:N for one GPU)")
    if where.type == "cuda":
        index = local_rank if torchrun or where.index is None else where.index
        check_cuda(where, index)
        torch.cuda.set_device(index)
        where = torch.device("cuda", index)
    else:
        where = torch.device("cpu")
    backend = None
    if torchrun:
        backend = "nccl" if where.type == "cuda" else "gloo"
        if not td.is_initialized():
            td.init_process_group(backend=backend)
    return Dist(rank, world, backend), where


def join(device: str | None) -> Dist:
    """Under torchrun, join the job's group (see `setup`; `device` None: cuda when available) before this
    process reads anything of its own (spec, checkpoint, data), which it may fail to read alone; a plain
    `Dist` (and no check of the device) otherwise."""
    if not under_torchrun():
        return Dist()
    return setup(device or ("cuda" if torch.cuda.is_available() else "cpu"))[0]


@contextmanager
def agreed(dist: Dist) -> Iterator[None]:
    """Set-up that one process of the job may fail alone (its files differ, or a rank-0 check), with no
    collective inside: the processes agree at its end, so that none waits for a process that stopped. The
    one that failed raises its own error, the others a `UserError` saying that another process stopped.
    Nothing without a group."""
    if not dist.active:
        yield
        return
    try:
        yield
    except Exception:
        with contextlib.suppress(Exception):  # its own error, even when another process is gone already
            dist.gather(False)
        raise
    if not all(dist.gather(True)):
        raise UserError(PEER_STOPPED)


def teardown(together: bool = False) -> None:
    """Leave the job's process group; `together` (a run that finished on every rank): after a barrier,
    so that no rank tears down while another still works (a rank that left while rank 0 wrote its final
    files aborted at exit in about one job in ten: "terminate called without an active exception").
    The finished runs' DistributedDataParallel wrappers, which hold the group and live on in reference
    cycles, are collected first, so that the group is freed here and not during the interpreter's exit
    (an ablation job's rank 1 once aborted at exit the same way, both runs' wrappers alive until then)."""
    if td.is_initialized():
        gc.collect()
        if together:
            td.barrier()
        td.destroy_process_group()


@contextmanager
def left_on_error() -> Iterator[None]:
    """Leave the job's group (`teardown`) if the block raises: for set-up after which the process stops on
    an error (after `agreed`, every process of the job does). A process that exited with its group still
    there aborted at exit now and then (a bare gloo job: one in three), after printing its error:
    "terminate called without an active exception". Not where the job goes on after the error (an
    ablation's next run)."""
    try:
        yield
    except BaseException:
        teardown()
        raise


def broadcast_module(module: torch.nn.Module, dist: Dist) -> None:
    """Copy rank 0's parameters and buffers to every rank (after rank 0's data-dependent init)."""
    if dist.active:
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                td.broadcast(tensor.data, src=0)


class StopVote:
    """Under torchrun, each rank's stop flags ride on every training step's all-reduce (`Updater`), and
    their sum is read a step later, without waiting for the step just queued: every rank stops after the
    same step, and the device is never waited for on steps without a stop.

    `flags` is a tensor kept on the device and written only when this rank's flags change; `read` takes
    the step's summed flags, starts their copy to the host, and returns the previous step's verdict.
    """

    def __init__(self, device: torch.device):
        self.local = torch.zeros(3, dtype=torch.float32, device=device)
        self._noted = [False, False, False]
        self._pending: tuple[torch.Tensor, torch.cuda.Event | None] | None = None

    def flags(self, received: str | None, time_up: bool) -> torch.Tensor:
        """This rank's flags (SIGINT, SIGTERM, --max-time up) for the coming step's all-reduce."""
        for i, now in enumerate((received == "SIGINT", received == "SIGTERM", time_up)):
            if now and not self._noted[i]:
                self._noted[i] = True
                self.local[i] = 1.0  # a fill on the device: no wait for it
        return self.local

    def read(self, summed: torch.Tensor) -> tuple[str | None, bool]:
        """Note the step's summed flags; the signal and time-up of the step before, (None, False) at first."""
        cuda = summed.device.type == "cuda"
        host = torch.empty(summed.shape, dtype=summed.dtype, pin_memory=cuda)
        host.copy_(summed, non_blocking=cuda)
        event = torch.cuda.Event() if cuda else None
        if event is not None:
            event.record()
        previous, self._pending = self._pending, (host, event)
        if previous is None:
            return None, False
        before, done = previous
        if done is not None:
            done.synchronize()  # the step before this one, queued earlier: usually finished already
        return read_stop_flags(before)


def read_stop_flags(summed: torch.Tensor) -> tuple[str | None, bool]:
    """The signal any rank received (SIGTERM first) and whether any rank's clock is up, from summed flags."""
    sigint, sigterm, late = (value > 0 for value in summed.tolist())
    return ("SIGTERM" if sigterm else "SIGINT" if sigint else None), late


def agree_to_stop(
    dist: Dist, device: torch.device, received: str | None, time_up: bool
) -> tuple[str | None, bool]:
    """The signal any rank received and whether any rank's clock is up, the same on every rank, so that
    all of them stop together. One small all-reduce; nothing without torchrun."""
    if not dist.active:
        return received, time_up
    flags = torch.tensor(
        [received == "SIGINT", received == "SIGTERM", time_up], dtype=torch.float32, device=device
    )
    dist.all_sum(flags)
    return read_stop_flags(flags)
