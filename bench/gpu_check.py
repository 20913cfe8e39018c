"""The GPU check: the CUDA tests, then Flow++ training speed on one GPU, within about 8 minutes.

    bench/gpu_check.sh              # on a machine with a CUDA GPU and the project installed
    bench/gpu_check.sh --dry-run    # the same logic on the CPU in about a minute: a tiny model, 2 steps,
                                    # the CUDA tests only collected

(a) runs the tests marked `cuda` (CUDA forward == CPU forward, bf16 bits/dim, sampling, torch.compile,
    a torchrun job that trains and resumes);
(b) trains flowpp_cifar at batch 64 for 50 steps (5 of them warm-up, untimed) in float32, bf16 and bf16
    with torch.compile (each recomputing as `train --recompute auto` would), and prints img/s, peak memory
    (torch.cuda.max_memory_allocated) and the fraction of
    the device's dense bf16 FLOP peak that the counted work (77.6 GFLOP per trained image) reaches;
(c) appends the rows to bench/RESULTS.md, and to $OUT/gpu_check.md when $OUT is set (made if missing).
Beside the data-sheet peak it measures a large bf16 matmul after each row, the rate the device reaches then.
When time is left it adds bf16 rows with the compiled networks replayed as CUDA graphs (`+graphs`), with the
other recompute setting (`+keep`: none, `+recompute`) and at batch 256 (`--configs` picks others), and
after the rows it profiles 3 steps of the first compiled bf16 configuration that trained (the goal's; the
first eager bf16 one where time is too short to compile it again) by CUDA kernel (the kernels taking most
time, how many launches a step makes, how busy the GPU is) into gpu_profile.txt in $OUT, beside the
CUDA tests' whole output (pytest_cuda.txt).
A configuration that would not fit in the time left is skipped and said so; a missing required row fails.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

import flowspec
from flowspec.train.precision import autocast_dtype
from flowspec.train.recompute import resolve_recompute
from flowspec.train.schedule import build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_flowpp import RESULTS, ROOT, forward_gflop_per_image, machine, synchronize  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by a part of the device name; first match wins.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("B200", 2250.0),
)
# PRECISION[+compile[+graphs]][+keep|+recompute]@BATCH (+graphs: the compiled networks replayed as CUDA
# graphs, torch.compile's mode="reduce-overhead", against the launch cost the first check found; +keep: no
# recomputation in the backward pass, +recompute: selective recomputation; neither: `train --recompute
# auto`'s choice): the issue's three at batch 64 (the goal's, bf16 + compile, first; required), then CUDA
# graphs, the other recompute setting of the two bf16 rows and a larger batch while time is left
CONFIGS = (
    "bf16+compile@64",
    "fp32@64",
    "bf16@64",
    "bf16+compile+graphs@64",
    "bf16+compile+keep@64",
    "bf16+recompute@64",
    "bf16+compile@256",
)
REQUIRED = CONFIGS[:3]
BUDGET = 450.0  # seconds; gpu_check.sh's hard limit is 470 s, then 10 s to die (8 minutes in all)
# seconds a configuration needs at 50 steps of batch 64 (the first H200 check: 95 s compiled at 20 steps,
# 49-70 s eager, and a 3-step profile about 45 s more), scaled by steps x batch (compiling: a fixed part);
# one that would not fit in the time left is skipped; the profile after the rows, if time is left, of a
# compiled configuration builds and compiles it again (COMPILE_SECONDS more than an eager one's)
NEEDED_SECONDS = {"compiled": 150, "eager": 75, "profile": 40}
COMPILE_SECONDS = 60
PROFILE_STEPS = 3  # training steps the profile after the rows records
DRY_RUN_SHRINK = (
    "data.shape=3x8x8",
    "defaults.coupling.filters=8",
    "defaults.coupling.blocks=1",
    "defaults.coupling.components=2",
    "defaults.coupling.heads=2",
    "dequantize.context.filters=4",
)


@dataclass
class Row:
    config: str
    batch: int
    seconds: float | None = None  # per timed step
    peak_gb: float | None = None
    note: str = ""
    matmul: float | None = None  # GFLOP/s of a bf16 matmul measured right after the row
    required: bool = False

    def img_s(self) -> float | None:
        return self.batch / self.seconds if self.seconds else None


@dataclass(frozen=True)
class Config:
    precision: str
    compiled: bool
    recompute: str  # on, off (keep every activation) or auto (as `train --recompute auto`)
    batch: int
    required: bool = False  # one of the check's three rows: a check without it fails
    graphs: bool = False  # the compiled networks replayed as CUDA graphs (mode="reduce-overhead")

    @classmethod
    def parse(cls, text: str) -> Config:
        """`bf16+compile+keep@64` and the like (a batch of at least 2; +graphs with +compile)."""
        match = re.fullmatch(r"(fp32|bf16)((?:\+compile|\+graphs|\+keep|\+recompute)*)@(\d+)", text)
        if (
            match is None
            or int(match[3]) < 2
            or ("+keep" in match[2] and "+recompute" in match[2])
            or ("+graphs" in match[2] and "+compile" not in match[2])
        ):
            raise argparse.ArgumentTypeError(
                f"not a configuration: {text!r} (e.g. bf16+compile@64; a batch of at least 2, at most one "
                "of +keep and +recompute, +graphs only with +compile)"
            )
        precision, flags, batch = match.groups()
        recompute = "off" if "+keep" in flags else "on" if "+recompute" in flags else "auto"
        compiled, graphs = "+compile" in flags, "+graphs" in flags
        return cls(precision, compiled, recompute, int(batch), required=text in REQUIRED, graphs=graphs)

    @property
    def text(self) -> str:
        """As written on the command line."""
        flags = "+compile" * self.compiled + "+graphs" * self.graphs
        flags += {"off": "+keep", "on": "+recompute", "auto": ""}[self.recompute]
        return f"{self.precision}{flags}@{self.batch}"

    def name(self, recompute: bool | None = None) -> str:
        """The row's name: precision, compile, and the recompute setting (`auto`'s choice when known)."""
        choice = "" if recompute is None else f": {'on' if recompute else 'off'}"
        setting = f"recompute {self.recompute}{choice if self.recompute == 'auto' else ''}"
        compiled = " + compile" * self.compiled + " (CUDA graphs)" * self.graphs
        return f"{self.precision}{compiled} · {setting}"


def bf16_peak(device: torch.device, measured: float) -> tuple[float, str]:
    """The device's dense bf16 peak in GFLOP/s and where it comes from: the data sheet, else `measured`."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for part, tflops in BF16_PEAK_TFLOPS:
            if part in name:
                return tflops * 1e3, f"{name}: {tflops:.0f} TFLOP/s dense bf16 (data sheet)"
    return measured, f"measured: {measured:.0f} GFLOP/s"


def matmul_rate(device: torch.device) -> float:
    """GFLOP/s of a large bf16 matmul on the device now (8192^3 on a GPU, 512^3 in a dry run)."""
    size = 8192 if device.type == "cuda" else 512
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(2):
        a @ b
    synchronize(device)
    repeats, start = 10, time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def cuda_test_files() -> list[str]:
    """The test modules that mark tests `cuda` (only these are collected: a module without any that cannot
    be imported on this machine costs nothing)."""
    return sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").glob("test_*.py")
        if "mark.cuda" in path.read_text()
    )


def run_tests(args: argparse.Namespace, seconds: float) -> str:
    """Run (or, in a dry run, only collect) the tests marked cuda; returns pytest's summary line. The
    whole output goes to pytest_cuda.txt in $OUT when $OUT is set; failures are printed short, without
    captured logs (torch's compile traces would bury them)."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"]
    command += ["-p", "no:logging", "--tb=short", "-rfEs", "--continue-on-collection-errors"]
    command += cuda_test_files()
    if args.dry_run:
        command.append("--collect-only")
    print("$", shlex.join(command), flush=True)
    # a session of its own: on a timeout the whole group goes (a torchrun job the tests started would
    # otherwise go on using the GPU while the timed rows run)
    tests = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = tests.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        for pid in [*descendants(tests.pid), tests.pid]:  # torchrun's workers start sessions of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output, _ = tests.communicate()
        summary = f"timed out after {seconds:.0f} s"
    else:
        counts = re.compile(r"\d+ (passed|failed|skipped|errors?|deselected|tests? collected)")
        lines = [line for line in output.splitlines() if counts.search(line)]  # not a later warning
        summary = lines[-1].strip("= ") if lines else "no summary"
        if tests.returncode != 0:
            summary = f"FAILED (exit {tests.returncode}): {summary}"
        elif not args.dry_run and " passed" not in summary:  # all skipped: the tests saw no GPU
            summary = f"FAILED (no test passed): {summary}"
    if args.out is not None:
        (args.out / "pytest_cuda.txt").write_text(output)
    print(output[-8000:], flush=True)
    return summary


def descendants(pid: int) -> list[int]:
    """Every process started by `pid`, however deep (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def shrunk(config: Config) -> Config:
    """The dry run's version of a configuration: a sixteenth of its batch, at least 2."""
    return dataclasses.replace(config, batch=max(2, config.batch // 16))


def training_step(
    spec, device: torch.device, config: Config, args: argparse.Namespace
) -> tuple[Callable[[], None], bool]:
    """One Adam step of the spec's recipe on a fixed batch of random images, as a function, and whether it
    recomputes (`auto`: as `flowspec train` decides for this batch on this device)."""
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # as training sets it: every step has the same shapes
    batch = config.batch
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"batch": batch})})
    whole = config.compiled and device.type == "cuda"  # as train: a CPU compiles only elementwise chains
    recompute = resolve_recompute(config.recompute, device, whole, spec, precision=config.precision)[0]
    model = flowspec.build(spec).to(device)
    x = torch.randint(0, spec.data.levels, (batch, *spec.data.shape), device=device)
    model.initialize(x)
    model.set_autocast(autocast_dtype(config.precision))
    model.set_recompute(recompute)
    if config.compiled:
        graphs = {"mode": "reduce-overhead"} if config.graphs else {}
        model.compile_networks(**({"backend": "aot_eager"} if args.dry_run else graphs))
    model.train()
    optimizer = build_optimizer(model.parameters(), spec.train)
    clip = spec.train.clip_grad_norm or float("inf")

    def step() -> None:
        if config.graphs:  # a new step: the graphs' outputs of the last one may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        optimizer.zero_grad(set_to_none=True)
        model.bpd(x).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()

    return step, recompute


def train_steps(spec, device: torch.device, config: Config, args: argparse.Namespace) -> Row:
    """`args.steps` training steps; the first `args.warmup` untimed."""
    step, recompute = training_step(spec, device, config, args)
    for _ in range(args.warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps - args.warmup):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / (args.steps - args.warmup)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return Row(config.name(recompute), config.batch, seconds, peak, required=config.required)


def profile(step, device: torch.device, path: Path, title: str) -> None:
    """Profile `PROFILE_STEPS` calls of `step`: the device kernels taking most time, launches per step, and
    the fraction of the wall time the device was busy; written to `path`."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    start = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for _ in range(PROFILE_STEPS):
            step()
        synchronize(device)
    wall = time.perf_counter() - start
    cuda = device.type == "cuda"
    kernels = [e for e in prof.events() if cuda and e.device_type.name == "CUDA"]
    busy = sum(e.device_time for e in kernels) / 1e6 / wall if kernels else float("nan")
    table = prof.key_averages().table(
        sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
        row_limit=25,
        max_name_column_width=70,
    )
    text = [
        f"{title}: {PROFILE_STEPS} steps in {wall:.3f} s under the profiler",
        f"device kernels per step: {len(kernels) / PROFILE_STEPS:.0f}; "
        f"device busy {busy:.0%} of the wall time",
        table,
    ]
    path.write_text("\n".join(text) + "\n")
    print("\n".join(text[:2]), f"(table in {path})", flush=True)


def needed_seconds(config: Config, args: argparse.Namespace) -> float:
    """Seconds a configuration needs: NEEDED_SECONDS scaled by steps x batch (compiling: a fixed part)."""
    scale = args.steps * config.batch / (50 * 64)
    if config.compiled:
        return COMPILE_SECONDS + (NEEDED_SECONDS["compiled"] - COMPILE_SECONDS) * scale
    return NEEDED_SECONDS["eager"] * scale


def parse_args() -> argparse.Namespace:
    """The command line, checked: steps > warm-up >= 0, a budget within the hard limit, $OUT a folder."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU, a tiny model, 2 steps, the CUDA tests only collected"
    )
    parser.add_argument("--spec", default=str(ROOT / "specs" / "flowpp_cifar.flow"), help="the model trained")
    parser.add_argument("--steps", type=int, default=50, help="steps per configuration, warm-up included")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument(
        "--budget", type=float, default=BUDGET, help=f"seconds for the whole check (at most {BUDGET:.0f})"
    )
    parser.add_argument(
        "--results", type=Path, help="file to append to (default bench/RESULTS.md; none in a dry run)"
    )
    parser.add_argument("--skip-tests", action="store_true", help="only the training rows, no CUDA tests")
    parser.add_argument(
        "--profile-to",
        type=Path,
        help="profile 3 steps of the first compiled bf16 configuration (else eager) into this file",
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        type=Config.parse,
        help="what to train, in order: PRECISION[+compile][+keep|+recompute]@BATCH (default: "
        f"{' '.join(CONFIGS)}; the first three are required)",
    )
    parser.add_argument("--test-seconds", type=float, help="the CUDA tests' limit (default: 0.4 x budget)")
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--steps {args.steps} --warmup {args.warmup}: needs steps > warmup >= 0")
    if not 0 < args.budget <= BUDGET:
        parser.error(f"--budget {args.budget:g}: needs 0 < budget <= {BUDGET:.0f} (the hard limit's share)")
    args.configs = args.configs or [Config.parse(c) for c in CONFIGS]
    args.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    if args.out is not None:
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            parser.error(f"$OUT={args.out} is not a folder that can be made: {error.strerror}")
    return args


def main() -> None:
    args = parse_args()
    started = time.monotonic()
    print(f"flowspec from {Path(flowspec.__file__).parent}", flush=True)
    overrides: tuple[str, ...] = ()
    if args.profile_to is None and args.out is not None:
        args.profile_to = args.out / "gpu_profile.txt"
    if args.dry_run:
        args.steps, args.warmup, overrides = 2, 1, DRY_RUN_SHRINK
        torch.set_num_threads(1)  # a tiny model: more threads only wait on each other
        args.configs = [shrunk(c) for c in args.configs]
    elif not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (torch.cuda.is_available() is False); try --dry-run")
    device = torch.device("cpu" if args.dry_run else "cuda")
    results = args.results or (None if args.dry_run else RESULTS)

    tests = "skipped (--skip-tests)"
    if not args.skip_tests:
        tests = run_tests(args, seconds=args.test_seconds or 0.4 * args.budget)
    print(f"cuda tests: {tests}", flush=True)

    spec = flowspec.load_spec(args.spec, overrides=overrides)
    train_gflop = 3 * forward_gflop_per_image(args.spec, overrides)
    measured = matmul_rate(device)
    peak, peak_source = bf16_peak(device, measured)
    print(f"bf16 peak {peak_source}; a bf16 matmul measured at {measured:.0f} GFLOP/s", flush=True)
    rows: list[Row] = []
    stopped = False
    for config in args.configs:
        left = args.budget - (time.monotonic() - started)
        needed = 0 if args.dry_run else needed_seconds(config, args)
        row = Row(config.name(), config.batch, required=config.required)
        if stopped:
            row.note = "not run: stopped by the time limit"
        elif left < needed:
            row.note = f"skipped: {left:.0f} s left of the budget, ~{needed:.0f} s needed"
        else:
            tick = time.monotonic()
            try:
                row = train_steps(spec, device, config, args)
                row.matmul = matmul_rate(device)
                row.note = f"{time.monotonic() - tick:.0f} s in all (compile and warm-up included)"
            except Exception as error:  # a failing configuration must not hide the others' rows
                row.note = f"failed: {error!r}"[:300]
            except KeyboardInterrupt:  # gpu_check.sh's hard time limit (SIGINT): keep what was measured
                row.note, stopped = "stopped by the time limit", True
        rows.append(row)
        print(format_row(row, train_gflop, peak), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    left = args.budget - (time.monotonic() - started)
    config = profiled_config(args, rows, left)
    if args.profile_to is not None and not stopped and config is not None:
        try:  # after the rows, in the time they left: the profile is extra
            step, recompute = training_step(spec, device, config, args)
            for _ in range(1 + config.compiled):  # CUDA graphs record on a later call than the first
                step()
            profile(step, device, args.profile_to, f"{config.name(recompute)}, batch {config.batch}")
        except Exception as error:
            print(f"profile failed: {error!r}", flush=True)
        except KeyboardInterrupt:
            print("profile stopped by the time limit", flush=True)

    report = render(args, spec, device, tests, rows, train_gflop, peak, peak_source, measured)
    print(report)
    for path in [results, args.out / "gpu_check.md" if args.out is not None else None]:
        if path is not None:
            with path.open("a") as f:
                f.write(report)
            print(f"appended to {path}")
    missing = [r.config for r in rows if r.required and not r.seconds]
    if missing:
        print(f"gpu_check: required rows not measured: {', '.join(missing)}", flush=True)
    if tests.startswith(("FAILED", "timed out")) or any(r.note.startswith("failed") for r in rows) or missing:
        sys.exit(1)


def profiled_config(args: argparse.Namespace, rows: list[Row], left: float) -> Config | None:
    """What the profile after the rows records: the first compiled bf16 configuration that trained (the
    goal's), else, or where `left` seconds are too few to compile it again, the first eager bf16 one that
    trained; None where none did or none fits."""
    trained = [c for c, row in zip(args.configs, rows, strict=True) if c.precision == "bf16" and row.seconds]
    for config in sorted(trained, key=lambda c: not c.compiled):  # compiled first, each kind in order
        needed = NEEDED_SECONDS["profile"] + COMPILE_SECONDS * config.compiled
        if args.dry_run or left >= needed:
            return config
    return None


def format_row(row: Row, train_gflop: float, peak: float) -> str:
    """A markdown table row: configuration, batch, s/step, img/s, peak memory, the fraction of the bf16
    peak, the bf16 matmul rate measured right after the row and the fraction of it."""
    img_s = row.img_s()
    cells = [
        row.config,
        str(row.batch),
        f"{row.seconds:.3f}" if row.seconds else "-",
        f"{img_s:.1f}" if img_s else "-",
        f"{row.peak_gb:.2f}" if row.peak_gb is not None else "-",
        f"{img_s * train_gflop / peak:.1%}" if img_s else "-",
        f"{row.matmul:.0f}" if row.matmul else "-",
        f"{img_s * train_gflop / row.matmul:.1%}" if img_s and row.matmul else "-",
        row.note,
    ]
    return "| " + " | ".join(cells) + " |"


def render(args, spec, device, tests, rows, train_gflop, peak, peak_source, measured) -> str:
    gpu = (
        f"{torch.cuda.get_device_name(device)} · CUDA {torch.version.cuda} · "
        if device.type == "cuda"
        else ""
    )
    command = os.environ.get("GPU_CHECK_COMMAND") or shlex.join(["python", *sys.argv])
    lines = [
        f"\n### {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · `{command}` (GPU check)\n",
        f"device: {gpu}host {machine()} · torch {torch.__version__} · threads {torch.get_num_threads()} · "
        f"{spec.name}, {train_gflop:.3g} GFLOP per trained image (forward + backward ~ 3x forward) · "
        f"bf16 peak {peak_source} · a bf16 matmul measured at {measured:.0f} GFLOP/s before the rows\n",
        f"cuda tests: {tests}\n",
        f"{args.steps} steps per configuration, the first {args.warmup} untimed; random images; recompute "
        "auto: as `flowspec train --recompute auto` decides for the row's batch and device\n",
        "| configuration | batch | s / step | img/s | peak memory (GB) | of the bf16 peak "
        "| bf16 matmul after the row (GFLOP/s) | of that matmul | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        *(format_row(row, train_gflop, peak) for row in rows),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
