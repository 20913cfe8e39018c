"""The README's Python examples run, in order, in one namespace (from a scratch folder with `specs/`)."""

from __future__ import annotations

import re

from conftest import ROOT
from train_helpers import one_thread  # noqa: F401 (fixture)


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
