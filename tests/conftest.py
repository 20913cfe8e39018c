"""Shared test fixtures: repository paths, the local CIFAR-10 data (never downloaded), one intra-op thread,
Hypothesis's profile, and matplotlib's and Hypothesis's caches (in the session's temporary folder)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
ALL_SPECS = sorted(SPECS.rglob("*.flow"))
NO_CIFAR = "real CIFAR-10 not found: set FLOWSPEC_DATA_DIR or place it at ../shared/data/cifar10"

# Hypothesis draws the same examples on every run and keeps no database (it wrote .hypothesis/ in the
# working folder); FLOWSPEC_HYPOTHESIS=explore draws new ones each run, for a hunt on one's own machine.
settings.register_profile("flowspec", database=None, derandomize=True)
settings.register_profile("explore", database=None, derandomize=False, print_blob=True)
_PROFILE = os.environ.get("FLOWSPEC_HYPOTHESIS") or "flowspec"
if _PROFILE not in ("flowspec", "explore"):
    raise pytest.UsageError(f"FLOWSPEC_HYPOTHESIS={_PROFILE!r}: unset it, or set it to explore")
settings.load_profile(_PROFILE)


def cifar_dir() -> Path | None:
    """`FLOWSPEC_DATA_DIR`, else `../shared/data/cifar10` beside the repository; None when absent."""
    env = os.environ.get("FLOWSPEC_DATA_DIR")
    path = Path(env) if env else ROOT.parent / "shared" / "data" / "cifar10"
    return path if (path / "test.npz").exists() else None


@pytest.fixture
def cifar10_dir() -> Path:
    path = cifar_dir()
    if path is None:
        pytest.skip(NO_CIFAR)
    return path


@pytest.fixture
def cache_in_tmp(tmp_path, monkeypatch):
    """Prepared data cached in the test's own folder, never in the user's cache or beside shared data."""
    monkeypatch.setenv("FLOWSPEC_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def float64_seeded():
    """float64 as the default dtype and the seed 0, for exact checks (the dtype restored after)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def exact_float32():
    """float32 means float32 on CUDA: no TF32 in cuDNN convolutions (torch's default) or matmuls.
    (Set and restored by hand: monkeypatch cannot read the cuBLAS flag, a computed attribute.)"""
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def pytest_terminal_summary(terminalreporter) -> None:
    """A run without real CIFAR-10 passes, but says so: its tests were skipped, not run."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if NO_CIFAR in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(
            f"warning: {len(skipped)} tests skipped for missing real CIFAR-10: point FLOWSPEC_DATA_DIR at a "
            "folder of its .npz shards (test.npz, ...) or place them at ../shared/data/cifar10 to run them",
            yellow=True,
            bold=True,
        )


@pytest.hookimpl(trylast=True)  # after pytest's own, which makes its temporary folder's factory
def pytest_configure(config) -> None:
    """matplotlib's font cache and Hypothesis's (the constants its plugin reads from the sources while it
    collects, even without a database) in the session's temporary folder, not ~/.cache/matplotlib and
    .hypothesis/ in the working folder, unless the environment names theirs (MPLCONFIGDIR,
    HYPOTHESIS_STORAGE_DIRECTORY); child processes inherit them."""
    from hypothesis.configuration import set_hypothesis_home_dir

    factory = getattr(config, "_tmp_path_factory", None)  # tmp_path_factory: no fixture runs this early
    if factory is None:  # pytest's tmp_path plugin turned off (-p no:tmpdir)
        return
    if "MPLCONFIGDIR" not in os.environ:
        os.environ["MPLCONFIGDIR"] = config._flowspec_mplconfigdir = str(factory.mktemp("matplotlib"))
    if "HYPOTHESIS_STORAGE_DIRECTORY" not in os.environ:
        set_hypothesis_home_dir(factory.mktemp("hypothesis"))


def pytest_unconfigure(config) -> None:
    if getattr(config, "_flowspec_mplconfigdir", None) == os.environ.get("MPLCONFIGDIR"):
        os.environ.pop("MPLCONFIGDIR", None)


def _set_threads(count: int) -> None:
    """torch's intra-op threads, when something imported torch already (the language tools' tests run
    without it: importing it here would slow them)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(count)


@pytest.fixture(autouse=True, scope="session")
def _one_thread_session():
    """One intra-op thread for the tiny test models (much faster on small shared CPUs), module- and
    session-scoped fixtures included; the count found is restored at the end."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    _set_threads(1)
    yield
    if before is not None:
        _set_threads(before)


@pytest.fixture(autouse=True)
def _caches_read_until_the_test_ends():
    """The prepared-data caches a test read are let go when it ends, as when a process ends (hundreds of
    open, locked files in one pytest process otherwise)."""
    yield
    datacache = sys.modules.get("flowspec.train.datacache")
    if datacache is not None:
        datacache.release_reads()


@pytest.fixture(autouse=True)
def one_thread(_one_thread_session):
    """Every test starts on one thread, and a count it set (a Trainer's, `--threads`) ends with it. A test
    that needs more threads sets them itself."""
    _set_threads(1)
    yield
    _set_threads(1)
