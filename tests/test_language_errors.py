"""The bad-spec corpus: one file per mistake in tests/bad_specs/, each saying what it must be told.

Each `# expect: [FILE:]LINE:COL: MESSAGE` header is one diagnostic the spec must produce (FILE, a name in
the same folder, defaults to the spec itself; MESSAGE may be the start of the message). The spec must
produce exactly these diagnostics. Files starting with `_` are helpers that others extend.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flowspec import load_spec
from flowspec.cli.app import run
from flowspec.diagnostics import SpecError

CORPUS = Path(__file__).parent / "bad_specs"
CASES = sorted(p for p in CORPUS.glob("*.flow") if not p.name.startswith("_"))
EXPECT = re.compile(
    r"^# expect: (?:(?P<file>[\w.]+\.flow):)?(?P<line>\d+):(?P<col>\d+): (?P<message>.+)$", re.M
)


def test_corpus_covers_the_mistakes():
    assert len(CASES) >= 35
    for path in CASES:
        assert EXPECT.search(path.read_text()), f"{path.name} has no `# expect:` header"


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_bad_spec_gives_its_expected_errors(path: Path):
    expected = [
        ((m["file"] or path.name), int(m["line"]), int(m["col"]), m["message"])
        for m in EXPECT.finditer(path.read_text())
    ]
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    got = [(Path(d.loc.file).name, d.loc.line, d.loc.col, d.message) for d in caught.value.diagnostics]
    assert len(got) == len(expected), str(caught.value)
    for (file, line, col, message), actual in zip(expected, got, strict=True):
        assert actual[:3] == (file, line, col), str(caught.value)
        assert actual[3].startswith(message), str(caught.value)
    # rendered: each diagnostic with its source line and a caret under the column
    text = str(caught.value)
    for file, line, col, message in expected:
        source = (CORPUS / file).read_text().splitlines()[line - 1]
        assert f"{file}:{line}:{col}: {message}" in text
        assert f"\n    {source}\n    {' ' * (col - 1)}^" in text
    if len(expected) > 1:
        assert text.startswith(f"{len(expected)} errors in ")


def test_bad_spec_on_the_command_line_exits_2_without_traceback(capsys):
    assert run(["validate", str(CORPUS / "several_errors.flow")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 4 errors in ") and "Traceback" not in err
    assert run(["show", str(CORPUS / "error_in_base.flow")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {CORPUS / '_bad_base.flow'}:4:32: heads (5) must divide filters (96)")


def test_under_torchrun_the_other_processes_name_their_rank(capsys, monkeypatch):
    """Each process of a job meets a bad spec and says so: rank 0 as always, the others with their rank."""
    monkeypatch.setenv("RANK", "1")
    assert run(["show", str(CORPUS / "syntax_error.flow")]) == 2
    assert capsys.readouterr().err.startswith("error (rank 1): ")
