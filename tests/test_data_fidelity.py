"""What the model is shown, where a mistake crashes nothing: RGBA read as RGB without its alpha, the centre
crop as torchvision's, 16-bit arrays reduced over their whole range, a prepared cache never served for
another preparation of the same files, a fractional test split's count, and a torchvision CIFAR-10 folder
read in the layout of the `.npz` shards (found by mutation testing: each test fails on a mutant that every
other test passed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from flowspec.errors import UserError
from flowspec.spec import DataSpec
from flowspec.train.data import load_split
from flowspec.train.prepare import prepare, resize_crop

pytestmark = pytest.mark.usefixtures("cache_in_tmp")


def test_rgba_to_rgb_drops_the_alpha_channel_not_red():
    rgba = torch.arange(4 * 3 * 3, dtype=torch.uint8).view(1, 4, 3, 3)
    got = prepare(rgba, 256, DataSpec(shape=(3, 3, 3), convert=("mode",)), "x")
    assert torch.equal(got, rgba[:, :3])


def test_rgba_pngs_read_as_rgb_match_pillow(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    arrays = [rng.integers(0, 256, (6, 6, 4), dtype=np.uint8) for _ in range(3)]
    for i, array in enumerate(arrays):
        Image.fromarray(array, "RGBA").save(tmp_path / "a" / f"{i}.png")
    data = DataSpec(dataset="folder", path=str(tmp_path), shape=(3, 6, 6), convert=("mode",), test_split=1)
    got = torch.cat([load_split(data, "train").images, load_split(data, "test").images])
    expected = {a[..., :3].transpose(2, 0, 1).tobytes() for a in arrays}
    assert {image.numpy().tobytes() for image in got} == expected


@pytest.mark.parametrize("width", [9, 13, 10, 11])
def test_the_centre_crop_is_torchvisions(width):
    from torchvision.transforms.functional import center_crop

    x = torch.arange(6 * width).view(1, 1, 6, width)
    assert torch.equal(resize_crop(x, 6, 6), center_crop(x, [6, 6]))
    tall = x.transpose(2, 3)
    assert torch.equal(resize_crop(tall, 6, 6), center_crop(tall, [6, 6]))


@pytest.mark.parametrize("levels", [256, 32])
def test_sixteen_bit_arrays_reduce_by_shifting_over_the_whole_range(tmp_path, levels):
    values = np.concatenate([np.arange(0, 65536, 97), [65535, 65534, 65280, 65279, 256, 255]])
    images = np.resize(values, (len(values) // 16 + 1) * 16).reshape(-1, 1, 4, 4).astype(np.uint16)
    np.save(tmp_path / "train.npy", images)
    np.save(tmp_path / "test.npy", images[:3])
    data = DataSpec(dataset="npy", path=str(tmp_path), shape=(1, 4, 4), levels=levels, convert=("depth",))
    got = load_split(data, "train").images
    expected = torch.from_numpy((images.astype(np.int64) * levels) >> 16).to(torch.uint8)
    assert torch.equal(got, expected)
    assert int(got.max()) == levels - 1


def _folder(root, split=False):
    rng = np.random.default_rng(0)
    for part in ("train", "test") if split else ("",):
        for c in ("cat", "dog"):
            (root / part / c).mkdir(parents=True)
            for i in range(4):
                image = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
                Image.fromarray(image).save(root / part / c / f"{i}.png")


def _both(data):
    return [load_split(data, s) for s in ("train", "test")]


@pytest.mark.parametrize(
    "change",
    [
        {"levels": 32},
        {"classes": ("dog",)},
        {"convert": ("size", "mode")},
        {"shape": (3, 6, 6)},
        {"test_split": 3},
        {"classes": ("dog",), "test_split": None},
    ],
    ids=["levels", "classes", "convert", "shape", "test_split", "classes_of_a_split_layout"],
)
def test_a_change_of_preparation_is_never_served_from_the_old_cache(tmp_path, monkeypatch, change):
    split = "test_split" in change and change["test_split"] is None  # train/ and test/ folders
    _folder(tmp_path / "imgs", split)
    base = DataSpec(
        dataset="folder", path=str(tmp_path / "imgs"), shape=(3, 8, 8), convert=("size", "depth"),
        test_split=None if split else 2,
    )  # fmt: skip
    if "convert" in change:
        change = dict(change, shape=(1, 8, 8))
    other = base.model_copy(update=change)
    _both(base)  # the first preparation, cached
    reused = _both(other)
    monkeypatch.setenv("FLOWSPEC_CACHE_DIR", str(tmp_path / "fresh"))
    fresh = _both(other)
    for a, b in zip(reused, fresh, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert int(reused[0].images.max()) < other.levels


@pytest.mark.parametrize("count, fraction, held", [(10, 0.27, 3), (9, 0.3, 3), (20, 0.02, 0), (50, 0.02, 1)])
def test_a_fractional_test_split_holds_out_the_rounded_count_disjointly(tmp_path, count, fraction, held):
    images = np.arange(count * 4, dtype=np.uint8).reshape(count, 1, 2, 2)
    np.savez(tmp_path / "train.npz", x=images, y=np.arange(count))
    data = DataSpec(dataset="npy", path=str(tmp_path / "train.npz"), shape=(1, 2, 2), test_split=fraction)
    if held == 0:
        with pytest.raises(UserError, match="empty test split"):
            load_split(data, "test")
        return
    train, test = load_split(data, "train"), load_split(data, "test")
    assert len(test) == held and len(train) == count - held
    assert sorted(train.labels.tolist() + test.labels.tolist()) == list(range(count))
    assert torch.equal(train.images, torch.from_numpy(images[train.labels.numpy()]))


def test_torchvision_cifar_folder_reads_as_the_npz_shards_do(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    arrays = {s: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for s, n in (("train", 6), ("test", 4))}
    labels = {s: (np.arange(len(a)) % 10).tolist() for s, a in arrays.items()}

    class FakeCIFAR10:  # torchvision's CIFAR10 checks md5 sums: its loaded arrays, without the files
        def __init__(self, root, train=True, download=False):
            split = "train" if train else "test"
            self.data, self.targets = arrays[split], labels[split]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    (tmp_path / "tv" / "cifar-10-batches-py").mkdir(parents=True)
    shards = tmp_path / "npz"
    shards.mkdir()
    np.savez(shards / "train_1.npz", x=arrays["train"], y=np.array(labels["train"]))
    np.savez(shards / "test.npz", x=arrays["test"], y=np.array(labels["test"]))
    data = DataSpec(dataset="cifar10", shape=(3, 32, 32))
    for split in ("train", "test"):
        tv = load_split(data, split, tmp_path / "tv")
        npz = load_split(data, split, shards)
        expected = torch.from_numpy(arrays[split]).permute(0, 3, 1, 2)
        assert torch.equal(tv.images, expected) and torch.equal(npz.images, expected)
        assert tv.labels.tolist() == npz.labels.tolist() == labels[split]
