"""Renderers of a `Report`: a rich table shaped like the spec, JSON, a markdown table, dot and mermaid."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from flowspec.inspection.memory import fmt_bytes
from flowspec.inspection.report import Report
from flowspec.inspection.tree import FIRST_HALF, StepRow

PROBE_LEGEND = (
    " logdet b/d: the step's log-det in bits/dim, batch mean (positive lowers the bits/dim); "
    "inv err: the largest |inverse(forward(x)) - x| of the step over the batch."
)
LEGEND = (
    "cond: a>b = half a conditions the transform of half b (b>a after an odd number of flips); "
    "a is the mask's first half: {halves}. Coupling: k components, f filters, b blocks, h attention heads "
    "(nin: gated NIN; gated: no attention), p dropout, wn weight-normalized; context: ln LayerNorms. "
    "A step inside a repeat counts the parameters of all its copies."
)


def label(row: StepRow) -> str:
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
    return f"{100 * n / total:.1f}%" if total else "-"


def fmt_flops(n: int | None) -> str:
    if n is None:
        return "-"
    unit, scale = next(
        ((u, s) for u, s in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)) if n >= s), ("FLOP", 1)
    )
    return f"{n / scale:.1f} {unit}" if scale > 1 else f"{n} FLOP"


def target_line(report: Report) -> str | None:
    if report.target is None:
        return None
    delta = report.total - report.target
    if delta == 0:
        return f"{report.target:,}: match"
    return f"{report.target:,}: {delta:+,} ({100 * delta / report.target:+.2f}%)"


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
        lines.append(
            (
                "memory",
                f"~{fmt_bytes(f.memory_bytes)} to train at batch {report.spec.train.batch}: {f.memory_note}",
            )
        )
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
                f"max inversion error of the main flow {p.max_inverse_error:.1e}",
            )
        )
    return lines


def legend(report: Report) -> str:
    masks = sorted({r.settings for r in report.rows() if r.kind == "split"})
    halves = "; ".join(f"{m}: {FIRST_HALF[m]}" for m in masks) or "no splits"
    return LEGEND.format(halves=halves) + (PROBE_LEGEND if report.probe is not None else "")


# ---------------------------------------------------------------- rich


def render_rich(report: Report, depth: int | None = None) -> Group:
    """The tree as a table. With probe results, the source and share columns make room for them."""
    total = report.total
    columns: list[tuple[str, dict[str, Any], Callable[[StepRow], str]]] = [
        ("cond", {}, lambda r: r.halves),
        ("shape", {"no_wrap": True}, shapes),
        ("params", {"justify": "right", "no_wrap": True}, lambda r: f"{r.params:,}" if r.params else ""),
    ]
    if report.probe is None:
        columns.insert(0, ("source", {"style": "dim", "no_wrap": True}, lambda r: r.source or ""))
        columns.append(("share", {"justify": "right"}, lambda r: share(r.params, total) if r.params else ""))
    else:
        columns += [
            (
                "logdet b/d",
                {"justify": "right"},
                lambda r: "" if r.logdet_bpd is None else f"{r.logdet_bpd:+.3f}",
            ),
            (
                "inv err",
                {"justify": "right"},
                lambda r: "" if r.inverse_error is None else f"{r.inverse_error:.0e}",
            ),
        ]
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    table.add_column("step", no_wrap=True)
    for name, options, _ in columns:
        table.add_column(name, **options)
    for branch in report.branches:
        cells = {"params": f"{branch.params:,}", "share": share(branch.params, total)}
        table.add_row(Text(branch.title, style="bold cyan"), *(cells.get(name, "") for name, _, _ in columns))
        for guide, row in visible(branch.rows, depth):
            table.add_row(Text(guide, style="dim") + Text(label(row)), *(cell(row) for _, _, cell in columns))
    foot = Table.grid(padding=(0, 2))
    foot.add_column(style="bold")
    foot.add_column()
    for name, text in footer_lines(report):
        foot.add_row(name, text)
    source = report.spec.source or "<spec>"
    shape = "x".join(map(str, report.spec.data.shape))
    title = Text.assemble((report.spec.name, "bold"), f"  ({source}, input {shape})")
    return Group(title, table, Text(""), foot, Text(legend(report), style="dim"))


def print_rich(report: Report, depth: int | None = None, console: Console | None = None) -> None:
    (console or Console()).print(render_rich(report, depth))


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
    return json.dumps(to_json(report, depth), indent=2)


# ---------------------------------------------------------------- markdown


def render_md(report: Report, depth: int | None = None) -> str:
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
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- **{name}**: {text}" for name, text in footer_lines(report)]
    lines += ["", f"_{legend(report)}_"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- graphs


def _node_id(path: str) -> str:
    return "n_" + path.replace(".", "_")


def _graph_label(row: StepRow) -> str:
    text = label(row)
    if row.params:
        text += f"\n{row.params:,} params"
    return f"{text}\n{shapes(row)}"


def render_dot(report: Report, depth: int | None = None) -> str:
    """A graphviz digraph: leaf steps chained in order, splits and repeats as clusters."""
    lines = [f'digraph "{report.spec.name}" {{', "  rankdir=TB;", "  node [shape=box, fontname=monospace];"]
    chain: list[str] = []

    def emit(rows: list[StepRow], level: int, indent: str) -> None:
        for row in rows:
            expand = row.children and (depth is None or level + 1 < depth)
            if expand:
                lines.append(f"{indent}subgraph cluster_{_node_id(row.path)} {{")
                lines.append(f"{indent}  label={json.dumps(label(row))};")
                emit(row.children, level + 1, indent + "  ")
                lines.append(f"{indent}}}")
            else:
                lines.append(f"{indent}{_node_id(row.path)} [label={json.dumps(_graph_label(row))}];")
                chain.append(_node_id(row.path))

    for branch in report.branches:
        if not branch.rows:  # the uniform dequantizer: one node
            lines.append(f"  n_{branch.name} [label={json.dumps(branch.title)}];")
            chain.append(f"n_{branch.name}")
            continue
        lines.append(f"  subgraph cluster_{branch.name} {{")
        lines.append(f"    label={json.dumps(branch.title)};")
        emit(branch.rows, 0, "    ")
        lines.append("  }")
    lines += [f"  {a} -> {b};" for a, b in zip(chain, chain[1:], strict=False)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_mermaid(report: Report, depth: int | None = None) -> str:
    """A mermaid flowchart: leaf steps chained in order, splits and repeats as subgraphs."""
    lines = ["flowchart TB"]
    chain: list[str] = []

    def text(s: str) -> str:
        return '"' + s.replace('"', "'").replace("\n", "<br/>") + '"'

    def emit(rows: list[StepRow], level: int, indent: str) -> None:
        for row in rows:
            node = _node_id(row.path)
            if row.children and (depth is None or level + 1 < depth):
                lines.append(f"{indent}subgraph {node}[{text(label(row))}]")
                emit(row.children, level + 1, indent + "  ")
                lines.append(f"{indent}end")
            else:
                lines.append(f"{indent}{node}[{text(_graph_label(row))}]")
                chain.append(node)

    for branch in report.branches:
        if not branch.rows:  # the uniform dequantizer: one node
            lines.append(f"  n_{branch.name}[{text(branch.title)}]")
            chain.append(f"n_{branch.name}")
            continue
        lines.append(f"  subgraph {branch.name}[{text(branch.title)}]")
        emit(branch.rows, 0, "    ")
        lines.append("  end")
    lines += [f"  {a} --> {b}" for a, b in zip(chain, chain[1:], strict=False)]
    return "\n".join(lines) + "\n"


RENDERERS = {"json": render_json, "md": render_md, "dot": render_dot, "mermaid": render_mermaid}
