"""The README's Python examples run, in order, in one namespace (from a scratch folder with `specs/`); its
Steps and Layers tables have a row for every step kind."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT

from flowspec.steps import KINDS


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    blocks = python_blocks()
    assert len(blocks) >= 2 and all("flowspec" in b for b in blocks)
    (tmp_path / "specs").symlink_to(ROOT / "specs")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    assert (tmp_path / "runs" / "api" / "last.pt").is_file()
    assert "max-steps 10" in capsys.readouterr().out


def _table(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"\n### {heading}\n", 1)[1].split("\n#", 1)[0]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_step_kind_has_a_row_in_the_steps_and_layers_tables(kind: str):
    for heading in ("Steps", "Layers"):
        assert re.search(rf"^\| `{kind}\b", _table(heading), re.M), f"add {kind} to the README's {heading}"


def test_every_table_row_has_as_many_cells_as_its_header():
    """A row split across lines renders as several rows (cells `|` apart, `\\|` inside a cell)."""
    text = (ROOT / "README.md").read_text()
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # code blocks hold no tables
    wrong = []
    for table in re.findall(r"(?:^\|.*\n)+", text, re.M):
        rows = table.splitlines()
        cells = [len(re.split(r"(?<!\\)\|", row.strip())) - 2 for row in rows]
        assert re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", rows[1].strip()), f"not a table: {rows[:2]}"
        wrong += [row[:80] for row, n in zip(rows, cells, strict=True) if n != cells[0]]
    assert not wrong, f"README table rows whose cells differ from their header's: {wrong}"


def test_the_specs_table_gives_every_shipped_spec_and_its_parameter_count():
    """The intro's table of shipped specs: a row a spec, its parameter count what `flowspec specs` prints."""
    from flowspec.cli.shipped import _parameters
    from flowspec.loader import load_spec

    row = r"^\| `specs/(\S+\.flow)` \| .* \| ([\d,]+) \|$"
    rows = re.findall(row, (ROOT / "README.md").read_text(), re.M)
    shipped = sorted(str(p.relative_to(ROOT / "specs")) for p in (ROOT / "specs").rglob("*.flow"))
    assert sorted(name for name, _ in rows) == shipped
    for name, count in rows:
        assert int(count.replace(",", "")) == _parameters(load_spec(ROOT / "specs" / name)), name
