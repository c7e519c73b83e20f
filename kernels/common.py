"""The contract every DDF implementation shares.

An implementation provides two pure functions over *canonical* arguments:

    forward(x, channel_filter, spatial_filter, config) -> out
    backward(x, channel_filter, spatial_filter, grad_out, config)
        -> (dx, d_channel_filter, d_spatial_filter)

with the NHWC layout

    x               (N, H, W, C)
    channel_filter  (N, C, K)            K = k * k, tap t = ky * k + kx
    spatial_filter  (N, Ho, Wo, G, K)    always 5-D here; channel c uses head c // (C // G)
    out / grad_out  (N, Ho, Wo, C)       Ho = ceil(H / s), Wo = ceil(W / s)

and the semantics

    r = (k - 1) // 2
    out[n, i, j, c] = sum_t x[n, i*s + (ky - r)*d, j*s + (kx - r)*d, c]
                            * comb(sf[n, i, j, c // (C // G), t], cf[n, c, t])

with x zero outside the image and comb = multiply ("mul") or add ("add").

`make_ddf_op` turns such a pair into a `jax.custom_vjp` function. Residuals are
the three inputs; nothing else is saved. Gradients come back in each input's
own dtype. Arguments reaching an implementation are already validated by
`ddf_jax.ops.ddf`, and are never empty: when x, a filter or the output has no
elements, `make_ddf_op` returns zeros (and zero gradients) of the right shapes
and dtypes without calling the implementation, so no kernel is launched on an
empty grid.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Literal

import jax
import jax.numpy as jnp

Combine = Literal["mul", "add"]
COMBINES = ("mul", "add")
# JAX platform names on which the GPU implementations compile their kernels
# (CUDA only: they are neither built nor tested for ROCm).
GPU_PLATFORMS = ("gpu", "cuda")


@dataclasses.dataclass(frozen=True)
class DDFConfig:
    """Static configuration of one DDF call (hashable, passed as nondiff arg).

    Attributes:
        kernel_size: odd filter size k >= 1; K = k * k taps.
        stride: output stride s >= 1.
        dilation: tap spacing d >= 1.
        combine: "mul" or "add", how the two filters are combined per tap.
    """

    kernel_size: int
    stride: int = 1
    dilation: int = 1
    combine: Combine = "mul"

    @property
    def taps(self) -> int:
        """Number of taps K = k * k."""
        return self.kernel_size * self.kernel_size

    @property
    def radius(self) -> int:
        """r = (k - 1) // 2: the centre tap's row and column."""
        return (self.kernel_size - 1) // 2

    def output_size(self, size: int) -> int:
        """Output length ceil(size / stride) for an input length."""
        return -(-size // self.stride)

    def tap_offsets(self) -> list[tuple[int, int, int]]:
        """(t, dy, dx) for every tap: the input offset of tap t from the centre."""
        r, d, k = self.radius, self.dilation, self.kernel_size
        return [(ky * k + kx, (ky - r) * d, (kx - r) * d) for ky in range(k) for kx in range(k)]


class ImplementationUnavailable(RuntimeError):
    """An implementation cannot run here (wrong platform or missing package)."""


def accumulation_dtype(*dtypes) -> jnp.dtype:
    """float32 for 16- and 32-bit inputs, float64 when any input is float64."""
    return jnp.result_type(jnp.float32, *dtypes)


def combine_filters(spatial, channel, combine: str):
    """comb(spatial, channel): their product for "mul", their sum for "add" (broadcasting)."""
    return spatial * channel if combine == "mul" else spatial + channel


def output_shape(x, spatial_filter) -> tuple[int, int, int, int]:
    """(N, Ho, Wo, C) of the output for canonical x (N, H, W, C) and spatial_filter (N, Ho, Wo, G, K)."""
    return (x.shape[0], spatial_filter.shape[1], spatial_filter.shape[2], x.shape[3])


def is_empty(x, channel_filter, spatial_filter) -> bool:
    """Whether x, channel_filter, spatial_filter or the output has no elements (a static check)."""
    shapes = (x.shape, channel_filter.shape, spatial_filter.shape, output_shape(x, spatial_filter))
    return any(math.prod(shape) == 0 for shape in shapes)


ForwardFn = Callable[[jax.Array, jax.Array, jax.Array, DDFConfig], jax.Array]
BackwardFn = Callable[
    [jax.Array, jax.Array, jax.Array, jax.Array, DDFConfig],
    tuple[jax.Array, jax.Array, jax.Array],
]


def skip_empty_forward(forward: ForwardFn) -> ForwardFn:
    """`forward`, except that it returns zeros of the output's shape and x's dtype when `is_empty`."""

    @functools.wraps(forward)
    def guarded(x, channel_filter, spatial_filter, config):
        if is_empty(x, channel_filter, spatial_filter):
            return jnp.zeros(output_shape(x, spatial_filter), x.dtype)
        return forward(x, channel_filter, spatial_filter, config)

    return guarded


def skip_empty_backward(backward: BackwardFn) -> BackwardFn:
    """`backward`, except that it returns zero gradients, each in its input's dtype, when `is_empty`.

    Every gradient of an empty op is an empty sum: zero.
    """

    @functools.wraps(backward)
    def guarded(x, channel_filter, spatial_filter, grad_out, config):
        if is_empty(x, channel_filter, spatial_filter):
            return tuple(jnp.zeros(a.shape, a.dtype) for a in (x, channel_filter, spatial_filter))
        return backward(x, channel_filter, spatial_filter, grad_out, config)

    return guarded


def make_ddf_op(forward: ForwardFn, backward: BackwardFn, name: str):
    """Wraps an implementation's forward and backward in one `jax.custom_vjp`.

    When x, a filter or the output has no elements (`is_empty`), neither
    function is called: the op returns zeros of the output's shape in x's
    dtype, and zero gradients.

    Args:
        forward: `forward(x, channel_filter, spatial_filter, config) -> out`.
        backward: `backward(x, channel_filter, spatial_filter, grad_out, config)
            -> (dx, d_channel_filter, d_spatial_filter)`.
        name: the implementation's name, used for the function's `__name__`.

    Returns:
        `op(x, channel_filter, spatial_filter, config) -> out`, differentiable in
        its three array arguments; `config` is static.
    """
    forward = skip_empty_forward(forward)
    backward = skip_empty_backward(backward)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def op(x, channel_filter, spatial_filter, config):
        return forward(x, channel_filter, spatial_filter, config)

    def op_fwd(x, channel_filter, spatial_filter, config):
        out = forward(x, channel_filter, spatial_filter, config)
        return out, (x, channel_filter, spatial_filter)

    def op_bwd(config, residuals, grad_out):
        x, channel_filter, spatial_filter = residuals
        dx, dcf, dsf = backward(x, channel_filter, spatial_filter, grad_out, config)
        return (
            dx.astype(x.dtype),
            dcf.astype(channel_filter.dtype),
            dsf.astype(spatial_filter.dtype),
        )

    op.defvjp(op_fwd, op_bwd)
    op.__name__ = f"ddf_{name}"
    op.__qualname__ = op.__name__
    return op
