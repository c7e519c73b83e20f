"""Random-access record sources for classification, and the readers behind them.

A source is what grain's `DataLoader` reads: `len(source)` and `source[i] ->
{"image", "label"}`, with a `repr` that identifies the data (grain compares it when
an iterator position is restored).

* `ArraySource`: in-memory uint8 arrays (digits, MNIST, CIFAR-10).
* `ImageFileSource`: image files decoded with PIL when read (folder datasets).
* `read_cifar_batch`: one CIFAR-10 python-pickle batch, read with an unpickler that
  accepts only plain containers and numpy arrays.
* `scan_image_folder`, `check_image_files`, `raise_for_bad_images`: the
  `<split>/<class>/<image>` layout and a decode check of every file.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
from typing import Any, Optional, Sequence

import numpy as np

from experiments.common.errors import BadDataError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


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


def read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
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


def scan_image_folder(split_dir: str, classes: Optional[Sequence[str]] = None):
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


def raise_for_bad_images(files: Sequence[str], data_dir: str, num_threads: int = 4) -> None:
    """`check_image_files`, then one `BadDataError` naming the files that fail (all are logged)."""
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
