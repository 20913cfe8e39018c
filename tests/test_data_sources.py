"""File datasets (folder of images, .npy/.npz arrays, downsampled ImageNet, torchvision), their preparation
(resize and centre crop, channels, colour depth, test split) and the prepared-data cache."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowspec.errors import UserError
from flowspec.spec import DataSpec
from flowspec.train.data import load_split
from flowspec.train.prepare import luma, prepare, reduce_depth, resize_crop

pytestmark = pytest.mark.usefixtures("cache_in_tmp")


def write_folder(root, sizes=((12, 12),) * 3, classes=("cat", "dog"), mode="RGB") -> dict:
    """PNG images in class subfolders: pixel values encode class, image and position."""
    written = {}
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            array = (np.arange(h * w * 3).reshape(h, w, 3) * 7 + 50 * c + 3 * i) % 256
            image = Image.fromarray(array.astype(np.uint8), "RGB").convert(mode)
            path = root / name / f"{i}.png"
            image.save(path)
            written[path] = np.array(image)
    return written


# ---------------------------------------------------------------- preparation against direct computations


def test_depth_reduction_is_the_official_floor_division():
    x = torch.arange(256).view(1, 1, 16, 16)
    for bits in (3, 5, 8):
        assert torch.equal(reduce_depth(x, 256, 2**bits), x // 2 ** (8 - bits))
    data = DataSpec(shape=(1, 16, 16), levels=32, convert=("depth",))
    assert torch.equal(prepare(x, 256, data, "x"), (x // 8).to(torch.uint8))


def test_resize_and_centre_crop_match_pillow():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    got = resize_crop(torch.from_numpy(array).permute(2, 0, 1)[None], 16, 16)[0].permute(1, 2, 0).numpy()
    resized = np.array(Image.fromarray(array).resize((24, 16), Image.BILINEAR))  # shorter side to 16
    expected = resized[:, 4:20]
    assert got.shape == (16, 16, 3) and np.abs(got.astype(int) - expected).max() <= 1


def test_crop_without_resize_and_a_tall_image():
    x = torch.arange(2 * 6 * 10).view(1, 2, 6, 10)
    assert torch.equal(resize_crop(x, 6, 6), x[:, :, :, 2:8])  # same height: only the centre crop
    tall = np.random.default_rng(2).integers(0, 256, (30, 10), dtype=np.uint8)
    expected = np.array(Image.fromarray(tall).resize((5, 15), Image.BILINEAR))[5:10]
    got = resize_crop(torch.from_numpy(tall)[None, None], 5, 5)[0, 0].numpy()
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_grey_conversion_matches_pillow():
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    grey = np.array(Image.fromarray(rgb).convert("L"))
    assert np.array_equal(luma(torch.from_numpy(rgb).permute(2, 0, 1)[None])[0, 0].numpy(), grey)


def test_unasked_conversions_are_refused_naming_the_images():
    x = torch.zeros(2, 3, 10, 12, dtype=torch.uint8)
    with pytest.raises(
        UserError,
        match=r"f\.npy: images of 3x10x12 \(RGB\) but the spec's data shape is "
        r"3x8x8; add `convert size`",
    ):
        prepare(x, 256, DataSpec(shape=(3, 8, 8)), "f.npy")
    with pytest.raises(UserError, match=r"add `convert \(mode, size\)`"):
        prepare(x, 256, DataSpec(shape=(1, 8, 8)), "f.npy")
    with pytest.raises(
        UserError, match=r"f\.npy: values up to 200 but the spec says 32 levels.*`convert depth`"
    ):
        prepare(x + 200, 256, DataSpec(shape=(3, 10, 12), levels=32), "f.npy")


# ---------------------------------------------------------------- sources


def test_classes_in_any_order_or_spelling_share_one_data_cache(tmp_path):
    """Classes select images: listed in another order, or by position instead of name, they read the same
    prepared data (a second cache was built); other classes another."""
    write_folder(tmp_path / "train")
    write_folder(tmp_path / "test", sizes=((12, 12),))
    data = DataSpec(dataset="folder", path=str(tmp_path), shape=(3, 12, 12))

    def cache(*classes: int | str) -> Path:
        return load_split(data.model_copy(update={"classes": classes}), "train").file.path.parent

    assert cache("dog", "cat") == cache("cat", "dog") == cache(1, 0) == cache("cat", 1)
    assert cache("dog") == cache(1) != cache("cat")
    assert len({cache("dog", "cat"), cache("dog"), cache("cat")}) == 3


def test_folder_of_pngs_with_two_classes(tmp_path):
    written = write_folder(tmp_path / "train")
    write_folder(tmp_path / "test", sizes=((12, 12),))
    data = DataSpec(dataset="folder", path=str(tmp_path), shape=(3, 12, 12))
    train, test = load_split(data, "train"), load_split(data, "test")
    assert train.images.shape == (6, 3, 12, 12) and len(test) == 2
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1] and train.file is not None
    first = written[tmp_path / "train" / "cat" / "0.png"]
    assert torch.equal(train.images[0], torch.from_numpy(first).permute(2, 0, 1))
    dogs = load_split(data.model_copy(update={"classes": ("dog",)}), "train")
    assert dogs.labels.tolist() == [1, 1, 1]
    with pytest.raises(UserError, match=r"has no class 'dgo'; did you mean 'dog'"):
        load_split(data.model_copy(update={"classes": ("dgo",)}), "train")


def test_a_number_names_a_subfolder_of_that_name_else_a_label_index(tmp_path):
    """Folders named by numbers (years, ids): `classes 1` is the folder `1`, not the second folder; a
    number past the last class is refused, not an empty split."""
    write_folder(tmp_path / "train", classes=("1", "2", "3"))
    write_folder(tmp_path / "test", sizes=((12, 12),), classes=("1", "2", "3"))
    data = DataSpec(dataset="folder", path=str(tmp_path), shape=(3, 12, 12))
    assert load_split(data.model_copy(update={"classes": (1,)}), "train").labels.tolist() == [0, 0, 0]
    with pytest.raises(UserError, match=r"has no class '0'"):  # numbered folders: numbers are names only
        load_split(data.model_copy(update={"classes": (0,)}), "train")
    named = write_folder(tmp_path / "other" / "train")
    write_folder(tmp_path / "other" / "test", sizes=((12, 12),))
    other = data.model_copy(update={"path": str(tmp_path / "other")})
    assert load_split(other.model_copy(update={"classes": (1,)}), "train").labels.tolist() == [1, 1, 1]
    assert named  # cat, dog: 1 is the index of dog
    with pytest.raises(UserError, match=r"has no class 7: its 2 classes are 0 to 1 \(cat, dog\)"):
        load_split(other.model_copy(update={"classes": (7,)}), "train")


def test_folder_reads_jpeg_and_webp_and_skips_other_files(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    image = Image.fromarray(np.full((10, 10, 3), 120, np.uint8))
    image.save(folder / "a.JPG")
    image.save(folder / "b.webp", lossless=True)
    image.save(folder / ".hidden.png")
    (folder / "notes.txt").write_text("not an image")
    data = DataSpec(dataset="folder", path=str(folder), shape=(3, 10, 10), test_split=1)
    both = torch.cat([load_split(data, "train").images, load_split(data, "test").images])
    assert both.shape == (2, 3, 10, 10) and (both.int() - 120).abs().max() <= 2


def test_folder_resized_grey_5bit_with_a_test_split(tmp_path):
    written = write_folder(tmp_path, sizes=((16, 20), (20, 16), (16, 16), (24, 24)))
    data = DataSpec(
        dataset="folder", path=str(tmp_path), shape=(1, 8, 8), levels=32, convert=("size", "mode", "depth"),
        test_split=2,
    )  # fmt: skip
    train, test = load_split(data, "train"), load_split(data, "test")
    assert len(train) == 6 and len(test) == 2 and int(train.images.max()) < 32
    again = load_split(data, "test")
    assert torch.equal(again.images, test.images)  # a fixed split
    path = tmp_path / "cat" / "0.png"
    rgb = torch.from_numpy(written[path]).permute(2, 0, 1)[None]
    expected = reduce_depth(resize_crop(luma(rgb), 8, 8), 256, 32).to(torch.uint8)[0]
    everything = torch.cat([train.images, test.images])
    assert any(torch.equal(image, expected) for image in everything)


def test_npy_folder_naming_rule_and_direct_use(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (20, 6, 6, 3), dtype=np.uint8)
    np.save(tmp_path / "train_6x6.npy", train)
    np.save(tmp_path / "valid_6x6.npy", train[:4])
    data = DataSpec(dataset="npy", path=str(tmp_path), shape=(3, 6, 6))
    got = load_split(data, "train")
    assert got.file is not None and got.file.path == tmp_path / "train_6x6.npy"  # used in place, no copy
    assert torch.equal(got.images, torch.from_numpy(train).permute(0, 3, 1, 2))
    assert len(load_split(data, "test")) == 4
    assert not (tmp_path / "cache").exists()


def two_colours(shape: tuple[int, ...]) -> np.ndarray:
    """N x C x H x W images whose first channel is 200 and second 10 everywhere (the rest 0)."""
    images = np.zeros(shape, np.uint8)
    images[:, 0], images[:, 1] = 200, 10
    return images


@pytest.mark.parametrize(
    ("shape", "spec_shape"),
    [
        ((40, 3, 8, 4), (3, 8, 4)),
        ((40, 3, 4, 4), (3, 4, 4)),
        ((40, 3, 1, 1), (3, 1, 1)),
        ((40, 8, 2, 2), (8, 2, 2)),
    ],
)
def test_a_channels_first_array_of_width_up_to_4_is_read_channels_first(tmp_path, shape, spec_shape):
    """N x C x H x W is read so: the layout is the one that gives the spec's shape, not channels-last
    whenever the width is at most 4 (a transposed set, or a `convert` that turned colours into a gradient)."""
    images = two_colours(shape)
    np.savez(tmp_path / "a.npz", x=images)
    got = load_split(DataSpec(dataset="npy", shape=spec_shape, test_split=8), "train", tmp_path / "a.npz")
    assert torch.equal(got.images, torch.from_numpy(images[:32]))
    channels_last = images.transpose(0, 2, 3, 1).copy()
    np.savez(tmp_path / "b.npz", x=channels_last)
    got = load_split(DataSpec(dataset="npy", shape=spec_shape, test_split=8), "train", tmp_path / "b.npz")
    assert torch.equal(got.images, torch.from_numpy(images[:32]))


def test_channels_first_arrays_used_in_place_and_as_npz_shards(tmp_path):
    images = two_colours((20, 3, 4, 4))
    np.save(tmp_path / "train.npy", images)
    np.save(tmp_path / "test.npy", images[:4])
    data = DataSpec(dataset="npy", path=str(tmp_path), shape=(3, 4, 4))
    got = load_split(data, "train")
    assert got.file is not None and not got.file.channels_last  # used in place, as N x C x H x W
    assert torch.equal(got.images, torch.from_numpy(images))
    shards = tmp_path / "shards"
    shards.mkdir()
    np.savez(shards / "train_1.npz", x=images, y=np.zeros(20, int))
    np.savez(shards / "test.npz", x=images[:4], y=np.zeros(4, int))
    got = load_split(DataSpec(dataset="npz", shape=(3, 4, 4)), "train", shards)
    assert torch.equal(got.images, torch.from_numpy(images))


@pytest.mark.parametrize(
    ("shape", "spec_shape", "convert"),
    [((40, 2, 2, 2), (2, 2, 2), ()), ((40, 3, 3, 3), (3, 3, 3), ()), ((40, 3, 4, 3), (3, 8, 8), ("size",))],
)
def test_an_array_that_both_layouts_fit_is_refused(tmp_path, shape, spec_shape, convert):
    np.savez(tmp_path / "a.npz", x=two_colours(shape))
    data = DataSpec(dataset="npy", shape=spec_shape, test_split=8, convert=convert)
    with pytest.raises(
        UserError, match=r"a\.npz .*read channels-last .* read channels-first .*`data folder`"
    ):
        load_split(data, "train", tmp_path / "a.npz")
    np.savez(tmp_path / "one.npz", x=np.full((40, 1, 1, 1), 7, np.uint8))  # 1x1x1: both readings the same
    got = load_split(DataSpec(dataset="npy", shape=(1, 1, 1), test_split=8), "train", tmp_path / "one.npz")
    assert got.images.shape == (32, 1, 1, 1) and int(got.images.min()) == 7


def test_an_array_of_the_specs_sides_in_another_order_is_refused_without_convert_advice(tmp_path):
    np.savez(tmp_path / "a.npz", x=two_colours((40, 4, 8, 3)))
    data = DataSpec(dataset="npy", shape=(3, 8, 4), test_split=8)
    with pytest.raises(
        UserError, match=r"neither layout.*reorder its axes .* N x 8 x 4 x 3 or N x 3 x 8 x 4$"
    ):
        load_split(data, "train", tmp_path / "a.npz")
    resized = load_split(data.model_copy(update={"convert": ("size",)}), "train", tmp_path / "a.npz")
    assert resized.images.shape == (32, 3, 8, 4)  # asked for: 4x8 images cropped to 8x4


def test_a_grey_array_of_the_specs_sides_swapped_is_refused_as_the_4d_one_is(tmp_path):
    """N x W x H is refused with np.transpose advice, not a `convert size` that squashes the images."""
    images = np.tile(np.arange(128, dtype=np.uint8).reshape(16, 8), (20, 1, 1))  # 16 high, 8 wide
    np.savez(tmp_path / "a.npz", x=images)
    np.savez(tmp_path / "b.npz", x=images[..., None])
    data = DataSpec(dataset="npy", shape=(1, 8, 16), test_split=4)
    with pytest.raises(
        UserError, match=r"a\.npz .*16x8 .*height and width swapped.*np\.transpose.*N x 8 x 16$"
    ):
        load_split(data, "train", tmp_path / "a.npz")
    with pytest.raises(UserError, match=r"b\.npz .*neither layout.*np\.transpose"):
        load_split(data, "train", tmp_path / "b.npz")
    transposed = images.transpose(0, 2, 1).copy()
    np.savez(tmp_path / "t.npz", x=transposed)
    got = load_split(data, "train", tmp_path / "t.npz")
    assert torch.equal(got.images, torch.from_numpy(transposed[:16, None]))
    resized = load_split(data.model_copy(update={"convert": ("size",)}), "train", tmp_path / "a.npz")
    assert resized.images.shape == (16, 1, 8, 16)  # asked for


def test_npy_single_file_needs_a_test_split(tmp_path):
    array = np.random.default_rng(0).integers(0, 32, (50, 4, 4, 3), dtype=np.uint8)  # already 5-bit
    np.save(tmp_path / "celeba_5bit.npy", array)
    data = DataSpec(dataset="npy", path=str(tmp_path / "celeba_5bit.npy"), shape=(3, 4, 4), levels=32)
    with pytest.raises(UserError, match=r"celeba_5bit\.npy has no test split: add `test_split 0\.02`"):
        load_split(data, "train")
    split = data.model_copy(update={"test_split": 0.1})
    train, test = load_split(split, "train"), load_split(split, "test")
    assert len(train) == 45 and len(test) == 5
    rows = {bytes(x.permute(1, 2, 0).contiguous().numpy()) for x in torch.cat([train.images, test.images])}
    assert rows == {bytes(a) for a in array}
    with pytest.raises(UserError, match="leaves an empty test split"):
        load_split(data.model_copy(update={"test_split": 0.001}), "train")


def test_npz_arrays_with_labels(tmp_path):
    np.savez(tmp_path / "train.npz", images=np.zeros((8, 4, 4), np.uint8), labels=np.arange(8) % 2)
    np.savez(tmp_path / "test.npz", images=np.ones((3, 4, 4), np.uint8), labels=np.array([1, 0, 1]))
    data = DataSpec(dataset="npy", path=str(tmp_path), shape=(1, 4, 4), classes=(1,))
    train, test = load_split(data, "train"), load_split(data, "test")
    assert len(train) == 4 and test.labels.tolist() == [1, 1] and int(test.images.max()) == 1


def write_imagenet(folder, side=4, batches=(5, 7), val=3):
    rng = np.random.default_rng(0)
    folder.mkdir()
    planes = {}
    for i, n in enumerate(batches, start=1):
        data = rng.integers(0, 256, (n, 3 * side * side), dtype=np.uint8)
        np.savez(folder / f"train_data_batch_{i}.npz", data=data, labels=rng.integers(1, 1001, n), mean=0.0)
        planes[i] = data
    np.savez(folder / "val_data.npz", data=rng.integers(0, 256, (val, 3 * side * side), dtype=np.uint8),
             labels=np.full(val, 1000))  # fmt: skip
    return planes


def test_downsampled_imagenet_batches(tmp_path):
    planes = write_imagenet(tmp_path / "imagenet")
    data = DataSpec(dataset="imagenet", path=str(tmp_path / "imagenet"), shape=(3, 4, 4))
    train, test = load_split(data, "train"), load_split(data, "test")
    assert len(train) == 12 and len(test) == 3 and test.labels.tolist() == [999] * 3
    first = torch.from_numpy(planes[1][0].reshape(3, 4, 4))  # red, green, blue planes
    assert torch.equal(train.images[0], first)


def write_mnist(root, counts=(("train", 6), ("t10k", 4)), side=6):
    """torchvision's MNIST raw files (idx format), with labels 0, 1, 2, ..."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in counts:
        header = np.array([2051, n, side, side], ">i4").tobytes()
        images = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        labels = np.arange(n, dtype=np.uint8) % 10
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            np.array([2049, n], ">i4").tobytes() + labels.tobytes()
        )


def test_torchvision_dataset_on_disk(tmp_path):
    write_mnist(tmp_path)
    data = DataSpec(dataset="torchvision", name="MNIST", path=str(tmp_path), shape=(1, 6, 6))
    train = load_split(data, "train")
    assert len(train) == 6 and train.labels.tolist() == list(range(6))
    subset = load_split(data.model_copy(update={"classes": ("1 - one", 3)}), "test")
    assert subset.labels.tolist() == [1, 3]
    with pytest.raises(UserError, match=r"torchvision has no dataset 'MNST'; did you mean 'MNIST'"):
        load_split(data.model_copy(update={"name": "MNST"}), "train")
    with pytest.raises(UserError, match=r"cannot read torchvision's MNIST from .*nowhere"):
        (tmp_path / "nowhere").mkdir()
        load_split(data.model_copy(update={"path": str(tmp_path / "nowhere")}), "train")


# ---------------------------------------------------------------- the cache


def test_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path, capsys):
    write_folder(tmp_path / "imgs")
    data = DataSpec(dataset="folder", path=str(tmp_path / "imgs"), shape=(3, 12, 12), test_split=1)
    first = load_split(data, "train")
    built = first.file.path.stat().st_mtime_ns
    assert "prepared 5 train and 1 test images" in capsys.readouterr().err
    again = load_split(data, "train")
    assert again.file.path.stat().st_mtime_ns == built and capsys.readouterr().err == ""  # reused
    changed = tmp_path / "imgs" / "dog" / "2.png"
    Image.fromarray(np.full((12, 12, 3), 9, np.uint8)).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    rebuilt = load_split(data, "train")
    assert "prepared" in capsys.readouterr().err
    everything = torch.cat([rebuilt.images, load_split(data, "test").images])
    assert (everything == 9).all(dim=(1, 2, 3)).sum() == 1
    assert len(list((tmp_path / "cache").iterdir())) == 3  # one cache folder, its lock and .use, no leftovers


def test_a_failed_build_leaves_no_cache(tmp_path):
    write_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "dog" / "1.png").write_bytes(b"\x89PNG broken")
    data = DataSpec(dataset="folder", path=str(tmp_path / "imgs"), shape=(3, 12, 12), test_split=1)
    with pytest.raises(UserError, match=r"cannot decode image .*dog/1\.png"):
        load_split(data, "train")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith((".lock", ".use"))] == []


# ---------------------------------------------------------------- faults: each names the file


def test_folder_image_faults_name_the_file(tmp_path):
    write_folder(tmp_path / "a", sizes=((12, 12), (10, 14)))
    data = DataSpec(dataset="folder", path=str(tmp_path / "a"), shape=(3, 12, 12), test_split=1)
    with pytest.raises(UserError, match=r"cat/1\.png: images of 3x10x14 \(RGB\).*`convert size`"):
        load_split(data, "train")
    write_folder(tmp_path / "b", mode="P")
    with pytest.raises(UserError, match=r"cat/0\.png: a P image, not grey or RGB; add `convert mode`"):
        load_split(data.model_copy(update={"path": str(tmp_path / "b")}), "train")
    write_folder(tmp_path / "c", mode="RGBA")
    with pytest.raises(UserError, match=r"cat/0\.png: images of 4x12x12 \(RGBA\).*`convert mode`"):
        load_split(data.model_copy(update={"path": str(tmp_path / "c")}), "train")
    converted = load_split(
        data.model_copy(update={"path": str(tmp_path / "c"), "convert": ("mode",)}), "train"
    )
    assert converted.images.shape[1:] == (3, 12, 12)


def test_fifo_is_refused_without_blocking(tmp_path):
    write_folder(tmp_path / "imgs")
    os.mkfifo(tmp_path / "imgs" / "cat" / "3.png")
    data = DataSpec(dataset="folder", path=str(tmp_path / "imgs"), shape=(3, 12, 12), test_split=1)
    with pytest.raises(UserError, match=r"image .*cat/3\.png is a FIFO \(named pipe\), not a regular file"):
        load_split(data, "train")
    os.mkfifo(tmp_path / "train.npy")
    npy = DataSpec(dataset="npy", path=str(tmp_path / "train.npy"), shape=(3, 12, 12), test_split=1)
    with pytest.raises(UserError, match=r"train\.npy is a FIFO"):
        load_split(npy, "train")
    os.mkfifo(tmp_path / "test.npz")
    with pytest.raises(UserError, match=r"test\.npz is a FIFO"):
        load_split(DataSpec(dataset="npz", shape=(1, 8, 8), levels=17), "test", tmp_path)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (dict(x=np.zeros((4, 8, 8), np.uint8), y=np.array(["a", "b", "c", "d"])), r"labels must be integers"),
        (dict(x=np.zeros((4, 8, 8), np.uint8), y=np.array(3)), r"got a scalar"),
        (dict(x=np.zeros((4, 8, 8), np.uint8), y=np.zeros(6)), r"6 labels, more than the 4 images"),
        (dict(x=np.zeros((0, 8, 8), np.uint8), y=np.zeros(0)), r"holds no images"),
        (
            dict(x=np.zeros((4, 8, 8), np.float32), y=np.zeros(4)),
            r"images must be uint8 \(or uint16\), got float32",
        ),
        (dict(x=np.zeros((4, 9, 8), np.uint8), y=np.zeros(4)), r"images of 1x9x8 \(grey\)"),
        (dict(y=np.zeros(4)), r"has no array of images: expected one named `x`, found `y`"),
    ],
)
def test_npz_shard_faults_name_the_file(tmp_path, arrays, message):
    np.savez(tmp_path / "test.npz", **arrays)
    with pytest.raises(UserError, match=r"test\.npz.*" + message):
        load_split(DataSpec(dataset="npz", shape=(1, 8, 8), levels=17), "test", tmp_path)


def test_shards_of_different_sizes_name_the_odd_one(tmp_path):
    np.savez(tmp_path / "train_1.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.zeros(4, int))
    np.savez(tmp_path / "train_2.npz", x=np.zeros((4, 16, 16), np.uint8), y=np.zeros(4, int))
    with pytest.raises(UserError, match=r"train_2\.npz: images of 1x16x16"):
        load_split(DataSpec(dataset="npz", shape=(1, 8, 8), levels=17), "train", tmp_path)


def test_npy_faults(tmp_path):
    np.save(tmp_path / "train.npy", np.zeros((4, 5), np.uint8))
    data = DataSpec(dataset="npy", path=str(tmp_path / "train.npy"), shape=(1, 8, 8), test_split=1)
    with pytest.raises(UserError, match=r"train\.npy: expected images N x H x W x C .* got 4x5"):
        load_split(data, "train")
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(UserError, match=r"cannot read .*broken\.npy"):
        load_split(data.model_copy(update={"path": str(tmp_path / "broken.npy")}), "train")
    with pytest.raises(UserError, match=r"names no data: add path"):
        load_split(DataSpec(dataset="npy", shape=(1, 8, 8)), "train")


def test_data_errors_exit_2_through_the_cli(tmp_path, capsys):
    from flowspec.cli.app import run

    write_folder(tmp_path / "imgs", sizes=((12, 12), (9, 9)))
    spec = tmp_path / "s.flow"
    spec.write_text(
        f'model m\ndata folder {{ path "{tmp_path / "imgs"}"  shape 3x12x12  test_split 1 }}\n'
        "flow { split stripe { coupling affine(filters=4, blocks=1); flip } }\n"
    )
    assert run(["train", str(spec), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    assert "cat/1.png: images of 3x9x9" in capsys.readouterr().err


def test_cache_goes_beside_the_data_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv("FLOWSPEC_CACHE_DIR")
    write_folder(tmp_path / "imgs")
    data = DataSpec(dataset="folder", path=str(tmp_path / "imgs"), shape=(3, 12, 12), test_split=1)
    train = load_split(data, "train")
    assert train.file.path.parent.parent == tmp_path / "imgs" / ".flowspec-cache"
    assert len(load_split(data, "train")) == 5  # the hidden cache folder is not a class


def test_an_unwritable_cache_beside_the_data_is_passed_over(tmp_path, monkeypatch):
    from flowspec.train import datacache

    monkeypatch.delenv("FLOWSPEC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
    write_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / ".flowspec-cache").mkdir()  # another user's, say: the data folder is writable
    writable = os.access
    monkeypatch.setattr(datacache.os, "access", lambda path, mode: not str(path).endswith("-cache") and
                        writable(path, mode))  # fmt: skip
    data = DataSpec(dataset="folder", path=str(tmp_path / "imgs"), shape=(3, 12, 12), test_split=1)
    train = load_split(data, "train")
    assert train.file.path.parent.parent == tmp_path / "home" / "flowspec" / "prepared"


def test_a_killed_build_is_cleaned_up_and_concurrent_callers_share_one_build(tmp_path):
    from flowspec.train.datacache import FORMAT, cached, digest

    what = {"source": "x"}
    stale = tmp_path / f"{digest({'format': FORMAT, **what})[:20]}.tmp-999999"
    stale.mkdir(parents=True)
    (stale / "train.npy").write_bytes(b"half")  # what a build killed with SIGKILL leaves
    builds = []

    def build(folder):
        builds.append(folder)
        (folder / "train.npy").write_bytes(b"whole")
        return {}

    folder = cached(tmp_path, what, [1], build)
    assert (folder / "train.npy").read_bytes() == b"whole" and not stale.exists()
    assert cached(tmp_path, what, [1], build) == folder and len(builds) == 1
    cached(tmp_path, what, [2], build)  # the source changed
    assert len(builds) == 2 and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [folder.name, f"{folder.name}.lock", f"{folder.name}.use"]
    )


def test_a_process_waiting_for_the_cache_says_who_prepares_it(tmp_path, capsys):
    """While another process prepares the data, one line names it and the folder, then the wait; the
    builder's pid and host are in the lock file; `quietly()` waits without a word."""
    import fcntl
    import socket
    import threading

    from flowspec.train.datacache import FORMAT, cached, digest, quietly

    what = {"source": "x"}
    name = digest({"format": FORMAT, **what})[:20]

    def build(folder):
        holder = (tmp_path / f"{name}.lock").read_text()
        assert holder.startswith(f"pid {os.getpid()} on {socket.gethostname()} since ")
        (folder / "train.npy").write_bytes(b"whole")
        return {}

    for stamp, quiet in (([1], False), ([2], True)):
        with open(tmp_path / f"{name}.lock", "a+") as held:  # another process's lock (flock: per open file)
            fcntl.flock(held, fcntl.LOCK_EX)
            held.truncate(0)
            held.write("pid 4242 on elsewhere since noon\n")
            held.flush()
            threading.Timer(0.3, fcntl.flock, (held, fcntl.LOCK_UN)).start()
            with quietly(quiet):
                folder = cached(tmp_path, what, stamp, build)
        said = f"waiting for pid 4242 on elsewhere since noon, which prepares {folder}\n"
        assert capsys.readouterr().err == ("" if quiet else said)


def test_sixteen_bit_pngs_need_convert_depth(tmp_path):
    folder = tmp_path / "deep"
    folder.mkdir()
    values = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(values).save(folder / "a.png")
    Image.fromarray(values[::-1].copy()).save(folder / "b.png")
    data = DataSpec(dataset="folder", path=str(folder), shape=(1, 8, 8), test_split=1)
    with pytest.raises(
        UserError, match=r"a\.png: a 16-bit image \(I(;16)?\) but the spec says 256 levels.*`convert depth`"
    ):
        load_split(data, "train")
    reduced = data.model_copy(update={"convert": ("depth",), "levels": 32})
    both = torch.cat([load_split(reduced, "train").images, load_split(reduced, "test").images])
    assert any(torch.equal(x[0], torch.from_numpy(values.astype(np.int64) * 32 // 65536)) for x in both)


def test_flipped_bytes_in_a_compressed_npz_name_the_file(tmp_path):
    images = np.random.default_rng(0).integers(0, 17, (50, 8, 8)).astype(np.uint8)
    np.savez_compressed(tmp_path / "test.npz", x=images, y=np.zeros(50, int))
    corrupt = bytearray((tmp_path / "test.npz").read_bytes())
    corrupt[200:260] = bytes(b ^ 0xFF for b in corrupt[200:260])
    (tmp_path / "test.npz").write_bytes(bytes(corrupt))
    with pytest.raises(UserError, match=r"cannot read .*test\.npz .*decompressing"):
        load_split(DataSpec(dataset="npz", shape=(1, 8, 8), levels=17), "test", tmp_path)


# ---------------------------------------------------------------- found by auditing the data pipeline


def test_a_class_filter_keeps_the_test_split_of_the_whole_set(tmp_path):
    """test_split is held out of all the images, then filtered: a class's test images are the whole set's
    test images of that class, never images the unfiltered run trained on."""
    write_folder(tmp_path / "imgs", sizes=((12, 12),) * 12)
    data = DataSpec(dataset="folder", path=str(tmp_path / "imgs"), shape=(3, 12, 12), test_split=6)
    whole = load_split(data, "test")
    dogs = load_split(data.model_copy(update={"classes": ("dog",)}), "test")
    dog_train = load_split(data.model_copy(update={"classes": ("dog",)}), "train")
    held = {
        bytes(image.numpy()) for image, label in zip(whole.images, whole.labels, strict=True) if label == 1
    }
    assert 0 < len(dogs) < 6 and {bytes(image.numpy()) for image in dogs.images} == held
    assert len(dogs) + len(dog_train) == 12 and not held & {
        bytes(image.numpy()) for image in dog_train.images
    }


def test_torchvision_image_folder_with_the_cache_beside_it(tmp_path, monkeypatch):
    monkeypatch.delenv("FLOWSPEC_CACHE_DIR")
    write_folder(tmp_path / "data" / "pets")
    data = DataSpec(dataset="torchvision", name="ImageFolder", path=str(tmp_path / "data" / "pets"),
                    shape=(3, 12, 12), test_split=2)  # fmt: skip
    train, test = load_split(data, "train"), load_split(data, "test")
    assert len(train) + len(test) == 6 and (tmp_path / "data" / ".flowspec-cache").is_dir()
    assert not (tmp_path / "data" / "pets" / ".flowspec-cache").exists()  # ImageFolder would see a class


def test_torchvision_faults_are_user_errors(tmp_path):
    write_folder(tmp_path / "pets")
    (tmp_path / "pets" / "dog" / "1.png").write_bytes(b"\x89PNG broken")
    data = DataSpec(dataset="torchvision", name="ImageFolder", path=str(tmp_path / "pets"), shape=(3, 12, 12),
                    test_split=1)  # fmt: skip
    with pytest.raises(
        UserError, match=r"torchvision ImageFolder in .*pets, item 4 cannot be read: Unidentified"
    ):
        load_split(data, "train")
    with pytest.raises(UserError, match=r"torchvision's FakeData reads no folder"):
        load_split(data.model_copy(update={"name": "FakeData"}), "train")


def test_no_room_for_the_prepared_data_is_a_user_error(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    write_folder(tmp_path / "imgs")
    data = DataSpec(dataset="folder", path=str(tmp_path / "imgs"), shape=(3, 12, 12), test_split=1)
    with pytest.raises(UserError, match=r"no room for the prepared data in .*cache.*No space left on device"):
        load_split(data, "train")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith((".lock", ".use"))] == []


@pytest.mark.parametrize("where", ["memmap", "labels", "meta"])
def test_a_full_disk_while_preparing_the_data_is_a_user_error_and_leaves_no_cache(
    tmp_path, monkeypatch, where
):
    """A failed write anywhere in the cache (the images' memory map, the labels, meta.json) is the error
    naming the cache folder, with nothing half-built left to be used."""
    from pathlib import Path

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")  # a write to an open file: no file name

    target = {"memmap": (np.lib.format, "open_memmap"), "labels": (np, "save"), "meta": (Path, "write_text")}
    monkeypatch.setattr(*target[where], full)
    write_folder(tmp_path / "imgs")
    data = DataSpec(dataset="folder", path=str(tmp_path / "imgs"), shape=(3, 12, 12), test_split=1)
    with pytest.raises(
        UserError, match=r"no room for the prepared data in \S*cache \(No space left on device\)"
    ):
        load_split(data, "train")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith((".lock", ".use"))] == []
    monkeypatch.undo()
    monkeypatch.setenv("FLOWSPEC_CACHE_DIR", str(tmp_path / "cache"))
    assert len(load_split(data, "train")) == 5


def test_an_os_error_naming_a_file_outside_the_cache_keeps_its_name(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "elsewhere"))

    monkeypatch.setattr(np, "save", denied)
    write_folder(tmp_path / "imgs")
    data = DataSpec(dataset="folder", path=str(tmp_path / "imgs"), shape=(3, 12, 12), test_split=1)
    with pytest.raises(PermissionError) as caught:
        load_split(data, "train")
    assert caught.value.filename == str(tmp_path / "elsewhere")


@pytest.mark.parametrize("limit", [10, 1000], ids=["lock", "images"])
def test_a_file_size_limit_while_preparing_the_data_is_a_user_error(tmp_path, limit):
    """A real failed write (EFBIG under RLIMIT_FSIZE, as ENOSPC on a full disk) in a fresh process: of the
    lock's holder line, or of the images' memory map."""
    import resource
    import subprocess
    import sys

    write_folder(tmp_path / "imgs")
    script = (
        "import sys\n"
        "from flowspec.errors import UserError\n"
        "from flowspec.spec import DataSpec\n"
        "from flowspec.train.data import load_split\n"
        "data = DataSpec(dataset='folder', path=sys.argv[1], shape=(3, 12, 12), test_split=1)\n"
        "try:\n"
        "    load_split(data, 'train')\n"
        "except UserError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "imgs")],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    cache = tmp_path / "cache"
    assert done.stdout == (
        f"no room for the prepared data in {cache} (File too large): free space there, or set "
        f"FLOWSPEC_CACHE_DIR to another folder\n"
    ), done.stderr
    assert [p.name for p in cache.iterdir() if not p.name.endswith((".lock", ".use"))] == []


def test_an_unreadable_class_folder_is_an_error_not_a_missing_class(tmp_path, monkeypatch):
    write_folder(tmp_path / "imgs")
    scandir = os.scandir

    def denied(path="."):
        if str(path).endswith("dog"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    data = DataSpec(dataset="folder", path=str(tmp_path / "imgs"), shape=(3, 12, 12), test_split=1)
    with pytest.raises(UserError, match=r"cannot read the folder .*imgs/dog: Permission denied"):
        load_split(data, "train")


def test_digits_read_no_files():
    with pytest.raises(UserError, match=r"dataset is digits .* reads no files: drop --data /some/where"):
        load_split(DataSpec(dataset="digits", shape=(1, 8, 8), levels=17), "train", "/some/where")


def test_a_truncated_or_replaced_cache_file_is_rebuilt(tmp_path, capsys):
    write_folder(tmp_path / "imgs")
    data = DataSpec(dataset="folder", path=str(tmp_path / "imgs"), shape=(3, 12, 12), test_split=1)
    first = load_split(data, "train").images.clone()
    folder = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    capsys.readouterr()

    def overwrite_start(name: str) -> None:  # same size: a pickled-object header in place of the real one
        with open(folder / name, "r+b") as file:
            file.write(b"\x93NUMPY\x01\x00v\x00{'descr': '|O'")

    def same_size_other_values() -> None:
        labels = np.load(folder / "train_labels.npy")
        np.save(folder / "train_labels.npy", labels + 123)

    for damage in (
        lambda: (folder / "train.npy").write_bytes(b"garbage"),
        lambda: (folder / "test_labels.npy").unlink(),
        lambda: overwrite_start("train_labels.npy"),
        lambda: overwrite_start("train.npy"),
        same_size_other_values,
    ):
        damage()
        assert torch.equal(load_split(data, "train").images, first)
        assert load_split(data, "train").labels.max() < 2
        assert "prepared 5 train and 1 test images" in capsys.readouterr().err  # rebuilt, not trusted


def test_a_cache_from_before_file_times_were_recorded_is_rebuilt(tmp_path, capsys):
    import json

    write_folder(tmp_path / "imgs")
    data = DataSpec(dataset="folder", path=str(tmp_path / "imgs"), shape=(3, 12, 12), test_split=1)
    load_split(data, "train")
    folder = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    meta = json.loads((folder / "meta.json").read_text())
    meta["sizes"] = {name: size for name, (size, _) in meta.pop("files").items()}  # the older format
    (folder / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    load_split(data, "train")
    assert "prepared 5 train and 1 test images" in capsys.readouterr().err


def test_a_cache_file_damaged_with_its_size_and_time_kept_is_an_error_naming_it(tmp_path):
    write_folder(tmp_path / "imgs")
    data = DataSpec(dataset="folder", path=str(tmp_path / "imgs"), shape=(3, 12, 12), test_split=1)
    load_split(data, "train")
    labels = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir()) / "train_labels.npy"
    state = labels.stat()
    with open(labels, "r+b") as file:  # bit rot: a pickled-object header, the file's size and time kept
        file.write(b"\x93NUMPY\x01\x00v\x00{'descr': '|O'")
    os.utime(labels, ns=(state.st_atime_ns, state.st_mtime_ns))
    with pytest.raises(UserError, match=rf"cannot read the prepared {labels} .*: delete {labels.parent} to"):
        load_split(data, "train")


def test_eight_bit_values_stored_as_sixteen_bit_are_refused_with_convert_depth(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 256, (6, 4, 4, 1)).astype(np.uint16))
    data = DataSpec(dataset="npy", path=str(tmp_path / "x.npy"), shape=(1, 4, 4), convert=("depth",),
                    test_split=1)  # fmt: skip
    with pytest.raises(
        UserError, match=r"every train image of .*x.npy is black after `convert depth` to 256 levels: were"
    ):
        load_split(data, "train")


def test_imagenet_labels_count_from_one(tmp_path):
    write_imagenet(tmp_path / "imagenet")
    np.savez(tmp_path / "imagenet" / "val_data.npz", data=np.zeros((3, 48), np.uint8), labels=np.arange(3))
    data = DataSpec(dataset="imagenet", path=str(tmp_path / "imagenet"), shape=(3, 4, 4))
    with pytest.raises(UserError, match=r"val_data.npz.*labels count from 1, got 0"):
        load_split(data, "train")


def test_folder_split_layouts(tmp_path):
    write_folder(tmp_path / "a" / "train")
    write_folder(tmp_path / "a" / "test")
    other = tmp_path / "other"
    write_folder(other)
    data = DataSpec(dataset="folder", path=str(tmp_path / "a"), shape=(3, 12, 12), test_path=str(other))
    with pytest.raises(UserError, match=r"has its own test folder \(test/\): remove test_path"):
        load_split(data, "train")
    write_folder(tmp_path / "b" / "train")  # train/ alone: the training set, its classes cat and dog
    only = DataSpec(dataset="folder", path=str(tmp_path / "b"), shape=(3, 12, 12), test_split=2)
    assert sorted(
        set(load_split(only.model_copy(update={"classes": ("dog",)}), "train").labels.tolist())
    ) == [1]
    write_folder(tmp_path / "flat", classes=("one",))  # one class against two in the test folder
    mixed = DataSpec(
        dataset="folder", path=str(tmp_path / "flat" / "one"), shape=(3, 12, 12), test_path=str(other)
    )
    with pytest.raises(
        UserError, match=r"the test folder .*other has classes \('cat', 'dog'\), the training"
    ):
        load_split(mixed, "train")


def test_one_dark_sixteen_bit_image_among_bright_ones_is_fine(tmp_path):
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 65536, (6, 4, 4, 1)).astype(np.uint16)
    arrays[2] = arrays[2] % 200  # values below 256 in one image only: a dark image, not 8-bit data
    np.save(tmp_path / "x.npy", arrays)
    data = DataSpec(dataset="npy", path=str(tmp_path / "x.npy"), shape=(1, 4, 4), convert=("depth",),
                    test_split=1)  # fmt: skip
    both = torch.cat([load_split(data, "train").images, load_split(data, "test").images])
    assert len(both) == 6 and both.max() > 0


def test_preparing_without_posix_fallocate(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "posix_fallocate")  # macOS has none
    write_folder(tmp_path / "imgs")
    data = DataSpec(dataset="folder", path=str(tmp_path / "imgs"), shape=(3, 12, 12), test_split=1)
    assert len(load_split(data, "train")) == 5


def test_imagenet_batches_without_labels_load(tmp_path):
    folder = tmp_path / "imagenet"
    folder.mkdir()
    np.savez(folder / "train_data_batch_1.npz", data=np.zeros((4, 48), np.uint8))
    np.savez(folder / "val_data.npz", data=np.zeros((2, 48), np.uint8))
    data = DataSpec(dataset="imagenet", path=str(folder), shape=(3, 4, 4))
    assert load_split(data, "train").labels.tolist() == [0, 0, 0, 0]


def test_sixteen_bit_pngs_holding_eight_bit_values_are_refused(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            array = np.random.default_rng(i).integers(0, 200, (8, 8)).astype(np.uint16)
            Image.fromarray(array).save(tmp_path / "imgs" / c / f"{i}.png")
    data = DataSpec(dataset="folder", path=str(tmp_path / "imgs"), shape=(1, 8, 8), levels=17,
                    convert=("depth",), test_split=1)  # fmt: skip
    with pytest.raises(UserError, match=r"every train image of .*imgs is black after `convert depth`"):
        load_split(data, "train")


def test_a_black_test_split_is_refused_too(tmp_path):
    folder = tmp_path / "mix"
    folder.mkdir()
    np.save(folder / "train.npy", np.random.default_rng(0).integers(0, 256, (6, 4, 4, 1)).astype(np.uint8))
    np.save(folder / "test.npy", np.random.default_rng(1).integers(0, 256, (3, 4, 4, 1)).astype(np.uint16))
    data = DataSpec(dataset="npy", path=str(folder), shape=(1, 4, 4), convert=("depth",))
    with pytest.raises(UserError, match=r"every test image of .*mix is black after `convert depth`"):
        load_split(data, "train")


def _numbered_image(i: int) -> torch.Tensor:
    if i == 7:
        raise UserError("cannot decode image 7.png")
    return torch.full((1, 1, 2, 2), i % 256, dtype=torch.uint8)


def test_decoding_workers_hand_back_arrays_in_order():
    """Workers send numpy arrays, copied through their pipe: a tensor went through a shared-memory handle
    served from a worker thread, which printed a traceback when the main process stopped mid-transfer
    (SIGTERM during a large preparation)."""
    from flowspec.train.images import Decoded, decode_all

    assert isinstance(Decoded([3], _numbered_image)[0], np.ndarray)
    indices = list(range(7)) + list(range(8, 300))
    batches = list(decode_all(indices, _numbered_image, workers=2))
    assert all(b.dtype == torch.uint8 for b in batches)
    assert torch.cat(batches)[:, 0, 0, 0].tolist() == [i % 256 for i in indices]
    with pytest.raises(UserError, match=r"cannot decode image 7\.png"):
        list(decode_all(range(10), _numbered_image, workers=2))


def test_levels_above_the_datas_depth_are_refused():
    """scikit-learn's digits have 17 levels: a spec saying 256 would measure bits/dim against a colour
    depth the data never had, and silently."""
    data = DataSpec(dataset="digits", shape=(1, 8, 8), levels=256)
    with pytest.raises(
        UserError,
        match=r"the images have 17 levels \(values 0\.\.16\) but the spec says 256; write `levels 17`",
    ):
        load_split(data, "train")
    assert len(load_split(data.model_copy(update={"levels": 17}), "train")) > 0


def test_preparing_data_says_so_unless_quiet(tmp_path, capsys):
    from flowspec.train.datacache import quietly

    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 17, (40, 8, 8), dtype=np.uint8))
    data = DataSpec(dataset="npy", path=str(tmp_path / "x.npy"), shape=(1, 8, 8), levels=17, test_split=8)
    with quietly():  # train --quiet, ablate --quiet
        load_split(data, "train")
    assert capsys.readouterr().err == ""
    load_split(data.model_copy(update={"test_split": 9}), "train")  # another split: prepared again
    assert "prepar" in capsys.readouterr().err


# ---------------------------------------------------------------- found by the second data audit


def test_classes_on_data_without_labels_are_refused(tmp_path):
    """An npy folder has no labels: `classes 0` selected every image as class 0."""
    folder = tmp_path / "arrays"
    folder.mkdir()
    np.save(folder / "train.npy", np.zeros((6, 4, 4), np.uint8))
    np.save(folder / "test.npy", np.zeros((2, 4, 4), np.uint8))
    data = DataSpec(dataset="npy", path=str(folder), shape=(1, 4, 4), classes=(0,))
    with pytest.raises(UserError, match=r"train\.npy has no labels, so `classes` cannot select from it"):
        load_split(data, "train")
    write_imagenet(tmp_path / "imagenet")
    np.savez(tmp_path / "imagenet" / "train_data_batch_3.npz", data=np.zeros((2, 48), np.uint8))
    imagenet = DataSpec(dataset="imagenet", path=str(tmp_path / "imagenet"), shape=(3, 4, 4))
    with pytest.raises(UserError, match=r"batch_1\.npz has labels but .*batch_3\.npz has none \(1 of 3"):
        load_split(imagenet, "train")
    (tmp_path / "imagenet" / "train_data_batch_3.npz").unlink()  # labelled batches, a val file without
    np.savez(tmp_path / "imagenet" / "val_data.npz", data=np.zeros((3, 48), np.uint8))
    with pytest.raises(UserError, match=r"val_data\.npz has no labels, so `classes` cannot select"):
        load_split(imagenet.model_copy(update={"classes": (0,)}), "test")


def test_hidden_folders_inside_a_class_are_not_read(tmp_path):
    write_folder(tmp_path / "imgs")
    data = DataSpec(dataset="folder", path=str(tmp_path / "imgs"), shape=(3, 12, 12), test_split=1)
    count = len(load_split(data, "train"))
    write_folder(tmp_path / "imgs" / "cat" / ".ipynb_checkpoints", classes=("copies",))
    assert len(load_split(data, "train")) == count


def test_npz_arrays_of_which_some_have_labels_are_refused(tmp_path):
    np.savez(tmp_path / "train_a.npz", images=np.zeros((4, 4, 4), np.uint8), labels=np.arange(4))
    np.savez(tmp_path / "train_b.npz", images=np.zeros((4, 4, 4), np.uint8))
    data = DataSpec(dataset="npy", path=str(tmp_path), shape=(1, 4, 4), test_split=1)
    with pytest.raises(UserError, match=r"train_a\.npz has labels but .*train_b\.npz has none"):
        load_split(data, "train")


def test_a_folder_with_images_and_class_subfolders_is_refused(tmp_path):
    """20 loose images and a thumbs/ subfolder of 4 trained on the 4."""
    folder = tmp_path / "imgs"
    write_folder(folder, sizes=((12, 12),) * 4, classes=("thumbs",))
    for i in range(20):
        Image.fromarray(np.full((12, 12, 3), i, np.uint8)).save(folder / f"{i}.png")
    data = DataSpec(dataset="folder", path=str(folder), shape=(3, 12, 12), test_split=1)
    with pytest.raises(UserError, match=r"imgs holds both .*\(thumbs/\): its 20 own images would be ignored"):
        load_split(data, "train")


def test_a_flat_folder_beside_subfolders_without_images_stays_flat(tmp_path):
    """A flat folder beside an empty subfolder said "no images in ..."."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((12, 12, 3), i, np.uint8)).save(folder / f"{i}.png")
    (folder / "empty").mkdir()
    (folder / "dir.png").mkdir()
    (folder / "__MACOSX").mkdir()
    (folder / "__MACOSX" / "._0.png").write_bytes(b"resource fork")
    data = DataSpec(dataset="folder", path=str(folder), shape=(3, 12, 12), test_split=1)
    assert len(load_split(data, "train")) == 2


def test_empty_class_folders_are_classes_beside_classes_with_images(tmp_path):
    """Empty class folders were dropped: `train/{a, b(empty), c}` made c class 1 (it was 2), and a test folder
    with an empty class was refused for having other classes than the training folder."""
    write_folder(tmp_path / "classes")
    (
        tmp_path / "classes" / "bird"
    ).mkdir()  # sorted first: bird 0, cat 1, dog 2, as torchvision's ImageFolder
    data = DataSpec(dataset="folder", path=str(tmp_path / "classes"), shape=(3, 12, 12), test_split=1)
    assert load_split(data.model_copy(update={"classes": ("dog",)}), "train").labels.tolist() == [2, 2]
    write_folder(tmp_path / "data" / "train", classes=("cat", "dog", "fox"))
    write_folder(tmp_path / "data" / "test", classes=("cat", "fox"))
    (tmp_path / "data" / "test" / "dog").mkdir()
    split = DataSpec(dataset="folder", path=str(tmp_path / "data"), shape=(3, 12, 12))
    assert load_split(split, "test").labels.tolist() == [0, 0, 0, 2, 2, 2]
    assert load_split(split, "train").labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_a_folder_reached_twice_through_links_is_refused(tmp_path):
    """Two links to one folder, or a class linking to a sibling class, read the same images twice (into the
    held-out test split too, and as the wrong class)."""
    write_folder(tmp_path / "imgs")
    write_folder(tmp_path / "more", classes=("extra",))
    (tmp_path / "imgs" / "cat" / "a").symlink_to(tmp_path / "more" / "extra")
    (tmp_path / "imgs" / "dog" / "b").symlink_to(tmp_path / "more" / "extra")
    data = DataSpec(dataset="folder", path=str(tmp_path / "imgs"), shape=(3, 12, 12), test_split=1)
    with pytest.raises(
        UserError,
        match=r"imgs/dog/b was read already \(as .*imgs/cat/a\): its images would be read twice",
    ):
        load_split(data, "train")
    (tmp_path / "imgs" / "dog" / "b").unlink()
    assert len(load_split(data, "train")) == 8  # 6 cats (3 linked), 3 dogs, 1 held out
    (tmp_path / "imgs" / "cat" / "dogs").symlink_to("../dog")
    with pytest.raises(UserError, match=r"imgs/dog was read already \(as .*imgs/cat/dogs\)"):
        load_split(data, "train")


def test_a_test_folder_within_the_training_folder_is_refused(tmp_path):
    write_folder(tmp_path / "imgs")
    for test_path, said in (
        (tmp_path / "imgs" / "cat", "cat was read already"),
        (tmp_path / "imgs", "imgs was"),
    ):
        data = DataSpec(
            dataset="folder", path=str(tmp_path / "imgs"), test_path=str(test_path), shape=(3, 12, 12)
        )
        with pytest.raises(UserError, match=rf"{said}.*give the test split a folder of its own"):
            load_split(data, "train")
    write_folder(tmp_path / "test")  # a folder of its own
    data = DataSpec(
        dataset="folder", path=str(tmp_path / "imgs"), test_path=str(tmp_path / "test"), shape=(3, 12, 12)
    )
    assert len(load_split(data, "test")) == 6


def test_linked_folders_inside_a_class_are_followed_and_a_loop_is_refused(tmp_path):
    write_folder(tmp_path / "imgs")
    write_folder(tmp_path / "more", classes=("extra",))
    (tmp_path / "imgs" / "cat" / "more").symlink_to(tmp_path / "more" / "extra")
    data = DataSpec(dataset="folder", path=str(tmp_path / "imgs"), shape=(3, 12, 12), test_split=1)
    labels = torch.cat([load_split(data, "train").labels, load_split(data, "test").labels]).tolist()
    assert labels.count(0) == 6 and labels.count(1) == 3  # the 3 linked images are cats
    (tmp_path / "imgs" / "dog" / "sub").mkdir()
    (tmp_path / "imgs" / "dog" / "sub" / "back").symlink_to(tmp_path / "imgs" / "dog")
    with pytest.raises(UserError, match=r"the link .*dog/sub/back leads to a folder it is in .*: a loop"):
        load_split(data, "train")
    (tmp_path / "imgs" / "dog" / "sub" / "back").unlink()
    (tmp_path / "imgs" / "dog" / "root").symlink_to(tmp_path / "imgs")
    with pytest.raises(UserError, match=r"the link .*imgs/dog/root leads to a folder it is in"):
        load_split(data, "train")


def test_a_test_path_that_is_missing_empty_or_of_the_wrong_kind_is_named(tmp_path):
    """A missing test_path was an OS error ("cannot complete accessing ..."), an empty one "has no test
    split ... or name the test data with test_path"."""
    np.save(tmp_path / "train.npy", np.zeros((4, 4, 4), np.uint8))
    (tmp_path / "empty").mkdir()
    npy = DataSpec(dataset="npy", path=str(tmp_path / "train.npy"), shape=(1, 4, 4))
    for test_path, message in (
        ("nowhere", r"the test path .*nowhere does not exist: fix the data section's test_path"),
        ("empty", r"the test path .*empty holds no \.npy/\.npz arrays"),
    ):
        with pytest.raises(UserError, match=message):
            load_split(npy.model_copy(update={"test_path": str(tmp_path / test_path)}), "train")
    write_folder(tmp_path / "imgs")
    folder = DataSpec(dataset="folder", path=str(tmp_path / "imgs"), shape=(3, 12, 12))
    for test_path, message in (
        ("nowhere", r"the test path .*nowhere does not exist"),
        ("train.npy", r"the test path .*train\.npy is not a folder of images"),
    ):
        with pytest.raises(UserError, match=message):
            load_split(folder.model_copy(update={"test_path": str(tmp_path / test_path)}), "train")


def test_a_sixteen_bit_png_needs_convert_depth_whatever_its_values(tmp_path):
    """A 16-bit PNG of values up to 255 was read as 8-bit: a dark 16-bit image made bright."""
    folder = tmp_path / "deep"
    folder.mkdir()
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(folder / "a.png")
    Image.fromarray(np.full((8, 8), 200, np.uint16)).save(folder / "b.png")
    assert Image.open(folder / "b.png").mode in ("I;16", "I")
    data = DataSpec(dataset="folder", path=str(folder), shape=(1, 8, 8), test_split=1)
    with pytest.raises(UserError, match=r"b\.png: a 16-bit image \(I(;16)?\) but the spec says 256 levels"):
        load_split(data, "train")


def test_array_files_sort_by_their_numbers_whatever_other_digits_their_names_hold():
    from pathlib import Path

    from flowspec.train.sources import _natural

    names = ["part10.npy", "part2.npy", "part1²", "part1"]  # "²" is a digit to str.isdigit, not to int
    assert sorted(names, key=lambda name: _natural(Path(name))) == [
        "part1",
        "part1²",
        "part2.npy",
        "part10.npy",
    ]
