"""Data sources, class subsets, the missing-data message, and the resumable, sharded batch stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import write_shards

from flowspec.errors import UserError
from flowspec.spec import DataSpec
from flowspec.train.batches import BatchStream, check_batch
from flowspec.train.data import DIGITS_TEST, load_split

DIGITS = DataSpec(dataset="digits", shape=(1, 8, 8), levels=17)
NPZ = DataSpec(dataset="npz", shape=(1, 8, 8), levels=17)
CIFAR = DataSpec(dataset="cifar10", shape=(3, 32, 32), levels=256)


def test_digits_splits_are_disjoint_and_shaped():
    train, test = load_split(DIGITS, "train"), load_split(DIGITS, "test")
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 8, 8)
    assert len(train) == 1797 - DIGITS_TEST and len(test) == DIGITS_TEST
    assert int(train.images.max()) == 16


def test_digits_class_subset():
    subset = load_split(DataSpec(dataset="digits", shape=(1, 8, 8), levels=17, classes=(3, 7)), "test")
    assert set(subset.labels.tolist()) == {3, 7} and 40 < len(subset) < 80


def test_npz_shards(tmp_path):
    folder = write_shards(tmp_path / "shards", n_train=100, n_test=30)
    train = load_split(NPZ, "train", folder)
    assert len(train) == 100 and train.images.shape == (100, 1, 8, 8)
    spec_path = DataSpec(dataset="npz", shape=(1, 8, 8), levels=17, path=str(folder), classes=(1,))
    test = load_split(spec_path, "test")
    assert len(test) > 0 and set(test.labels.tolist()) == {1}


def test_npz_shape_and_levels_are_checked(tmp_path):
    folder = write_shards(tmp_path / "shards")
    with pytest.raises(UserError, match=r"train_1\.npz: images of 1x8x8 \(grey\) but .* shape is 3x32x32"):
        load_split(CIFAR, "train", folder)
    with pytest.raises(UserError, match="values up to 16 but the spec says 8 levels"):
        load_split(NPZ.model_copy(update={"levels": 8}), "test", folder)


def test_unreadable_shard_names_the_file(tmp_path):
    (tmp_path / "test.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match=r"cannot read .*test\.npz"):
        load_split(NPZ, "test", tmp_path)


def test_wrong_folder_says_how_to_pass_data(tmp_path):
    with pytest.raises(UserError, match=r"no train data in .*--data DIR"):
        load_split(NPZ, "train", tmp_path)
    with pytest.raises(UserError, match=r"does not exist"):
        load_split(NPZ, "train", tmp_path / "nowhere")


def test_missing_cifar_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSPEC_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FLOWSPEC_OFFLINE", "1")
    with pytest.raises(UserError) as error:
        load_split(CIFAR, "train")
    message = str(error.value)
    assert str(tmp_path / "env") in message and str(tmp_path / "cache" / "flowspec" / "cifar10") in message
    assert "--data DIR" in message


def test_missing_cifar_says_why_it_was_not_downloaded(tmp_path, monkeypatch):
    """Offline, and a download that failed, said the same 'downloading was not possible'; a failed download
    leaves none of the folders it made (torchvision makes only the root) and all that were there before."""
    import torchvision.datasets

    def unreachable(root, train, download):
        Path(root).mkdir(parents=True, exist_ok=True)  # as torchvision's download_url does
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    cache = tmp_path / "cache"
    monkeypatch.delenv("FLOWSPEC_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", unreachable)  # never downloads in a test
    monkeypatch.setenv("FLOWSPEC_OFFLINE", "1")
    with pytest.raises(UserError, match=r"cifar10; downloading is off: FLOWSPEC_OFFLINE=1\): pass --data"):
        load_split(CIFAR, "train")
    monkeypatch.delenv("FLOWSPEC_OFFLINE")
    with pytest.raises(UserError, match=r"the download failed: <urlopen error \[Errno -2\] Name or service"):
        load_split(CIFAR, "train")
    assert not cache.exists()  # nothing left of the attempt
    for there in (cache / "flowspec", cache / "flowspec" / "cifar10"):
        there.mkdir(parents=True)
        with pytest.raises(UserError, match="the download failed"):
            load_split(CIFAR, "train")
        assert there.is_dir() and not any(there.iterdir())  # kept, and nothing made in it


def test_broken_torchvision_folder(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(UserError, match=r"cannot read CIFAR-10 from .*cifar-10-batches-py"):
        load_split(CIFAR, "test", tmp_path)


def test_real_cifar_shards_and_class_subset(cifar10_dir):
    test = load_split(CIFAR, "test", cifar10_dir)
    assert test.images.shape == (1000, 3, 32, 32) and test.images.dtype == torch.uint8
    dogs = load_split(DataSpec(classes=("dog",)), "test", cifar10_dir)
    assert set(dogs.labels.tolist()) == {5} and 50 < len(dogs) < 200


def test_cifar_from_env_dir(cifar10_dir, monkeypatch):
    monkeypatch.setenv("FLOWSPEC_DATA_DIR", str(cifar10_dir))
    assert len(load_split(CIFAR, "test")) == 1000


def test_a_data_dir_set_to_a_folder_without_cifar_is_an_error_not_passed_over(
    cifar10_dir, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    (cache / "flowspec").mkdir(parents=True)
    (cache / "flowspec" / "cifar10").symlink_to(cifar10_dir)  # a copy the cache would otherwise serve
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setenv("FLOWSPEC_DATA_DIR", str(tmp_path / "typo"))
    with pytest.raises(
        UserError, match=rf"FLOWSPEC_DATA_DIR is {tmp_path / 'typo'}, which holds no CIFAR-10"
    ):
        load_split(CIFAR, "test")
    monkeypatch.delenv("FLOWSPEC_DATA_DIR")
    assert len(load_split(CIFAR, "test")) == 1000


def test_the_default_folder_is_only_for_cifar10_without_a_path(tmp_path, monkeypatch):
    from flowspec.train.data import default_folder

    monkeypatch.setenv("FLOWSPEC_DATA_DIR", str(tmp_path))
    (tmp_path / "test.npz").write_bytes(b"")  # what marks a folder of cifar10 shards
    assert default_folder(DataSpec()) == tmp_path.resolve()
    assert default_folder(DataSpec(path="elsewhere")) is None  # the spec names its data
    assert default_folder(DataSpec(dataset="digits", shape=(1, 8, 8), levels=17)) is None
    (tmp_path / "test.npz").unlink()  # an existing folder without CIFAR-10: the variable's own message
    with pytest.raises(UserError, match=rf"FLOWSPEC_DATA_DIR is {tmp_path}, which holds no CIFAR-10"):
        load_split(CIFAR, "test")


def test_the_fingerprint_of_a_set_of_images_samples_it_evenly():
    from flowspec.train.data import fingerprint

    images = torch.zeros(1000, 1, 2, 2, dtype=torch.uint8)
    digest = fingerprint(images)
    last, middle = images.clone(), images.clone()
    last[-1] += 1
    middle[507] += 1  # one of 64 evenly spaced picks (999 * 32 / 63, rounded)
    assert fingerprint(last) != digest and fingerprint(middle) != digest
    assert fingerprint(images[:999]) != digest and fingerprint(images.view(1000, 1, 4, 1)) != digest
    assert fingerprint(images.clone()) == digest


def _drain(stream: BatchStream, n: int) -> list[torch.Tensor]:
    return [next(stream) for _ in range(n)]


def test_stream_visits_every_image_once_per_epoch():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1)
    stream = BatchStream(images, batch=8, seed=3)
    every = torch.arange(40, dtype=torch.uint8)
    first = torch.cat(_drain(stream, 5)).flatten()
    second = torch.cat(_drain(stream, 5)).flatten()
    assert torch.equal(first.sort().values, every) and torch.equal(second.sort().values, every)
    assert stream.epoch == 1 and not torch.equal(second, first)  # each epoch in its own order


def test_stream_resumes_exactly_and_shards():
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 1, 2, 2).contiguous()
    images[:, :, :, 1] += 100  # so flips show
    straight = BatchStream(images, batch=8, seed=1, hflip=True)
    expected = _drain(straight, 13)
    first = BatchStream(images, batch=8, seed=1, hflip=True)
    head = _drain(first, 7)
    resumed = BatchStream(images, batch=8, seed=1, hflip=True)
    resumed.load_state_dict(first.state_dict())
    got = head + _drain(resumed, 6)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert any(bool((b[:, :, :, 0] >= 100).any()) for b in expected)  # some images were flipped

    ranks = [BatchStream(images, batch=8, seed=1, rank=r, world=2) for r in range(2)]
    plain = BatchStream(images, batch=8, seed=1)
    for _ in range(3):
        assert torch.equal(torch.cat([next(ranks[0]), next(ranks[1])]), next(plain))


def test_stream_rejects_bad_batches():
    images = torch.zeros(10, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(UserError, match="divisible by the number of processes"):
        BatchStream(images, batch=9, seed=0, world=2)
    with pytest.raises(UserError, match="fewer than one batch"):
        BatchStream(images, batch=16, seed=0)
    with pytest.raises(UserError, match=r"processes \(2\) times accumulate \(4\)"):
        check_batch(12, 2, 100, accumulate=4)


def test_npz_grey_images_without_channel_axis(tmp_path):
    np.savez(tmp_path / "test.npz", x=np.zeros((5, 8, 8), np.uint8), y=np.zeros(5))
    assert load_split(NPZ, "test", tmp_path).images.shape == (5, 1, 8, 8)


def test_npz_shards_without_labels_refuse_classes_and_a_mix_is_refused(tmp_path):
    """Shards without `y` read as label 0: `classes 0` selected every image, a mix labelled some 0."""
    images = np.zeros((4, 8, 8), np.uint8)
    np.savez(tmp_path / "train_1.npz", x=images)
    np.savez(tmp_path / "test.npz", x=images)
    assert len(load_split(NPZ, "train", tmp_path)) == 4
    with pytest.raises(UserError, match=r"train_1\.npz has no labels, so `classes` cannot select from it"):
        load_split(NPZ.model_copy(update={"classes": (0,)}), "train", tmp_path)
    np.savez(tmp_path / "train_2.npz", x=images, y=np.arange(4))
    with pytest.raises(UserError, match=r"train_2\.npz has labels but .*train_1\.npz has none"):
        load_split(NPZ, "train", tmp_path)


def test_npz_train_shards_must_be_numbered_in_turn(tmp_path):
    """`train_*.npz` also matched `train_1 (copy).npz`: a duplicated shard in place of a missing one."""
    images = np.zeros((4, 8, 8), np.uint8)
    for name in ("train_1.npz", "train_1 (copy).npz", "train_3.npz", "test.npz"):
        np.savez(tmp_path / name, x=images, y=np.zeros(4, int))
    with pytest.raises(
        UserError,
        match=r"train shards of .* are not numbered 1, 2, \.\.\. in turn: found train_1\.npz, train_3\.npz; "
        r"missing 1 shard: train_2\.npz; and they include train_1 \(copy\)\.npz, not named train_N\.npz",
    ):
        load_split(NPZ, "train", tmp_path)
    (tmp_path / "train_3.npz").rename(tmp_path / "train_2.npz")
    (tmp_path / "train_1 (copy).npz").unlink()
    assert len(load_split(NPZ, "train", tmp_path)) == 8
    np.savez(tmp_path / "train_01.npz", x=images, y=np.zeros(4, int))
    with pytest.raises(UserError, match=r"not numbered 1, 2, \.\.\. in turn: found train_01\.npz, train_1"):
        load_split(NPZ, "train", tmp_path)
    (tmp_path / "train_01.npz").rename(tmp_path / "train_0.npz")  # counted from 0: not 1, 2, ...
    with pytest.raises(UserError, match=r"not numbered 1, 2, \.\.\. in turn: found train_0\.npz"):
        load_split(NPZ, "train", tmp_path)
    (tmp_path / "train_0.npz").rename(tmp_path / "train_.npz")  # no number: another name, not a crash
    with pytest.raises(UserError, match=r"include train_\.npz, not named train_N\.npz"):
        load_split(NPZ, "train", tmp_path)


def test_a_far_numbered_shard_gives_a_short_message(tmp_path):
    """`train_1.npz` + `train_20240101.npz` listed every missing name: a 393-million-character message."""
    for name in ("train_1.npz", "train_20240101.npz"):
        np.savez(tmp_path / name, x=np.zeros((4, 8, 8), np.uint8), y=np.zeros(4, int))
    with pytest.raises(UserError) as error:
        load_split(NPZ, "train", tmp_path)
    message = str(error.value)
    assert len(message) < 500 + len(str(tmp_path))
    assert message.endswith(
        "missing 20,240,099 shards: train_2.npz, train_3.npz, train_4.npz, train_5.npz, train_6.npz, ..."
    )


def test_train_shards_of_other_names_are_refused_and_no_train_data_names_what_is_there(tmp_path):
    """`train_2 (1).npz` and `train_extra.npz` beside train_1, train_2 were silently not read."""
    images = np.zeros((4, 8, 8), np.uint8)
    for name in ("train_1.npz", "train_2.npz", "train_2 (1).npz", "train_extra.npz"):
        np.savez(tmp_path / name, x=images, y=np.zeros(4, int))
    with pytest.raises(
        UserError,
        match=r"train shards of .* include train_2 \(1\)\.npz, train_extra\.npz, not named train_N\.npz and "
        r"so never read: rename or move them",
    ):
        load_split(NPZ, "train", tmp_path)
    for name in ("train_1.npz", "train_2.npz", "train_2 (1).npz", "train_extra.npz"):
        (tmp_path / name).rename(tmp_path / name.replace("_", "-"))
    with pytest.raises(
        UserError,
        match=r"no train data in .* \(it holds train-1\.npz, train-2 \(1\)\.npz, train-2\.npz, "
        r"train-extra\.npz\): expected",
    ):
        load_split(NPZ, "train", tmp_path)
