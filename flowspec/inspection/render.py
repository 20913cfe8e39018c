"""Renderers of a `Report`: a rich table shaped like the spec, JSON, a markdown table, dot and mermaid."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.table import Table
from rich.text import Text

from flowspec.inspection.report import Report
from flowspec.inspection.tree import FIRST_HALF, StepRow
from flowspec.units import fmt_bytes

#: What each optional column of the rich view means; the legend names only the columns shown.
COLUMN_LEGEND = {
    "cond": "cond: a>b = half a conditions the transform of half b (b>a after an odd number of flips); "
    "a is the mask's first half: {halves}.",
    "logdet b/d": "logdet b/d: the step's log-det in bits/dim, batch mean (positive lowers the bits/dim).",
    "inv err": "inv err: the largest |inverse(forward(x)) - x| of the step over the batch.",
}
#: The abbreviations in coupling and context labels; the legend explains those of the rows shown.
ABBREVIATIONS = {
    r"k\d+": "k components",
    r"f\d+": "f filters",
    r"b\d+": "b blocks",
    r"h\d+": "h attention heads",
    "nin": "nin gated NIN (no attention)",
    "gated": "gated no attention",
    r"p[\d.e+-]+": "p dropout",
    "wn": "wn weight-normalized",
    "bn": "bn batch-normalized",
    "ln": "ln LayerNorms",
    "noln": "noln without LayerNorms",
    "3x3": "3x3 a 3x3 second conv in the gated convs",
    "elu": "elu concat_elu before the output conv",
}
REPEAT_LEGEND = "A step inside a repeat counts the parameters of all its copies."


def label(row: StepRow) -> str:
    """A row's kind and settings: `coupling k32 f96 b10 h4`."""
    return f"{row.kind} {row.settings}".rstrip()


def shapes(row: StepRow) -> str:
    """`in`, or `in > out` when the step changes it (a factor-out's latent is in its label)."""
    return row.shape_in if row.shape_in == row.shape_out else f"{row.shape_in} > {row.shape_out}"


def visible(rows: list[StepRow], depth: int | None) -> list[tuple[str, StepRow]]:
    """(tree guide, row) pairs down to `depth` levels (None: all), depth first."""
    out: list[tuple[str, StepRow]] = []

    def visit(items: list[StepRow], prefix: str, level: int) -> None:
        for i, row in enumerate(items):
            last = i == len(items) - 1
            out.append((prefix + ("└─ " if last else "├─ "), row))
            if depth is None or level + 1 < depth:
                visit(row.children, prefix + ("   " if last else "│  "), level + 1)

    visit(rows, "", 0)
    return out


def share(n: int, total: int) -> str:
    """`n` as a percentage of `total` (`-` when the total is 0)."""
    return f"{100 * n / total:.1f}%" if total else "-"


def fmt_flops(n: int | None) -> str:
    """`25.9 GFLOP`: a FLOP count in its largest unit (`-` when it is not known)."""
    if n is None:
        return "-"
    unit, scale = next(
        ((u, s) for u, s in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)) if n >= s), ("FLOP", 1)
    )
    return f"{n / scale:.1f} {unit}" if scale > 1 else f"{n} FLOP"


def target_line(report: Report) -> str | None:
    """How the total parameters compare with the target (`31,443,440: match`, or the delta), or None
    without a target."""
    if report.target is None:
        return None
    delta = report.total - report.target
    if delta == 0:
        return f"{report.target:,}: match"
    relative = f" ({100 * delta / report.target:+.2f}%)" if report.target else ""
    return f"{report.target:,}: {delta:+,}{relative}"


def footer_lines(report: Report) -> list[tuple[str, str]]:
    """(name, text) lines of the footer, shared by the rich and markdown views."""
    total, flow, deq = report.total, report.branch("flow").params, report.branch("dequantize").params
    params = f"{total:,} trainable: flow {flow:,} ({share(flow, total)}), "
    params += f"dequantizer {deq:,} ({share(deq, total)})"
    if report.unassigned:
        params += f", outside any step {report.unassigned:,}"
    lines = [("parameters", params)]
    if (target := target_line(report)) is not None:
        lines.append(("target", target))
    f = report.footer
    if f.flops_flow is not None:
        both = f.flops_flow + (f.flops_dequantize or 0)
        lines.append(
            (
                "forward",
                f"{fmt_flops(both)} per image: flow {fmt_flops(f.flops_flow)}, dequantizer "
                f"{fmt_flops(f.flops_dequantize)} (convolutions and matrix products)",
            )
        )
    if f.memory_bytes is not None:
        t = report.spec.train
        batch = f"batch {t.batch}" + (
            f" in {t.accumulate} micro-batches of {t.micro_batch}" if t.accumulate > 1 else ""
        )
        lines.append(("memory", f"~{fmt_bytes(f.memory_bytes)} to train at {batch}: {f.memory_note}"))
    c = report.couplings
    lines.append(
        ("couplings", f"{c['flow'] + c['dequantize']} (flow {c['flow']}, dequantizer {c['dequantize']})")
    )
    if (p := report.probe) is not None:
        lines.append(
            (
                "probe",
                f"batch {p.batch} of {p.data}: {p.bpd:.3f} bits/dim, "
                f"flow log-det {p.logdet_bpd:+.3f} bits/dim, "
                f"largest inversion error of a step of the main flow {p.max_inverse_error:.1e}",
            )
        )
    return lines


def legend(report: Report, columns: list[str] | None = None, depth: int | None = None) -> str:
    """What the columns shown (default: cond, and the probe's columns with a probe) and the labels of the
    rows shown (down to `depth`) mean: only what a shown row uses."""
    if columns is None:
        columns = ["cond", *(["logdet b/d", "inv err"] if report.probe is not None else [])]
    rows = [row for branch in report.branches for _, row in visible(branch.rows, depth)]
    if not any(row.halves for row in rows):
        columns = [c for c in columns if c != "cond"]
    masks = sorted({r.settings for r in report.rows() if r.kind == "split"})
    halves = "; ".join(f"{m}: {FIRST_HALF[m]}" for m in masks) or "no splits"
    parts = [COLUMN_LEGEND[c].format(halves=halves) for c in COLUMN_LEGEND if c in columns]
    explained: set[str] = set()
    for kind in ("coupling", "context"):  # the context's words that a coupling's explained, once
        words = {word for row in rows if row.kind == kind for word in row.settings.split()}
        meant = [
            text
            for key, text in ABBREVIATIONS.items()
            if text not in explained and any(re.fullmatch(key, word) for word in words)
        ]
        explained.update(meant)
        if meant:
            parts.append(f"{kind.capitalize()}: {', '.join(meant)}.")
    shown = {id(row) for row in rows}
    if any(row.kind == "repeat" and any(id(c) in shown for c in row.children) for row in rows):
        parts.append(REPEAT_LEGEND)
    return " ".join(parts)


# ---------------------------------------------------------------- rich

#: Optional columns of the rich view, the most wanted first: a narrow terminal drops them from the end.
PRIORITY = ("logdet b/d", "inv err", "shape", "line", "cond", "share")
GAP = 2  # spaces between two columns


def source_files(report: Report) -> list[str]:
    """The files the steps were written in, the most used first."""
    files = [r.source.rpartition(":")[0] for r in report.rows() if r.source and ":" in r.source]
    return sorted(set(files), key=lambda f: -files.count(f))


def line_label(row: StepRow, main_file: str | None) -> str:
    """`L21` for a step written in the main file (named once in the header), else `file.flow:21`."""
    if not row.source:
        return ""
    file, _, line = row.source.rpartition(":")
    return f"L{line}" if file == main_file and line.isdigit() else row.source


def rich_columns(report: Report) -> dict[str, tuple[dict[str, Any], Callable[[StepRow], str]]]:
    """Every column the rich view can show after `step`, in display order: options and cell function."""
    total, main = report.total, next(iter(source_files(report)), None)
    right = {"justify": "right", "no_wrap": True}
    columns: dict[str, tuple[dict[str, Any], Callable[[StepRow], str]]] = {
        "line": ({"style": "dim", "no_wrap": True}, lambda r: line_label(r, main)),
        "cond": ({"no_wrap": True}, lambda r: r.halves),
        "shape": ({"no_wrap": True}, shapes),
        "params": (right, lambda r: f"{r.params:,}" if r.params else ""),
        "share": (right, lambda r: share(r.params, total) if r.params else ""),
    }
    if report.probe is not None:
        columns["logdet b/d"] = (right, lambda r: "" if r.logdet_bpd is None else f"{r.logdet_bpd:+.3f}")
        columns["inv err"] = (right, lambda r: "" if r.inverse_error is None else f"{r.inverse_error:.0e}")
    return columns


def fit_columns(widths: dict[str, int], width: int) -> list[str]:
    """The columns, in display order, that fit in `width` by their natural `widths` (0: an empty column,
    never shown): `step` and `params` always, then the optional ones by `PRIORITY` while they fit."""
    widths = {name: max(w, len(name)) if w or name in ("step", "params") else 0 for name, w in widths.items()}
    shown = {"step", "params"}
    used = widths["step"] + GAP + widths["params"]
    for name in PRIORITY:
        if widths.get(name) and used + GAP + widths[name] <= width:
            shown.add(name)
            used += GAP + widths[name]
    return [name for name in widths if name in shown]


class RichView:
    """The tree as a table that fits the console: optional columns drop by priority when it is too narrow;
    numbers and line labels are never cut."""

    def __init__(self, report: Report, depth: int | None = None):
        self.report, self.depth = report, depth

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        report, total = self.report, self.report.total
        columns = rich_columns(report)
        branch_cells = {"params": lambda b: f"{b.params:,}", "share": lambda b: share(b.params, total)}
        rows = []
        for branch in report.branches:
            cells = {name: branch_cells.get(name, lambda b: "")(branch) for name in columns}
            rows.append((Text(branch.title, style="bold cyan"), cells))
            for guide, row in visible(branch.rows, self.depth):
                text = Text(guide, style="dim") + Text(label(row))
                rows.append((text, {name: cell(row) for name, (_, cell) in columns.items()}))
        widths = {"step": max(cell_len(step.plain) for step, _ in rows)}
        widths |= {name: max(cell_len(c[name]) for _, c in rows) for name in columns}
        shown = [c for c in fit_columns(widths, options.max_width) if c != "step"]
        table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
        table.add_column("step")  # wraps at spaces only if even the step and its parameters do not fit
        for name in shown:
            table.add_column(name, **columns[name][0])
        for step, cells in rows:
            table.add_row(step, *(Text(cells[name]) for name in shown))  # Text: file names are not markup
        foot = Table.grid(padding=(0, 2))
        foot.add_column(style="bold", no_wrap=True)
        foot.add_column()
        for name, text in footer_lines(report):
            foot.add_row(name, text)
        files = source_files(report)
        where = f"{report.spec.source or '<spec>'}, input {'x'.join(map(str, report.spec.data.shape))}"
        if "line" in shown and files and Path(report.spec.source or "").name != files[0]:
            where += f"; steps written in {files[0]}"  # an ablation's steps come from its base
        title = Text.assemble((report.spec.name, "bold"), f"  ({where})")
        explained = legend(report, shown, self.depth)
        yield Group(title, table, Text(""), foot, *([Text(explained, style="dim")] if explained else []))


def render_rich(report: Report, depth: int | None = None) -> RichView:
    """The rich view of `report`, laid out for the width of the console that prints it."""
    return RichView(report, depth)


def print_rich(report: Report, depth: int | None = None) -> None:
    """Print the rich view of `report` to the terminal."""
    Console().print(render_rich(report, depth))


# ---------------------------------------------------------------- json


def to_json(report: Report, depth: int | None = None) -> dict[str, Any]:
    """Every step (all depths unless `depth`): path, kind, shapes, parameters and forward FLOPs per image
    (both with descendants), leaf flag.

    The `params` of the leaf steps sum to `params.total`.
    """
    f = report.footer
    steps = []
    for branch in report.branches:
        for _, row in visible(branch.rows, depth):
            entry: dict[str, Any] = {
                "path": row.path,
                "branch": branch.name,
                "kind": row.kind,
                "settings": row.settings,
                "source": row.source,
                "depth": row.depth,
                "shape_in": row.shape_in,
                "shape_out": row.shape_out,
                "latent": row.latent,
                "cond": row.halves or None,
                "params": row.params,
                "flops": row.flops,
                "leaf": row.leaf or (depth is not None and row.depth + 1 >= depth),
            }
            if report.probe is not None:
                entry["logdet_bpd"] = row.logdet_bpd
                entry["inverse_error"] = row.inverse_error
            steps.append(entry)
    if report.unassigned:
        steps.append(
            {"path": "", "branch": None, "kind": "unassigned", "params": report.unassigned, "leaf": True}
        )
    out: dict[str, Any] = {
        "name": report.spec.name,
        "source": report.spec.source,
        "input_shape": list(report.spec.data.shape),
        "params": {
            "total": report.total,
            "flow": report.branch("flow").params,
            "dequantize": report.branch("dequantize").params,
            "unassigned": report.unassigned,
        },
        "target_params": report.target,
        "target_delta": None if report.target is None else report.total - report.target,
        "flops_per_image": {"flow": f.flops_flow, "dequantize": f.flops_dequantize},
        "train_memory_bytes": f.memory_bytes,
        "train_memory_method": f.memory_note or None,
        "train_batch": report.spec.train.batch,
        "couplings": report.couplings,
        "steps": steps,
    }
    if (p := report.probe) is not None:
        out["probe"] = {
            "batch": p.batch,
            "data": p.data,
            "bpd": p.bpd,
            "logdet_bpd": p.logdet_bpd,
            "max_inverse_error": p.max_inverse_error,
        }
    return out


def render_json(report: Report, depth: int | None = None) -> str:
    """`to_json` as indented JSON text."""
    return json.dumps(to_json(report, depth), indent=2)


# ---------------------------------------------------------------- markdown


def render_md(report: Report, depth: int | None = None) -> str:
    """The tree as a markdown table (one row per step down to `depth`), then the footer and the legend."""
    probe = report.probe is not None
    head = ["step", "source", "cond", "shape", "params", "share"] + (
        ["logdet bits/dim", "inv err"] if probe else []
    )
    lines = [f"**{report.spec.name}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    total = report.total
    for branch in report.branches:
        lines.append(
            f"| **{branch.title}** | | | | {branch.params:,} | {share(branch.params, total)} |"
            + " |" * (2 * probe)
        )
        for _, row in visible(branch.rows, depth):
            cells = [
                "&nbsp;&nbsp;" * (row.depth + 1) + f"`{label(row)}`",
                row.source or "",
                row.halves,
                shapes(row).replace(" > ", " → "),
                f"{row.params:,}" if row.params else "",
                share(row.params, total) if row.params else "",
            ]
            if probe:
                cells += [
                    "" if row.logdet_bpd is None else f"{row.logdet_bpd:+.3f}",
                    "" if row.inverse_error is None else f"{row.inverse_error:.0e}",
                ]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    lines.append("")
    lines += [f"- **{name}**: {text}" for name, text in footer_lines(report)]
    if explained := legend(report, depth=depth):
        lines += ["", f"_{explained}_"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- graphs


def _node_id(path: str) -> str:
    return "n_" + path.replace(".", "_")


def _graph_label(row: StepRow) -> str:
    text = label(row)
    if row.params:
        text += f"\n{row.params:,} params"
    return f"{text}\n{shapes(row)}"


def _graph(
    report: Report,
    depth: int | None,
    node: Callable[[str, str], str],
    group: Callable[[str, str], list[str]],
    close: str,
) -> tuple[list[str], list[str]]:
    """The traversal `render_dot` and `render_mermaid` share: the indented lines of the branches and of the
    splits and repeats shown (`group(id, label)` opens one, `close` ends it) with a `node(id, label)` per
    leaf step, and the leaves' ids in order, for the caller to chain."""
    lines: list[str] = []
    chain: list[str] = []

    def leaf(node_id: str, text: str, indent: str) -> None:
        lines.append(indent + node(node_id, text))
        chain.append(node_id)

    def emit(rows: list[StepRow], level: int, indent: str) -> None:
        for row in rows:
            if row.children and (depth is None or level + 1 < depth):
                lines.extend(indent + line for line in group(_node_id(row.path), label(row)))
                emit(row.children, level + 1, indent + "  ")
                lines.append(indent + close)
            else:
                leaf(_node_id(row.path), _graph_label(row), indent)

    for branch in report.branches:
        if not branch.rows:  # the uniform dequantizer: one node
            leaf(f"n_{branch.name}", branch.title, "  ")
            continue
        lines.extend("  " + line for line in group(branch.name, branch.title))
        emit(branch.rows, 0, "    ")
        lines.append("  " + close)
    return lines, chain


def render_dot(report: Report, depth: int | None = None) -> str:
    """A graphviz digraph: leaf steps chained in order, splits and repeats as clusters."""
    name = report.spec.name.replace('"', '\\"')  # a name made in Python may hold any text
    body, chain = _graph(
        report,
        depth,
        node=lambda node_id, text: f"{node_id} [label={json.dumps(text)}];",
        group=lambda node_id, text: [f"subgraph cluster_{node_id} {{", f"  label={json.dumps(text)};"],
        close="}",
    )
    head = [f'digraph "{name}" {{', "  rankdir=TB;", "  node [shape=box, fontname=monospace];"]
    edges = [f"  {a} -> {b};" for a, b in zip(chain, chain[1:], strict=False)]
    return "\n".join([*head, *body, *edges, "}"]) + "\n"


def render_mermaid(report: Report, depth: int | None = None) -> str:
    """A mermaid flowchart: leaf steps chained in order, splits and repeats as subgraphs."""

    def text(s: str) -> str:
        return '"' + s.replace('"', "'").replace("\n", "<br/>") + '"'

    body, chain = _graph(
        report,
        depth,
        node=lambda node_id, s: f"{node_id}[{text(s)}]",
        group=lambda node_id, s: [f"subgraph {node_id}[{text(s)}]"],
        close="end",
    )
    edges = [f"  {a} --> {b}" for a, b in zip(chain, chain[1:], strict=False)]
    return "\n".join(["flowchart TB", *body, *edges]) + "\n"


RENDERERS = {"json": render_json, "md": render_md, "dot": render_dot, "mermaid": render_mermaid}
