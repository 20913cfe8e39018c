"""What ruff does not check in flowspec's code: public functions have docstrings and type hints that say
what they take, private module names are used, and shared formulas are written once."""

from __future__ import annotations

import ast
import inspect
import re
import sys
import typing
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
import torch

import flowspec
from flowspec.api import train
from flowspec.model import FlowModel
from flowspec.spec import FlowSpec
from flowspec.train.export import Trained
from flowspec.train.trainer import RunResult

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


def test_type_checkers_see_the_public_names_as_they_are_used():
    """`flowspec/__init__.py` imports its lazy names for type checkers: each is the object itself, but for
    `train`, a package at run time that checkers cannot call, the function it calls."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    seen = {
        alias.asname or alias.name: getattr(import_module(node.module), alias.name)
        for node in block.body
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flowspec")
        for alias in node.names
    }
    assert seen.pop("train") is train and inspect.signature(flowspec.train) == inspect.signature(train)
    others = set(flowspec.__all__) - {"build", "train", "__version__"}
    assert seen == {name: getattr(flowspec, name) for name in others}


def _hints(function: object) -> dict[str, typing.Any]:
    """The type hints of `function`, with the names modules import only for type checkers."""
    names = {"torch": torch, "FlowModel": FlowModel, "FlowSpec": FlowSpec, "RunResult": RunResult}
    return typing.get_type_hints(function, localns=names)


def test_the_type_hints_of_the_api_admit_what_it_takes():
    for function in (flowspec.build, flowspec.load, train):
        assert torch.device in typing.get_args(_hints(function)["device"]), function
    sample = _hints(FlowModel.sample)
    for n, temperature in ((2, 0.5), (np.int64(2), np.float32(0.5)), (torch.tensor(3), torch.tensor(0.8))):
        assert isinstance(n, sample["n"]) and isinstance(temperature, sample["temperature"])
    assert _hints(flowspec.load)["return"] is FlowModel and _hints(Trained)["model"] is FlowModel


@pytest.mark.skipif(sys.version_info < (3, 11), reason="typing.get_overloads is Python 3.11's")
def test_decode_returns_a_pair_exactly_with_logdet():
    returns = {_hints(f)["with_logdet"]: _hints(f)["return"] for f in typing.get_overloads(FlowModel.decode)}
    assert returns[typing.Literal[False]] is torch.Tensor
    assert returns[typing.Literal[True]] == tuple[torch.Tensor, torch.Tensor]


def test_the_package_is_marked_typed():
    package_data = r'\[tool\.setuptools\.package-data\]\nflowspec = \[[^]\n]*"py\.typed"'
    assert (PACKAGE / "py.typed").is_file()
    assert re.search(package_data, (PACKAGE.parent / "pyproject.toml").read_text())
