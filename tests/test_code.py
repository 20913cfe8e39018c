"""What ruff does not check in flowspec's code: public functions have docstrings and type hints, private
module names are used, and shared formulas are written once."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "flowspec"
MODULES = sorted(PACKAGE.rglob("*.py"))


def _public_functions(tree: ast.Module) -> list[tuple[ast.FunctionDef, bool]]:
    """Public functions and the methods of public classes (with whether each is a method), nested ones not."""
    found = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            found.append((node, False))
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and (
                    item.name == "__init__" or not item.name.startswith("_")
                ):
                    found.append((item, True))
    return found


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(PACKAGE)}:{node.lineno}"


def test_public_functions_have_docstrings_and_type_hints():
    undocumented, unhinted = [], []
    for path in MODULES:
        for fn, method in _public_functions(ast.parse(path.read_text())):
            if not method and not ast.get_docstring(fn):
                undocumented.append(f"{_where(path, fn)} {fn.name}")
            args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
            args += [a for a in (fn.args.vararg, fn.args.kwarg) if a is not None]
            bare = [a.arg for a in args if a.annotation is None and a.arg not in ("self", "cls")]
            if bare or (fn.returns is None and fn.name != "__init__"):
                unhinted.append(f"{_where(path, fn)} {fn.name}: {bare or 'return'}")
    assert not undocumented, undocumented
    assert not unhinted, unhinted


def test_private_module_names_are_used():
    unused = []
    for path in MODULES:
        tree = ast.parse(path.read_text())
        defined = {
            target.id
            for node in tree.body
            if isinstance(node, (ast.Assign, ast.AnnAssign))
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(target, ast.Name) and target.id.startswith("_") and not target.id.startswith("__")
        }
        loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        unused += [f"{path.relative_to(PACKAGE)}: {name}" for name in sorted(defined - loaded)]
    assert not unused, unused


@pytest.mark.parametrize(
    ("formula", "home"),
    [
        (r"log\(2(\.0)?\)", "layers/base.py"),  # one bit/dim in nats: nats_per_bpd
        (r"\.name\}:\{[a-z.]*line\}", "nodes.py"),  # `name.flow:12`: SourceLoc.short
    ],
    ids=["nats-per-bit", "file-and-line"],
)
def test_shared_formulas_are_written_once(formula: str, home: str):
    found = [str(p.relative_to(PACKAGE)) for p in MODULES if re.search(formula, p.read_text())]
    assert found == [home]
