"""Streaming batches from a memory-mapped file: the same batches as the in-memory stream, exact resume,
sharding across ranks, and a training run that streams and resumes exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SPECS
from train_helpers import tiny_spec

import flowspec
from flowspec.errors import UserError
from flowspec.spec import DataSpec, TrainSpec
from flowspec.train.batches import BatchOrder, BatchStream, training_batches
from flowspec.train.checkpoint import load_checkpoint
from flowspec.train.data import load_split
from flowspec.train.distributed import Dist
from flowspec.train.stream import StreamingBatches


@pytest.fixture
def npy_set(tmp_path):
    """50 images of 1x2x3 (channels last on disk) whose values tell them apart, as a memory-mapped set."""
    images = (np.arange(50)[:, None, None, None] * 4 + np.arange(6).reshape(1, 2, 3, 1)) % 256
    np.save(tmp_path / "train.npy", images.astype(np.uint8))
    np.save(tmp_path / "test.npy", images[:5].astype(np.uint8))
    return load_split(DataSpec(dataset="npy", path=str(tmp_path), shape=(1, 2, 3)), "train")


def drain(stream, n: int) -> list[torch.Tensor]:
    return [next(stream) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 1])
def test_streaming_serves_the_in_memory_batches(npy_set, workers):
    memory = BatchStream(npy_set.images.contiguous(), batch=8, seed=3, hflip=True)
    streamed = StreamingBatches(npy_set.file, batch=8, seed=3, hflip=True, workers=workers)
    expected, got = drain(memory, 14), drain(streamed, 14)  # over two epochs (6 batches each)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert streamed.epoch == 2 and streamed.state_dict()["position"] == memory.state_dict()["position"]


@pytest.mark.parametrize("workers", [0, 1])
def test_streaming_resumes_exactly(npy_set, workers):
    straight = drain(StreamingBatches(npy_set.file, batch=8, seed=1, hflip=True, workers=workers), 10)
    first = StreamingBatches(npy_set.file, batch=8, seed=1, hflip=True, workers=workers)
    head = drain(first, 5)
    state = first.state_dict()
    drain(first, 2)  # the old stream moves on: the state is a copy
    fresh = StreamingBatches(npy_set.file, batch=8, seed=1, hflip=True, workers=workers)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(straight, head + drain(fresh, 5), strict=True))
    # the in-memory stream continues from a streaming state, and back
    memory = BatchStream(npy_set.images.contiguous(), batch=8, seed=1, hflip=True)
    memory.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(straight[5:], drain(memory, 5), strict=True))
    with pytest.raises(UserError, match="the saved data order has seed 1, this stream seed 2"):
        StreamingBatches(npy_set.file, batch=8, seed=2, workers=workers).load_state_dict(state)
    # another training set (resumed with --data elsewhere) or batch: its position would be another set's
    for images, batch in ((npy_set.images[:40], 8), (npy_set.images, 16)):
        with pytest.raises(UserError, match="is for 50 training images in batches of 8, but this run has "):
            BatchStream(images.contiguous(), batch=batch, seed=1).load_state_dict(state)


def test_an_epochs_order_and_flips_are_drawn_once(npy_set, monkeypatch):
    drawn = []
    for name in ("indices", "flips"):
        real = getattr(BatchOrder, name)
        counted = lambda s, e, real=real, n=name: drawn.append((n, e)) or real(s, e)  # noqa: E731
        monkeypatch.setattr(BatchOrder, name, counted)
    drain(BatchStream(npy_set.images.contiguous(), batch=8, seed=0, hflip=True), 12)  # two epochs of 6
    assert sorted(drawn) == [("flips", 0), ("flips", 1), ("indices", 0), ("indices", 1)]
    drawn.clear()
    drain(StreamingBatches(npy_set.file, batch=8, seed=0, hflip=True, workers=0), 12)
    assert sorted(drawn) == [("flips", 0), ("flips", 1), ("indices", 0), ("indices", 1)]


def test_streaming_shards_across_ranks(npy_set):
    ranks = [StreamingBatches(npy_set.file, batch=8, seed=2, rank=r, world=2, workers=0) for r in range(2)]
    whole = StreamingBatches(npy_set.file, batch=8, seed=2, workers=0)
    for _ in range(7):
        assert torch.equal(torch.cat([next(ranks[0]), next(ranks[1])]), next(whole))


def test_the_memory_budget_picks_the_path(npy_set):
    train, cpu = TrainSpec(batch=8, seed=0, hflip=True), torch.device("cpu")
    memory = training_batches(npy_set, train, Dist(), cpu)
    assert isinstance(memory, BatchStream) and memory.hflip
    assert memory.images.is_contiguous() and torch.equal(memory.images, npy_set.images)
    assert memory.images.data_ptr() != npy_set.images.data_ptr()  # read into memory, not left mapped
    streamed = training_batches(npy_set, train, Dist(), cpu, memory=299)  # 300 bytes of images
    assert isinstance(streamed, StreamingBatches) and streamed.hflip
    assert all(torch.equal(a, b) for a, b in zip(drain(memory, 8), drain(streamed, 8), strict=True))


@pytest.mark.slow
def test_training_streams_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSPEC_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 12, 8)[None, :, None] * np.ones((96, 8, 8))
    images = (ramp + rng.integers(0, 5, (96, 8, 8))).clip(0, 16).astype(np.uint8)
    np.save(tmp_path / "train.npy", images[:80])
    np.save(tmp_path / "test.npy", images[80:])
    data = DataSpec(dataset="npy", path=str(tmp_path), shape=(1, 8, 8), levels=17)
    spec = tiny_spec(data, steps=6, eval_every=6, hflip=True)

    def run(out, **kw):  # through the Python API, which takes --data-memory's sizes
        return flowspec.train(spec, out=tmp_path / out, device="cpu", quiet=True, data_memory="0", **kw)

    straight = run("straight")
    run("split", max_steps=3)
    resumed = run("split", resume=tmp_path / "split")
    assert straight.step == resumed.step == 6 and resumed.history[-1]["test_bpd"] < 10
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    assert a["rng"][0]["stream"]["position"] == 1 and a["epoch"] == pytest.approx(6 / 5)
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key])


def test_data_memory_option(capsys):
    from flowspec.api import parse_size
    from flowspec.cli.app import run

    assert [parse_size(t) for t in ("0", "512M", "4G", "1.5g", "2GiB", "100")] == [
        0, 512 << 20, 4 << 30, 3 << 29, 2 << 30, 100
    ]  # fmt: skip
    assert run(["train", str(SPECS / "quickstart.flow"), "--data-memory", "lots"]) == 2
    assert "--data-memory: expected a size like 512M or 4G, got 'lots'" in capsys.readouterr().err


def test_a_truncated_file_is_refused(npy_set, tmp_path):
    path = tmp_path / "train.npy"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match=r"train\.npy is truncated: \d+ bytes, its header describes \d+"):
        StreamingBatches(npy_set.file, batch=8, seed=0, workers=0)
    with pytest.raises(UserError, match=r"train\.npy is truncated"):
        load_split(DataSpec(dataset="npy", path=str(tmp_path), shape=(1, 2, 3)), "train")
