"""Tests for the classification data: the ImageNet-folder and CIFAR-10 loaders on generated
fixtures, their transforms, and the errors for missing or malformed data."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from experiments.classification import datasets, input_pipeline, transforms
from experiments.classification.configs import default as default_config


def _write_image(path, size, color):
    from PIL import Image

    rng = np.random.default_rng(abs(hash(path)) % 2**32)
    pixels = np.clip(rng.normal(color, 20, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def image_folder(tmp_path):
    """train/{cat,dog}/ and val/{cat,dog}/ with JPEG and PNG files of assorted sizes."""
    colors = {"cat": 40, "dog": 210}
    sizes = [(37, 29), (20, 44), (64, 48)]
    for split, count in (("train", 3), ("val", 2)):
        for name, color in colors.items():
            os.makedirs(tmp_path / split / name)
            for i in range(count):
                ext = ".JPEG" if i % 2 == 0 else ".png"
                _write_image(str(tmp_path / split / name / f"{i}{ext}"), sizes[i], color)
    (tmp_path / "train" / "cat" / "readme.txt").write_text("not an image")
    return tmp_path


def test_image_folder_loader(image_folder):
    dataset = datasets.load_image_folder(str(image_folder), image_size=16)
    info = dataset.info
    assert info.class_names == ("cat", "dog") and info.num_classes == 2
    # The validation split: 2 of the 6 training files (one per class); test: val/.
    assert (info.num_train, info.num_validation, info.num_test) == (4, 2, 4)
    np.testing.assert_array_equal(dataset.validation_source.labels, [0, 1])
    assert not set(dataset.validation_source.files) & set(dataset.train_source.files)
    loader = input_pipeline.train_loader(dataset, batch_size=4, seed=3)
    iterator = iter(loader)
    first = next(iterator)
    assert first["image"].shape == (4, 16, 16, 3) and first["image"].dtype == np.uint8
    # Colour identifies the class: dark = cat (0), bright = dog (1).
    brightness = first["image"].reshape(4, -1).mean(1)
    np.testing.assert_array_equal(first["label"], (brightness > 125).astype(np.int32))
    state = iterator.get_state()
    second = next(iterator)
    again = iter(loader)
    again.set_state(state)  # Resume at the same data position.
    np.testing.assert_array_equal(next(again)["image"], second["image"])
    # Same seed, same stream; another seed, another order or crop.
    np.testing.assert_array_equal(next(iter(loader))["image"], first["image"])
    other = next(iter(input_pipeline.train_loader(dataset, batch_size=4, seed=4)))
    assert not np.array_equal(other["image"], first["image"])

    batches = list(input_pipeline.eval_batches(dataset, "test", batch_size=3))
    assert len(batches) == 2
    np.testing.assert_array_equal(np.concatenate([b["mask"] for b in batches]), [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(batches[0]["label"], [0, 0, 1])
    assert batches[0]["image"].shape == (3, 16, 16, 3)


def test_resize_center_crop_geometry():
    from PIL import Image

    array = np.zeros((40, 80, 3), np.uint8)
    array[:, 35:45] = 255  # A bright vertical bar in the middle.
    out = transforms.ResizeCenterCrop(14, 0.875).map({"image": Image.fromarray(array), "label": 0})
    assert out["image"].shape == (14, 14, 3)
    # Short side 40 -> 16, so the 80-wide image becomes 32 wide; the bar (scaled to 4
    # px) stays centred, and the crop drops 1 px top and bottom.
    column_means = out["image"][..., 0].mean(0)
    assert column_means[5:9].min() > 200 and column_means[:3].max() < 30 and column_means[-3:].max() < 30


def _cifar_batch(rng, n, first_label):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [(first_label + i) % 10 for i in range(n)]  # Over the 5 batches: 3 per class.
    return {b"batch_label": b"x", b"labels": labels, b"data": data, b"filenames": [b"f"] * n}


@pytest.fixture
def cifar_dir(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = {}
    for i, name in enumerate(datasets.CIFAR10_TRAIN_FILES + (datasets.CIFAR10_TEST_FILE,)):
        batches[name] = _cifar_batch(rng, 6, 6 * i)
        with open(root / name, "wb") as f:
            pickle.dump(batches[name], f)
    return tmp_path, batches


def test_cifar10_loader(cifar_dir):
    parent, batches = cifar_dir
    # The parent directory also works. 12 of the 30 training images are held out.
    dataset = datasets.load_cifar10(str(parent), validation_fraction=0.4)
    info = dataset.info
    assert (info.num_train, info.num_validation, info.num_test, info.in_chans) == (18, 12, 6, 3)
    record = dataset.test_source[4]
    raw = batches["test_batch"][b"data"][4]
    # Row-major 1024 red, then green, then blue values per image.
    np.testing.assert_array_equal(record["image"][2, 7], raw[[2 * 32 + 7, 1024 + 2 * 32 + 7, 2048 + 2 * 32 + 7]])
    assert record["label"] == batches["test_batch"][b"labels"][4]
    train_labels = np.concatenate([batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)])
    train_images = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    held = dataset.split["pool_positions"]["validation"]
    kept = np.setdiff1d(np.arange(30), held)
    np.testing.assert_array_equal(dataset.validation_source.labels, train_labels[held])
    np.testing.assert_array_equal(dataset.train_source.labels, train_labels[kept])
    np.testing.assert_array_equal(dataset.train_source.images.transpose(0, 3, 1, 2).reshape(18, -1),
                                  train_images[kept])
    assert dataset.split["pool_positions"]["test"] is None  # The official test batch.
    batch = next(iter(input_pipeline.train_loader(dataset, batch_size=5, seed=0)))
    assert batch["image"].shape == (5, 32, 32, 3) and batch["image"].dtype == np.uint8




def test_missing_or_malformed_data_raise_clear_errors(tmp_path, cifar_dir, image_folder):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        datasets.load_cifar10(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        datasets.load_image_folder(missing)
    with pytest.raises(ValueError, match="data_dir"):
        datasets.load_cifar10("")

    parent, _ = cifar_dir
    root = parent / "cifar-10-batches-py"
    os.remove(root / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        datasets.load_cifar10(str(root))
    (root / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="data_batch_3.*not a CIFAR-10"):
        datasets.load_cifar10(str(root))
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"data_batch_3.*\(N, 3072\)"):
        datasets.load_cifar10(str(root))
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump(os.getcwd, f)  # Code, not data: must not be loaded.
    with pytest.raises(ValueError, match="refusing"):
        datasets.load_cifar10(str(root))

    os.makedirs(image_folder / "val" / "bird")
    with pytest.raises(ValueError, match="bird"):
        datasets.load_image_folder(str(image_folder))
    os.rmdir(image_folder / "val" / "bird")
    os.makedirs(image_folder / "train" / "empty_class")
    with pytest.raises(ValueError, match="empty_class"):
        datasets.load_image_folder(str(image_folder))
    os.rmdir(image_folder / "train" / "empty_class")
    (image_folder / "train" / "dog" / "9.JPEG").write_bytes(b"garbage")
    dataset = datasets.load_image_folder(str(image_folder), check_images=False)
    broken = dataset.train_source.files.index(str(image_folder / "train" / "dog" / "9.JPEG"))
    with pytest.raises(ValueError, match="9.JPEG"):
        dataset.train_source[broken]
    empty_root = tmp_path / "flat"
    (empty_root / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class sub-directories"):
        datasets.load_image_folder(str(empty_root))

    config = default_config.get_config()
    config.dataset = "svhn"
    with pytest.raises(ValueError, match="dataset must be one of"):
        datasets.get_dataset(config)


