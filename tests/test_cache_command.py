"""`flowspec cache`: the prepared-data caches listed (data, size, last use, state) and removed, never one
that a process reads or builds."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
from test_data_sources import write_folder

from flowspec.cli.app import run
from flowspec.spec import DataSpec
from flowspec.train import datacache
from flowspec.train.data import load_split


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FLOWSPEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "200")
    return tmp_path / "cache"


def prepare(root: Path, *classes: str) -> Path:
    """Two splits of PNGs at `root` prepared (with `classes`, if given); the cache folder, which this
    process then no longer reads (as when the run that read it ended)."""
    if not root.exists():
        write_folder(root / "train")
        write_folder(root / "test", sizes=((12, 12),))
    data = DataSpec(dataset="folder", path=str(root), shape=(3, 12, 12), classes=classes or None)
    folder = load_split(data, "train").file.path.parent
    datacache.release_reads()
    return folder


def test_the_caches_of_a_data_folder_are_listed_with_their_data_size_and_state(cache_dir, tmp_path, capsys):
    everything, dogs = prepare(tmp_path / "pets"), prepare(tmp_path / "pets", "dog")
    prepare(tmp_path / "other")  # in the same cache folder, of other data
    assert run(["cache", str(tmp_path / "pets")]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "folder 3x12x12" in line]
    assert len(rows) == 2 and all(f"({tmp_path / 'pets'})" in row and "ready" in row for row in rows)
    [dog_row] = [row for row in rows if dogs.name[:8] in row]
    assert "class labels 1" in dog_row and "3 + 1" in dog_row and everything.name[:8] not in dog_row
    assert f"2 caches, {_size(everything, dogs)}, in {cache_dir}" in out
    assert run(["cache"]) == 0 and "3 caches" in capsys.readouterr().out  # the whole cache folder
    assert run(["cache", str(cache_dir)]) == 0 and "3 caches" in capsys.readouterr().out


def test_a_single_cache_is_counted_as_one(cache_dir, tmp_path, capsys):
    only = prepare(tmp_path / "pets")
    assert run(["cache"]) == 0
    assert f"1 cache, {_size(only)}, in {cache_dir}" in capsys.readouterr().out


def _size(*folders: Path) -> str:
    from flowspec.units import fmt_bytes

    return fmt_bytes(sum(f.stat().st_size for folder in folders for f in folder.iterdir()))


def test_clean_removes_the_caches_that_can_never_be_used_again(cache_dir, tmp_path, capsys):
    ready = prepare(tmp_path / "kept")
    gone = prepare(tmp_path / "moved")
    (tmp_path / "moved").rename(tmp_path / "elsewhere")
    damaged = prepare(tmp_path / "damaged")
    (damaged / "train.npy").write_bytes(b"")
    unfinished = cache_dir / f"{ready.name}.tmp-12345"
    unfinished.mkdir()
    (unfinished / "train.npy").write_bytes(b"0" * 100)
    assert run(["cache"]) == 0
    listed = capsys.readouterr().out
    for folder, state in ((ready, "ready"), (gone, "sources gone"), (damaged, "damaged")):
        assert any(folder.name[:8] in line and state in line for line in listed.splitlines())
    assert "--clean removes the 3 never usable again" in listed
    assert run(["cache", "--clean"]) == 0
    out = capsys.readouterr().out
    assert ready.is_dir() and not gone.exists() and not damaged.exists() and not unfinished.exists()
    assert f"removed {gone} (" in out and "sources gone" in out and "freed " in out
    assert run(["cache", "--clean"]) == 0
    assert "nothing to remove: every cache can be used" in capsys.readouterr().out


def test_all_removes_every_cache_but_those_read_or_built_and_a_later_run_prepares_again(
    cache_dir, tmp_path, capsys
):
    free, read, built = (prepare(tmp_path / name) for name in ("free", "read", "built"))
    data = DataSpec(dataset="folder", path=str(tmp_path / "read"), shape=(3, 12, 12))
    load_split(data, "train")  # this process reads it now
    with open(cache_dir / f"{built.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a process that rebuilds it
        assert run(["cache", "--all"]) == 0
    out = capsys.readouterr().out
    assert not free.exists() and read.is_dir() and built.is_dir()
    assert f"kept {read}: in use" in out and f"kept {built}: being built" in out
    datacache.release_reads()
    assert run(["cache", str(tmp_path / "read"), "--all"]) == 0
    assert not read.exists() and built.is_dir()
    again = load_split(data, "train")
    assert again.file.path.parent == read and len(again) == 6


def test_a_read_marks_the_cache_used_and_shared(cache_dir, tmp_path):
    folder = prepare(tmp_path / "pets")
    marker = cache_dir / f"{folder.name}.use"
    os.utime(marker, (1, 1))
    load_split(DataSpec(dataset="folder", path=str(tmp_path / "pets"), shape=(3, 12, 12)), "test")
    assert marker.stat().st_mtime > 1
    with open(marker) as other:
        fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)  # readers share it
        with pytest.raises(BlockingIOError):
            with open(marker) as remover:
                fcntl.flock(remover, fcntl.LOCK_EX | fcntl.LOCK_NB)
    datacache.release_reads()


def test_cache_of_a_missing_path_or_an_empty_cache_folder(cache_dir, tmp_path, capsys):
    assert run(["cache", str(tmp_path / "nowhere")]) == 2
    assert f"{tmp_path / 'nowhere'} does not exist: give a data folder or file" in capsys.readouterr().err
    assert run(["cache", " "]) == 2 and "PATH is empty" in capsys.readouterr().err
    (tmp_path / "pets").mkdir()
    assert run(["cache", str(tmp_path / "pets")]) == 0
    assert capsys.readouterr().out == f"no prepared data in {cache_dir}\n"
    assert run(["cache", str(tmp_path / "pets"), "--all"]) == 0


def test_a_data_folders_caches_are_found_inside_it_and_beside_it(tmp_path, monkeypatch, capsys):
    """Without FLOWSPEC_CACHE_DIR a folder's cache is inside it, a torchvision root's beside it."""
    from flowspec.train.caches import roots

    monkeypatch.delenv("FLOWSPEC_CACHE_DIR", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    inside = prepare(tmp_path / "pets")
    assert inside.parent == tmp_path / "pets" / ".flowspec-cache"
    assert roots(tmp_path / "pets") == ([inside.parent], tmp_path / "pets")
    assert run(["cache", str(tmp_path / "pets")]) == 0 and inside.name[:8] in capsys.readouterr().out
    (tmp_path / "root").mkdir()
    (tmp_path / ".flowspec-cache").mkdir()  # where a torchvision dataset at root/ is prepared
    assert roots(tmp_path / "root") == ([tmp_path / ".flowspec-cache"], tmp_path / "root")
