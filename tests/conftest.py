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


@pytest.fixture
def exact_float32():
    """float32 means float32 on CUDA: no TF32 in cuDNN convolutions (torch's default) or matmuls.
    (Set and restored by hand: monkeypatch cannot read the cuBLAS flag, a computed attribute.)"""
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
