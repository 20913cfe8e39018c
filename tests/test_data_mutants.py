"""Tests from a mutation audit of the data pipeline (the dataset readers, the preparation, the prepared-data
cache and `flowspec cache`, the batches in memory and streamed): each fails on a plausible bug that every
other test passed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from train_helpers import write_shards

from flowspec.errors import UserError
from flowspec.spec import DataSpec
from flowspec.train import images as image_files
from flowspec.train.data import load_split
from flowspec.train.prepare import resize_crop

pytestmark = pytest.mark.usefixtures("cache_in_tmp")

SHARDS = DataSpec(dataset="npz", shape=(1, 8, 8), levels=17)


def _npy(tmp_path, images: np.ndarray, **spec) -> DataSpec:
    """`images` saved as train.npy and test.npy in `tmp_path`, and a spec of the npy dataset there."""
    np.save(tmp_path / "train.npy", images)
    np.save(tmp_path / "test.npy", images)
    return DataSpec(dataset="npy", path=str(tmp_path), **spec)


def _reduced(tmp_path) -> DataSpec:
    """A spec of 4 + 4 images in train.npy and test.npy, reduced to 16 levels: prepared into the cache."""
    return _npy(
        tmp_path, np.full((4, 2, 2, 1), 200, np.uint8), shape=(1, 2, 2), levels=16, convert=("depth",)
    )


# ---------------------------------------------------------------- data.py: digits, shards, CIFAR-10 folders


def test_digits_hold_out_the_last_297_images_unturned():
    """The digits' test split is the last 297 of the 1,797 images (not 296), each as scikit-learn has it
    (not transposed)."""
    from sklearn.datasets import load_digits

    data = DataSpec(dataset="digits", shape=(1, 8, 8), levels=17)
    train, test = load_split(data, "train"), load_split(data, "test")
    assert (len(train), len(test)) == (1500, 297)
    expected = torch.from_numpy(load_digits().images.astype(np.uint8))
    assert torch.equal(train.images[:, 0], expected[:1500]) and torch.equal(
        test.images[:, 0], expected[1500:]
    )


def test_a_class_subset_without_images_says_which_classes(tmp_path):
    """Classes that select nothing are named in the message, not reported as a split without images."""
    write_shards(tmp_path / "shards")
    with pytest.raises(UserError, match=r"no train images of classes \[7\] in "):
        load_split(SHARDS.model_copy(update={"classes": (7,)}), "train", tmp_path / "shards")


def test_every_test_shard_is_read(tmp_path):
    """The test split is every `test*.npz` shard (test_1.npz, test_2.npz, ...), not only test.npz."""
    write_shards(tmp_path, n_test=10)
    test = np.load(tmp_path / "test.npz")
    (tmp_path / "test.npz").rename(tmp_path / "test_1.npz")
    np.savez(tmp_path / "test_2.npz", x=test["x"][:3], y=test["y"][:3])
    assert len(load_split(SHARDS, "test", tmp_path)) == 13


def test_six_misnamed_shards_are_listed_as_five_and_a_count(tmp_path):
    """The names in a message are the first five, then `... (N in all)` from the sixth on."""
    write_shards(tmp_path)
    for letter in "abcdef":
        (tmp_path / f"train_{letter}.npz").write_bytes(b"")
    with pytest.raises(UserError, match=r"train_e\.npz, \.\.\. \(6 in all\), not named train_N\.npz"):
        load_split(SHARDS, "train", tmp_path)


def test_the_cifar_10_batches_py_folder_itself_can_be_passed(tmp_path, monkeypatch):
    """`--data .../cifar-10-batches-py` reads CIFAR-10 from the folder above it, as torchvision's root."""
    data = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)

    class FakeCIFAR10:  # the arrays torchvision would load, found only where its root holds the folder
        def __init__(self, root, train=True, download=False):
            if not (tmp_path / "cifar-10-batches-py").samefile(f"{root}/cifar-10-batches-py"):
                raise RuntimeError("Dataset not found or corrupted")
            self.data, self.targets = data, [0, 1, 2, 3]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    (tmp_path / "cifar-10-batches-py").mkdir()
    got = load_split(DataSpec(dataset="cifar10"), "test", tmp_path / "cifar-10-batches-py")
    assert torch.equal(got.images, torch.from_numpy(data).permute(0, 3, 1, 2))


# ---------------------------------------------------------------- prepare.py: resizing, levels


def test_resized_values_are_rounded_to_the_nearest_not_truncated():
    """The resized images are rounded: on average they match Pillow's (truncation is half a level low)."""
    array = np.random.default_rng(0).integers(0, 256, (40, 60), dtype=np.uint8)
    got = resize_crop(torch.from_numpy(array)[None, None], 16, 24)[0, 0].numpy().astype(float)
    expected = np.array(Image.fromarray(array).resize((24, 16), Image.BILINEAR)).astype(float)
    assert abs((got - expected).mean()) < 0.1


def test_the_scaled_long_side_is_rounded_to_keep_the_aspect_ratio():
    """30x70 covering 20x20 is scaled to 20x47 (70 * 2/3 = 46.7, rounded), then its centre is cut out."""
    array = np.random.default_rng(1).integers(0, 256, (30, 70), dtype=np.uint8)
    got = resize_crop(torch.from_numpy(array)[None, None], 20, 20)[0, 0].numpy().astype(int)
    expected = np.array(Image.fromarray(array).resize((47, 20), Image.BILINEAR))[:, 14:34]
    assert np.abs(got - expected).max() <= 1


def test_a_spec_of_one_level_more_than_the_data_is_refused():
    """The digits have 17 levels: a spec of 18 is refused (the colour depth cannot be raised)."""
    with pytest.raises(UserError, match=r"the images have 17 levels .* but the spec says 18"):
        load_split(DataSpec(dataset="digits", shape=(1, 8, 8), levels=18), "train")


def test_a_value_equal_to_the_levels_is_refused_without_convert_depth(tmp_path):
    """Values must be below `levels`: one equal to it is out of range."""
    images = np.zeros((4, 2, 2), np.uint8)
    images[2, 1, 1] = 16
    with pytest.raises(UserError, match=r"values up to 16 but the spec says 16 levels"):
        load_split(_npy(tmp_path, images, shape=(1, 2, 2), levels=16), "train")


# ---------------------------------------------------------------- images.py: folders and decoded images


def test_a_hidden_folder_beside_the_classes_is_not_a_class(tmp_path):
    """`.cache/` beside `cat/` and `dog/` holds no class, however many images it has."""
    for name in ("cat", "dog", ".cache"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / name / "0.png")
    files, labels, classes = image_files.list_folder(tmp_path)
    assert classes == ("cat", "dog") and labels.tolist() == [0, 1] and len(files) == 2


def test_an_empty_folder_is_a_user_error(tmp_path):
    """A folder with neither images nor subfolders says it holds no images."""
    with pytest.raises(UserError, match=r"no images in .*: expected \.png"):
        image_files.list_folder(tmp_path)


def test_a_palette_png_with_transparency_keeps_its_alpha_for_four_channels(tmp_path):
    """A palette image with a transparent colour converts to RGBA: a 4-channel spec keeps its alpha."""
    image = Image.new("P", (4, 4))
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    image.putpixel((1, 2), 1)
    image.info["transparency"] = 0
    data = DataSpec(dataset="folder", shape=(4, 4, 4), convert=("mode",))
    got = image_files.image_tensor(image, data, "x.png")[0]
    expected = np.array(image.convert("RGBA")).transpose(2, 0, 1)
    assert np.array_equal(got.numpy(), expected) and got[3].tolist()[2][1] == 255


@pytest.mark.parametrize("value", [65536, -1])
def test_an_integer_image_beyond_sixteen_bits_is_refused(value):
    """A 32-bit integer image with a value out of 0..65535 is refused, not wrapped into uint8."""
    image = Image.fromarray(np.array([[0, value], [7, 9]], np.int32), "I")
    data = DataSpec(dataset="folder", shape=(1, 2, 2), convert=("depth",))
    with pytest.raises(UserError, match=r"x\.png: a I image with values outside 16 bits"):
        image_files.image_tensor(image, data, "x.png")


# ---------------------------------------------------------------- arrays.py: array files


def test_an_npy_one_byte_short_is_refused(tmp_path):
    """A file shorter than its header says by a single byte is truncated."""
    data = _npy(tmp_path, np.zeros((4, 2, 2, 1), np.uint8), shape=(1, 2, 2))
    path = tmp_path / "train.npy"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(UserError, match=r"train\.npy is truncated"):
        load_split(data, "train")


def test_a_fortran_ordered_array_is_refused(tmp_path):
    """An array stored in Fortran order would be read scrambled in place: it is refused."""
    data = _npy(tmp_path, np.asfortranarray(np.zeros((4, 2, 2, 1), np.uint8)), shape=(1, 2, 2))
    with pytest.raises(UserError, match=r"stored in Fortran order"):
        load_split(data, "train")


def test_the_first_image_key_present_is_read(tmp_path):
    """An .npz with `x` and `images` is read from `x` (keys in the order x, data, images)."""
    x = np.ones((4, 2, 2), np.uint8)
    np.savez(tmp_path / "train.npz", images=np.zeros((4, 2, 2), np.uint8), x=x, y=np.arange(4))
    np.savez(tmp_path / "test.npz", x=x, y=np.arange(4))
    train = load_split(DataSpec(dataset="npy", path=str(tmp_path), shape=(1, 2, 2)), "train")
    assert int(train.images.min()) == 1


def test_an_rgba_array_converts_to_rgb(tmp_path):
    """A channels-last array of 4 channels (RGBA) is read as images to convert, alpha dropped."""
    rgba = np.random.default_rng(0).integers(0, 256, (3, 5, 5, 4), dtype=np.uint8)
    train = load_split(_npy(tmp_path, rgba, shape=(3, 5, 5), convert=("mode",)), "train")
    assert torch.equal(train.images, torch.from_numpy(rgba[..., :3]).permute(0, 3, 1, 2))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([0, -1, 2, 3]), "labels must be 0 or more, got -1"),
        (np.ones(4, complex), "labels must be integers"),
    ],
)
def test_negative_and_complex_labels_are_refused(tmp_path, labels, message):
    """Labels are whole numbers from 0: a -1 or a complex array is refused naming the file."""
    np.savez(tmp_path / "train.npz", x=np.zeros((4, 2, 2), np.uint8), y=labels)
    data = DataSpec(dataset="npy", path=str(tmp_path / "train.npz"), shape=(1, 2, 2), test_split=1)
    with pytest.raises(UserError, match=rf"train\.npz \(array `y`\): {message}"):
        load_split(data, "train")


# ---------------------------------------------------------------- sources.py: which files, the cache's key


def test_npy_train_arrays_are_read_in_number_order(tmp_path):
    """train_2.npy comes before train_10.npy (by number, not by name)."""
    for n in (10, 2):
        np.save(tmp_path / f"train_{n}.npy", np.full((2, 2, 2, 1), n, np.uint8))
    np.save(tmp_path / "test.npy", np.zeros((2, 2, 2, 1), np.uint8))
    train = load_split(DataSpec(dataset="npy", path=str(tmp_path), shape=(1, 2, 2)), "train")
    assert train.images[:, 0, 0, 0].tolist() == [2, 2, 10, 10]


def test_a_valid_folder_beside_train_is_the_test_split(tmp_path):
    """`train/` and `valid/` are a split layout (as `test/` and `val/`), not two classes."""
    for split in ("train", "valid"):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (4, 4), (9, 9, 9) if split == "valid" else (0, 0, 0)).save(
                tmp_path / split / name / "0.png"
            )
    data = DataSpec(dataset="folder", path=str(tmp_path), shape=(3, 4, 4))
    train, test = load_split(data, "train"), load_split(data, "test")
    assert train.labels.tolist() == test.labels.tolist() == [0, 1]
    assert int(train.images.max()) == 0 and int(test.images.min()) == 9


def test_an_npy_pair_of_another_shape_or_depth_is_prepared_not_used_in_place(tmp_path):
    """An .npy pair is used as it is only when it already has the spec's shape and 256 levels: one to
    resize, or to reduce in depth, goes through the preparation."""
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 1), dtype=np.uint8)
    small = load_split(_npy(tmp_path, images, shape=(1, 2, 2), convert=("size",)), "train")
    assert small.images.shape == (3, 1, 2, 2)
    reduced = load_split(_npy(tmp_path, images, shape=(1, 4, 4), levels=16, convert=("depth",)), "train")
    assert torch.equal(reduced.images, torch.from_numpy(images // 16).permute(0, 3, 1, 2))


def test_a_change_of_convert_alone_is_never_served_from_the_old_cache(tmp_path):
    """The cache is keyed by `convert` too: the same files without `convert depth` are refused, not served
    the images reduced for the other spec."""
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 1), dtype=np.uint8)
    data = _npy(tmp_path, images, shape=(1, 4, 4), levels=16, convert=("depth",))
    assert int(load_split(data, "train").images.max()) < 16
    with pytest.raises(UserError, match=r"values up to \d+ but the spec says 16 levels"):
        load_split(data.model_copy(update={"convert": ()}), "train")


def test_two_data_sets_of_one_spec_get_a_cache_each(tmp_path, capsys):
    """The cache's name holds its source files: two folders prepared alike in one cache folder get two
    caches, and going back to the first one prepares nothing again."""
    spec = DataSpec(dataset="npy", shape=(1, 2, 2), levels=16, convert=("depth",))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        _npy(tmp_path / name, np.full((2, 2, 2, 1), ord(name), np.uint8), shape=(1, 2, 2))
    for name in ("a", "b", "a"):
        load_split(spec.model_copy(update={"path": str(tmp_path / name)}), "train")
    assert capsys.readouterr().err.count("preparing") == 2
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2


def test_a_number_is_a_position_unless_every_subfolder_is_a_number(tmp_path):
    """Of the subfolders `1/` and `cat/`, class 0 is the first (a position: `0/` is no subfolder and not
    every subfolder is named by a number)."""
    for split in ("train", "test"):
        for value, name in ((10, "1"), (20, "cat")):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("L", (2, 2), value).save(tmp_path / split / name / "0.png")
    data = DataSpec(dataset="folder", path=str(tmp_path), shape=(1, 2, 2), classes=(0,))
    assert set(load_split(data, "train").images.flatten().tolist()) == {10}


def test_a_class_index_one_past_the_last_is_refused_naming_the_range(tmp_path):
    """Of two subfolders, class 2 does not exist: the message gives the indices 0 to 1."""
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        Image.new("L", (2, 2)).save(tmp_path / name / "0.png")
    data = DataSpec(dataset="folder", path=str(tmp_path), shape=(1, 2, 2), test_split=1, classes=(2,))
    with pytest.raises(UserError, match=r"has no class 2: its 2 classes are 0 to 1 \(cat, dog\)"):
        load_split(data, "train")


def test_a_test_split_of_every_image_leaves_no_training_images(tmp_path):
    """`test_split N` of N images is refused as leaving no training images."""
    np.save(tmp_path / "train.npy", np.zeros((4, 2, 2, 1), np.uint8))
    data = DataSpec(dataset="npy", path=str(tmp_path / "train.npy"), shape=(1, 2, 2), test_split=4)
    with pytest.raises(UserError, match=r"test_split 4 of the 4 images in .* leaves no training images"):
        load_split(data, "train")


def test_test_split_beside_a_test_set_is_refused(tmp_path):
    """A source with test arrays and `test_split` too: the split would be silently ignored."""
    data = _npy(tmp_path, np.zeros((4, 2, 2, 1), np.uint8), shape=(1, 2, 2), test_split=1)
    with pytest.raises(UserError, match=r"has a test split: remove test_split"):
        load_split(data, "train")


def test_classes_with_test_images_only_leave_no_training_images(tmp_path):
    """A class found only in the test arrays is refused for training, not served as an empty set."""
    np.savez(tmp_path / "train.npz", x=np.zeros((4, 2, 2), np.uint8), y=np.array([0, 1, 0, 1]))
    np.savez(tmp_path / "test.npz", x=np.zeros((2, 2, 2), np.uint8), y=np.array([3, 3]))
    data = DataSpec(dataset="npy", path=str(tmp_path), shape=(1, 2, 2), classes=(3,))
    with pytest.raises(UserError, match=r"no training images of classes \[3\] in "):
        load_split(data, "train")


class Splits(torchvision.datasets.VisionDataset):
    """A torchvision dataset of splits "train" and "val" (no "test"): grey 2x2 images of its split's value."""

    def __init__(self, root, split="train", download=False):
        if split not in ("train", "val"):
            raise ValueError(f"Unknown split '{split}'")
        super().__init__(root)
        self.value, self.targets = (1 if split == "train" else 2), [0, 0, 0]

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return Image.new("L", (2, 2), self.value), 0


def test_a_torchvision_dataset_without_a_test_split_is_tested_on_val(tmp_path, monkeypatch):
    """`split="test"` refused, the test images are those of `split="val"`."""
    monkeypatch.setattr(torchvision.datasets, "Splits", Splits, raising=False)
    data = DataSpec(dataset="torchvision", name="Splits", path=str(tmp_path), shape=(1, 2, 2))
    assert int(load_split(data, "test").images.max()) == 2


class Unlabelled(Splits):
    """`Splits` without labels."""

    def __init__(self, root, split="train", download=False):
        super().__init__(root, split, download)
        del self.targets


def test_classes_of_a_torchvision_dataset_without_labels_are_refused(tmp_path, monkeypatch):
    """Without labels to select by, `classes 0` is refused, not read as every image (all labelled 0)."""
    monkeypatch.setattr(torchvision.datasets, "Unlabelled", Unlabelled, raising=False)
    data = DataSpec(
        dataset="torchvision", name="Unlabelled", path=str(tmp_path), shape=(1, 2, 2), classes=(0,)
    )
    with pytest.raises(UserError, match=r"no class labels to select classes by"):
        load_split(data, "train")


def test_a_cache_inside_a_torchvision_root_is_not_one_of_its_files(tmp_path, monkeypatch, capsys):
    """FLOWSPEC_CACHE_DIR=ROOT/.flowspec-cache: the cache's own files are not sources whose change
    rebuilds it (it would be rebuilt at every use)."""
    monkeypatch.setattr(torchvision.datasets, "Splits", Splits, raising=False)
    monkeypatch.setenv("FLOWSPEC_CACHE_DIR", str(tmp_path / ".flowspec-cache"))
    data = DataSpec(dataset="torchvision", name="Splits", path=str(tmp_path), shape=(1, 2, 2))
    for _ in range(2):
        load_split(data, "train")
    assert capsys.readouterr().err.count("preparing") == 1


def test_a_class_filter_reads_each_array_file_at_its_own_place(tmp_path):
    """The second train array's images are kept by their own labels, not by the first one's."""
    np.savez(tmp_path / "train_1.npz", x=np.zeros((2, 2, 2), np.uint8), y=np.array([0, 0]))
    np.savez(tmp_path / "train_2.npz", x=np.full((2, 2, 2), 5, np.uint8), y=np.array([1, 1]))
    np.savez(tmp_path / "test.npz", x=np.zeros((2, 2, 2), np.uint8), y=np.array([1, 1]))
    train = load_split(DataSpec(dataset="npy", path=str(tmp_path), shape=(1, 2, 2), classes=(1,)), "train")
    assert train.labels.tolist() == [1, 1] and int(train.images.min()) == 5


def test_arrays_named_neither_train_nor_test_are_the_training_set(tmp_path):
    """A folder of `a.npy` and `b.npy`: both are the training set (with test_split for the test set)."""
    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", np.zeros((3, 2, 2, 1), np.uint8))
    data = DataSpec(dataset="npy", path=str(tmp_path), shape=(1, 2, 2), test_split=2)
    assert len(load_split(data, "train")) == 4


def test_a_test_path_folder_of_npz_arrays_is_read(tmp_path):
    """`test_path` naming a folder reads its `.npz` arrays as well as its `.npy` ones."""
    np.save(tmp_path / "train.npy", np.zeros((4, 2, 2, 1), np.uint8))
    (tmp_path / "held").mkdir()
    np.savez(tmp_path / "held" / "part.npz", x=np.ones((3, 2, 2), np.uint8))
    data = DataSpec(dataset="npy", path=str(tmp_path / "train.npy"), test_path=str(tmp_path / "held"),
                    shape=(1, 2, 2))  # fmt: skip
    assert len(load_split(data, "test")) == 3


def test_downsampled_imagenet_batches_in_subfolders_are_found(tmp_path):
    """`train_data_batch_*.npz` and `val_data.npz` one folder down (as Imagenet32_train/, _val/ unpack)."""
    for sub, name, n in (("Imagenet32_train", "train_data_batch_1", 3), ("Imagenet32_val", "val_data", 2)):
        (tmp_path / sub).mkdir()
        np.savez(tmp_path / sub / f"{name}.npz", data=np.zeros((n, 12), np.uint8), labels=np.ones(n, int))
    data = DataSpec(dataset="imagenet", path=str(tmp_path), shape=(3, 2, 2))
    assert (len(load_split(data, "train")), len(load_split(data, "test"))) == (3, 2)


# ---------------------------------------------------------------- datacache.py: the prepared-data cache


def test_a_cache_whose_meta_lists_no_files_is_rebuilt(tmp_path, capsys):
    """A meta.json with no written files checks nothing: the cache is rebuilt, not trusted."""
    import json

    data = _reduced(tmp_path)
    load_split(data, "train")
    folder = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps(meta | {"files": {}}))
    (folder / "train.npy").unlink()
    capsys.readouterr()
    assert len(load_split(data, "train")) == 4 and "prepared 4 train" in capsys.readouterr().err


def test_a_cache_built_while_waiting_for_the_lock_is_used_not_built_again(tmp_path, monkeypatch, capsys):
    """The cache is looked at again once the lock is held: another process may have built it meanwhile
    (here: the first look says not built, as before another process finished)."""
    from flowspec.train import datacache

    data = _reduced(tmp_path)
    load_split(data, "train")
    looks = []
    current = datacache._current
    monkeypatch.setattr(
        datacache, "_current", lambda *args: bool(looks.append(1) or len(looks) > 1) and current(*args)
    )
    capsys.readouterr()
    load_split(data, "train")
    assert len(looks) == 2 and "preparing" not in capsys.readouterr().err


def test_the_lock_file_is_left_empty_after_a_build(tmp_path):
    """The builder's line in the lock file is removed when it is done: no later reader names a process
    that is gone."""
    data = _reduced(tmp_path)
    load_split(data, "train")
    locks = list((tmp_path / "cache").glob("*.lock"))
    assert len(locks) == 1 and locks[0].read_text() == ""


# ---------------------------------------------------------------- caches.py: `flowspec cache`


def test_the_old_folder_a_killed_replacement_left_is_an_unfinished_build_of_any_data(tmp_path):
    """`NAME.tmp-PID-old` (a cache set aside while its rebuild was renamed in) is listed as unfinished, as
    `NAME.tmp-PID` is, also among the caches of a given data folder."""
    from flowspec.train import caches

    root = tmp_path / "cache"
    for name in ("0123456789abcdef0123.tmp-7", "0123456789abcdef0123.tmp-7-old"):
        (root / name).mkdir(parents=True)
    for of in (None, tmp_path / "data"):
        found = caches.find(root, of)
        assert [(c.name, c.state) for c in found] == [
            ("0123456789abcdef0123.tmp-7", caches.UNFINISHED_BUILD),
            ("0123456789abcdef0123.tmp-7-old", caches.UNFINISHED_BUILD),
        ]


def test_a_cache_of_which_one_source_file_is_gone_can_never_be_used(tmp_path):
    """Its train file there, its test file deleted: the cache's sources are gone."""
    from flowspec.train import caches, datacache

    data = _reduced(tmp_path)
    load_split(data, "train")
    datacache.release_reads()
    (tmp_path / "test.npy").unlink()
    assert [c.state for c in caches.find(tmp_path / "cache")] == [caches.SOURCES_GONE]


def test_a_caches_last_use_is_its_use_files_time_not_its_build(tmp_path, monkeypatch, capsys):
    """`last used` is the modification time of `NAME.use` (touched at each read), not of meta.json, in
    the cache's record and in the table `flowspec cache` prints."""
    import os

    from flowspec.cli.app import run
    from flowspec.train import caches, datacache

    monkeypatch.setenv("COLUMNS", "200")
    data = _reduced(tmp_path)
    load_split(data, "train")
    datacache.release_reads()
    (use,) = (tmp_path / "cache").glob("*.use")
    os.utime(use, (1e9, 1e9))  # 2001-09-09
    (cache,) = caches.find(tmp_path / "cache")
    assert cache.used == 1e9 and cache.built != 1e9
    assert run(["cache", str(tmp_path / "cache")]) == 0
    assert "2001-09-0" in capsys.readouterr().out


def test_cache_all_says_how_much_it_freed(tmp_path, capsys):
    """`flowspec cache --all` adds up the sizes of the caches it removed."""
    from flowspec.cli.app import run
    from flowspec.train import datacache

    data = _reduced(tmp_path)
    load_split(data, "train")
    datacache.release_reads()
    assert run(["cache", str(tmp_path / "cache"), "--all"]) == 0
    freed = capsys.readouterr().out.splitlines()[-1]
    assert freed.startswith("freed ") and freed != "freed 0 B"


# ---------------------------------------------------------------- batches.py and stream.py


def test_a_set_of_exactly_the_memory_budget_is_kept_in_memory(tmp_path):
    """The budget is inclusive: 300 bytes of images with a budget of 300 are trained on from memory."""
    from flowspec.spec import TrainSpec
    from flowspec.train.batches import BatchStream, training_batches
    from flowspec.train.distributed import Dist

    train_set = load_split(_npy(tmp_path, np.zeros((50, 2, 3, 1), np.uint8), shape=(1, 2, 3)), "train")
    assert train_set.file is not None and train_set.images.numel() == 300
    chosen = training_batches(train_set, TrainSpec(batch=8, seed=0), Dist(), torch.device("cpu"), memory=300)
    assert isinstance(chosen, BatchStream)


def test_one_image_fewer_than_a_batch_is_refused():
    """7 training images cannot make a batch of 8; the largest they make is named, one that the processes
    and micro-batches share (none: more images)."""
    from flowspec.train.batches import check_batch

    check_batch(8, 1, 8)
    with pytest.raises(UserError, match=r"the training set has 7 images, fewer than one batch \(8\)"):
        check_batch(8, 1, 7)
    with pytest.raises(UserError, match=r"\(8\): lower the batch to 4 or fewer \(--set train.batch=4\), or "):
        check_batch(8, 2, 7, accumulate=2)
    with pytest.raises(UserError, match=r"^s.flow: the training set has 7 images, .*: train on more images$"):
        check_batch(8, 4, 7, accumulate=2, spec="s.flow")


def test_a_seeds_next_epoch_is_not_the_next_seeds_first():
    """Epoch 1 of seed 0 and epoch 0 of seed 1 visit the images in different orders (a seed + epoch
    generator seed would make them one)."""
    from flowspec.train.batches import BatchOrder

    assert not torch.equal(BatchOrder(64, 8, seed=0).indices(1), BatchOrder(64, 8, seed=1).indices(0))


def test_each_rank_draws_its_own_flips():
    """With hflip, the two ranks' flips of an epoch are drawn apart (seeded with the rank), not alike."""
    from flowspec.train.batches import BatchOrder

    ranks = [BatchOrder(64, 16, seed=0, rank=r, world=2, hflip=True).flips(0) for r in (0, 1)]
    assert not torch.equal(*ranks)


def test_half_the_images_are_flipped():
    """hflip flips each image with probability 1/2."""
    from flowspec.train.batches import BatchOrder

    flips = BatchOrder(4096, 64, seed=0, hflip=True).flips(0)
    assert 0.47 < flips.float().mean() < 0.53


def _streamed(tmp_path):
    """50 distinct images of 1x2x3 as a memory-mapped set, and its stream (batches of 8, no workers)."""
    from flowspec.train.stream import StreamingBatches

    images = (np.arange(50)[:, None, None, None] * 4 + np.arange(6).reshape(1, 2, 3, 1)) % 256
    train_set = load_split(_npy(tmp_path, images.astype(np.uint8), shape=(1, 2, 3)), "train")
    return StreamingBatches(train_set.file, batch=8, seed=0, workers=0)


def test_a_loaded_position_restarts_the_streams_reading(tmp_path):
    """`load_state_dict` on a stream already reading: the next batch is the one after the loaded position,
    not the one after those already read."""
    stream = _streamed(tmp_path)
    first = next(stream)
    state = stream.state_dict()
    second = next(stream)
    next(stream)
    stream.load_state_dict(state)
    assert torch.equal(next(stream), second) and not torch.equal(first, second)


def test_a_file_truncated_while_streamed_is_an_error(tmp_path):
    """A read that comes back short (the file cut after it was opened) raises, not a batch of zeros."""
    stream = _streamed(tmp_path)
    path = tmp_path / "train.npy"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(OSError, match=r"train\.npy was truncated while it was read"):
        for _ in range(6):  # a whole epoch: some batch reads past the end
            next(stream)
