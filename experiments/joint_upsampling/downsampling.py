"""The down-sampling protocols, and the model example made with them.

An example is made from a full-resolution pair, the RGB guide (H, W, 3) uint8
and the ground truth (H, W) float (disparity in pixels, or depth in metres;
pixels that are not finite are invalid), by `make_example`. Its low-resolution
input comes from one of two protocols (`downsample_disparity`):

* "area" (the default; training on synthetic scenes, Middlebury): the mean
  of the valid pixels of each `scale x scale` block, like an area sensor.
  Low-resolution pixel (i, j) is then centred on full-resolution coordinate
  `(i*scale + (scale-1)/2, j*scale + (scale-1)/2)`, exactly the half-pixel
  centre convention of `jax.image.resize` and of pixel shuffle, so bilinear,
  bicubic and DDF-Up all see correctly aligned inputs.
* "point" (the NYU Depth v2 protocol of the published joint-upsampling tables;
  see `configs/nyu_pac.py`): pixel `((scale-1)//2 + i*scale, (scale-1)//2 +
  j*scale)` of the ground truth, with no pre-filter. For an even scale this
  sample sits half a pixel above and left of the block centre that bilinear
  up-sampling assumes; the protocol keeps that offset, and so do we.

Either way, a low-resolution pixel with no valid value takes the value of the
nearest one that has one (Euclidean distance on the low-resolution grid).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

METHODS = ("area", "point")


def check_scale(scale) -> int:
    """`scale` as an int >= 1; a TypeError or ValueError naming it otherwise."""
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)):
        raise TypeError(f"scale must be an int, got {scale!r} of type {type(scale).__name__}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    return int(scale)


def _fill_nearest(low_res: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """`low_res` with every invalid pixel set to the value of the nearest valid one."""
    if valid.all():
        return low_res
    from scipy import ndimage

    _, (rows, cols) = ndimage.distance_transform_edt(~valid, return_indices=True)
    return low_res[rows, cols]


def downsample_disparity(
    disparity: np.ndarray, scale: int, method: str = "area"
) -> tuple[np.ndarray, np.ndarray]:
    """The low-resolution input of a full-resolution ground truth.

    Args:
      disparity: (H, W) float array; pixels that are not finite are invalid.
        H and W must be multiples of `scale`.
      scale: the integer down-sampling factor.
      method: "area" (mean of the valid pixels of each block) or "point"
        (every `scale`-th pixel from offset `(scale - 1) // 2`); see the module
        docstring.

    Returns:
      `(low_res, sample_valid)`: `low_res` is (H/scale, W/scale) float32;
      where no valid value was found (an empty block, or an invalid sample) it
      takes the value of the nearest low-resolution pixel that has one.
      `sample_valid` is (H/scale, W/scale) bool, True where a valid value was
      found.

    Raises:
      ValueError: on a bad shape, a size that `scale` does not divide, an
        unknown method, or a map without any valid pixel.
    """
    scale = check_scale(scale)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    disparity = np.asarray(disparity)
    if disparity.ndim != 2:
        raise ValueError(f"disparity must be 2-D (H, W), got shape {disparity.shape}")
    h, w = disparity.shape
    if h % scale or w % scale:
        raise ValueError(
            f"disparity shape {disparity.shape} must be a multiple of scale={scale} in both dimensions"
        )
    valid = np.isfinite(disparity)
    if not valid.any():
        raise ValueError("disparity has no valid (finite) pixel")
    if method == "point":
        offset = (scale - 1) // 2
        samples = disparity[offset::scale, offset::scale].astype(np.float32)
        sample_valid = valid[offset::scale, offset::scale]
        if not sample_valid.any():
            raise ValueError(f"no point sample of the disparity is valid at scale {scale}")
        return _fill_nearest(samples, sample_valid), sample_valid
    values = np.where(valid, disparity, 0.0).astype(np.float64)
    blocks = (h // scale, scale, w // scale, scale)
    total = values.reshape(blocks).sum(axis=(1, 3))
    count = valid.reshape(blocks).sum(axis=(1, 3))
    block_valid = count > 0
    low_res = np.where(block_valid, total / np.maximum(count, 1), 0.0)
    return _fill_nearest(low_res, block_valid).astype(np.float32), block_valid


def crop_to_multiple(array: np.ndarray, multiple: int) -> np.ndarray:
    """Centre-crops the first two axes of `array` down to multiples of `multiple`.

    Args:
      array: (H, W, ...) array.
      multiple: positive int.

    Returns:
      (H', W', ...) with H' = H - H % multiple (same for W); the crop drops
      `(H % multiple) // 2` rows at the top and the rest at the bottom.
    """
    multiple = check_scale(multiple)
    h, w = array.shape[:2]
    top, left = (h % multiple) // 2, (w % multiple) // 2
    return array[top : top + h - h % multiple, left : left + w - w % multiple]


def make_example(
    image: np.ndarray, disparity: np.ndarray, scale: int, downsampling: str = "area"
) -> dict[str, np.ndarray]:
    """Turns a full-resolution (image, disparity) pair into a model example.

    Args:
      image: (H, W, 3) uint8 RGB; H and W multiples of `scale`.
      disparity: (H, W) float; non-finite pixels are invalid.
      scale: the up-sampling factor.
      downsampling: the protocol of the low-resolution input, "area" or
        "point" (see `downsample_disparity`).

    Returns:
      A dict of float32/bool numpy arrays:
        'guide' (H, W, 3) float32 in [0, 1];
        'low_res' (H/scale, W/scale, 1) float32, from `downsample_disparity`;
        'target' (H, W, 1) float32, invalid pixels set to 0;
        'valid' (H, W, 1) bool.
    """
    image = np.asarray(image)
    disparity = np.asarray(disparity)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    if disparity.shape != image.shape[:2]:
        raise ValueError(
            f"disparity must have the image's (H, W) = {image.shape[:2]}, got {disparity.shape}"
        )
    low_res, _ = downsample_disparity(disparity, scale, downsampling)
    valid = np.isfinite(disparity)
    return {
        "guide": (image.astype(np.float32) / 255.0),
        "low_res": low_res[..., None],
        "target": np.where(valid, disparity, 0.0).astype(np.float32)[..., None],
        "valid": valid[..., None],
    }


def stack_examples(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks a list of examples into a batch (leading axis N)."""
    return {key: np.stack([ex[key] for ex in examples]) for key in examples[0]}
