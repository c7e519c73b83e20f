"""Input pipelines for image classification: digits, CIFAR-10 and ImageNet-style folders.

Every dataset is a grain random-access source of records
`{"image": uint8 (H, W, C), "label": int32}` plus a `DatasetInfo`. Loaders are
`grain.python.DataLoader`s:

* training: `IndexSampler` with seeded shuffling (a new permutation every epoch,
  infinite), the dataset's random augmentation as a `RandomMapTransform` (its
  per-record generator is derived from the seed and the record position, so the
  stream is reproducible), `Batch(drop_remainder=True)`; optional worker processes
  (`worker_count`). The iterator's `get_state()`/`set_state()` position goes into
  checkpoints.
* evaluation: the split in order, once, in batches padded to a fixed size with a
  `mask` (1 = real example), so one compiled eval step serves every batch and every
  host runs the same number of steps.

Images stay uint8 on the host; `normalize` maps them to floats on the device.

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
import hashlib
import io
import logging
import math
import os
import pickle
import sys
from typing import Any, Iterator, Optional, Sequence

import grain.python as grain
import numpy as np

from experiments.common.errors import BadDataError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
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


def normalize(images, info: DatasetInfo, dtype=None):
    """uint8 images (N, H, W, C) -> `(x / 255 - mean) / std` in `dtype` (default float32).

    Works on numpy and jax arrays (runs on the device inside the jitted step).
    """
    import jax.numpy as jnp

    x = jnp.asarray(images, jnp.float32) / 255.0
    x = (x - jnp.asarray(info.mean, jnp.float32)) / jnp.asarray(info.std, jnp.float32)
    return x.astype(dtype or jnp.float32)


# --------------------------------------------------------------------------- sources


class ArraySource:
    """A grain random-access source over in-memory arrays.

    Args:
        images: (N, H, W, C) uint8.
        labels: (N,) integer labels.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 with shape (N, H, W, C), got {images.dtype} {images.shape}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
        self.images = images
        self.labels = labels.astype(np.int32)
        self._fingerprint = None

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        # grain compares the source's repr when an iterator state is restored, so it
        # must identify the data, not the Python object.
        if self._fingerprint is None:
            digest = hashlib.sha256(self.images.tobytes())
            digest.update(self.labels.tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return f"ArraySource(images={self.images.shape}, sha256={self._fingerprint})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": self.labels[index]}


class ImageFileSource:
    """A grain random-access source that decodes image files with PIL (RGB uint8).

    Args:
        files: Image paths.
        labels: Integer label per path.
    """

    def __init__(self, files: Sequence[str], labels: Sequence[int]):
        if len(files) != len(labels):
            raise ValueError(f"files and labels must have equal length, got {len(files)} and {len(labels)}")
        self.files = list(files)
        self.labels = np.asarray(labels, np.int32)
        digest = hashlib.sha256("\n".join(self.files).encode())
        digest.update(self.labels.tobytes())
        self._fingerprint = digest.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        # Deterministic (see ArraySource.__repr__): the file list and labels.
        return f"ImageFileSource(files={len(self.files)}, sha256={self._fingerprint})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image, UnidentifiedImageError

        path = self.files[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
            image = Image.open(io.BytesIO(data))
            image = image.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise ValueError(f"cannot decode image file {path}: {err}") from err
        return {"image": image, "label": self.labels[index]}


# --------------------------------------------------------------------------- transforms
# Module-level classes, so that grain worker processes can unpickle them.


class PadCropFlip(grain.RandomMapTransform):
    """Zero-pad by `pad` pixels, random crop back to the input size, optional h-flip.

    Input and output: `{"image": uint8 (H, W, C), "label"}`.
    """

    def __init__(self, pad: int, flip: bool):
        self.pad, self.flip = int(pad), bool(flip)

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = element["image"]
        h, w = image.shape[:2]
        if self.pad:
            padded = np.pad(image, ((self.pad, self.pad), (self.pad, self.pad), (0, 0)))
            dy, dx = rng.integers(0, 2 * self.pad + 1, size=2)
            image = padded[dy : dy + h, dx : dx + w]
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return {"image": np.ascontiguousarray(image), "label": element["label"]}


class RandomResizedCropFlip(grain.RandomMapTransform):
    """Inception-style random-resized crop to `size` x `size` (bicubic) and h-flip.

    Input: `{"image": PIL.Image (RGB), "label"}`; output image: uint8 (size, size, 3).

    Args:
        size: Output side in pixels.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the crop aspect ratio (width / height), sampled log-uniformly.
        flip: Random horizontal flip with probability 0.5.
    """

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), flip=True):
        self.size, self.scale, self.ratio, self.flip = int(size), tuple(scale), tuple(ratio), flip

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """A random (x0, y0, w, h) box; ten tries, then the central crop with clamped ratio."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                x0 = int(rng.integers(0, width - w + 1))
                y0 = int(rng.integers(0, height - h + 1))
                return x0, y0, w, h
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        from PIL import Image

        image = element["image"]
        x0, y0, w, h = self.crop_box(image.width, image.height, rng)
        image = image.resize((self.size, self.size), Image.BICUBIC, box=(x0, y0, x0 + w, y0 + h))
        array = np.asarray(image, np.uint8)
        if self.flip and rng.random() < 0.5:
            array = array[:, ::-1]
        return {"image": np.ascontiguousarray(array), "label": element["label"]}


class ResizeCenterCrop(grain.MapTransform):
    """Bicubic resize of the shorter side to `floor(size / crop_pct)`, then a centre crop.

    Input: `{"image": PIL.Image (RGB), "label"}`; output image: uint8 (size, size, 3).
    """

    def __init__(self, size: int, crop_pct: float):
        self.size, self.crop_pct = int(size), float(crop_pct)

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        from PIL import Image

        image = element["image"]
        short = int(math.floor(self.size / self.crop_pct))
        scale = short / min(image.width, image.height)
        new_w = max(self.size, int(round(image.width * scale)))
        new_h = max(self.size, int(round(image.height * scale)))
        image = image.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        return {"image": np.asarray(image, np.uint8), "label": element["label"]}


# --------------------------------------------------------------------------- datasets


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


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (no arbitrary code)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        target = self._ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        import importlib

        return getattr(importlib.import_module(target[0]), target[1])


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is not a CIFAR-10 python pickle batch: {err}") from err
    if not isinstance(batch, dict):
        raise ValueError(f"{path} must hold a dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path} must have keys 'data' and 'labels', got {sorted(batch)}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise ValueError(
            f"{path}: 'data' must be uint8 with shape (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.shape != (data.shape[0],) or labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(
            f"{path}: 'labels' must be {data.shape[0]} integers in [0, 9], got shape {labels.shape}"
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW planes -> NHWC
    return np.ascontiguousarray(images), labels.astype(np.int32)


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
    parts = [_read_cifar_batch(os.path.join(data_dir, name)) for name in CIFAR10_TRAIN_FILES]
    train_images = np.concatenate([p[0] for p in parts])
    train_labels = np.concatenate([p[1] for p in parts])
    test_images, test_labels = _read_cifar_batch(os.path.join(data_dir, CIFAR10_TEST_FILE))
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


def _scan_split(split_dir: str, classes: Optional[Sequence[str]] = None):
    """Returns (files, labels, classes) for split_dir/<class>/<image files>."""
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"image folder split {split_dir!r} does not exist or is not a directory")
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not found:
        raise ValueError(f"{split_dir!r} has no class sub-directories (expected {split_dir}/<class>/*.JPEG)")
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(
                f"{split_dir!r} has classes that the training split lacks: {unknown[:10]}"
            )
    index = {name: i for i, name in enumerate(classes)}
    files, labels, empty = [], [], []
    for name in found:
        class_dir = os.path.join(split_dir, name)
        images = sorted(
            e.path for e in os.scandir(class_dir)
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not images:
            empty.append(name)
        files.extend(images)
        labels.extend([index[name]] * len(images))
    if empty:
        raise ValueError(
            f"{split_dir!r}: class directories without image files ({', '.join(IMAGE_EXTENSIONS)}): "
            f"{empty[:10]}"
        )
    return files, labels, list(classes)


def check_image_files(files: Sequence[str], num_threads: int = 4) -> list[tuple[str, str]]:
    """Opens and decodes every file (PIL, reduced-size JPEG decoding where possible).

    Args:
        files: Image paths.
        num_threads: Files checked in parallel.

    Returns:
        `(path, reason)` for every file that fails, in the order of `files`.
    """
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def check(path: str) -> Optional[str]:
        try:
            with Image.open(path) as image:
                image.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale, still every byte.
                image.load()
        except Exception as err:  # noqa: BLE001 -- PIL raises many types for bad files.
            return f"{type(err).__name__}: {err}"
        return None

    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        reasons = list(pool.map(check, files))
    return [(path, reason) for path, reason in zip(files, reasons) if reason is not None]


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
    train_files, train_labels, classes = _scan_split(os.path.join(data_dir, train_split))
    eval_files, eval_labels, _ = _scan_split(os.path.join(data_dir, eval_split), classes)
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


# --------------------------------------------------------------------------- loaders


class ProcessShardSampler:
    """This process's share of every global batch drawn from a sampler's record stream.

    A grain sampler defines one global stream of records; the global batch `t` is
    records `[t * B, (t + 1) * B)` of it (B = `global_batch_size`). Process `p` of `P`
    reads rows `[p * b, (p + 1) * b)` of every global batch (b = B / P), so the
    assembled global batch, and hence the whole run, is the same for any number of
    processes. With `worker_count` grain workers, which batch within their own share,
    the same holds batch for batch against one process with that many workers.

    Local position `j` (worker `w = j % W`, batch `m` of that worker, row `i`) maps to
    global position `w + W * (m * B + p * b + i)`, W = max(worker_count, 1).

    Args:
        sampler: The global sampler (`grain.IndexSampler` without sharding).
        global_batch_size: B, examples per global batch.
        worker_count: grain worker processes batching within their share (0: none).
        process_index: p (default `jax.process_index()`).
        process_count: P (default `jax.process_count()`).
    """

    def __init__(self, sampler, global_batch_size: int, *, worker_count: int = 0,
                 process_index: Optional[int] = None, process_count: Optional[int] = None):
        import jax

        self.sampler = sampler
        self.process_count = jax.process_count() if process_count is None else process_count
        self.process_index = jax.process_index() if process_index is None else process_index
        if global_batch_size < 1 or global_batch_size % self.process_count:
            raise ValueError(
                f"global_batch_size must be a positive multiple of the {self.process_count} "
                f"processes, got {global_batch_size}"
            )
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // self.process_count
        self.workers = max(int(worker_count), 1)
        total = len(sampler)
        if total >= sys.maxsize // 2:  # An infinite sampler.
            self._length = sys.maxsize
        else:
            if self.workers > 1:
                raise ValueError(
                    "a finite sampler must be read in order: pass worker_count=0 and batch "
                    "the records after the loader"
                )
            full, rest = divmod(total, global_batch_size)
            start = self.process_index * self.local_batch_size
            self._length = full * self.local_batch_size + min(max(rest - start, 0), self.local_batch_size)

    def global_index(self, index: int) -> int:
        """The position in the global stream of this process's position `index`."""
        worker, position = index % self.workers, index // self.workers
        batch, row = divmod(position, self.local_batch_size)
        offset = self.process_index * self.local_batch_size
        return worker + self.workers * (batch * self.global_batch_size + offset + row)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int):
        if not 0 <= index < self._length:
            raise IndexError(f"index must be in [0, {self._length}), got {index}")
        return self.sampler[self.global_index(index)]

    def __repr__(self) -> str:
        # grain compares reprs when an iterator state is restored.
        return (
            f"ProcessShardSampler({self.sampler!r}, global_batch_size={self.global_batch_size}, "
            f"workers={self.workers}, process={self.process_index}/{self.process_count})"
        )


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside `absl.app.run` they are unparsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 4,
    prefetch_buffer_size: int = 64,
) -> grain.DataLoader:
    """An infinite, shuffled, augmented and batched training loader (this process's share).

    Records are drawn epoch after epoch, each epoch a fresh seeded permutation;
    global batches are consecutive in that stream (a batch may span an epoch
    boundary), and this process loads its rows of each (`ProcessShardSampler`), so the
    global stream does not depend on the number of processes.

    Args:
        dataset: The `Dataset`.
        batch_size: Examples per global batch (over all processes).
        seed: Shuffling and augmentation seed.
        worker_count: grain worker processes (0: in this process).
        worker_buffer_size: Batches buffered per worker.
        read_threads: Threads reading records (per process / worker).
        prefetch_buffer_size: Records read ahead.

    Returns:
        A `grain.python.DataLoader`; `iter()` gives an iterator with
        `get_state()`/`set_state()`, yielding `{"image": uint8 (B, H, W, C),
        "label": int32 (B,)}`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(dataset.train_source) < batch_size:
        raise ValueError(
            f"batch_size {batch_size} exceeds the {len(dataset.train_source)} training examples"
        )
    sampler = ProcessShardSampler(
        grain.IndexSampler(
            num_records=len(dataset.train_source),
            shard_options=grain.NoSharding(),
            shuffle=True,
            num_epochs=None,
            seed=seed,
        ),
        batch_size,
        worker_count=worker_count,
    )
    operations = [dataset.train_transform] if dataset.train_transform is not None else []
    operations.append(grain.Batch(sampler.local_batch_size, drop_remainder=True))
    if worker_count:
        _ensure_absl_flags_parsed()
    return grain.DataLoader(
        data_source=dataset.train_source,
        sampler=sampler,
        operations=operations,
        shard_options=grain.NoSharding(),  # The sampler shards by process.
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
        read_options=grain.ReadOptions(
            num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size
        ),
    )


def num_eval_steps(num_eval: int, global_batch_size: int) -> int:
    """Global eval batches that cover `num_eval` examples (every process runs them all)."""
    return math.ceil(num_eval / global_batch_size)


def eval_batches(
    dataset: Dataset,
    *,
    batch_size: int,
    worker_count: int = 0,
    read_threads: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields this process's rows of each global evaluation batch, padded.

    Global batch `t` holds evaluation examples `[t * B, (t + 1) * B)` in order
    (B = `batch_size`, the global batch); this process yields its `B / P` rows of each
    as `{"image": uint8 (b, H, W, C), "label": int32 (b,), "mask": float32 (b,)}`
    with mask 0 on padding. Every process yields `num_eval_steps(num_eval, B)`
    batches, so collective eval steps stay in lockstep.

    Args:
        dataset: The `Dataset`.
        batch_size: Examples per global batch (over all processes).
        worker_count: grain worker processes (records are batched here, in order).
        read_threads: Threads reading records.
    """
    source = dataset.eval_source
    sampler = ProcessShardSampler(
        grain.IndexSampler(
            num_records=len(source),
            shard_options=grain.NoSharding(),
            shuffle=False,
            num_epochs=1,
            seed=0,
        ),
        batch_size,
    )
    operations = [dataset.eval_transform] if dataset.eval_transform is not None else []
    if worker_count:
        _ensure_absl_flags_parsed()
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=operations,
        shard_options=grain.NoSharding(),
        worker_count=worker_count,
        read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64),
    )
    info = dataset.info
    local = sampler.local_batch_size
    image_shape = (info.image_size, info.image_size, info.in_chans)
    records = iter(loader)
    for _ in range(num_eval_steps(len(source), batch_size)):
        images = np.zeros((local,) + image_shape, np.uint8)
        labels = np.zeros((local,), np.int32)
        mask = np.zeros((local,), np.float32)
        for row in range(local):
            record = next(records, None)
            if record is None:
                break
            images[row], labels[row], mask[row] = record["image"], record["label"], 1.0
        yield {"image": images, "label": labels, "mask": mask}
