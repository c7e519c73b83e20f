"""Image transforms for classification records, the normalisation statistics and the on-device
normalisation.

Records are `{"image": ..., "label": int32}`. The grain transforms run on the host
(in the loader, or in its worker processes, which is why they are module-level
classes that pickle); `normalize` runs on the device inside the jitted step.

* `PadCropFlip`: zero-pad, random crop back to the input size, optional h-flip
  (uint8 arrays; digits, MNIST and CIFAR-10 training).
* `RandomResizedCropFlip`: Inception-style crop of a PIL image, bicubic (ImageNet
  training).
* `ResizeCenterCrop`: bicubic resize of the shorter side, centre crop (ImageNet
  evaluation).
* `resize_grey` (whole grey arrays, when a dataset is loaded) and
  `channel_mean_std` (the training split's statistics for `normalize`).
"""

from __future__ import annotations

import math
from typing import Any, TYPE_CHECKING

import grain.python as grain
import numpy as np

if TYPE_CHECKING:
    from experiments.classification.datasets import DatasetInfo


def channel_mean_std(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images (..., C), scaled to [0, 1]."""
    x = images.astype(np.float64) / 255.0
    axes = tuple(range(x.ndim - 1))
    return tuple(float(v) for v in x.mean(axes)), tuple(float(v) for v in x.std(axes))


def resize_grey(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, h, w) -> (N, size, size), bilinear; unchanged if already that size."""
    from PIL import Image

    if images.shape[1:] == (size, size):
        return images
    return np.stack([
        np.asarray(Image.fromarray(im, "L").resize((size, size), Image.BILINEAR)) for im in images
    ])


def normalize(images, info: DatasetInfo, dtype=None):
    """uint8 images (N, H, W, C) -> `(x / 255 - mean) / std` in `dtype` (default float32).

    Works on numpy and jax arrays (runs on the device inside the jitted step).
    """
    import jax.numpy as jnp

    x = jnp.asarray(images, jnp.float32) / 255.0
    x = (x - jnp.asarray(info.mean, jnp.float32)) / jnp.asarray(info.std, jnp.float32)
    return x.astype(dtype or jnp.float32)


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
