"""What a pip install ships: the specs as package data (and `flowspec specs`, which hands them out), the
tests and bench scripts in the sdist, and the licence. Read from pyproject.toml and MANIFEST.in: building
a wheel or an sdist here would take too long."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest
from conftest import ALL_SPECS, ROOT, SPECS

import flowspec
from flowspec.cli.app import run

PYPROJECT = (ROOT / "pyproject.toml").read_text()
NAMES = [p.relative_to(SPECS).as_posix() for p in ALL_SPECS]


def test_the_specs_are_package_data_and_the_root_specs_is_a_link_to_them():
    assert len(ALL_SPECS) == 14 and "ablations/no_attention.flow" in NAMES
    if (ROOT / ".git").exists():  # a clone; an unpacked sdist holds a copy
        assert (ROOT / "specs").is_symlink() and os.readlink(ROOT / "specs") == "flowspec/specs"
    [patterns] = re.findall(
        r"^flowspec = (\[.*\])$", PYPROJECT.split("[tool.setuptools.package-data]")[1], re.M
    )
    shipped = {p for pattern in ast.literal_eval(patterns) for p in (ROOT / "flowspec").glob(pattern)}
    assert shipped >= {ROOT / "flowspec" / "specs" / name for name in NAMES}


def test_specs_lists_the_shipped_specs(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert run(["specs"]) == 0
    rows = {line.split("│")[1].strip(): line for line in capsys.readouterr().out.splitlines() if "│" in line}
    assert set(NAMES) <= set(rows)
    assert "31,443,440" in rows["flowpp_cifar.flow"] and "Flow++ on CIFAR-10" in rows["flowpp_cifar.flow"]
    assert "73,489,960" in rows["imagenet64_5bit.flow"]  # its base's target_params
    assert "uniform dequantization" in rows["ablations/uniform_dequant.flow"]
    assert "43,592" in rows["quickstart.flow"]  # no target_params: counted on a model built without memory
    assert rows["realnvp_cifar.flow"].split("│")[3].strip() == "RealNVP on CIFAR-10"  # up to a parenthesis


def test_specs_copies_the_tree_so_that_ablations_still_extend_their_base(tmp_path, capsys):
    folder = tmp_path / "my specs"
    assert run(["specs", str(folder)]) == 0
    out = capsys.readouterr().out
    assert {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} == set(NAMES)
    assert all((folder / name).read_bytes() == (SPECS / name).read_bytes() for name in NAMES)
    assert f"wrote {folder / 'ablations' / 'no_attention.flow'}" in out
    assert f"flowspec train '{folder / 'quickstart.flow'}'" in out
    assert flowspec.load_spec(folder / "ablations" / "uniform_dequant.flow").target_params == 32324408


def test_specs_replaces_no_file(tmp_path, capsys):
    (tmp_path / "ablations").mkdir(parents=True)
    (tmp_path / "ablations" / "no_attention.flow").write_text("mine")
    (tmp_path / "quickstart.flow").write_text("mine too")
    assert run(["specs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path} already holds quickstart.flow, ablations/no_attention.flow")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*.flow")) == ["no_attention.flow", "quickstart.flow"]
    (tmp_path / "file").write_text("")
    assert run(["specs", str(tmp_path / "file")]) == 2
    assert f"{tmp_path / 'file'} is not a folder" in capsys.readouterr().err


def test_specs_refuses_a_folder_inside_the_package_and_its_shipped_specs(tmp_path, capsys, monkeypatch):
    """The copies would be written among the files flowspec ships (here a copy of the package's specs
    folder stands in for it: a failing test must not write into this checkout)."""
    import contextlib
    import shutil
    from types import SimpleNamespace

    from flowspec.cli import shipped

    package = tmp_path / "flowspec"
    shutil.copytree(SPECS, package / "specs")
    fake = SimpleNamespace(files=lambda name: package, as_file=contextlib.nullcontext)
    monkeypatch.setattr(shipped, "resources", fake)
    before = sorted(package.rglob("*"))
    monkeypatch.chdir(package / "specs")
    cases = {
        str(package / "specs" / "ablations"): ("shipped specs folder", package / "specs"),
        ".": ("shipped specs folder", package / "specs"),
        str(package / "mine"): ("package", package),
    }
    for folder, (what, inside) in cases.items():
        assert run(["specs", folder]) == 2
        assert capsys.readouterr().err == (
            f"error: {folder} is inside flowspec's own {what} ({inside}): flowspec specs copies the shipped "
            "specs out of it, to be changed; give a folder outside it\n"
        )
    assert sorted(package.rglob("*")) == before
    assert run(["specs", str(tmp_path / "copy")]) == 0  # a folder outside it


def test_specs_writes_all_or_nothing(tmp_path, capsys, monkeypatch):
    """A copy that fails part way (a full disk, an unwritable ablations/) removes what it wrote, so the
    same command runs again; a file where a folder must go, or an empty DIR, is refused before writing."""
    import shutil

    copy, calls = shutil.copyfile, []

    def failing(source, target):
        calls.append(target)
        if len(calls) == 12:
            Path(target).write_text("half a sp")  # the disk filled up in the middle of this file
            raise OSError(28, "No space left on device", str(target))
        return copy(source, target)

    monkeypatch.setattr(shutil, "copyfile", failing)
    assert run(["specs", str(tmp_path / "new" / "deeper")]) == 2
    assert "no space left" in capsys.readouterr().err.lower()
    assert len(calls) == 12 and not (tmp_path / "new").exists()  # the folders it made, too
    monkeypatch.setattr(shutil, "copyfile", copy)
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "ablations").write_text("")
    assert run(["specs", str(tmp_path / "new")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'new' / 'ablations'} is not a folder")
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["ablations"]
    monkeypatch.chdir(tmp_path / "new")
    assert run(["specs", ""]) == 2  # Path("") would be this folder
    assert capsys.readouterr().err.startswith("error: DIR is empty")


def test_a_missing_spec_named_like_a_shipped_one_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        flowspec.UserError,
        match=r"specs/ablations/no_attention.flow not found \(flowspec ships "
        r"ablations/no_attention.flow: `flowspec specs specs` copies",
    ):
        flowspec.load_spec("specs/ablations/no_attention.flow")
    with pytest.raises(flowspec.UserError, match=r"mine.flow not found$"):
        flowspec.load_spec("specs/mine.flow")


def test_specs_is_refused_under_a_torchrun_job_of_several_processes(tmp_path, capsys, monkeypatch):
    """Each process would copy: all but the first would find the files there and fail."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run(["specs", str(tmp_path / "copy")]) == 2
    assert "specs runs in one process: run it without torchrun" in capsys.readouterr().err
    assert not (tmp_path / "copy").exists()


def test_the_sdist_holds_the_tests_their_helpers_and_the_bench():
    rules = (ROOT / "MANIFEST.in").read_text().splitlines()
    for line in ("graft tests", "graft bench", "graft specs", "global-exclude __pycache__ *.py[cod]"):
        assert line in rules


@pytest.mark.parametrize(
    "line", ['requires = ["setuptools>=77"]', 'license = "MIT"', 'license-files = ["LICENSE"]']
)
def test_the_licence_is_declared_and_shipped(line):
    assert line in PYPROJECT.splitlines()
    assert "Copyright (c) 2026 the flowspec developers" in (ROOT / "LICENSE").read_text()


def test_the_lower_bounds_are_versions_that_work():
    """Each was checked by installing it: torch 2.4 lacks `CheckpointPolicy`, pydantic below 2.6.3 reports
    every member of the recursive step union for one mistake, typer below 0.29 runs nothing with a new click
    (0.12.4-0.12.5), crashes in --help (0.13-0.15) or names arguments by Python types, and needs rich 13.8."""
    for floor in ("torch>=2.5", "torchvision>=0.20", "pydantic>=2.6.3", "typer>=0.29", "rich>=13.8"):
        assert f'"{floor}",' in PYPROJECT


def test_specs_never_writes_through_a_dangling_link_where_a_spec_goes(tmp_path, capsys):
    """A link at DIR/quickstart.flow whose target is missing is taken: copying through it would write a
    file outside DIR."""
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "quickstart.flow").symlink_to(tmp_path / "elsewhere.flow")
    assert run(["specs", str(folder)]) == 2
    assert f"{folder} already holds quickstart.flow:" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere.flow").exists()


def test_specs_refuses_a_dangling_link_where_dir_goes(tmp_path, capsys):
    (tmp_path / "copy").symlink_to(tmp_path / "missing")
    assert run(["specs", str(tmp_path / "copy")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'copy'} is not a folder")
    assert not (tmp_path / "missing").exists()


def test_specs_interrupted_part_way_by_ctrl_c_removes_what_it_wrote(tmp_path, monkeypatch):
    """Ctrl-C is a KeyboardInterrupt, not an Exception: the clean-up runs for it too."""
    import shutil

    copy, calls = shutil.copyfile, []

    def interrupted(source, target):
        calls.append(target)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return copy(source, target)

    monkeypatch.setattr(shutil, "copyfile", interrupted)
    assert run(["specs", str(tmp_path / "new")]) == 130
    assert len(calls) == 3 and not (tmp_path / "new").exists()


def test_a_missing_bare_shipped_name_gets_the_hint_and_a_shipped_folder_name_none(tmp_path, monkeypatch):
    """`quickstart.flow` alone, missing here, is named like a shipped spec; `ablations`, a shipped folder
    but no spec, is not."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        flowspec.UserError,
        match=r"^spec file quickstart.flow not found \(flowspec ships quickstart.flow: `flowspec specs",
    ):
        flowspec.load_spec("quickstart.flow")
    with pytest.raises(flowspec.UserError, match=r"ablations not found$"):
        flowspec.load_spec("ablations")


def test_a_description_ends_without_the_punctuation_that_led_on():
    """The first comment line of seed_realnvp_dogs.flow ends with a comma, its sentence going on: the
    `flowspec specs` table leaves it off."""
    from flowspec.cli.shipped import _description

    dogs = SPECS / "seed_realnvp_dogs.flow"
    assert dogs.read_text().partition("\n")[0].endswith("Adam at 1e-5,")
    assert _description(dogs).endswith("the dog class alone, Adam at 1e-5")
