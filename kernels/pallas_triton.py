"""DDF as Pallas kernels lowered through Triton (GPU), or interpreted elsewhere.

The op (NHWC, K = k * k taps, tap t = ky * k + kx, r = (k - 1) // 2,
head g(c) = c // (C // G)):

    out[n, i, j, c] = sum_t x[n, i*s + (ky - r)*d, j*s + (kx - r)*d, c]
                            * comb(sf[n, i, j, g(c), t], cf[n, c, t])

with x zero outside the image and comb = product ("mul") or sum ("add").

Memory layout (row-major, channels last, so a run of channels is contiguous):

    x, dx           (N, H, W, C)
    channel_filter  (N, C, K)             taps of one channel contiguous
    spatial_filter  (N, Ho, Wo, G, K)     taps of one (pixel, head) contiguous
    out / grad_out  (N, Ho, Wo, C)        Ho = ceil(H / s), Wo = ceil(W / s)
    dcf partials    (N, P, K, C)          float32 (float64 for float64 inputs); P pixel tiles

Both kernels flatten the output's (row, column) plane into one pixel axis, so
that a tile of BP pixels wastes no lanes when Wo is not a power of two, and
work on (BP pixels) x (BC channels) tiles. Halos do not fit BlockSpecs (blocks
cannot overlap), so the kernels take whole-array refs and do one masked
gather-load per tap. Tap rows are a `lax.fori_loop` and tap columns are
unrolled in Python, so code size, compile time and the loads the compiler
keeps in flight (registers) grow with k rather than k*k. Tap rows and columns can
fall outside the image: those indices are clamped to >= 0 before the load
(the Triton lowering widens indices with zero extension, so a negative index
would become a huge offset) and masked. The channel index is never clamped:
it is never negative, the lanes past C are masked, and a clamp would hide its
contiguity from Triton (which then loads element by element). Every load and
store is masked.

Under `jax.vmap` the op folds the mapped axis into N (`common.make_kernel_op`),
so Pallas's own batching of the grid is never used.

Kernels:

- `ddf_fwd_kernel`, grid (output pixel tiles, channel tiles, N): accumulates
  x_t * comb(sf_t, cf_t) over the taps in float32 (float64 for float64
  inputs) and stores in x's dtype.
- `ddf_bwd_kernel`, the whole backward pass in one kernel, grid (output pixel
  tiles, G, N). A program owns BP output pixels and one head, and loops over
  the head's channels in steps of BC. Per step it
  - writes dx (go is grad_out) for the input pixels its output pixels own: output pixel (i, j)
    owns the stride phases (i*s + a, j*s + b), 0 <= a, b < s. Tap t reaches
    phase (a, b) from output pixel (i + (a - dy_t) / s, j + (b - dx_t) / s)
    when both divisions are exact (known statically), so each phase is a
    gather over its own taps of

        dx[n, y, x, c] = sum_t go[n, i_t, j_t, c] * comb(sf[n, i_t, j_t, g(c), t], cf[n, c, t])

    with no atomics: every input pixel has exactly one owner;
  - loads grad_out at its own pixels once and, per tap, x_t once, and adds
    per pixel

        dsf[n, i, j, h, t] = sum_{c in head h} go[n, i, j, c] * x_t[n, i, j, c] (* cf[n, c, t])

    into one (BP, kp, kp) accumulator indexed [pixel, ky, kx] (kp =
    next_pow2(k)), written once at the end in the spatial filter's dtype;
  - writes per tap and channel the partial sum over its pixels of

        dcf[n, c, t] = sum_{i, j} go[n, i, j, c] * x_t[n, i, j, c] (* sf[n, i, j, g(c), t])

    into the partials, which XLA sums over the tile axis afterwards: a
    deterministic two-stage reduction instead of atomics.
  dx is stored in x's dtype and dsf in the spatial filter's dtype, cast at the
  store.

Bytes moved, with X the bytes of x (and of dx), O those of out (and of
grad_out), SF / CF those of the spatial / channel filter and PART =
4 * N * P * K * C those of the float32 partials, reading each input once
(the tap halos and the filters that neighbouring tiles share come from
cache):

    ddf_fwd_kernel    reads X + SF + CF             writes O
    ddf_bwd_kernel    reads X + O + SF + CF         writes X + SF + PART
    XLA partial sum   reads PART                    writes CF

The fwd+bwd minimum is 3X + 2O + 3SF + 3CF (x read by both passes and dx
written, out written and grad_out read, the filters read twice and their
gradients written once), so the design moves 2 * PART more. PART / O is
4K / (BP * itemsize) at stride 1 (float32 partials): the backward pixel tile
BP sets it, and K makes it grow. `experiments/kernel_report.py` evaluates
these at given shapes. Two separate backward kernels (dx; then the filter
gradients) would read grad_out twice, one O more.

Tile sizes and launch options are a `BlockSizes` (one `LaunchConfig` per
kernel): a tuned entry of `tuning_table.json` for the device, else the
heuristic of `common.BlockSizes`, shared with `jax_triton` (the kernels of both
have the same structure).

On a CUDA GPU (`common.GPU_PLATFORMS`) the calls always carry
`pltriton.CompilerParams`, which selects the Triton lowering (without it Pallas
would pick Mosaic GPU). On the CPU the same kernels run with `interpret=True`
(for tests). Other platforms (ROCm, TPU, ...) raise `ImplementationUnavailable`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from . import common
from .common import (
    GPU_PLATFORMS,
    DDFConfig,
    ImplementationUnavailable,
    LaunchConfig,
    accumulation_dtype,
    combine_filters,
    make_kernel_op,
    next_power_of_2,
)

# Where the kernels run in Pallas interpret mode instead (slow; for tests).
INTERPRET_PLATFORMS = ("cpu",)


@dataclasses.dataclass(frozen=True)
class BlockSizes(common.BlockSizes):
    """Launch configurations of `ddf_fwd_kernel` and `ddf_bwd_kernel` (see `common.BlockSizes`)."""

    implementation = "pallas_triton"


# --------------------------------------------------------------------------
# Helpers used inside the kernels.
# --------------------------------------------------------------------------


def _div(index, divisor: int):
    """Integer division of a non-negative int32 index array by a static int."""
    return lax.div(index, np.asarray(divisor, index.dtype))


def _rem(index, divisor: int):
    """Remainder of a non-negative int32 index array by a static int."""
    return lax.rem(index, np.asarray(divisor, index.dtype))


def _pixel_tile(tile, block_pixels: int, width: int, size: int):
    """Flattened pixel ids of pixel tile `tile` as (row, column, valid), each (BP,)."""
    pixel = pl.multiple_of(tile * block_pixels, block_pixels) + jnp.arange(block_pixels, dtype=jnp.int32)
    return _div(pixel, width), _rem(pixel, width), pixel < size


def _channel_tile(start, block_channels: int):
    """Channels start, ..., start + BC - 1 for `start` a multiple of BC (never clamped: see above)."""
    return pl.multiple_of(start, block_channels) + jnp.arange(block_channels, dtype=jnp.int32)


def _inside(index, size: int):
    """(index clamped to >= 0, whether 0 <= index < size): a safe masked gather index."""
    return jnp.maximum(index, 0), (index >= 0) & (index < size)


def _load(ref_view, mask, dtype):
    """Masked load (zeros where masked) cast to the accumulation dtype."""
    return pltriton.load(ref_view, mask=mask, other=0).astype(dtype)


def _tap_weight(spatial_tap, channel_tap, combine: str):
    """comb(sf, cf) of one tap as a (BP, BC) (or broadcastable) tile, from sf (BP,) and cf (BC,)."""
    return combine_filters(spatial_tap[:, None], channel_tap[None, :], combine)


# --------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------


def ddf_fwd_kernel(
    x_ref, channel_filter_ref, spatial_filter_ref, out_ref, *, config, block_pixels, block_channels
):
    """One (BP output pixels) x (BC channels) tile of the DDF output.

    Refs are whole arrays: x_ref (N, H, W, C), channel_filter_ref (N, C, K),
    spatial_filter_ref (N, Ho, Wo, G, K), out_ref (N, Ho, Wo, C).
    """
    _, height, width, channels = x_ref.shape
    _, out_h, out_w, heads, _ = spatial_filter_ref.shape
    acc_dtype = accumulation_dtype(x_ref.dtype, channel_filter_ref.dtype, spatial_filter_ref.dtype)
    batch = pl.program_id(2)
    row, col, pixel_valid = _pixel_tile(pl.program_id(0), block_pixels, out_w, out_h * out_w)
    channel_start = pl.program_id(1) * block_channels
    channel = _channel_tile(channel_start, block_channels)
    channel_valid = channel < channels
    group = channels // heads
    # One head for the whole channel tile: the spatial filter is then a (BP,)
    # vector per tap instead of a (BP, BC) gather.
    one_head_per_tile = heads == 1 or group % block_channels == 0
    head = channel_start // group if one_head_per_tile else _div(channel, group)

    k, r, d = config.kernel_size, config.radius, config.dilation

    def tap_row(ky, acc):
        in_row, row_valid = _inside(row * config.stride + (ky - r) * d, height)
        for kx in range(k):
            tap = ky * k + kx
            in_col, col_valid = _inside(col * config.stride + (kx - r) * d, width)
            tap_valid = pixel_valid & row_valid & col_valid
            x_tap = _load(
                x_ref.at[batch, in_row[:, None], in_col[:, None], channel[None, :]],
                tap_valid[:, None] & channel_valid[None, :],
                acc_dtype,
            )
            channel_tap = _load(channel_filter_ref.at[batch, channel, tap], channel_valid, acc_dtype)
            if one_head_per_tile:
                spatial_tap = _load(spatial_filter_ref.at[batch, row, col, head, tap], pixel_valid, acc_dtype)
                weight = _tap_weight(spatial_tap, channel_tap, config.combine)
            else:
                spatial_tap = _load(
                    spatial_filter_ref.at[batch, row[:, None], col[:, None], head[None, :], tap],
                    pixel_valid[:, None] & channel_valid[None, :],
                    acc_dtype,
                )
                weight = combine_filters(spatial_tap, channel_tap[None, :], config.combine)
            acc += x_tap * weight
        return acc

    acc = lax.fori_loop(0, k, tap_row, jnp.zeros((block_pixels, block_channels), acc_dtype))

    pltriton.store(
        out_ref.at[batch, row[:, None], col[:, None], channel[None, :]],
        acc.astype(out_ref.dtype),
        mask=pixel_valid[:, None] & channel_valid[None, :],
    )


# --------------------------------------------------------------------------
# Backward: dx, d_spatial_filter and the d_channel_filter partials in one pass.
# --------------------------------------------------------------------------


def _phase_taps(config: DDFConfig, phase_row: int, phase_col: int):
    """The taps that reach stride phase (a, b), as tap rows (first, step, count) and tap columns.

    Input pixel (i*s + a, j*s + b) receives tap (ky, kx) from output pixel
    (i + (a - dy) / s, j + (b - dx) / s) when both divisions are exact. The
    rows ky that qualify form an arithmetic progression (the solutions of
    d * (ky - r) = a mod s), so a loop can walk them. Returns
    ((first ky, ky step, count, source row step of the first, source row
    step per iteration), [(kx, source column step)]).
    """
    s, d, r, k = config.stride, config.dilation, config.radius, config.kernel_size
    rows = [ky for ky in range(k) if (phase_row - (ky - r) * d) % s == 0]
    cols = [(kx, (phase_col - (kx - r) * d) // s) for kx in range(k) if (phase_col - (kx - r) * d) % s == 0]
    if not rows:
        return (0, 1, 0, 0, 0), cols
    step = rows[1] - rows[0] if len(rows) > 1 else 1
    return (rows[0], step, len(rows), (phase_row - (rows[0] - r) * d) // s, step * d // s), cols


def ddf_bwd_kernel(
    x_ref,
    channel_filter_ref,
    spatial_filter_ref,
    grad_out_ref,
    dx_ref,
    d_spatial_filter_ref,
    d_channel_filter_partial_ref,
    *,
    config: DDFConfig,
    block_pixels: int,
    block_channels: int,
):
    """dx, dsf and the dcf partials of BP output pixels and one head (see the module docstring).

    Refs are whole arrays: x_ref and dx_ref (N, H, W, C), channel_filter_ref
    (N, C, K), spatial_filter_ref and d_spatial_filter_ref (N, Ho, Wo, G, K),
    grad_out_ref (N, Ho, Wo, C), d_channel_filter_partial_ref (N, P, K, C).
    """
    _, height, width, channels = x_ref.shape
    _, out_h, out_w, heads, _ = spatial_filter_ref.shape
    acc_dtype = d_channel_filter_partial_ref.dtype
    k, r, d, stride = config.kernel_size, config.radius, config.dilation, config.stride
    pixel_tile, head, batch = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row, col, pixel_valid = _pixel_tile(pixel_tile, block_pixels, out_w, out_h * out_w)
    group = channels // heads
    tap_rows = jnp.arange(next_power_of_2(k), dtype=jnp.int32)
    tap_cols = tap_rows

    def channel_step(channel_tile, d_spatial_acc):
        offset = _channel_tile(channel_tile * block_channels, block_channels)
        channel_valid = offset < group
        channel = head * group + offset

        def load_tile(ref, rows, cols, valid):
            return _load(
                ref.at[batch, rows[:, None], cols[:, None], channel[None, :]],
                valid[:, None] & channel_valid[None, :],
                acc_dtype,
            )

        def channel_tap(tap):
            return _load(channel_filter_ref.at[batch, channel, tap], channel_valid, acc_dtype)

        def spatial_tap(rows, cols, valid, tap):
            return _load(spatial_filter_ref.at[batch, rows, cols, head, tap], valid, acc_dtype)

        # dx, one stride phase at a time: loop over the phase's tap rows.
        for phase_row in range(stride):
            for phase_col in range(stride):
                rows, cols = _phase_taps(config, phase_row, phase_col)
                first, step, count, row_step, row_step_delta = rows

                def phase_row_step(index, acc):
                    ky = first + index * step
                    src_row, row_valid = _inside(row + row_step - index * row_step_delta, out_h)
                    for kx, col_step in cols:
                        tap = ky * k + kx
                        src_col, col_valid = _inside(col + col_step, out_w)
                        valid = pixel_valid & row_valid & col_valid
                        grad_tap = load_tile(grad_out_ref, src_row, src_col, valid)
                        spatial = spatial_tap(src_row, src_col, valid, tap)
                        acc += grad_tap * _tap_weight(spatial, channel_tap(tap), config.combine)
                    return acc

                acc = jnp.zeros((block_pixels, block_channels), acc_dtype)
                if count and cols:
                    acc = lax.fori_loop(0, count, phase_row_step, acc)
                in_row, in_col = row * stride + phase_row, col * stride + phase_col
                in_image = pixel_valid & (in_row < height) & (in_col < width)
                pltriton.store(
                    dx_ref.at[batch, in_row[:, None], in_col[:, None], channel[None, :]],
                    acc.astype(dx_ref.dtype),
                    mask=in_image[:, None] & channel_valid[None, :],
                )

        # dsf and the dcf partials, from grad_out at the tile's own pixels.
        grad = load_tile(grad_out_ref, row, col, pixel_valid)

        def filter_row_step(ky, d_spatial_acc):
            in_row, row_valid = _inside(row * stride + (ky - r) * d, height)
            row_parts = jnp.zeros((block_pixels, tap_cols.shape[0]), acc_dtype)
            for kx in range(k):
                tap = ky * k + kx
                in_col, col_valid = _inside(col * stride + (kx - r) * d, width)
                grad_x = grad * load_tile(x_ref, in_row, in_col, pixel_valid & row_valid & col_valid)
                if config.combine == "mul":
                    spatial = spatial_tap(row, col, pixel_valid, tap)
                    d_spatial_part = jnp.sum(grad_x * channel_tap(tap)[None, :], axis=1)
                    d_channel_part = jnp.sum(grad_x * spatial[:, None], axis=0)
                else:
                    d_spatial_part = jnp.sum(grad_x, axis=1)
                    d_channel_part = jnp.sum(grad_x, axis=0)
                pltriton.store(
                    d_channel_filter_partial_ref.at[batch, pixel_tile, tap, channel],
                    d_channel_part,
                    mask=channel_valid,
                )
                row_parts += jnp.where(tap_cols[None, :] == kx, d_spatial_part[:, None], 0)
            return d_spatial_acc + jnp.where(tap_rows[None, :, None] == ky, row_parts[:, None, :], 0)

        return lax.fori_loop(0, k, filter_row_step, d_spatial_acc)

    initial = jnp.zeros((block_pixels, tap_rows.shape[0], tap_cols.shape[0]), acc_dtype)
    d_spatial_acc = lax.fori_loop(0, pl.cdiv(group, block_channels), channel_step, initial)
    tap = tap_rows[None, :, None] * k + tap_cols[None, None, :]
    pltriton.store(
        d_spatial_filter_ref.at[batch, row[:, None, None], col[:, None, None], head, tap],
        d_spatial_acc.astype(d_spatial_filter_ref.dtype),
        mask=pixel_valid[:, None, None] & (tap_rows[None, :, None] < k) & (tap_cols[None, None, :] < k),
    )


# --------------------------------------------------------------------------
# pallas_call wrappers.
# --------------------------------------------------------------------------


def _compiler_params(launch: LaunchConfig):
    # Always given: without Triton compiler params a GPU pallas_call is
    # routed to Mosaic GPU, which these kernels are not written for.
    return pltriton.CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages)


def forward(
    x, channel_filter, spatial_filter, config: DDFConfig, *, block_sizes=None, interpret: bool = False
):
    """DDF forward with `ddf_fwd_kernel`.

    Args:
        x: (N, H, W, C), float16/bfloat16/float32/float64.
        channel_filter: (N, C, K).
        spatial_filter: (N, Ho, Wo, G, K).
        config: the static `DDFConfig`.
        block_sizes: tiles; None for `BlockSizes.get_default`.
        interpret: run the kernel in Pallas interpret mode (any platform).

    Returns:
        (N, Ho, Wo, C) in x's dtype, accumulated in float32 (float64 when any
        input is float64).
    """
    n, _, _, channels = x.shape
    _, out_h, out_w, _, _ = spatial_filter.shape
    launch = (block_sizes or BlockSizes.get_default(x, channel_filter, spatial_filter, config)).forward
    kernel = functools.partial(
        ddf_fwd_kernel, config=config, block_pixels=launch.block_pixels, block_channels=launch.block_channels
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n, out_h, out_w, channels), x.dtype),
        grid=(pl.cdiv(out_h * out_w, launch.block_pixels), pl.cdiv(channels, launch.block_channels), n),
        interpret=interpret,
        compiler_params=_compiler_params(launch),
        name="ddf_fwd_kernel",
    )(x, channel_filter, spatial_filter)


def backward(
    x,
    channel_filter,
    spatial_filter,
    grad_out,
    config: DDFConfig,
    *,
    block_sizes=None,
    interpret: bool = False,
):
    """DDF backward with `ddf_bwd_kernel`, then XLA's sum of the d_channel_filter partials.

    Args:
        x: (N, H, W, C).
        channel_filter: (N, C, K).
        spatial_filter: (N, Ho, Wo, G, K).
        grad_out: (N, Ho, Wo, C), the cotangent of the output.
        config: the static `DDFConfig`.
        block_sizes: tiles; None for `BlockSizes.get_default`.
        interpret: run the kernel in Pallas interpret mode (any platform).

    Returns:
        (dx (N, H, W, C) in x's dtype, d_channel_filter (N, C, K) in the
        accumulation dtype, d_spatial_filter (N, Ho, Wo, G, K) in the
        spatial filter's dtype).
    """
    n, _, _, channels = x.shape
    _, out_h, out_w, heads, taps = spatial_filter.shape
    launch = (block_sizes or BlockSizes.get_default(x, channel_filter, spatial_filter, config)).backward
    acc_dtype = accumulation_dtype(x.dtype, channel_filter.dtype, spatial_filter.dtype, grad_out.dtype)
    kernel = functools.partial(
        ddf_bwd_kernel, config=config, block_pixels=launch.block_pixels, block_channels=launch.block_channels
    )
    pixel_tiles = pl.cdiv(out_h * out_w, launch.block_pixels)
    dx, d_spatial_filter, partials = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct(spatial_filter.shape, spatial_filter.dtype),
            jax.ShapeDtypeStruct((n, pixel_tiles, taps, channels), acc_dtype),
        ),
        grid=(pixel_tiles, heads, n),
        interpret=interpret,
        compiler_params=_compiler_params(launch),
        name="ddf_bwd_kernel",
    )(x, channel_filter, spatial_filter, grad_out)
    # Second stage of the d_channel_filter reduction, in a fixed order: (N, P, K, C) -> (N, C, K).
    d_channel_filter = jnp.swapaxes(jnp.sum(partials, axis=1), 1, 2)
    return dx, d_channel_filter, d_spatial_filter


@functools.lru_cache(maxsize=None)
def _op(interpret: bool, block_sizes: BlockSizes | None):
    options = dict(block_sizes=block_sizes, interpret=interpret)
    # jit with the config static, so that eager calls are cached too (an eager
    # pallas_call retraces its kernel on every call).
    forward_fn = jax.jit(functools.partial(forward, **options), static_argnums=(3,))
    backward_fn = jax.jit(functools.partial(backward, **options), static_argnums=(4,))
    return make_kernel_op(forward_fn, backward_fn, "pallas_triton_interpret" if interpret else "pallas_triton")


def get_op(platform: str, block_sizes: BlockSizes | None = None):
    """The Pallas-Triton op: compiled on a CUDA GPU, interpreted on the CPU.

    Args:
        platform: a JAX platform name: one of `GPU_PLATFORMS` ("gpu",
            "cuda") compiles the kernels with Triton; "cpu" runs them in
            Pallas interpret mode (orders of magnitude slower; for tests).
        block_sizes: fixed launch configurations for every call; None picks
            `BlockSizes.get_default` per call.

    Returns:
        `op(x, channel_filter, spatial_filter, config) -> out`, a
        `jax.custom_vjp` function over canonical arguments (see
        `ddf_jax.kernels.common`), cached per (platform kind, block_sizes).

    Raises:
        ImplementationUnavailable: any other platform (such as "rocm" or
            "tpu"), where the kernels would neither compile nor run at a
            usable speed.
    """
    if platform in GPU_PLATFORMS:
        return _op(False, block_sizes)
    if platform in INTERPRET_PLATFORMS:
        return _op(True, block_sizes)
    raise ImplementationUnavailable(
        f'implementation="pallas_triton" cannot run on platform {platform!r}: its kernels compile '
        f"only for CUDA GPUs (platforms {GPU_PLATFORMS}) and run in interpret mode only on "
        f'{INTERPRET_PLATFORMS}. Use implementation="xla" on this platform.'
    )
