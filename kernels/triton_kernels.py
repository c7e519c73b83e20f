"""Triton kernels of the DDF op: the forward, and the whole backward pass in one kernel.

These are plain `@triton.jit` kernels over raw pointers. `kernels/jax_triton.py`
launches them from JAX with `jax_triton.triton_call`; tests also run them on a
CPU under Triton's interpreter (`TRITON_INTERPRET=1`). This module imports
`triton` at import time, so only import it when that implementation is asked
for (`import ddf_jax` never imports it).

Memory layout (all arrays contiguous, row-major, NHWC):

    x, dx            (N, H, W, C)             element (n, y, x, c) at ((n*H + y)*W + x)*C + c
    grad_out, out    (N, Ho, Wo, C)
    channel_filter   (N, C, K)                K = k*k, tap t = ky*k + kx
    spatial_filter   (N, Ho, Wo, G, K)        channel c uses head c // (C // G); also d_spatial_filter
    dcf_partials     (N, P, K, C)             P = number of output-pixel tiles; in the accumulation
                                              dtype: float32, or float64 when FP64

Math, for r = (k - 1) // 2, tap offsets dy_t = (ky - r)*d, dx_t = (kx - r)*d, head
g(c) = c // (C // G) and go = grad_out:

    out[n, i, j, c] = sum_t x[n, i*s + dy_t, j*s + dx_t, c] * comb(sf[n, i, j, g(c), t], cf[n, c, t])
    dx[n, y, x, c]  = sum_t go[n, i, j, c] * comb(sf[n, i, j, g(c), t], cf[n, c, t])
                      over the taps with y = i*s + dy_t and x = j*s + dx_t for an output (i, j)
    dsf[n, i, j, h, t] = sum_{c in head h} go[n, i, j, c] * x[n, i*s + dy_t, j*s + dx_t, c] (* cf[n, c, t])
    dcf[n, c, t]       = sum_{i, j} go[n, i, j, c] * x[n, i*s + dy_t, j*s + dx_t, c] (* sf[n, i, j, g(c), t])

(the factor in brackets only for comb = multiply), with x zero outside the image.

Tiling. Both kernels work on 2-D tiles of BLOCK_P *flattened* output pixels
times BLOCK_C channels, so no lanes are lost when Wo is not a power of two.
Channels are the contiguous axis, so each pixel row of a tile is one
coalesced access. Halos are handled without padding x: each tap does one
masked gather-load of its shifted (BLOCK_P, BLOCK_C) window. Tap rows (ky) are
a runtime loop and tap columns (kx) are unrolled, so code size, compile time
and the loads the compiler keeps in flight grow with k rather than k*k.

- `ddf_fwd_kernel`: grid (N * cdiv(Ho*Wo, BLOCK_P), cdiv(C, BLOCK_C)).
- `ddf_bwd_kernel`: grid (N * cdiv(Ho*Wo, BLOCK_P), G). A program owns BLOCK_P
  output pixels of one image and one head and loops over the head's channels
  in steps of BLOCK_C. Per step it writes dx of the input pixels its output
  pixels own (the stride phases (i*s + a, j*s + b), 0 <= a, b < s: tap t
  reaches phase (a, b) from output pixel (i + (a - dy_t) / s, j + (b - dx_t) /
  s) when both divisions are exact), so dx is a gather with no atomics; then
  it loads grad_out at its own pixels once and x once per tap, writes the
  d_channel_filter partial sums over its pixels (summed by the caller: a
  deterministic two-stage reduction), and adds d_spatial_filter into a
  (BLOCK_P, next_pow2(k), next_pow2(k)) accumulator, stored once at the end.

Bytes moved (X the bytes of x or dx, O of out or grad_out, SF / CF of the
filters, PART = 4 N P K C of the float32 partials; each input read once, the
tap halos and shared filters coming from cache): the forward reads X + SF + CF
and writes O; the backward reads X + O + SF + CF and writes X + SF + PART,
and the caller's sum reads PART and writes CF. That is 2 PART over the
fwd+bwd minimum of 3X + 2O + 3SF + 3CF (`pallas_triton` has the same
accounting and says why).

Indexing. Pixel indices inside one image (< H*W or Ho*Wo, checked by the caller
to be below 2**31) are int32. The per-image bases are int64, and offsets inside
one image are int32 unless one image of x, grad_out or the spatial filter has
2**31 elements or more (then int64), so tensors with more than 2**31 elements
are addressed correctly without paying for 64-bit index arithmetic otherwise.
Loads use the unclamped indices under a mask; Triton never dereferences a
masked-off lane.

Precision. Inputs may be float16, bfloat16, float32 or float64 (each array its
own dtype). Products and sums are formed in float32 (float64 when FP64), and
each result is cast once at its store: out and dx to x's dtype,
d_spatial_filter to the spatial filter's. The reduction order is fixed, so
results are bitwise reproducible for a given configuration.

All shapes and options are `tl.constexpr`, so each distinct shape compiles once.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_tile(image, pixel_offset, pixel_valid, channel, channel_valid, ACC: tl.constexpr):
    """The (BLOCK_P, BLOCK_C) tile at element offsets pixel_offset (pixel * C) + channel, masked, as ACC."""
    return tl.load(
        image + (pixel_offset[:, None] + channel[None, :]),
        mask=pixel_valid[:, None] & channel_valid[None, :],
        other=0.0,
    ).to(ACC)


@triton.jit
def ddf_fwd_kernel(
    x_ptr,
    channel_filter_ptr,
    spatial_filter_ptr,
    out_ptr,
    H: tl.constexpr,
    W: tl.constexpr,
    C: tl.constexpr,
    OUT_H: tl.constexpr,
    OUT_W: tl.constexpr,
    HEADS: tl.constexpr,
    KERNEL_SIZE: tl.constexpr,
    STRIDE: tl.constexpr,
    DILATION: tl.constexpr,
    MUL: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out tile (BLOCK_P output pixels, BLOCK_C channels) of one image."""
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    TAPS: tl.constexpr = KERNEL_SIZE * KERNEL_SIZE
    RADIUS: tl.constexpr = (KERNEL_SIZE - 1) // 2
    OUT_PIXELS: tl.constexpr = OUT_H * OUT_W
    PIXEL_TILES: tl.constexpr = (OUT_PIXELS + BLOCK_P - 1) // BLOCK_P
    GROUP: tl.constexpr = C // HEADS
    # Offsets inside one image: int32 unless one image of an array has 2**31 elements or more.
    LARGE: tl.constexpr = H * W * C >= 2**31 or OUT_PIXELS * C >= 2**31 or OUT_PIXELS * HEADS * TAPS >= 2**31
    INDEX: tl.constexpr = tl.int64 if LARGE else tl.int32
    # One head for the whole channel tile: the spatial filter is then a (BLOCK_P,)
    # vector per tap instead of a (BLOCK_P, BLOCK_C) gather.
    ONE_HEAD_PER_TILE: tl.constexpr = HEADS == 1 or GROUP % BLOCK_C == 0

    program = tl.program_id(0)
    batch = (program // PIXEL_TILES).to(tl.int64)
    pixel_tile = program % PIXEL_TILES
    channel_start = tl.program_id(1) * BLOCK_C

    pixel = pixel_tile * BLOCK_P + tl.arange(0, BLOCK_P)  # flattened output pixel i*Wo + j
    pixel_valid = pixel < OUT_PIXELS
    out_row = pixel // OUT_W
    out_col = pixel % OUT_W
    channel = channel_start + tl.arange(0, BLOCK_C)
    channel_valid = channel < C

    x_image = x_ptr + batch * (H * W * C)
    channel_filter_image = channel_filter_ptr + batch * (C * TAPS)
    spatial_filter_image = spatial_filter_ptr + batch * (OUT_PIXELS * HEADS * TAPS)
    spatial_pixel = pixel.to(INDEX) * (HEADS * TAPS)
    if ONE_HEAD_PER_TILE:
        spatial_offset = spatial_pixel + (channel_start // GROUP) * TAPS
        spatial_valid = pixel_valid
    else:
        spatial_offset = spatial_pixel[:, None] + ((channel // GROUP) * TAPS)[None, :]
        spatial_valid = pixel_valid[:, None] & channel_valid[None, :]

    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for ky in range(KERNEL_SIZE):
        in_row = out_row * STRIDE + (ky - RADIUS) * DILATION
        row_valid = pixel_valid & (in_row >= 0) & (in_row < H)
        for kx in tl.static_range(KERNEL_SIZE):
            tap = ky * KERNEL_SIZE + kx
            in_col = out_col * STRIDE + (kx - RADIUS) * DILATION
            valid = row_valid & (in_col >= 0) & (in_col < W)
            x_offset = (in_row * W + in_col).to(INDEX) * C
            x_tap = _load_tile(x_image, x_offset, valid, channel, channel_valid, ACC)
            channel_tap = tl.load(
                channel_filter_image + (channel * TAPS + tap), mask=channel_valid, other=0.0
            ).to(ACC)
            spatial_tap = tl.load(
                spatial_filter_image + (spatial_offset + tap), mask=spatial_valid, other=0.0
            ).to(ACC)
            if ONE_HEAD_PER_TILE:
                spatial_tap = spatial_tap[:, None]
            if MUL:
                acc += x_tap * (spatial_tap * channel_tap[None, :])
            else:
                acc += x_tap * (spatial_tap + channel_tap[None, :])

    out_offset = pixel.to(INDEX) * C
    tl.store(
        out_ptr + batch * (OUT_PIXELS * C) + (out_offset[:, None] + channel[None, :]),
        acc.to(out_ptr.dtype.element_ty),
        mask=pixel_valid[:, None] & channel_valid[None, :],
    )


@triton.jit
def ddf_bwd_kernel(
    x_ptr,
    channel_filter_ptr,
    spatial_filter_ptr,
    grad_out_ptr,
    dx_ptr,
    d_spatial_filter_ptr,
    dcf_partials_ptr,
    H: tl.constexpr,
    W: tl.constexpr,
    C: tl.constexpr,
    OUT_H: tl.constexpr,
    OUT_W: tl.constexpr,
    HEADS: tl.constexpr,
    KERNEL_SIZE: tl.constexpr,
    STRIDE: tl.constexpr,
    DILATION: tl.constexpr,
    MUL: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dx, d_spatial_filter and the d_channel_filter partials of BLOCK_P output pixels and one head.

    Writes dx of the input pixels the tile's output pixels own, for the head's
    channels; d_spatial_filter[n, p, h, t] for the tile's pixels p and every
    tap t; and dcf_partials[n, tile, t, c] = the sum over the tile's pixels,
    for the head's channels c and every tap t.
    """
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    TAPS: tl.constexpr = KERNEL_SIZE * KERNEL_SIZE
    RADIUS: tl.constexpr = (KERNEL_SIZE - 1) // 2
    OUT_PIXELS: tl.constexpr = OUT_H * OUT_W
    PIXEL_TILES: tl.constexpr = (OUT_PIXELS + BLOCK_P - 1) // BLOCK_P
    GROUP: tl.constexpr = C // HEADS
    TAP_AXIS: tl.constexpr = triton.next_power_of_2(KERNEL_SIZE)
    # Offsets inside one image: int32 unless one image of an array has 2**31 elements or more.
    LARGE: tl.constexpr = H * W * C >= 2**31 or OUT_PIXELS * C >= 2**31 or OUT_PIXELS * HEADS * TAPS >= 2**31
    INDEX: tl.constexpr = tl.int64 if LARGE else tl.int32

    program = tl.program_id(0)
    batch = (program // PIXEL_TILES).to(tl.int64)
    pixel_tile = program % PIXEL_TILES
    head = tl.program_id(1)

    pixel = pixel_tile * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_valid = pixel < OUT_PIXELS
    out_row = pixel // OUT_W
    out_col = pixel % OUT_W
    pixel_index = pixel.to(INDEX)
    lanes = tl.arange(0, BLOCK_C)
    tap_index = tl.arange(0, TAP_AXIS)

    x_image = x_ptr + batch * (H * W * C)
    dx_image = dx_ptr + batch * (H * W * C)
    grad_image = grad_out_ptr + batch * (OUT_PIXELS * C)
    channel_filter_image = channel_filter_ptr + batch * (C * TAPS)
    spatial_head = spatial_filter_ptr + batch * (OUT_PIXELS * HEADS * TAPS) + head * TAPS
    # program == batch * PIXEL_TILES + pixel_tile indexes the partials' leading (N * P) axes.
    partials_tile = dcf_partials_ptr + program.to(tl.int64) * (TAPS * C)

    d_spatial = tl.zeros((BLOCK_P, TAP_AXIS, TAP_AXIS), dtype=ACC)  # [pixel, ky, kx]
    for channel_in_head in range(0, GROUP, BLOCK_C):
        channel = head * GROUP + channel_in_head + lanes
        channel_valid = (channel_in_head + lanes) < GROUP

        # dx, one stride phase at a time.
        for phase_row in tl.static_range(STRIDE):
            for phase_col in tl.static_range(STRIDE):
                acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
                for ky in range(KERNEL_SIZE):
                    row_shift = phase_row - (ky - RADIUS) * DILATION
                    if row_shift % STRIDE == 0:  # this tap row reaches the phase
                        src_row = out_row + row_shift // STRIDE
                        row_valid = pixel_valid & (src_row >= 0) & (src_row < OUT_H)
                        for kx in tl.static_range(KERNEL_SIZE):
                            if (phase_col - (kx - RADIUS) * DILATION) % STRIDE == 0:
                                tap = ky * KERNEL_SIZE + kx
                                src_col = out_col + (phase_col - (kx - RADIUS) * DILATION) // STRIDE
                                valid = row_valid & (src_col >= 0) & (src_col < OUT_W)
                                src = (src_row * OUT_W + src_col).to(INDEX)
                                grad_tap = _load_tile(grad_image, src * C, valid, channel, channel_valid, ACC)
                                channel_tap = tl.load(
                                    channel_filter_image + (channel * TAPS + tap),
                                    mask=channel_valid,
                                    other=0.0,
                                ).to(ACC)
                                spatial_tap = tl.load(
                                    spatial_head + (src * (HEADS * TAPS) + tap), mask=valid, other=0.0
                                ).to(ACC)
                                if MUL:
                                    acc += grad_tap * (spatial_tap[:, None] * channel_tap[None, :])
                                else:
                                    acc += grad_tap * (spatial_tap[:, None] + channel_tap[None, :])
                in_row = out_row * STRIDE + phase_row
                in_col = out_col * STRIDE + phase_col
                in_image = pixel_valid & (in_row < H) & (in_col < W)
                dx_offset = (in_row * W + in_col).to(INDEX) * C
                tl.store(
                    dx_image + (dx_offset[:, None] + channel[None, :]),
                    acc.to(dx_ptr.dtype.element_ty),
                    mask=in_image[:, None] & channel_valid[None, :],
                )

        # d_spatial_filter and the d_channel_filter partials.
        grad = _load_tile(grad_image, pixel_index * C, pixel_valid, channel, channel_valid, ACC)
        for ky in range(KERNEL_SIZE):
            in_row = out_row * STRIDE + (ky - RADIUS) * DILATION
            row_valid = pixel_valid & (in_row >= 0) & (in_row < H)
            row_parts = tl.zeros((BLOCK_P, TAP_AXIS), dtype=ACC)
            for kx in tl.static_range(KERNEL_SIZE):
                tap = ky * KERNEL_SIZE + kx
                in_col = out_col * STRIDE + (kx - RADIUS) * DILATION
                valid = row_valid & (in_col >= 0) & (in_col < W)
                x_offset = (in_row * W + in_col).to(INDEX) * C
                grad_x = grad * _load_tile(x_image, x_offset, valid, channel, channel_valid, ACC)
                if MUL:
                    channel_tap = tl.load(
                        channel_filter_image + (channel * TAPS + tap), mask=channel_valid, other=0.0
                    ).to(ACC)
                    spatial_tap = tl.load(
                        spatial_head + (pixel_index * (HEADS * TAPS) + tap), mask=pixel_valid, other=0.0
                    ).to(ACC)
                    spatial_part = tl.sum(grad_x * channel_tap[None, :], axis=1)
                    channel_part = tl.sum(grad_x * spatial_tap[:, None], axis=0)
                else:
                    spatial_part = tl.sum(grad_x, axis=1)
                    channel_part = tl.sum(grad_x, axis=0)
                tl.store(
                    partials_tile + (tap * C + channel),
                    channel_part.to(dcf_partials_ptr.dtype.element_ty),
                    mask=channel_valid,
                )
                row_parts += tl.where(tap_index[None, :] == kx, spatial_part[:, None], 0.0)
            d_spatial += tl.where(tap_index[None, :, None] == ky, row_parts[:, None, :], 0.0)

    taps_2d = tap_index[None, :, None] * KERNEL_SIZE + tap_index[None, None, :]
    tap_valid = (tap_index[None, :, None] < KERNEL_SIZE) & (tap_index[None, None, :] < KERNEL_SIZE)
    tl.store(
        d_spatial_filter_ptr
        + batch * (OUT_PIXELS * HEADS * TAPS)
        + head * TAPS
        + (pixel_index[:, None, None] * (HEADS * TAPS) + taps_2d),
        d_spatial.to(d_spatial_filter_ptr.dtype.element_ty),
        mask=pixel_valid[:, None, None] & tap_valid,
    )
