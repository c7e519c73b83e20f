"""FilterNorm: the standardisation of dynamic filters over their taps (NNX).

The official module standardises each filter over its K = k*k taps with the
unbiased standard deviation plus 1e-10, then scales it by a learned (channel
filters) or fixed (spatial filters) gain. This version keeps that formula, and
gives finite gradients when all taps of a filter are equal (the official one
gives NaN there) and handles ``kernel_size=1``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from ddf_jax._checks import check_int, check_odd, nonlinearity_gain
from ddf_jax._types import Array, Dtype, Initializer

FILTER_TYPES = ("spatial", "channel")

# The official epsilon, added to the standard deviation.
_STD_EPSILON = 1e-10


def standardize_filters(filters: Array) -> Array:
    """Standardises filters over their last (tap) axis, the official way, with safe gradients.

    For K = filters.shape[-1] > 1 taps this is the official FilterNorm formula

        (f - mean(f)) / (std(f) + 1e-10),  std unbiased: sqrt(sum((f - mean)^2) / (K - 1)),

    evaluated exactly as written wherever the computed variance is positive, so
    imported official weights give the official outputs. Where it is exactly 0
    (all K taps equal, e.g. a zero input pixel and equal biases), the official
    formula's value is 0 (below about 1e-9 in float32 if tiny deviations
    underflow when squared) but its gradient is NaN: the derivative of sqrt at
    0, times 0. Here such a filter standardises to exactly 0 with a zero
    gradient (a constant filter has no pattern to normalise); sqrt never sees a
    zero, so no NaN or inf arises. Only this degenerate case differs from the official formula. A
    `sqrt(var + eps)` alternative was not used because it would change every
    output slightly and, for nearly constant filters, still give gradients of
    order 1/sqrt(eps).

    For K = 1 the unbiased std divides by K - 1 = 0 and the centred filter is
    always 0, so standardisation has nothing to act on. The filter is returned
    unchanged (only FilterNorm's scale applies), which keeps a 1x1 DDF a useful
    dynamic gate instead of a layer whose output is always zero.

    Statistics are computed in float32 (float64 for float64 input). Every sum
    over the taps, in the forward and in its gradient (written out, a
    `jax.custom_vjp`), is a sum of the K tap slices, so that both passes are
    elementwise loops over the filters: XLA:CPU runs reductions over a short
    minor axis, and autodiff's transposed broadcasts are such reductions, many
    times slower.

    Args:
        filters: (..., K), any floating dtype.

    Returns:
        (..., K) in float32 (float64 for float64 input).
    """
    compute_dtype = jnp.promote_types(jnp.result_type(filters), jnp.float32)
    filters = jnp.asarray(filters, compute_dtype)
    if filters.shape[-1] == 1:
        return filters
    return _standardize(filters)


def _sum_over_taps(a: Array) -> Array:
    """The sum over the last axis, kept as a length-1 axis, as a sum of its slices."""
    total = a[..., 0]
    for t in range(1, a.shape[-1]):
        total = total + a[..., t]
    return total[..., None]


def _statistics(filters: Array) -> tuple[Array, Array, Array]:
    """(centred filters, std, whether the variance is positive), std and mask with a length-1 tap axis."""
    taps = filters.shape[-1]
    centred = filters - _sum_over_taps(filters) / taps
    variance = _sum_over_taps(centred * centred) / (taps - 1)
    nonconstant = variance > 0
    # sqrt only ever sees positive values.
    std = jnp.sqrt(jnp.where(nonconstant, variance, 1.0))
    return centred, std, nonconstant


@jax.custom_vjp
def _standardize(filters: Array) -> Array:
    """`standardize_filters` for K > 1 taps in the compute dtype."""
    centred, std, nonconstant = _statistics(filters)
    return jnp.where(nonconstant, centred / (std + _STD_EPSILON), 0.0)


def _standardize_fwd(filters):
    return _standardize(filters), filters


def _standardize_bwd(filters, grad):
    """With z = c / (s + eps), c = f - mean(f), s = sqrt(sum(c^2) / (K - 1)):
    dL/dc = g / (s + eps) - c * sum(g * c) / ((s + eps)^2 * s * (K - 1)), and
    dL/df = dL/dc - mean(dL/dc); zero where the filter is constant."""
    taps = filters.shape[-1]
    centred, std, nonconstant = _statistics(filters)
    denominator = std + _STD_EPSILON
    grad = jnp.where(nonconstant, grad, 0.0)
    d_centred = grad / denominator - centred * (
        _sum_over_taps(grad * centred) / (denominator * denominator * std * (taps - 1))
    )
    return (d_centred - _sum_over_taps(d_centred) / taps,)


_standardize.defvjp(_standardize_fwd, _standardize_bwd)


class FilterNorm(nnx.Module):
    """Standardises dynamic filters over their K = k*k taps and rescales them.

    ``out = (f - mean) / std * scale`` per filter, with the unbiased std of the
    official module (see `standardize_filters` for the epsilon and ``k = 1``).

    * ``filter_type="spatial"``: one filter per (pixel, head); ``scale`` is the
      constant ``gain / kernel_size`` (a Python float; no parameters).
    * ``filter_type="channel"``: one filter per (sample, channel); ``scale`` is a
      learnable `nnx.Param` of shape (features * K,), indexed ``c * K + t``
      (the official ``std`` parameter), initialised ``normal * gain / kernel_size``.

    Attributes:
        scale: float (spatial) or nnx.Param of shape (features * K,) (channel).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from ddf_jax.nn import FilterNorm
        >>> norm = FilterNorm(3, filter_type="channel", features=8, rngs=nnx.Rngs(0))
        >>> norm.scale.shape
        (72,)
        >>> norm(jax.random.normal(jax.random.key(1), (2, 8, 9))).shape
        (2, 8, 9)
        >>> FilterNorm(3)(jnp.ones((2, 5, 5, 1, 9))).shape
        (2, 5, 5, 1, 9)
    """

    def __init__(
        self,
        kernel_size: int,
        *,
        filter_type: str = "spatial",
        features: Optional[int] = None,
        nonlinearity: str = "relu",
        dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        scale_init: Optional[Initializer] = None,
        rngs: Optional[nnx.Rngs] = None,
    ):
        """Builds the normalisation.

        Args:
            kernel_size: the filter size k (odd, >= 1); filters have K = k*k taps.
            filter_type: "spatial" or "channel".
            features: the number of channels C; required for "channel", must
                be None for "spatial".
            nonlinearity: "relu" (gain sqrt(2)) or "linear" (gain 1).
            dtype: the output dtype; None keeps the input's dtype.
            param_dtype: the dtype of the channel scale.
            scale_init: initializer of the channel scale; default
                ``normal(stddev=gain / kernel_size)``.
            rngs: random streams; required for "channel".
        """
        self.kernel_size = check_odd(kernel_size, "kernel_size")
        self.taps = self.kernel_size**2
        if filter_type not in FILTER_TYPES:
            raise ValueError(f"filter_type must be one of {FILTER_TYPES}, got {filter_type!r}")
        self.filter_type = filter_type
        self.nonlinearity = nonlinearity
        self.gain = nonlinearity_gain(nonlinearity)
        self.dtype = dtype
        if filter_type == "spatial":
            if features is not None:
                raise ValueError(f"features must be None for a spatial FilterNorm, got {features!r}")
            self.features = None
            self.scale = self.gain / self.kernel_size
        else:
            self.features = check_int(features, "features")
            if rngs is None:
                raise TypeError("a channel FilterNorm has parameters and needs rngs=nnx.Rngs(...)")
            init = scale_init or nnx.initializers.normal(stddev=self.gain / self.kernel_size)
            self.scale = nnx.Param(init(rngs.params(), (self.features * self.taps,), param_dtype))

    def __call__(self, filters: Array) -> Array:
        """Normalises `filters`.

        Args:
            filters: spatial: (..., K), e.g. (N, Ho, Wo, G, K); channel:
                (N, C, K). Any floating dtype.

        Returns:
            The same shape, in ``dtype`` (default: the input's dtype). Statistics
            are computed in float32.
        """
        shape = jnp.shape(filters)
        if not shape or shape[-1] != self.taps:
            raise ValueError(
                f"filters must have kernel_size**2 = {self.taps} taps on the last axis, got shape {shape}"
            )
        out_dtype = self.dtype or jnp.result_type(filters)
        normalized = standardize_filters(filters)
        if self.filter_type == "spatial":
            out = normalized * self.scale
        else:
            if len(shape) != 3 or shape[1] != self.features:
                raise ValueError(
                    f"channel filters must have shape (N, features={self.features}, {self.taps}), got {shape}"
                )
            scale = jnp.reshape(self.scale[...], (self.features, self.taps))
            out = normalized * scale.astype(normalized.dtype)
        return out.astype(out_dtype)
