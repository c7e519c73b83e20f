"""DDF as Pallas kernels lowered through Triton (GPU), or interpreted elsewhere.

The op (NHWC, K = k * k taps, tap t = ky * k + kx, r = (k - 1) // 2,
head g(c) = c // (C // G)):

    out[n, i, j, c] = sum_t x[n, i*s + (ky - r)*d, j*s + (kx - r)*d, c]
                            * comb(sf[n, i, j, g(c), t], cf[n, c, t])

with x zero outside the image and comb = product ("mul") or sum ("add").

Memory layout (all arrays row-major, channels last, so a run of channels is
contiguous in memory):

    x               (N, H, W, C)
    channel_filter  (N, C, K)             taps of one channel contiguous
    spatial_filter  (N, Ho, Wo, G, K)     taps of one (pixel, head) contiguous
    out / grad_out  (N, Ho, Wo, C)        Ho = ceil(H / s), Wo = ceil(W / s)

Every kernel flattens the (row, column) plane of the grid it walks into one
pixel axis, so that a tile of BP pixels wastes no lanes when W is not a power
of two, and works on (BP pixels) x (BC channels) tiles. Halos do not fit
BlockSpecs (blocks cannot overlap), so the kernels take whole-array refs and
do one masked gather-load per tap; taps are unrolled in Python. Indices used
for loads are clamped into the array (the Triton lowering widens indices with
zero extension, so a negative index would become a huge offset) and the mask
zeroes what lies outside; stores use the unclamped indices and a mask.

Kernels:

- `ddf_fwd_kernel`: grid (pixel tiles of the output, channel tiles, N).
  Accumulates x_t * comb(sf_t, cf_t) over the taps in float32 (float64 for
  float64 inputs) and stores in x's dtype.
- `ddf_bwd_dx_kernel`: the transposed stencil written as a gather over output
  positions, so no atomics are needed and the result is deterministic. Grid
  (pixel tiles of the input, channel tiles, N). For input row y and tap row
  offset dy the source output row is (y - dy) / s, valid when it is a
  non-negative integer below Ho (same for columns):

      dx[n, y, x, c] = sum_t g[n, i_t, j_t, c] * comb(sf[n, i_t, j_t, g(c), t], cf[n, c, t])

- `ddf_bwd_filters_kernel`: d_spatial_filter and d_channel_filter together,
  as both need the products g * x_t. Grid (output pixel tiles, G, N); each
  program loops over its head's channel tiles with `lax.fori_loop`, carrying
  K per-pixel accumulators for

      dsf[n, i, j, g, t] = sum_{c in head g} g[n, i, j, c] * x_t[n, i, j, c] (* cf[n, c, t])

  and writes, per channel tile and tap, the partial sum over its pixels of

      dcf[n, c, t] = sum_{i, j} g[n, i, j, c] * x_t[n, i, j, c] (* sf[n, i, j, g(c), t])

  into a (N, pixel tiles, C, K) buffer that XLA then sums over the tile axis:
  a deterministic two-stage reduction instead of atomics.

Tile sizes and launch options (`tuning.BlockSizes`, one `LaunchConfig` per
kernel) come from `tuning.py`: a tuned table entry for the call's shape class
on this device kind, else a heuristic.

On a CUDA GPU (`common.GPU_PLATFORMS`) the calls always carry
`pltriton.CompilerParams`, which selects the Triton lowering (without it Pallas
would pick Mosaic GPU). On the CPU the same kernels run with `interpret=True`
(for tests). Other platforms (ROCm, TPU, ...) raise `ImplementationUnavailable`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from . import tuning
from .common import (
    GPU_PLATFORMS,
    DDFConfig,
    ImplementationUnavailable,
    accumulation_dtype,
    combine_filters,
    make_ddf_op,
)
from .tuning import BlockSizes

# Where the kernels run in Pallas interpret mode instead (slow; for tests).
INTERPRET_PLATFORMS = ("cpu",)


# --------------------------------------------------------------------------
# Helpers used inside the kernels.
# --------------------------------------------------------------------------


def _flat_pixels(block_pixels: int, width: int, size: int):
    """This program's flattened pixel ids as (row, column, valid) of shape (BP,)."""
    pixel = pl.program_id(0) * block_pixels + jnp.arange(block_pixels, dtype=jnp.int32)
    return _div(pixel, width), _rem(pixel, width), pixel < size


def _div(index, divisor: int):
    """Integer division of a non-negative int32 index array by a static int."""
    return lax.div(index, np.asarray(divisor, index.dtype))


def _rem(index, divisor: int):
    """Remainder of a non-negative int32 index array by a static int."""
    return lax.rem(index, np.asarray(divisor, index.dtype))


def _clamp(index, size: int):
    """Clamps an index array into [0, size - 1] for a safe masked load."""
    return jnp.minimum(jnp.maximum(index, 0), size - 1)


def _load(ref_view, mask, dtype):
    """Masked load (zeros where masked) cast to the accumulation dtype."""
    return pltriton.load(ref_view, mask=mask, other=0).astype(dtype)


def _source_of_input(index, offset: int, stride: int, out_size: int):
    """Output index o with o * stride + offset == index, and whether it exists.

    Used by dx: input row `index` receives tap `offset` from output row
    (index - offset) / stride when that is a non-negative integer < out_size.
    The division is done on clamped, non-negative values only.
    """
    shifted = index - offset
    if stride == 1:
        return shifted, (shifted >= 0) & (shifted < out_size)
    nonnegative = jnp.maximum(shifted, 0)
    source = _div(nonnegative, stride)
    valid = (shifted >= 0) & (_rem(nonnegative, stride) == 0) & (source < out_size)
    return source, valid


# --------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------


def ddf_fwd_kernel(
    x_ref,
    channel_filter_ref,
    spatial_filter_ref,
    out_ref,
    *,
    config: DDFConfig,
    block_pixels: int,
    block_channels: int,
    acc_dtype,
):
    """One (BP output pixels) x (BC channels) tile of the DDF output.

    Refs are whole arrays: x_ref (N, H, W, C), channel_filter_ref (N, C, K),
    spatial_filter_ref (N, Ho, Wo, G, K), out_ref (N, Ho, Wo, C).
    """
    _, height, width, channels = x_ref.shape
    _, out_h, out_w, heads, _ = spatial_filter_ref.shape
    batch = pl.program_id(2)
    row, col, pixel_valid = _flat_pixels(block_pixels, out_w, out_h * out_w)
    channel = pl.program_id(1) * block_channels + jnp.arange(block_channels, dtype=jnp.int32)
    channel_valid = channel < channels
    channel_safe = _clamp(channel, channels)
    row_safe, col_safe = _clamp(row, out_h), _clamp(col, out_w)
    head = _div(channel_safe, channels // heads)

    acc = jnp.zeros((block_pixels, block_channels), acc_dtype)
    for t, dy, dx in config.tap_offsets():
        in_row = row * config.stride + dy
        in_col = col * config.stride + dx
        tap_valid = pixel_valid & (in_row >= 0) & (in_row < height) & (in_col >= 0) & (in_col < width)
        in_row, in_col = _clamp(in_row, height), _clamp(in_col, width)
        x_tap = _load(
            x_ref.at[batch, in_row[:, None], in_col[:, None], channel_safe[None, :]],
            tap_valid[:, None] & channel_valid[None, :],
            acc_dtype,
        )
        channel_tap = _load(channel_filter_ref.at[batch, channel_safe, t], channel_valid, acc_dtype)
        if heads == 1:
            spatial_tap = _load(
                spatial_filter_ref.at[batch, row_safe, col_safe, 0, t], pixel_valid, acc_dtype
            )[:, None]
        else:
            spatial_tap = _load(
                spatial_filter_ref.at[batch, row_safe[:, None], col_safe[:, None], head[None, :], t],
                pixel_valid[:, None] & channel_valid[None, :],
                acc_dtype,
            )
        acc += x_tap * combine_filters(spatial_tap, channel_tap[None, :], config.combine)

    pltriton.store(
        out_ref.at[batch, row[:, None], col[:, None], channel[None, :]],
        acc.astype(out_ref.dtype),
        mask=pixel_valid[:, None] & channel_valid[None, :],
    )


# --------------------------------------------------------------------------
# Backward: dx.
# --------------------------------------------------------------------------


def ddf_bwd_dx_kernel(
    channel_filter_ref,
    spatial_filter_ref,
    grad_out_ref,
    dx_ref,
    *,
    config: DDFConfig,
    block_pixels: int,
    block_channels: int,
):
    """One (BP input pixels) x (BC channels) tile of dx, gathered from grad_out.

    Refs are whole arrays: channel_filter_ref (N, C, K), spatial_filter_ref
    (N, Ho, Wo, G, K), grad_out_ref (N, Ho, Wo, C), dx_ref (N, H, W, C) in the
    accumulation dtype.
    """
    _, height, width, channels = dx_ref.shape
    _, out_h, out_w, heads, _ = spatial_filter_ref.shape
    acc_dtype = dx_ref.dtype
    batch = pl.program_id(2)
    row, col, pixel_valid = _flat_pixels(block_pixels, width, height * width)
    channel = pl.program_id(1) * block_channels + jnp.arange(block_channels, dtype=jnp.int32)
    channel_valid = channel < channels
    channel_safe = _clamp(channel, channels)
    head = _div(channel_safe, channels // heads)

    acc = jnp.zeros((block_pixels, block_channels), acc_dtype)
    for t, dy, dx in config.tap_offsets():
        out_row, row_valid = _source_of_input(row, dy, config.stride, out_h)
        out_col, col_valid = _source_of_input(col, dx, config.stride, out_w)
        tap_valid = pixel_valid & row_valid & col_valid
        out_row, out_col = _clamp(out_row, out_h), _clamp(out_col, out_w)
        mask = tap_valid[:, None] & channel_valid[None, :]
        grad_tap = _load(
            grad_out_ref.at[batch, out_row[:, None], out_col[:, None], channel_safe[None, :]], mask, acc_dtype
        )
        channel_tap = _load(channel_filter_ref.at[batch, channel_safe, t], channel_valid, acc_dtype)
        if heads == 1:
            spatial_tap = _load(
                spatial_filter_ref.at[batch, out_row, out_col, 0, t], tap_valid, acc_dtype
            )[:, None]
        else:
            spatial_tap = _load(
                spatial_filter_ref.at[batch, out_row[:, None], out_col[:, None], head[None, :], t],
                mask,
                acc_dtype,
            )
        acc += grad_tap * combine_filters(spatial_tap, channel_tap[None, :], config.combine)

    pltriton.store(
        dx_ref.at[batch, row[:, None], col[:, None], channel[None, :]],
        acc,
        mask=pixel_valid[:, None] & channel_valid[None, :],
    )


# --------------------------------------------------------------------------
# Backward: d_spatial_filter and d_channel_filter.
# --------------------------------------------------------------------------


def ddf_bwd_filters_kernel(
    x_ref,
    channel_filter_ref,
    spatial_filter_ref,
    grad_out_ref,
    d_spatial_filter_ref,
    d_channel_filter_partial_ref,
    *,
    config: DDFConfig,
    block_pixels: int,
    block_channels: int,
):
    """dsf for BP output pixels of one head, and that tile's partial dcf sums.

    Refs are whole arrays: x_ref (N, H, W, C), channel_filter_ref (N, C, K),
    spatial_filter_ref (N, Ho, Wo, G, K), grad_out_ref (N, Ho, Wo, C),
    d_spatial_filter_ref (N, Ho, Wo, G, K) and d_channel_filter_partial_ref
    (N, pixel tiles, C, K), both in the accumulation dtype.
    """
    _, height, width, channels = x_ref.shape
    _, out_h, out_w, heads, taps = spatial_filter_ref.shape
    acc_dtype = d_spatial_filter_ref.dtype
    pixel_tile, head, batch = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row, col, pixel_valid = _flat_pixels(block_pixels, out_w, out_h * out_w)
    row_safe, col_safe = _clamp(row, out_h), _clamp(col, out_w)
    group = channels // heads
    tap_offsets = config.tap_offsets()

    # Per tap: where x is read and whether that lies inside the image. These
    # do not depend on the channel, so they are computed once.
    x_rows, x_cols, x_valid = [], [], []
    for _, dy, dx in tap_offsets:
        in_row = row * config.stride + dy
        in_col = col * config.stride + dx
        x_valid.append(pixel_valid & (in_row >= 0) & (in_row < height) & (in_col >= 0) & (in_col < width))
        x_rows.append(_clamp(in_row, height))
        x_cols.append(_clamp(in_col, width))

    def channel_tile_step(channel_tile, d_spatial_accs):
        offset = channel_tile * block_channels + jnp.arange(block_channels, dtype=jnp.int32)
        channel_valid = offset < group
        channel = head * group + offset
        channel_safe = _clamp(channel, channels)
        grad = _load(
            grad_out_ref.at[batch, row_safe[:, None], col_safe[:, None], channel_safe[None, :]],
            pixel_valid[:, None] & channel_valid[None, :],
            acc_dtype,
        )
        new_accs = []
        for (t, _, _), x_row, x_col, valid, d_spatial_acc in zip(
            tap_offsets, x_rows, x_cols, x_valid, d_spatial_accs
        ):
            x_tap = _load(
                x_ref.at[batch, x_row[:, None], x_col[:, None], channel_safe[None, :]],
                valid[:, None] & channel_valid[None, :],
                acc_dtype,
            )
            grad_x = grad * x_tap
            if config.combine == "mul":
                channel_tap = _load(channel_filter_ref.at[batch, channel_safe, t], channel_valid, acc_dtype)
                spatial_tap = _load(
                    spatial_filter_ref.at[batch, row_safe, col_safe, head, t], pixel_valid, acc_dtype
                )
                d_spatial_part = jnp.sum(grad_x * channel_tap[None, :], axis=1)
                d_channel_part = jnp.sum(grad_x * spatial_tap[:, None], axis=0)
            else:
                d_spatial_part = jnp.sum(grad_x, axis=1)
                d_channel_part = jnp.sum(grad_x, axis=0)
            pltriton.store(
                d_channel_filter_partial_ref.at[batch, pixel_tile, channel, t],
                d_channel_part,
                mask=channel_valid,
            )
            new_accs.append(d_spatial_acc + d_spatial_part)
        return tuple(new_accs)

    num_channel_tiles = pl.cdiv(group, block_channels)
    initial = tuple(jnp.zeros((block_pixels,), acc_dtype) for _ in range(taps))
    d_spatial_accs = lax.fori_loop(0, num_channel_tiles, channel_tile_step, initial)
    for t, d_spatial_acc in enumerate(d_spatial_accs):
        pltriton.store(
            d_spatial_filter_ref.at[batch, row, col, head, t],
            d_spatial_acc,
            mask=pixel_valid,
        )


# --------------------------------------------------------------------------
# pallas_call wrappers.
# --------------------------------------------------------------------------


def _compiler_params(launch: tuning.LaunchConfig):
    # Always given: without Triton compiler params a GPU pallas_call is
    # routed to Mosaic GPU, which these kernels are not written for.
    return pltriton.CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages)


def _launch_config(x, spatial_filter, config: DDFConfig, block_sizes: BlockSizes | None, role: str):
    """One kernel's tiles and launch options: from `block_sizes`, else `tuning.BlockSizes.get_default`."""
    if block_sizes is None:
        block_sizes = BlockSizes.get_default(
            "pallas_triton",
            channels=x.shape[-1],
            taps=config.taps,
            heads=spatial_filter.shape[3],
            dtype=x.dtype,
        )
    return block_sizes.for_role(role)


def forward(
    x,
    channel_filter,
    spatial_filter,
    config: DDFConfig,
    *,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
):
    """DDF forward with `ddf_fwd_kernel`.

    Args:
        x: (N, H, W, C), float16/bfloat16/float32/float64.
        channel_filter: (N, C, K).
        spatial_filter: (N, Ho, Wo, G, K).
        config: the static `DDFConfig`.
        interpret: run the kernel in Pallas interpret mode (any platform).
        block_sizes: tiles; `tuning.BlockSizes.get_default` when None.

    Returns:
        (N, Ho, Wo, C) in x's dtype, accumulated in float32 (float64 when any
        input is float64).
    """
    n, _, _, channels = x.shape
    _, out_h, out_w, _, _ = spatial_filter.shape
    launch = _launch_config(x, spatial_filter, config, block_sizes, "forward")
    acc_dtype = accumulation_dtype(x.dtype, channel_filter.dtype, spatial_filter.dtype)
    kernel = functools.partial(
        ddf_fwd_kernel,
        config=config,
        block_pixels=launch.block_pixels,
        block_channels=launch.block_channels,
        acc_dtype=acc_dtype,
    )
    grid = (pl.cdiv(out_h * out_w, launch.block_pixels), pl.cdiv(channels, launch.block_channels), n)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n, out_h, out_w, channels), x.dtype),
        grid=grid,
        interpret=interpret,
        compiler_params=_compiler_params(launch),
        name="ddf_fwd",
    )(x, channel_filter, spatial_filter)


def backward(
    x,
    channel_filter,
    spatial_filter,
    grad_out,
    config: DDFConfig,
    *,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
):
    """DDF backward with `ddf_bwd_dx_kernel` and `ddf_bwd_filters_kernel`.

    Args:
        x: (N, H, W, C).
        channel_filter: (N, C, K).
        spatial_filter: (N, Ho, Wo, G, K).
        grad_out: (N, Ho, Wo, C), the cotangent of the output.
        config: the static `DDFConfig`.
        interpret: run the kernels in Pallas interpret mode (any platform).
        block_sizes: tiles; `tuning.BlockSizes.get_default` when None.

    Returns:
        (dx (N, H, W, C), d_channel_filter (N, C, K), d_spatial_filter
        (N, Ho, Wo, G, K)), all in the accumulation dtype (float32, or float64
        when any input is float64).
    """
    kwargs = dict(interpret=interpret, block_sizes=block_sizes)
    dx = backward_dx(x, channel_filter, spatial_filter, grad_out, config, **kwargs)
    d_channel_filter, d_spatial_filter = backward_filters(
        x, channel_filter, spatial_filter, grad_out, config, **kwargs
    )
    return dx, d_channel_filter, d_spatial_filter


def backward_dx(
    x,
    channel_filter,
    spatial_filter,
    grad_out,
    config: DDFConfig,
    *,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
):
    """dx with `ddf_bwd_dx_kernel`: the first half of `backward`.

    Args:
        x: (N, H, W, C); only its shape and dtype are used.
        channel_filter: (N, C, K).
        spatial_filter: (N, Ho, Wo, G, K).
        grad_out: (N, Ho, Wo, C), the cotangent of the output.
        config: the static `DDFConfig`.
        interpret: run the kernel in Pallas interpret mode (any platform).
        block_sizes: tiles; `tuning.BlockSizes.get_default` when None.

    Returns:
        dx, (N, H, W, C) in the accumulation dtype.
    """
    n, height, width, channels = x.shape
    launch = _launch_config(x, spatial_filter, config, block_sizes, "dx")
    acc_dtype = accumulation_dtype(x.dtype, channel_filter.dtype, spatial_filter.dtype, grad_out.dtype)
    dx_kernel = functools.partial(
        ddf_bwd_dx_kernel,
        config=config,
        block_pixels=launch.block_pixels,
        block_channels=launch.block_channels,
    )
    return pl.pallas_call(
        dx_kernel,
        out_shape=jax.ShapeDtypeStruct((n, height, width, channels), acc_dtype),
        grid=(pl.cdiv(height * width, launch.block_pixels), pl.cdiv(channels, launch.block_channels), n),
        interpret=interpret,
        compiler_params=_compiler_params(launch),
        name="ddf_bwd_dx",
    )(channel_filter, spatial_filter, grad_out)


def backward_filters(
    x,
    channel_filter,
    spatial_filter,
    grad_out,
    config: DDFConfig,
    *,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
):
    """d_channel_filter and d_spatial_filter with `ddf_bwd_filters_kernel`: the second half of `backward`.

    Args:
        x: (N, H, W, C).
        channel_filter: (N, C, K).
        spatial_filter: (N, Ho, Wo, G, K).
        grad_out: (N, Ho, Wo, C), the cotangent of the output.
        config: the static `DDFConfig`.
        interpret: run the kernel in Pallas interpret mode (any platform).
        block_sizes: tiles; `tuning.BlockSizes.get_default` when None.

    Returns:
        (d_channel_filter (N, C, K), d_spatial_filter (N, Ho, Wo, G, K)), in
        the accumulation dtype.
    """
    n, _, _, channels = x.shape
    _, out_h, out_w, heads, taps = spatial_filter.shape
    launch = _launch_config(x, spatial_filter, config, block_sizes, "filters")
    acc_dtype = accumulation_dtype(x.dtype, channel_filter.dtype, spatial_filter.dtype, grad_out.dtype)
    filters_kernel = functools.partial(
        ddf_bwd_filters_kernel,
        config=config,
        block_pixels=launch.block_pixels,
        block_channels=launch.block_channels,
    )
    pixel_tiles = pl.cdiv(out_h * out_w, launch.block_pixels)
    d_spatial_filter, d_channel_filter_partial = pl.pallas_call(
        filters_kernel,
        out_shape=(
            jax.ShapeDtypeStruct((n, out_h, out_w, heads, taps), acc_dtype),
            jax.ShapeDtypeStruct((n, pixel_tiles, channels, taps), acc_dtype),
        ),
        grid=(pixel_tiles, heads, n),
        interpret=interpret,
        compiler_params=_compiler_params(launch),
        name="ddf_bwd_filters",
    )(x, channel_filter, spatial_filter, grad_out)
    # Second stage of the d_channel_filter reduction, in a fixed order.
    d_channel_filter = jnp.sum(d_channel_filter_partial, axis=1)
    return d_channel_filter, d_spatial_filter


def make_op(interpret: bool, block_sizes: BlockSizes | None = None):
    """Builds the custom-VJP op with fixed tiles (None: `tuning.BlockSizes.get_default` per call).

    Args:
        interpret: run the kernels in Pallas interpret mode instead of
            compiling them with Triton for a GPU.
        block_sizes: tiles for every call, or None for the shape-dependent
            defaults.

    Returns:
        `op(x, channel_filter, spatial_filter, config) -> out` over canonical
        arguments, made by `make_ddf_op`.
    """
    return _make_op(bool(interpret), block_sizes)


@functools.lru_cache(maxsize=None)
def _make_op(interpret: bool, block_sizes: BlockSizes | None):
    # jit with the config static, so that eager calls are cached too (an eager
    # pallas_call retraces its kernel on every call).
    forward_fn = jax.jit(
        functools.partial(forward, interpret=interpret, block_sizes=block_sizes), static_argnums=(3,)
    )
    backward_fn = jax.jit(
        functools.partial(backward, interpret=interpret, block_sizes=block_sizes), static_argnums=(4,)
    )
    name = "pallas_triton_interpret" if interpret else "pallas_triton"
    return make_ddf_op(forward_fn, backward_fn, name)


def get_op(platform: str):
    """The Pallas-Triton op: compiled on a CUDA GPU, interpreted on the CPU.

    Args:
        platform: a JAX platform name: one of `GPU_PLATFORMS` ("gpu",
            "cuda") compiles the kernels with Triton; "cpu" runs them in
            Pallas interpret mode (orders of magnitude slower; for tests).

    Returns:
        `op(x, channel_filter, spatial_filter, config) -> out`, a
        `jax.custom_vjp` function over canonical arguments (see
        `ddf_jax.kernels.common`).

    Raises:
        ImplementationUnavailable: any other platform (such as "rocm" or
            "tpu"), where the kernels would neither compile nor run at a
            usable speed.
    """
    if platform in GPU_PLATFORMS:
        return make_op(interpret=False)
    if platform in INTERPRET_PLATFORMS:
        return make_op(interpret=True)
    raise ImplementationUnavailable(
        f'implementation="pallas_triton" cannot run on platform {platform!r}: its kernels compile '
        f"only for CUDA GPUs (platforms {GPU_PLATFORMS}) and run in interpret mode only on "
        f'{INTERPRET_PLATFORMS}. Use implementation="xla" on this platform.'
    )
