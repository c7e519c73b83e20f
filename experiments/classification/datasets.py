"""Classification datasets: digits, CIFAR-10 and ImageNet-style folders.

A `Dataset` is the `DatasetInfo`, random-access sources of records
`{"image": uint8 (H, W, C), "label": int32}` (see `sources.py`) and the train and
eval transforms (see `transforms.py`); `input_pipeline.py` turns it into loaders.
Images stay uint8 on the host; `transforms.normalize` maps them to floats on the
device.

Datasets (`config.dataset`):
    "digits": scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels, shipped
        inside scikit-learn), a fixed stratified split (seed 0: 1,437 train, 360 test),
        upsampled to `image_size` with bilinear interpolation. Train augmentation:
        random shifts of up to `digits_max_shift` pixels (zero fill).
    "cifar10": the python-pickle batches (`data_batch_1`..`5`, `test_batch`) from
        `config.data_dir` (the `cifar-10-batches-py` directory or its parent). Train
        augmentation: zero-pad 4 + random 32x32 crop + horizontal flip.
    "imagenet" (any folder dataset): `data_dir/train/<class>/*.JPEG` and
        `data_dir/val/<class>/*.JPEG`. Train: RandomResizedCrop(scale (0.08, 1),
        ratio (3/4, 4/3)) + horizontal flip, bicubic; eval: bicubic resize of the
        shorter side to `image_size / crop_pct`, then a centre crop (crop_pct 0.875).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional, Sequence

import grain.python as grain
import numpy as np

from experiments.classification.sources import (
    ArraySource,
    ImageFileSource,
    check_image_files,
    read_cifar_batch,
    scan_image_folder,
)
from experiments.classification.transforms import PadCropFlip, RandomResizedCropFlip, ResizeCenterCrop
from experiments.common.errors import BadDataError

CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset.

    Attributes:
        name: Dataset name.
        num_classes: Number of labels; labels are in [0, num_classes).
        image_size: Side of the square model input, in pixels.
        in_chans: Image channels (1 or 3).
        num_train: Training examples.
        num_eval: Evaluation examples.
        mean: Per-channel mean of images scaled to [0, 1], for `normalize`.
        std: Per-channel standard deviation of images scaled to [0, 1].
        class_names: Label names, index = label.
    """

    name: str
    num_classes: int
    image_size: int
    in_chans: int
    num_train: int
    num_eval: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()


@dataclasses.dataclass
class Dataset:
    """A dataset ready for the loaders.

    Attributes:
        info: The `DatasetInfo`.
        train_source: Random-access source of training records.
        eval_source: Random-access source of evaluation records.
        train_transform: Random augmentation for training records (or None).
        eval_transform: Deterministic preprocessing for evaluation records (or None).
    """

    info: DatasetInfo
    train_source: Any
    eval_source: Any
    train_transform: Optional[grain.RandomMapTransform]
    eval_transform: Optional[grain.MapTransform]


def _mean_std(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.astype(np.float64) / 255.0
    axes = tuple(range(x.ndim - 1))
    return tuple(float(v) for v in x.mean(axes)), tuple(float(v) for v in x.std(axes))


def load_digits(
    image_size: int = 16,
    *,
    max_shift: int = 1,
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> Dataset:
    """scikit-learn's handwritten digits (1,797 8x8 images, 10 classes) with a fixed split.

    Args:
        image_size: Model input side (>= 8); the 8x8 images are upsampled with
            bilinear interpolation when larger.
        max_shift: Train augmentation: random translation by up to this many pixels.
        test_fraction: Fraction of the data in the (stratified) test split.
        split_seed: Seed of the split; keep 0 to compare with published numbers.

    Returns:
        A `Dataset` with uint8 (image_size, image_size, 1) images.
    """
    from PIL import Image
    from sklearn.datasets import load_digits as sklearn_load_digits
    from sklearn.model_selection import train_test_split

    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 for digits, got {image_size}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = sklearn_load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 grey levels
    if image_size != 8:
        images = np.stack(
            [
                np.asarray(Image.fromarray(im, "L").resize((image_size, image_size), Image.BILINEAR))
                for im in images
            ]
        )
    images = images[..., None]
    labels = digits.target.astype(np.int32)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=split_seed, stratify=labels
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    mean, std = _mean_std(images[train_idx])
    info = DatasetInfo(
        name="digits",
        num_classes=10,
        image_size=image_size,
        in_chans=1,
        num_train=len(train_idx),
        num_eval=len(test_idx),
        mean=mean,
        std=std,
        class_names=tuple(str(i) for i in range(10)),
    )
    return Dataset(
        info=info,
        train_source=ArraySource(images[train_idx], labels[train_idx]),
        eval_source=ArraySource(images[test_idx], labels[test_idx]),
        train_transform=PadCropFlip(max_shift, flip=False) if max_shift else None,
        eval_transform=None,
    )


def load_cifar10(data_dir: str, *, crop_padding: int = 4, flip: bool = True) -> Dataset:
    """CIFAR-10 from its python-pickle batches in a local directory.

    Args:
        data_dir: Directory holding `data_batch_1`..`data_batch_5` and `test_batch`, or
            a directory containing `cifar-10-batches-py/` with them.
        crop_padding: Train augmentation: zero padding before the random 32x32 crop.
        flip: Train augmentation: random horizontal flip.

    Returns:
        A `Dataset` with uint8 (32, 32, 3) images (50,000 train, 10,000 test).

    Raises:
        FileNotFoundError: The directory or one of the batch files is missing.
        ValueError: A batch file is not a CIFAR-10 pickle batch.
    """
    if not data_dir:
        raise ValueError("data_dir must name the CIFAR-10 directory (config.data_dir), got ''")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"CIFAR-10 data_dir {data_dir!r} does not exist or is not a directory")
    nested = os.path.join(data_dir, "cifar-10-batches-py")
    if not os.path.exists(os.path.join(data_dir, CIFAR10_TEST_FILE)) and os.path.isdir(nested):
        data_dir = nested
    needed = CIFAR10_TRAIN_FILES + (CIFAR10_TEST_FILE,)
    missing = [name for name in needed if not os.path.isfile(os.path.join(data_dir, name))]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 data_dir {data_dir!r} lacks {missing}; expected the python-pickle "
            f"batches {list(needed)} (from cifar-10-python.tar.gz)"
        )
    parts = [read_cifar_batch(os.path.join(data_dir, name)) for name in CIFAR10_TRAIN_FILES]
    train_images = np.concatenate([p[0] for p in parts])
    train_labels = np.concatenate([p[1] for p in parts])
    test_images, test_labels = read_cifar_batch(os.path.join(data_dir, CIFAR10_TEST_FILE))
    info = DatasetInfo(
        name="cifar10",
        num_classes=10,
        image_size=32,
        in_chans=3,
        num_train=len(train_labels),
        num_eval=len(test_labels),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        class_names=("airplane", "automobile", "bird", "cat", "deer",
                     "dog", "frog", "horse", "ship", "truck"),
    )
    return Dataset(
        info=info,
        train_source=ArraySource(train_images, train_labels),
        eval_source=ArraySource(test_images, test_labels),
        train_transform=PadCropFlip(crop_padding, flip) if (crop_padding or flip) else None,
        eval_transform=None,
    )


def _raise_for_bad_images(files: Sequence[str], data_dir: str, num_threads: int) -> None:
    bad = check_image_files(files, num_threads)
    if not bad:
        return
    for path, reason in bad:
        logging.error("cannot read image %s (%s)", path, reason)
    shown = ", ".join(path for path, _ in bad[:5])
    more = f" and {len(bad) - 5} more (all listed in the log above)" if len(bad) > 5 else ""
    raise BadDataError(
        f"{len(bad)} of {len(files)} image files under {data_dir} cannot be read: {shown}{more}. "
        "Replace or delete them (or set config.check_images=False to skip this check)."
    )


def load_image_folder(
    data_dir: str,
    image_size: int = 224,
    *,
    train_split: str = "train",
    eval_split: str = "val",
    crop_pct: float = 0.875,
    min_scale: float = 0.08,
    name: str = "imagenet",
    check_images: bool = True,
    num_threads: int = 4,
) -> Dataset:
    """An ImageNet-style folder dataset: `data_dir/<split>/<class>/<image>`.

    Class names are the sorted sub-directory names of the training split; labels are
    their indices. Files are decoded with PIL (RGB) when read.

    Args:
        data_dir: The dataset root.
        image_size: Model input side.
        train_split: Training sub-directory.
        eval_split: Evaluation sub-directory (its classes must exist in training).
        crop_pct: Evaluation centre-crop fraction (resize to image_size / crop_pct).
        min_scale: Smallest RandomResizedCrop area fraction.
        name: Dataset name for `DatasetInfo`.
        check_images: Decode every file of both splits first (`check_image_files`),
            so that a bad file stops the run before training, not mid-epoch.
        num_threads: Threads for the check.

    Returns:
        A `Dataset` with uint8 (image_size, image_size, 3) images.

    Raises:
        FileNotFoundError: `data_dir` or a split directory is missing.
        ValueError: The layout is wrong (no class directories, empty classes,
            evaluation classes unknown to training).
        BadDataError: `check_images` found files that cannot be read (all are
            logged; the message names the first five).
    """
    if not data_dir:
        raise ValueError("data_dir must name the image folder root (config.data_dir), got ''")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"image folder data_dir {data_dir!r} does not exist or is not a directory")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    train_files, train_labels, classes = scan_image_folder(os.path.join(data_dir, train_split))
    eval_files, eval_labels, _ = scan_image_folder(os.path.join(data_dir, eval_split), classes)
    if check_images:
        _raise_for_bad_images(train_files + eval_files, data_dir, num_threads)
    info = DatasetInfo(
        name=name,
        num_classes=len(classes),
        image_size=image_size,
        in_chans=3,
        num_train=len(train_files),
        num_eval=len(eval_files),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        class_names=tuple(classes),
    )
    return Dataset(
        info=info,
        train_source=ImageFileSource(train_files, train_labels),
        eval_source=ImageFileSource(eval_files, eval_labels),
        train_transform=RandomResizedCropFlip(image_size, scale=(min_scale, 1.0)),
        eval_transform=ResizeCenterCrop(image_size, crop_pct),
    )


DATASETS = ("digits", "cifar10", "imagenet")


def get_dataset(config) -> Dataset:
    """Builds the dataset named by `config.dataset` (see the module docstring).

    Args:
        config: The experiment config; reads `dataset`, `data_dir`, `image_size`,
            `digits_max_shift`, `crop_padding`, `crop_pct`, `min_scale`,
            `check_images`, `read_threads`.
    """
    if config.dataset == "digits":
        return load_digits(config.image_size, max_shift=config.digits_max_shift)
    if config.dataset == "cifar10":
        if config.image_size != 32:
            raise ValueError(f"image_size must be 32 for cifar10, got {config.image_size}")
        return load_cifar10(config.data_dir, crop_padding=config.crop_padding)
    if config.dataset == "imagenet":
        return load_image_folder(
            config.data_dir, config.image_size, crop_pct=config.crop_pct, min_scale=config.min_scale,
            check_images=config.check_images, num_threads=config.read_threads,
        )
    raise ValueError(f"dataset must be one of {DATASETS}, got {config.dataset!r}")
