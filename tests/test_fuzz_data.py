"""Fuzzing data files: whatever a shard holds, loading it gives checked images or a `UserError` naming it.

The CLI turns a `UserError` into one message and exit code 2 (tests/test_hostile.py), so any other
exception here would be a traceback for the user.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from flowspec.errors import UserError
from flowspec.spec import DataSpec
from flowspec.train.data import load_split

SHAPE = (3, 4, 4)  # C x H x W of the spec; shards hold N x H x W x C
DATA = DataSpec(dataset="npz", shape=SHAPE, levels=256)


def _images(draw, count: int) -> np.ndarray:
    kind = draw(st.sampled_from(["good", "shape", "dtype", "scalar", "strings", "empty"]))
    if kind == "good":
        return np.random.default_rng(count).integers(0, 256, (count, 4, 4, 3), dtype=np.uint8)
    if kind == "shape":
        dims = draw(st.lists(st.integers(0, 5), min_size=1, max_size=5))
        return np.zeros(dims, dtype=np.uint8)
    if kind == "dtype":
        dtype = draw(st.sampled_from([np.float32, np.int64, np.uint16, np.bool_]))
        return np.full((count, 4, 4, 3), draw(st.integers(0, 300)), dtype=dtype)
    if kind == "scalar":
        return np.array(7, dtype=np.uint8)
    if kind == "strings":
        return np.array(["a"] * count)
    return np.zeros((0, 4, 4, 3), dtype=np.uint8)


def _labels(draw, count: int) -> np.ndarray | None:
    kind = draw(st.sampled_from(["none", "good", "more", "fewer", "strings", "scalar", "floats", "2d"]))
    return {
        "none": None,
        "good": np.arange(count) % 3,
        "more": np.zeros(count + draw(st.integers(1, 3)), dtype=np.int64),
        "fewer": np.zeros(max(count - 1, 0), dtype=np.int64),
        "strings": np.array(["cat"] * count),
        "scalar": np.array(3),
        "floats": np.linspace(0, 1, count),
        "2d": np.zeros((count, 2), dtype=np.int64),
    }[kind]


@st.composite
def shard_bytes(draw) -> bytes:
    """The bytes of a `.npz` shard: arrays of any sort, or a damaged file."""
    count = draw(st.integers(1, 6))
    arrays = {"x": _images(draw, count)}
    labels = _labels(draw, count)
    if labels is not None:
        arrays["y"] = labels
    if draw(st.booleans()):
        arrays = {draw(st.sampled_from(["images", "pixels", "x"])): arrays["x"]}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    damage = draw(st.sampled_from(["none", "truncate", "garbage", "empty"]))
    if damage == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if damage == "garbage":
        return draw(st.binary(min_size=1, max_size=200))
    return b"" if damage == "empty" else data


@settings(max_examples=60, deadline=None)
@given(shard_bytes(), st.integers(1, 3))
def test_any_shard_gives_images_or_a_message_naming_it(content: bytes, shards: int):
    with tempfile.TemporaryDirectory() as folder:
        good = np.random.default_rng(0).integers(0, 256, (4, 4, 4, 3), dtype=np.uint8)
        for i in range(1, shards):
            np.savez(Path(folder) / f"train_{i}.npz", x=good, y=np.zeros(4, dtype=np.int64))
        bad = Path(folder) / f"train_{shards}.npz"
        bad.write_bytes(content)
        try:
            loaded = load_split(DATA, "train", folder, download=False)
        except UserError as error:
            assert bad.name in str(error) or folder in str(error), str(error)
            return
        assert loaded.images.dtype.is_floating_point is False
        assert tuple(loaded.images.shape[1:]) == SHAPE
        assert len(loaded.labels) == len(loaded.images)
