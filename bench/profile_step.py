"""Where a training step (or a log_prob call) spends its time, by kind of work, and the rate its kernels
alone allow.

Runs the call once under torch.profiler (self time of every op) and once under FlopCounterMode (FLOPs of
every op, backward and recomputation included; attention counted as q k^T and a v, backward twice the
forward), groups ops into convolution, attention, dense matmul,
dropout random numbers and everything else, and prints seconds, share and GFLOP/s per group, split
into the forward pass, the backward pass and the optimizer step for a training step; then the --top ops
that took most time, by name, with their calls and the same split; then the time of each written step
of the spec (its own ops, not its sub-steps'; backward work goes to the step whose forward recorded it,
found by the autograd sequence number). The
images per second that the convolution, attention and matmul kernels alone would allow, if all other work
took no time, bound what any scheduling of the same kernels can reach on this machine. Appends the table,
with the exact command and the machine, to bench/RESULTS.md.

    python bench/profile_step.py                      # train step at batch 8, CPU, 2 threads
    python bench/profile_step.py --task log_prob --batch 64 --precision bf16
    python bench/profile_step.py --precision bf16 --compile      # with the elementwise chains compiled

Ops run inside an attention kernel (the bf16 chunked one's matmuls and softmax) count as attention.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from unittest.mock import patch

# this checkout's flowspec (not whichever is installed) and the bench folder
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import torch  # noqa: E402
from bench_flowpp import RESULTS, ROOT, commit, machine, report  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import flowspec  # noqa: E402
from flowspec.allocator import keep_freed_memory  # noqa: E402
from flowspec.inspection.flops import step_modules  # noqa: E402
from flowspec.inspection.tree import build_branches  # noqa: E402
from flowspec.layers import attention as attention_module  # noqa: E402
from flowspec.layers.networks import GatedAttention  # noqa: E402
from flowspec.train.schedule import build_optimizer  # noqa: E402

KERNELS = ("convolution", "attention", "dense matmul")
FUSED = "elementwise chains (compiled)"
STEP_RANGE = "flowspec step: "  # profiler ranges around each call of a step's modules
OUTSIDE = "(no step: loss, prior, gradient accumulation)"


def category(op_name: str) -> str:
    """The kind of work an op name (profiler's `aten::x` or the flop counter's `aten.x`) stands for."""
    if "CompiledFxGraph" in op_name:
        return FUSED
    name = op_name.split("::")[-1].split(".")[-1]
    if "conv" in name:
        return "convolution"
    if "scaled_dot_product" in name or "chunked_attention" in name:
        return "attention"
    if name in ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear"):
        return "dense matmul"
    if name in ("random_", "bernoulli_", "uniform_", "normal_", "randint"):
        return "random numbers"
    return "other (elementwise, copies, dispatch)"


def phase(event) -> str:
    """Which part of a training step a profiler event ran in: "backward" (under the autograd engine),
    "optimizer" (under the optimizer's step) or "forward"; the engine's and the step's own ranges count as
    their part too."""
    parent = event
    while parent is not None:
        if parent.name.startswith("autograd::engine::evaluate_function"):
            return "backward"
        if parent.name.startswith("Optimizer.step"):
            return "optimizer"
        parent = parent.cpu_parent
    return "forward"


def op_name(event) -> str:
    """An event's name for the table of ops: every compiled graph as one."""
    return FUSED if category(event.name) == FUSED else event.name


def attributed_category(event) -> str:
    """An op's kind of work, attention when it runs inside an attention kernel (a profiler event)."""
    parent = event.cpu_parent
    while parent is not None:
        if category(parent.name) == "attention":
            return "attention"
        parent = parent.cpu_parent
    return category(event.name)


@contextmanager
def step_ranges(model: torch.nn.Module) -> Iterator[None]:
    """Meanwhile, every call of a spec step's modules runs inside a profiler range named after its path."""
    ranges: list[torch.profiler.record_function] = []

    def enter(module: torch.nn.Module, args: tuple) -> None:
        ranges.append(torch.profiler.record_function(STEP_RANGE + module.spec_path))
        ranges[-1].__enter__()

    def leave(module: torch.nn.Module, args: tuple, output: object) -> None:
        ranges.pop().__exit__(None, None, None)

    modules = [m for found in step_modules(model).values() for m in found]
    hooks = [m.register_forward_pre_hook(enter) for m in modules]
    hooks += [m.register_forward_hook(leave) for m in modules]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def enclosing_step(event, forward_steps: dict[tuple[int, int], str]) -> str:
    """The spec path of the step an event ran for: the innermost step range around it, or for backward
    work, the step whose forward op recorded the autograd node (`forward_steps`, by sequence number and
    thread); `OUTSIDE` if none."""
    parent = event
    while parent is not None:
        if parent.name.startswith(STEP_RANGE):
            return parent.name.removeprefix(STEP_RANGE)
        if parent.name.startswith("autograd::engine::evaluate_function"):
            return forward_steps.get((parent.sequence_nr, parent.fwd_thread), OUTSIDE)
        parent = parent.cpu_parent
    return OUTSIDE


def forward_steps(events) -> dict[tuple[int, int], str]:
    """(sequence number, thread) of every forward op that recorded an autograd node -> its step's path."""
    found = {}
    for event in events:
        if event.sequence_nr >= 0 and phase(event) == "forward":
            found[event.sequence_nr, event.thread] = enclosing_step(event, {})
    return found


def step_rows(spec: flowspec.FlowSpec, model: torch.nn.Module) -> list[tuple[str, str, str]]:
    """(spec path, label, where written) of every step that has modules, in the order `inspect` lists them;
    the label is the step as `inspect` writes it, with its copies' count, marked "· " once per enclosing
    step. A module with no row of its own (the dequantizer) comes before its sub-steps."""
    modules = step_modules(model)
    rows = [row for branch in build_branches(spec, {}) for row in branch.walk() if row.path in modules]
    listed = [(row.path, f"{row.kind} {row.settings}".strip(), row.source or "") for row in rows]
    for path in modules:
        if path not in {row.path for row in rows}:
            at = next((i for i, row in enumerate(listed) if row[0].startswith(path + ".")), 0)
            listed.insert(at, (path, f"{path} ({type(modules[path][0]).__name__})", ""))
    out = []
    for path, label, where in listed:
        depth = sum(path.startswith(other + ".") for other, _, _ in listed)
        copies = f" x{len(modules[path])}" if len(modules[path]) > 1 else ""
        out.append((path, "· " * depth + label + copies, where))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spec", default=str(ROOT / "specs" / "flowpp_cifar.flow"))
    parser.add_argument("--task", choices=["train", "log_prob"], default="train")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument(
        "--recompute",
        choices=["on", "off"],
        default="off",
        help="on: training recomputes (selective checkpointing)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="fuse the elementwise chains with inductor (train --compile)"
    )
    parser.add_argument("--top", type=int, default=12, help="ops listed by the time they took (default 12)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="file to append to (bench/RESULTS.md)")
    parser.add_argument("--no-append", action="store_true", help="print only; append nowhere")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    torch.manual_seed(0)
    spec = flowspec.load_spec(args.spec)
    model = flowspec.build(spec)
    x = torch.randint(0, spec.data.levels, (args.batch, *spec.data.shape))
    model.initialize(x)
    model.set_autocast(torch.bfloat16 if args.precision == "bf16" else None)
    model.set_recompute(args.recompute == "on")
    if args.compile:
        model.fuse_elementwise("inductor")
    opt = build_optimizer(model.parameters(), spec.train)  # fused Adam, as training

    def call() -> None:
        if args.task == "train":
            model.train()
            opt.zero_grad(set_to_none=True)
            (-model.log_prob(x).mean()).backward()
            opt.step()
        else:
            model.eval()
            with torch.no_grad():
                model.log_prob(x)

    for _ in range(2 if args.compile else 1):  # warm-up; compiled, a second call for the recompiles
        call()
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    with step_ranges(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    model.fuse_elementwise(None)  # the counter sees eager ops (the same FLOPs)
    with (
        patch.object(attention_module, "use_chunked", lambda x: False),
        FlopCounterMode(display=False) as counter,
    ):
        call()  # the fused kernel, which the counter skips: attention is counted below
    attention_flop = []  # FlopCounterMode does not count fused attention kernels: count q k^T and a v

    def count_attention(module, inputs, output) -> None:
        n, h, w, f = inputs[0].shape
        attention_flop.append(4 * n * (h * w) ** 2 * f * (3 if args.task == "train" else 1))

    attentions = [m for m in model.modules() if isinstance(m, GatedAttention)]
    hooks = [m.register_forward_hook(count_attention) for m in attentions]
    with torch.no_grad():
        model.eval()
        model.log_prob(x)  # one forward (a training step's recomputation would call the hooks again)
    for hook in hooks:
        hook.remove()

    busy: dict[str, float] = defaultdict(float)
    split: dict[tuple[object, str], float] = defaultdict(float)  # (kind of work or op, phase) -> seconds
    calls: dict[tuple[str, str], int] = defaultdict(int)  # (op, kind of work) -> calls
    by_step: dict[tuple[str, str], float] = defaultdict(float)  # (step path, phase) -> seconds
    ops = [event for event in prof.events() if not event.name.startswith(STEP_RANGE)]
    steps = forward_steps(ops)
    for event in ops:
        kind, part, self_seconds = attributed_category(event), phase(event), event.self_cpu_time_total / 1e6
        busy[kind] += self_seconds
        split[kind, part] += self_seconds
        split[(op_name(event), kind), part] += self_seconds
        by_step["optimizer" if part == "optimizer" else enclosing_step(event, steps), part] += self_seconds
        calls[op_name(event), kind] += 1
    flops: dict[str, int] = defaultdict(int)
    for op, n in counter.get_flop_counts()["Global"].items():
        flops[category(str(op))] += n
    flops["attention"] = sum(attention_flop)
    profiled = sum(busy.values())
    kernel_seconds = sum(busy[k] for k in KERNELS) * seconds / profiled

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    header = (
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · `{command}`\n\n"
        f"machine: {machine()} · torch {torch.__version__} · flowspec {commit()} · threads {args.threads} · "
        f"{Path(args.spec).name} "
        f"{args.task} at batch {args.batch}, {args.precision}, recompute {args.recompute}"
        f"{', elementwise chains compiled' if args.compile else ''}: "
        f"{seconds:.2f} s per call "
        f"({args.batch / seconds:.2f} img/s); "
        f"the convolution, attention and matmul kernels alone take {kernel_seconds:.2f} s, so no schedule "
        f"of them exceeds {args.batch / kernel_seconds:.2f} img/s here"
    )
    phases = ("forward", "backward", "optimizer") if args.task == "train" else ()
    scale = seconds / profiled  # profiled self time, rescaled to the unprofiled call

    def by_phase(key: object, digits: int = 2, seconds: dict = split) -> list[str]:
        return [f"{seconds[key, part] * scale:.{digits}f}" for part in phases]

    columns = ("work", "seconds", "share", *phases, "GFLOP", "GFLOP/s")
    cells = []
    kinds = (
        *KERNELS,
        "random numbers",
        *([FUSED] if args.compile else []),
        "other (elementwise, copies, dispatch)",
    )
    for work in kinds:
        share = busy[work] / profiled
        work_seconds = share * seconds  # profiled self time, rescaled to the unprofiled call
        gflop = flops[work] / 1e9
        rate = f"{gflop / work_seconds:.0f}" if gflop and work_seconds else ""
        cells.append(
            [
                work,
                f"{work_seconds:.2f}",
                f"{share:.0%}",
                *by_phase(work),
                f"{gflop:.0f}" if gflop else "",
                rate,
            ]
        )
    title = f"{Path(args.spec).name} {args.task}, batch {args.batch}"
    report(title, header, columns, cells, None if args.no_append else args.results)

    def op_seconds(op: tuple[str, str]) -> float:
        return sum(split[op, part] for part in ("forward", "backward", "optimizer"))

    op_cells = [
        [name, kind, str(calls[name, kind]), f"{op_seconds((name, kind)) * scale:.3f}",
         f"{op_seconds((name, kind)) / profiled:.1%}", *by_phase((name, kind), 3)]
        for name, kind in sorted(calls, key=op_seconds, reverse=True)[: args.top]
    ]  # fmt: skip
    report(
        f"the {len(op_cells)} ops that took most time",
        f"{Path(args.spec).name} {args.task} at batch {args.batch}, {args.precision}: the ops that took most "
        "time (self time, rescaled to the unprofiled call)",
        ("op", "kind of work", "calls", "seconds", "share", *phases),
        op_cells,
        None if args.no_append else args.results,
    )

    step_cells = []
    for path, label, where in [*step_rows(spec, model), (OUTSIDE, "", ""), ("optimizer", "", "")]:
        total = sum(by_step[path, part] for part in ("forward", "backward", "optimizer"))
        if path != "optimizer" or args.task == "train":
            cells = [
                label or path,
                where,
                f"{total * scale:.3f}",
                f"{total / profiled:.1%}",
                *by_phase(path, 3, by_step),
            ]
            step_cells.append(cells)
    report(
        "time by step",
        f"{Path(args.spec).name} {args.task} at batch {args.batch}, {args.precision}: time by spec step "
        "(its own ops, not its sub-steps'; backward work goes to the step whose forward made it)",
        ("step", "written at", "seconds", "share", *phases),
        step_cells,
        None if args.no_append else args.results,
    )


if __name__ == "__main__":
    main()
