"""How many intra-op threads torch uses: chosen by the size of the model and how busy the CPU is.

Small layers gain nothing from torch's thread pool, and on a CPU shared with other jobs the threads'
synchronisation can make every step several times slower; large models use the idle cores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from flowspec.errors import UserError

#: Models with fewer trainable parameters than this run on one thread.
SMALL_MODEL = 1_000_000


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op threads chosen and why, as the run header says them."""

    threads: int
    reason: str

    def __str__(self) -> str:
        return f"threads {self.threads} ({self.reason})"


def _millions(params: int) -> str:
    return f"{params / 1e6:.2g}M params" if params < 1e7 else f"{params / 1e6:.0f}M params"


def check_threads(requested: int, cpus: int | None = None) -> None:
    """A `UserError` unless `requested` (`--threads`) is between 1 and the `cpus` cores (this machine's):
    thousands of threads crash the OpenMP runtime instead of failing cleanly."""
    cpus = max(1, cpus if cpus is not None else os.cpu_count() or 1)
    if requested < 1:
        raise UserError(f"--threads {requested}: give a number of threads >= 1")
    if requested > cpus:
        raise UserError(f"--threads {requested}: this machine has {cpus} CPU cores; ask for at most {cpus}")


def choose_threads(
    params: int,
    cpus: int,
    load: float | None,
    env: str | None = None,
    requested: int | None = None,
    kept: int | None = None,
) -> ThreadChoice:
    """The number of threads for a model of `params` parameters on `cpus` cores at load average `load`.

    `requested` (`--threads`, at most `cpus`) wins, then `env` (the user's `OMP_NUM_THREADS`, cut to
    `cpus`), then `kept` (a resumed run's count: another one sums in another order, so the run would not be
    reproduced exactly); otherwise one thread for a small model or when fewer than two cores are idle, else
    the idle cores (all of them on an idle CPU).
    """
    if requested is not None:
        check_threads(requested, cpus)
        return ThreadChoice(requested, "--threads")
    if env is not None and env.strip().isdecimal() and int(env) > 0:
        if int(env) > max(1, cpus):  # more threads than cores: many times slower, never faster
            return ThreadChoice(max(1, cpus), f"OMP_NUM_THREADS={int(env)}, at most the {max(1, cpus)} cores")
        return ThreadChoice(int(env), "OMP_NUM_THREADS")
    if kept is not None and 1 <= kept <= max(1, cpus):
        return ThreadChoice(kept, "as the run trained, so that it resumes exactly; --threads to change")
    size = _millions(params)
    if params < SMALL_MODEL:
        return ThreadChoice(1, f"small model, {size}")
    cpus = max(1, cpus)
    idle = cpus if load is None else int(cpus - load + 0.5)
    if idle < 2:
        busy = f"busy CPU, load {load:.1f} on {cpus} cores" if load is not None else f"{cpus} core"
        return ThreadChoice(1, f"{busy}; {size}")
    threads = min(cpus, idle)
    where = "all cores" if threads == cpus else f"load {load:.1f} on {cpus} cores"
    return ThreadChoice(threads, f"large model, {size}; {where}")


def machine_load() -> float | None:
    """The one-minute load average, or None where the system has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def set_threads(params: int, requested: int | None = None, kept: int | None = None) -> ThreadChoice:
    """Choose the thread count for this machine now and give it to torch; keep freed memory in the
    process for the tensors to come (`flowspec.allocator`)."""
    import torch

    from flowspec.allocator import keep_freed_memory

    keep_freed_memory()
    choice = choose_threads(
        params, os.cpu_count() or 1, machine_load(), os.environ.get("OMP_NUM_THREADS"), requested, kept
    )
    torch.set_num_threads(choice.threads)
    return choice
