"""Classical depth up-samplers and the evaluation metric.

* `bilinear`, `bicubic`: `jax.image.resize` with half-pixel centres (the
  convention of the "area" protocol of `downsampling.downsample_disparity`).
* `guided_filter`: He, Sun and Tang's guided filter (ECCV 2010 / TPAMI 2013)
  with a grayscale or an RGB guide, applied to the bilinear up-sampling.
  Window means use box filters built from cumulative sums, so the cost does
  not depend on the radius; windows are clipped at the image border and
  normalised by their true pixel count.
* `rmse`: root mean squared error over the valid ground-truth pixels.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def rmse(prediction, target, valid=None) -> float:
    """Root mean squared error over valid pixels.

    Args:
      prediction: (..., H, W[, 1]) array.
      target: array of the same shape; pixels that are not finite are invalid.
      valid: optional bool array of the same shape; pixels where it is False
        are excluded as well.

    Returns:
      The RMSE (a Python float) over pixels that are valid and finite in the
      target.

    Raises:
      ValueError: on mismatched shapes or when no pixel is valid.
    """
    prediction = np.asarray(prediction, np.float64)
    target = np.asarray(target, np.float64)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction shape {prediction.shape} != target shape {target.shape}")
    mask = np.isfinite(target)
    if valid is not None:
        valid = np.asarray(valid)
        if valid.shape != target.shape:
            raise ValueError(f"valid shape {valid.shape} != target shape {target.shape}")
        mask &= valid.astype(bool)
    if not mask.any():
        raise ValueError("no valid pixel to evaluate")
    diff = prediction[mask] - target[mask]
    return float(np.sqrt(np.mean(diff * diff)))


def _resize(low_res, scale: int, method: str) -> np.ndarray:
    low_res = jnp.asarray(low_res, jnp.float32)
    if low_res.ndim < 2:
        raise ValueError(f"low_res must be at least 2-D (H, W, ...), got shape {low_res.shape}")
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    # The spatial axes are the two before a trailing channel axis of size 1,
    # or the last two for (..., H, W).
    channels_last = low_res.shape[-1] == 1 and low_res.ndim >= 3
    axes = (low_res.ndim - 3, low_res.ndim - 2) if channels_last else (low_res.ndim - 2, low_res.ndim - 1)
    shape = list(low_res.shape)
    for axis in axes:
        shape[axis] *= scale
    return np.asarray(jax.image.resize(low_res, tuple(shape), method=method))


def bilinear(low_res, scale: int) -> np.ndarray:
    """Bilinear up-sampling by `scale`.

    Args:
      low_res: (h, w), (h, w, 1) or (N, h, w, 1) float array.
      scale: positive int.

    Returns:
      float32 numpy array with the spatial axes multiplied by `scale`.
    """
    return _resize(low_res, scale, "linear")


def bicubic(low_res, scale: int) -> np.ndarray:
    """Bicubic (Keys, a = -0.5) up-sampling by `scale`; shapes as in `bilinear`."""
    return _resize(low_res, scale, "cubic")


def box_mean(x: np.ndarray, radius: int) -> np.ndarray:
    """Mean over the (2r+1) x (2r+1) window around each pixel, clipped at the border.

    Args:
      x: (H, W, ...) array; the window runs over the first two axes.
      radius: non-negative int.

    Returns:
      float64 array of x's shape.
    """
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ValueError(f"radius must be a non-negative int, got {radius!r}")
    x = np.asarray(x, np.float64)
    sums = x
    for axis in (0, 1):
        n = x.shape[axis]
        cumulative = np.cumsum(sums, axis=axis)
        cumulative = np.concatenate(
            [np.zeros_like(np.take(cumulative, [0], axis=axis)), cumulative], axis=axis
        )
        index = np.arange(n)
        upper = np.minimum(index + radius, n - 1) + 1
        lower = np.maximum(index - radius, 0)
        sums = np.take(cumulative, upper, axis=axis) - np.take(cumulative, lower, axis=axis)
    h, w = x.shape[:2]
    rows = np.minimum(np.arange(h) + radius, h - 1) - np.maximum(np.arange(h) - radius, 0) + 1
    cols = np.minimum(np.arange(w) + radius, w - 1) - np.maximum(np.arange(w) - radius, 0) + 1
    count = (rows[:, None] * cols[None, :]).astype(np.float64)
    return sums / count.reshape(count.shape + (1,) * (x.ndim - 2))


def _solve_symmetric3(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solves (..., 3, 3) symmetric positive definite systems by the adjugate (vectorised)."""
    a, b, c = matrix[..., 0, 0], matrix[..., 0, 1], matrix[..., 0, 2]
    d, e, f = matrix[..., 1, 1], matrix[..., 1, 2], matrix[..., 2, 2]
    inv00, inv01, inv02 = d * f - e * e, c * e - b * f, b * e - c * d
    inv11, inv12, inv22 = a * f - c * c, b * c - a * e, a * d - b * b
    det = a * inv00 + b * inv01 + c * inv02
    x, y, z = rhs[..., 0], rhs[..., 1], rhs[..., 2]
    return np.stack(
        [
            inv00 * x + inv01 * y + inv02 * z,
            inv01 * x + inv11 * y + inv12 * z,
            inv02 * x + inv12 * y + inv22 * z,
        ],
        axis=-1,
    ) / det[..., None]


def guided_filter_sweep(guide, source, radius: int, epsilons: Sequence[float]) -> list[np.ndarray]:
    """The guided filter for several eps at one radius, sharing the window statistics.

    Args and shapes as in `guided_filter`, with `epsilons` a sequence of
    values > 0.

    Returns:
      A list of (H, W) float32 arrays, one per eps.
    """
    guide = np.asarray(guide, np.float64)
    source = np.asarray(source, np.float64)
    if source.ndim != 2:
        raise ValueError(f"source must be (H, W), got shape {source.shape}")
    if guide.shape[:2] != source.shape or guide.ndim not in (2, 3):
        raise ValueError(f"guide must be (H, W) or (H, W, C) with (H, W) = {source.shape}, got {guide.shape}")
    for eps in epsilons:
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
    if guide.ndim == 2:
        guide = guide[..., None]
    c = guide.shape[2]
    mean_i = box_mean(guide, radius)  # (H, W, C)
    mean_p = box_mean(source, radius)  # (H, W)
    cov_ip = box_mean(guide * source[..., None], radius) - mean_i * mean_p[..., None]
    rows, cols = np.triu_indices(c)
    products = box_mean(guide[..., rows] * guide[..., cols], radius)
    sigma = np.empty(source.shape + (c, c))
    sigma[..., rows, cols] = products
    sigma[..., cols, rows] = products
    sigma -= mean_i[..., :, None] * mean_i[..., None, :]
    outputs = []
    for eps in epsilons:
        regularised = sigma + eps * np.eye(c)
        if c == 1:
            a = cov_ip / regularised[..., 0]
        elif c == 3:
            a = _solve_symmetric3(regularised, cov_ip)
        else:
            a = np.linalg.solve(regularised, cov_ip[..., None])[..., 0]
        b = mean_p - np.sum(a * mean_i, axis=-1)
        mean_ab = box_mean(np.concatenate([a, b[..., None]], axis=-1), radius)
        q = np.sum(mean_ab[..., :c] * guide, axis=-1) + mean_ab[..., c]
        outputs.append(q.astype(np.float32))
    return outputs


def guided_filter(guide, source, radius: int, eps: float) -> np.ndarray:
    """The guided filter of He et al. (grayscale or colour guide).

    For every (2r+1) x (2r+1) window w_k (clipped at the border) a linear model
    q = a_k^T I + b_k is fitted to the source p by ridge regression
    (regulariser `eps`); the output at a pixel averages the models of all
    windows that cover it: q_i = mean_k(a_k)^T I_i + mean_k(b_k).

    Args:
      guide: (H, W) grayscale or (H, W, C) colour guide, float (e.g. in [0, 1];
        `eps` is in squared guide units).
      source: (H, W) float, the image to filter (here: the bilinearly
        up-sampled depth).
      radius: window radius r (window side 2r + 1), >= 0.
      eps: regulariser, > 0.

    Returns:
      (H, W) float32 numpy array.
    """
    return guided_filter_sweep(guide, source, radius, [eps])[0]


def guided_filter_upsample(guide, low_res, scale: int, radius: int, eps: float) -> np.ndarray:
    """Bilinear up-sampling followed by the colour guided filter.

    Args:
      guide: (H, W, 3) float RGB in [0, 1].
      low_res: (H/scale, W/scale) or (H/scale, W/scale, 1) float.
      scale: the up-sampling factor.
      radius, eps: guided filter parameters.

    Returns:
      (H, W) float32.
    """
    low_res = np.asarray(low_res)
    if low_res.ndim == 3:
        low_res = low_res[..., 0]
    return guided_filter(guide, bilinear(low_res, scale), radius, eps)


def tune_guided_filter(
    examples: Sequence[dict],
    scale: int,
    radii: Iterable[int],
    epsilons: Iterable[float],
) -> dict:
    """Grid-searches the guided filter's radius and eps for one scale.

    Args:
      examples: `downsampling.make_example` dicts at this scale ('guide',
        'low_res', 'target', 'valid'; pixels where 'valid' is False are not
        scored); held-out data, never the frames the filter is evaluated on.
      scale: the up-sampling factor of the examples.
      radii: candidate radii.
      epsilons: candidate eps values.

    Returns:
      {'radius': int, 'eps': float, 'rmse': float (the mean RMSE over the
      examples at the best setting), 'grid': list of [radius, eps, rmse]}.
    """
    epsilons = [float(eps) for eps in epsilons]
    prepared = []
    for ex in examples:
        low_res = np.asarray(ex["low_res"])
        low_res = low_res[..., 0] if low_res.ndim == 3 else low_res
        prepared.append((ex["guide"], bilinear(low_res, scale), ex["target"][..., 0], ex["valid"][..., 0]))
    grid = []
    for radius in radii:
        errors = np.zeros(len(epsilons))
        for guide, source, target, valid in prepared:
            outputs = guided_filter_sweep(guide, source, radius, epsilons)
            errors += [rmse(q, target, valid) for q in outputs]
        grid.extend([int(radius), eps, float(e / len(prepared))] for eps, e in zip(epsilons, errors))
    best = min(grid, key=lambda row: row[2])
    return {"radius": best[0], "eps": best[1], "rmse": best[2], "grid": grid}
