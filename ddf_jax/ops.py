"""The public DDF op: `ddf_jax.ddf`."""

from __future__ import annotations

import functools
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from ddf_jax._checks import check_combine, check_int, check_odd
from ddf_jax.kernels import IMPLEMENTATIONS, DDFConfig, get_op

# What `implementation=` accepts, in `ddf` and in every layer and model: None
# (the platform default), a name from `IMPLEMENTATIONS`, or an op with the
# implementations' contract, ``op(x, channel_filter, spatial_filter, config)``
# (spatial_filter always 5-D, config a `DDFConfig`; see `ddf_jax.kernels`).
Implementation = Union[None, str, Callable[[jax.Array, jax.Array, jax.Array, DDFConfig], jax.Array]]

# The implementation used when `implementation=None`. A GPU kernel becomes the
# GPU default only after its tests have passed on a real GPU and BENCHMARKS.md
# records it; until then XLA is the default everywhere.
DEFAULT_IMPLEMENTATION = {"gpu": "xla", "cuda": "xla", "rocm": "xla"}


def default_implementation(platform: Optional[str] = None) -> str:
    """The implementation `ddf` uses for `platform` (default: JAX's default backend)."""
    platform = platform or jax.default_backend()
    return DEFAULT_IMPLEMENTATION.get(platform, "xla")


def check_implementation(implementation: Implementation) -> Implementation:
    """Returns `implementation` if `ddf` accepts it; the one check of the argument.

    Args:
        implementation: None, a name from `IMPLEMENTATIONS` ("xla",
            "pallas_triton", "jax_triton"), or a callable op
            ``op(x, channel_filter, spatial_filter, config)``.

    Returns:
        `implementation`, unchanged.

    Raises:
        ValueError: a string that is not an implementation name.
        TypeError: neither None, a string nor a callable, or an unhashable
            callable.
    """
    if implementation is None:
        return implementation
    if callable(implementation):
        try:
            hash(implementation)
        except TypeError:
            raise TypeError(
                f"implementation must be hashable when it is an op (it is a static argument of the "
                f"op's jit), got an unhashable {type(implementation).__name__}"
            ) from None
        return implementation
    if isinstance(implementation, str):
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be one of {IMPLEMENTATIONS}, None or an op, got {implementation!r}"
            )
        return implementation
    raise TypeError(
        f"implementation must be one of {IMPLEMENTATIONS}, None or an op "
        f"op(x, channel_filter, spatial_filter, config), got {implementation!r} of type "
        f"{type(implementation).__name__}"
    )


def _check_float(array, name: str) -> None:
    if not (hasattr(array, "shape") and hasattr(array, "dtype")):
        raise TypeError(
            f"{name} must be an array (jax.Array or numpy.ndarray), got {type(array).__name__}"
        )
    dtype = jnp.result_type(array)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {dtype}"
        )


def make_config(kernel_size, stride=1, dilation=1, combine="mul") -> DDFConfig:
    """Validates the static arguments of `ddf` and returns the `DDFConfig`.

    Args:
        kernel_size: odd int >= 1.
        stride: int >= 1.
        dilation: int >= 1.
        combine: "mul" or "add".

    Returns:
        The hashable `DDFConfig` that every implementation receives.

    Raises:
        TypeError: a non-integer size (bools included).
        ValueError: an even or non-positive kernel_size, stride or dilation
            below 1, or an unknown combine.
    """
    kernel_size = check_odd(kernel_size, "kernel_size")
    stride = check_int(stride, "stride")
    dilation = check_int(dilation, "dilation")
    check_combine(combine)
    return DDFConfig(kernel_size, stride, dilation, combine)


def _canonical_filters(x, channel_filter, spatial_filter, config: DDFConfig):
    """Checks shapes and returns spatial_filter as (N, Ho, Wo, G, K)."""
    if jnp.ndim(x) != 4:
        raise ValueError(f"x must be 4-D (N, H, W, C), got shape {jnp.shape(x)}")
    n, h, w, c = jnp.shape(x)
    k2 = config.taps
    ho, wo = config.output_size(h), config.output_size(w)
    if jnp.shape(channel_filter) != (n, c, k2):
        raise ValueError(
            f"channel_filter must have shape (N, C, kernel_size**2) = {(n, c, k2)}, "
            f"got {jnp.shape(channel_filter)}"
        )
    sf_shape = jnp.shape(spatial_filter)
    if len(sf_shape) == 4:
        expected = (n, ho, wo, k2)
        if sf_shape != expected:
            raise ValueError(
                f"spatial_filter must have shape (N, ceil(H/stride), ceil(W/stride), kernel_size**2)"
                f" = {expected}, got {sf_shape}"
            )
        spatial_filter = jnp.reshape(spatial_filter, (n, ho, wo, 1, k2))
    elif len(sf_shape) == 5:
        heads = sf_shape[3]
        expected = (n, ho, wo, heads, k2)
        if sf_shape != expected:
            raise ValueError(
                "spatial_filter must have shape (N, ceil(H/stride), ceil(W/stride), heads, "
                f"kernel_size**2) = {expected}, got {sf_shape}"
            )
        if heads < 1 or c % heads:
            raise ValueError(
                f"the number of heads (spatial_filter.shape[3]) must divide C={c}, got {heads}"
            )
    else:
        raise ValueError(
            "spatial_filter must be 4-D (N, Ho, Wo, K) or 5-D (N, Ho, Wo, heads, K), "
            f"got shape {sf_shape}"
        )
    return spatial_filter


def ddf(
    x: jax.Array,
    channel_filter: jax.Array,
    spatial_filter: jax.Array,
    *,
    kernel_size: int,
    stride: int = 1,
    dilation: int = 1,
    combine: str = "mul",
    implementation: Implementation = None,
) -> jax.Array:
    """Decoupled dynamic filtering: a depthwise conv whose filter varies per pixel and channel.

    For tap t = ky * k + kx, r = (k - 1) // 2 and head g(c) = c // (C // G):

        out[n, i, j, c] = sum_t x[n, i*s + (ky - r)*d, j*s + (kx - r)*d, c]
                                * comb(spatial_filter[n, i, j, g(c), t], channel_filter[n, c, t])

    with x zero outside the image and comb = product ("mul") or sum ("add").
    Output pixel (i, j) is centred on input pixel (i*s, j*s). There is no bias.

    Args:
        x: input, (N, H, W, C), float16/bfloat16/float32 (float64 with x64).
        channel_filter: per-sample, per-channel filter, (N, C, K) with
            K = kernel_size**2, taps in row-major order.
        spatial_filter: per-pixel filter, (N, Ho, Wo, K) for one head or
            (N, Ho, Wo, G, K) for G heads (G divides C), where
            Ho = ceil(H / stride) and Wo = ceil(W / stride).
        kernel_size: odd k >= 1.
        stride: s >= 1.
        dilation: d >= 1.
        combine: "mul" or "add".
        implementation: "xla", "pallas_triton", "jax_triton", None for the
            default of the current backend (see `default_implementation`), or
            an op called as ``op(x, channel_filter, spatial_filter, config)``
            with the arguments checked here, spatial_filter 5-D and config the
            `ddf_jax.kernels.DDFConfig` (e.g. a stand-in in a test). Eager
            calls compile once per op object.

    Returns:
        (N, Ho, Wo, C) in x's dtype. Accumulation is float32 (float64 for
        float64 inputs). Differentiable in all three array arguments.

    Raises:
        ValueError: bad kernel_size, stride, dilation, combine, implementation
            or shapes.
        TypeError: non-integer static arguments, arguments that are not
            arrays (Python lists), non-floating arrays, or an implementation
            that is neither None, a name nor a hashable callable.
        ddf_jax.kernels.ImplementationUnavailable: the implementation cannot
            run on this platform.

    Example:
        >>> import jax, jax.numpy as jnp, ddf_jax
        >>> x = jnp.ones((2, 9, 7, 8))
        >>> cf = jnp.ones((2, 8, 9))
        >>> sf = jnp.ones((2, 5, 4, 9))
        >>> ddf_jax.ddf(x, cf, sf, kernel_size=3, stride=2).shape
        (2, 5, 4, 8)
    """
    config = make_config(kernel_size, stride, dilation, combine)
    check_implementation(implementation)
    for array, name in ((x, "x"), (channel_filter, "channel_filter"), (spatial_filter, "spatial_filter")):
        _check_float(array, name)
    spatial_filter_5d = _canonical_filters(x, channel_filter, spatial_filter, config)
    if implementation is None:
        implementation = default_implementation()
    platform = jax.default_backend()
    args = (x, channel_filter, spatial_filter_5d)
    if any(isinstance(a, jax.core.Tracer) for a in args):
        # Already inside a transformation: let the caller's jit see the op itself.
        return _resolve(implementation, platform)(*args, config)
    return _apply_jitted(*args, config, implementation, platform)


def _resolve(implementation, platform: str):
    """The op for a checked, non-None `implementation`."""
    return implementation if callable(implementation) else get_op(implementation, platform)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _apply_jitted(x, channel_filter, spatial_filter, config: DDFConfig, implementation, platform: str):
    """Eager calls: compiled once per shape instead of dispatched op by op."""
    return _resolve(implementation, platform)(x, channel_filter, spatial_filter, config)
