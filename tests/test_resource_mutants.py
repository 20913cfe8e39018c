"""Tests from a mutation audit of the resource modules: the bf16 detection behind `--precision auto`, the
shares of memory behind `--recompute auto`, the peak-memory report, the memory a process may take and the
thread count. Each pins down a behaviour that a plausible one-line bug changed while every other test
passed (GPUs are faked where the code asks torch.cuda)."""

from __future__ import annotations

import mmap
import resource
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from train_helpers import tiny_spec as train_spec

import flowspec
from flowspec import allocator, devices, threads
from flowspec.errors import UserError
from flowspec.inspection import budget
from flowspec.layers.networks import FlowppBlock
from flowspec.model import compile_scope
from flowspec.train import memory, precision
from flowspec.train.memory import PeakMemory
from flowspec.train.precision import native_bf16, resolve_precision
from flowspec.train.recompute import check_training, resolve_recompute
from flowspec.units import fmt_bytes

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
FLOWPP = 31_443_440
GiB = 2**30
LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's /proc and glibc")

# ---------------------------------------------------------------- precision


@pytest.mark.parametrize(
    ("text", "flags"),
    [
        ("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n\n", {"fpu", "avx512f", "avx512_bf16"}),
        ("processor\t: 0\nFeatures\t: fp asimd bf16\n", {"fp", "asimd", "bf16"}),  # an ARM CPU
        ("processor\t: 0\n", set()),
    ],
)
def test_the_cpu_flags_come_from_the_flags_or_features_line_of_cpuinfo(tmp_path, monkeypatch, text, flags):
    (tmp_path / "cpuinfo").write_text(text)
    monkeypatch.setattr(precision, "Path", lambda _: tmp_path / "cpuinfo")
    assert precision._cpu_flags() == flags


def test_an_unreadable_cpuinfo_means_no_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "Path", lambda _: tmp_path)  # a folder: IsADirectoryError
    assert precision._cpu_flags() == set()


def _cpu(monkeypatch, capability: str, flags: set[str], torch_says: bool) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: torch_says, raising=False)


@pytest.mark.parametrize(
    ("capability", "flags", "torch_says", "expected"),
    [
        ("AVX512", set(), True, "CPU AVX512 with avx512_bf16"),  # no cpuinfo: torch's own check
        ("AVX512", {"amx_bf16"}, True, "CPU AVX512 with amx_bf16"),  # the flags found are said
        ("AMX", {"amx_bf16"}, False, "CPU AMX with amx_bf16"),
        ("AVX2", {"avx512_bf16"}, True, None),  # torch's kernels for AVX2 only: no bf16 ones
        ("AVX512", set(), False, None),
    ],
)
def test_native_bf16_on_a_cpu_needs_the_kernels_and_the_instructions(
    monkeypatch, capability, flags, torch_says, expected
):
    _cpu(monkeypatch, capability, flags, torch_says)
    assert native_bf16(CPU) == expected


def test_auto_on_a_device_that_is_neither_cpu_nor_cuda_is_fp32(monkeypatch):
    """The host CPU's bf16 instructions say nothing of another device's."""
    _cpu(monkeypatch, "AVX512", {"avx512_bf16"}, True)
    assert resolve_precision("auto", torch.device("mps")) == ("fp32", "auto: no native bf16 on this mps")


def _two_gpus(monkeypatch, native: tuple[bool, bool]) -> list[int]:
    """A machine with GPUs cuda:0 and cuda:1, of which those `native` compute bf16 natively (all of them
    emulate it); the current device's index, which `torch.cuda.device` changes meanwhile, is returned."""
    current = [0]

    @contextmanager
    def device(which):
        before, index = current[0], torch.device(which).index
        current[0] = before if index is None else index
        try:
            yield
        finally:
            current[0] = before

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: f"GPU {torch.device(d).index}")
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: including_emulation or native[current[0]],
    )
    return current


def test_auto_on_a_gpu_wants_native_bf16_not_emulated(monkeypatch):
    """`is_bf16_supported()` alone also counts bf16 emulated in float32 (pre-Ampere GPUs): slower, not
    faster."""
    _two_gpus(monkeypatch, (False, False))
    assert resolve_precision("auto", torch.device("cuda:1")) == ("fp32", "auto: no native bf16 on this cuda")
    _two_gpus(monkeypatch, (False, True))
    assert resolve_precision("auto", torch.device("cuda:1")) == ("bf16", "auto: GPU 1 has bf16")


def test_auto_asks_the_gpu_it_runs_on_not_the_current_one(monkeypatch):
    """`eval --device cuda:1 --precision auto` where cuda:0 has native bf16 and cuda:1 has not: fp32 (it
    asked cuda:0, the current device, and ran bf16 emulated); the current device is left as it was."""
    current = _two_gpus(monkeypatch, (True, False))
    assert resolve_precision("auto", torch.device("cuda:1")) == ("fp32", "auto: no native bf16 on this cuda")
    assert resolve_precision("auto", torch.device("cuda:0")) == ("bf16", "auto: GPU 0 has bf16")
    assert current == [0]


# ---------------------------------------------------------------- recompute


def _keeping(spec, world: int = 1, precision: str = "fp32") -> float:
    return budget.training_bytes(budget.measure(spec), spec, world, recompute=False, precision=precision)


@pytest.mark.parametrize(("device", "share"), [(CUDA, 0.8), (CPU, 0.5)])
def test_auto_keeps_every_activation_up_to_its_share_of_the_memory_and_not_beyond(monkeypatch, device, share):
    """80% of a GPU's memory, half the RAM: 2% more than the share recomputes, 2% less keeps."""
    spec = train_spec(steps=1)
    keeping = _keeping(spec)
    for available, keeps in ((int(keeping / share / 0.98), True), (int(keeping / share / 1.02), False)):
        monkeypatch.setattr(devices, "device_memory", lambda device, available=available: available)
        keep, why = resolve_recompute("auto", device, False, spec)
        estimate = f"~{fmt_bytes(int(keeping))} of {fmt_bytes(available)}"
        fits = f"fits ({estimate})" if keeps else f"would need {estimate}"
        assert (keep, why) == (not keeps, f"auto: keeping every activation {fits}"), (device, available)


def test_auto_keeps_every_activation_that_fills_exactly_its_share(monkeypatch):
    monkeypatch.setattr(budget, "training_bytes", lambda *args, **kwargs: 1000)
    monkeypatch.setattr(devices, "device_memory", lambda device: 2000)
    assert not resolve_recompute("auto", CPU, False, train_spec(steps=1))[0]


def test_auto_asks_for_the_memory_of_the_device_it_trains_on(monkeypatch):
    """A GPU with room for every activation keeps them, on a host whose RAM has none."""
    spec = train_spec(steps=1)
    room = {"cuda": int(10 * _keeping(spec)), "cpu": 0}
    monkeypatch.setattr(devices, "device_memory", lambda device: room[torch.device(device).type])
    assert not resolve_recompute("auto", CUDA, False, spec)[0]
    assert resolve_recompute("auto", CPU, False, spec)[0]


def _checked_recompute(monkeypatch) -> list[tuple[bool, str]]:
    checked: list[tuple[bool, str]] = []
    monkeypatch.setattr(
        budget, "check_size", lambda *args, recompute, precision, **kw: checked.append((recompute, precision))
    )
    return checked


def test_the_training_check_of_compile_on_a_cpu_sizes_the_eager_choice(monkeypatch):
    """--compile on a CPU compiles only elementwise chains: `auto` keeps every activation where they fit,
    and the check sizes that, not the recomputation of compiled networks."""
    spec = train_spec(steps=1)
    checked = _checked_recompute(monkeypatch)
    monkeypatch.setattr(devices, "device_memory", lambda device: int(10 * _keeping(spec)))
    check_training(spec, "cpu", False, "fp32", "auto", True)
    assert checked == [(False, "fp32")]


def test_the_training_check_sizes_auto_for_one_torchrun_process(monkeypatch):
    """Under WORLD_SIZE=4 each process keeps the activations of a quarter of the batch: room for those
    only is room enough to keep them."""
    spec = train_spec(steps=1)
    alone, shared = _keeping(spec, precision="bf16"), _keeping(spec, world=4, precision="bf16")
    assert shared < alone
    checked = _checked_recompute(monkeypatch)
    monkeypatch.setattr(devices, "device_memory", lambda device: int((alone + shared) / 2 / 0.5))
    monkeypatch.setenv("WORLD_SIZE", "4")
    check_training(spec, "cpu", False, "bf16", "auto", False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_training(spec, "cpu", False, "bf16", "auto", False)
    assert checked == [(False, "bf16"), (True, "bf16")]


def test_set_recompute_reaches_the_blocks_of_a_model_in_eval_mode():
    model = flowspec.build(train_spec(steps=1)).eval()
    model.set_recompute(False)
    blocks = [m for m in model.modules() if isinstance(m, FlowppBlock)]
    assert blocks and not any(b.recompute for b in blocks)


def test_only_cuda_compiles_whole_networks():
    assert [compile_scope(torch.device(d)) for d in ("cuda:1", "cpu", "mps", "meta")] == [
        "networks",
        *["elementwise"] * 3,
    ]


# ---------------------------------------------------------------- peak memory


@LINUX
def test_peak_memory_leaves_out_a_peak_before_its_start():
    """250 MiB touched and unmapped before the start are not in the peak (clear_refs "5" resets VmHWM)."""
    try:  # absent, or refused in some sandboxes: `PeakMemory` then counts from the process start
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("/proc/self/clear_refs cannot be written here")
    block = mmap.mmap(-1, 250 << 20)
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1
    block.close()
    peak, kind = PeakMemory(CPU).read()
    assert kind == "resident" and peak < devices.status_bytes("VmRSS") + 100e6


@LINUX
def test_without_clear_refs_the_peak_is_since_the_process_began_in_bytes(tmp_path, monkeypatch):
    """ru_maxrss counts KiB on Linux: the peak since the process began is about what it holds now or more
    (the kernel updates the two counts at different times)."""
    monkeypatch.setattr(memory, "_CLEAR", tmp_path / "none" / "clear_refs")
    meter = PeakMemory(CPU)
    peak, kind = meter.read()
    assert (meter.start, kind) == (None, "resident since the process began")
    assert peak > devices.status_bytes("VmRSS") / 2 > 0
    assert str(meter) == f"peak memory {peak / 1e9:.2f} GB (resident since the process began)"


def test_the_peak_memory_line_says_gigabytes(monkeypatch):
    meter = PeakMemory(CPU)
    meter.start = 1_500_000_000
    monkeypatch.setattr(meter, "read", lambda: (2_254_000_000, "resident"))
    assert str(meter) == "peak memory 2.25 GB (resident, 1.50 GB at the start)"


def test_on_a_gpu_the_peak_is_what_cuda_allocated_at_most_since_the_start(monkeypatch):
    reset: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 10**9)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset.append)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 10**9)
    meter = PeakMemory(torch.device("cuda:1"))
    assert reset == [torch.device("cuda:1")] and meter.start == 10**9
    assert str(meter) == "peak memory 3.00 GB (CUDA allocated, 1.00 GB at the start)"


# ---------------------------------------------------------------- devices


def test_a_device_of_the_wrong_type_is_a_user_error():
    for device in (1.5, None):
        with pytest.raises(UserError, match=r"is not one torch knows: use cpu, cuda or cuda:N"):
            devices.parse_device(device)


def test_the_default_device_is_cuda_where_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (devices.default_device(), devices.default_device("cpu")) == (CUDA, CPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.default_device() == CPU


def test_a_missing_gpu_index_names_the_ones_there_are_given_or_of_the_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    devices.check_cuda(torch.device("cuda:1"))
    with pytest.raises(UserError) as refused:
        devices.check_cuda(torch.device("cuda:2"))
    assert str(refused.value) == (
        "--device cuda:2: CUDA device 2 does not exist (this machine has 2: cuda:0 to cuda:1)"
    )
    devices.check_cuda(CUDA, 1)  # a torchrun process's GPU, the one of its LOCAL_RANK
    with pytest.raises(UserError, match=r"--device cuda: CUDA device 2 does not exist \(this machine has 2"):
        devices.check_cuda(CUDA, 2)


def test_the_memory_of_a_missing_gpu_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device cuda was requested but no CUDA device is available"):
        devices.device_memory("cuda")


def test_status_sizes_are_kib_in_bytes(tmp_path, monkeypatch):
    (tmp_path / "status").write_text("Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t   1000 kB\n")
    monkeypatch.setattr(devices, "_STATUS", tmp_path / "status")
    assert [devices.status_bytes(f) for f in ("VmRSS", "VmHWM", "VmSize")] == [1000 * 1024, 2 * 2**20, None]
    monkeypatch.setattr(devices, "_STATUS", tmp_path / "none")
    assert devices.status_bytes("VmRSS") is None


def _machine(monkeypatch, tmp_path, cgroup: str | None, address_space: int = resource.RLIM_INFINITY) -> None:
    """4 GiB of RAM, a cgroup limit (None: no file) and an address-space limit; no torchrun job."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(devices.os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096}.get(name, GiB // 1024))
    limit = tmp_path / "memory.max"
    if cgroup is not None:
        limit.write_text(cgroup)
    monkeypatch.setattr(devices, "Path", lambda p: limit if p == "/sys/fs/cgroup/memory.max" else Path(p))
    monkeypatch.setattr(devices.resource, "getrlimit", lambda kind: (address_space, resource.RLIM_INFINITY))


def test_a_cgroup_memory_limit_below_the_ram_bounds_a_process(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "HELD_AT_IMPORT", (0, 0))
    _machine(monkeypatch, tmp_path, "1073741824\n")
    assert devices.device_memory(CPU) == GiB
    _machine(monkeypatch, tmp_path, "max\n")
    assert devices.device_memory(CPU) == 4 * GiB


def test_a_torchrun_process_takes_its_share_less_all_it_holds(tmp_path, monkeypatch):
    """The RAM is split among LOCAL_WORLD_SIZE processes; what one already holds comes out of its share."""
    _machine(monkeypatch, tmp_path, None)
    monkeypatch.setattr(devices, "HELD_AT_IMPORT", (GiB // 4, 0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert devices.device_memory(CPU) == GiB - GiB // 4


def test_an_address_space_limit_bounds_a_process_less_what_it_mapped(tmp_path, monkeypatch):
    _machine(monkeypatch, tmp_path, None, address_space=2 * GiB)
    monkeypatch.setattr(devices, "HELD_AT_IMPORT", (0, GiB + 5))
    assert devices.device_memory(CPU) == GiB - 5


# ---------------------------------------------------------------- threads


def test_a_million_parameters_is_a_large_model():
    small, large = (threads.choose_threads(n, cpus=8, load=0.0) for n in (999_999, 1_000_000))
    assert str(small) == "threads 1 (small model, 1M params)"
    assert str(large) == "threads 8 (large model, 1M params; all cores)"


@pytest.mark.parametrize(
    ("params", "said"), [(500_000, "0.5M params"), (12_345_678, "12M params"), (123_456_789, "123M params")]
)
def test_the_parameters_are_said_in_millions(params, said):
    assert said in threads.choose_threads(params, cpus=1, load=0.0).reason


def test_every_core_may_be_asked_for_or_set_in_the_environment():
    assert threads.choose_threads(FLOWPP, cpus=4, load=3.0, requested=4).threads == 4
    assert str(threads.choose_threads(FLOWPP, cpus=16, load=0.0, env="16")) == "threads 16 (OMP_NUM_THREADS)"


@pytest.mark.parametrize("kept", [0, 4])
def test_a_kept_thread_count_that_does_not_fit_this_machine_is_chosen_anew(kept):
    """A resumed run's count of 0 (a damaged checkpoint) or more than the cores is not kept."""
    choice = threads.choose_threads(FLOWPP, cpus=2, load=1.5, kept=kept)
    assert str(choice) == "threads 1 (busy CPU, load 1.5 on 2 cores; 31M params)"


def test_the_load_is_the_one_minute_average(monkeypatch):
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.5, 2.0, 3.0))
    assert threads.machine_load() == 0.5
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (_ for _ in ()).throw(OSError("no load")))
    assert threads.machine_load() is None


def test_set_threads_tunes_malloc_reads_omp_num_threads_and_sets_torch(monkeypatch):
    tuned: list[bool] = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: tuned.append(True) or True)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert str(threads.set_threads(FLOWPP)) == "threads 3 (OMP_NUM_THREADS)"
    assert torch.get_num_threads() == 3 and tuned == [True]
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.set_threads(FLOWPP, requested=2).threads == torch.get_num_threads() == 2


def test_the_api_refuses_a_thread_count_before_it_reads_anything(tmp_path):
    """`flowspec.train(threads=0)` says so before looking for the run to resume (or reading data)."""
    with pytest.raises(UserError, match=r"^--threads 0: give a number of threads >= 1$"):
        flowspec.train(resume=tmp_path / "no-such-run", threads=0)
