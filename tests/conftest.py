"""Shared test fixtures: repository paths and the local CIFAR-10 data (never downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
ALL_SPECS = sorted(SPECS.rglob("*.flow"))


def cifar_dir() -> Path | None:
    """`FLOWSPEC_DATA_DIR`, else `../shared/data/cifar10` beside the repository; None when absent."""
    env = os.environ.get("FLOWSPEC_DATA_DIR")
    path = Path(env) if env else ROOT.parent / "shared" / "data" / "cifar10"
    return path if (path / "test.npz").exists() else None


@pytest.fixture
def cifar10_dir() -> Path:
    path = cifar_dir()
    if path is None:
        pytest.skip("real CIFAR-10 not found: set FLOWSPEC_DATA_DIR or place it at ../shared/data/cifar10")
    return path
