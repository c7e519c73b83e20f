"""Triton kernels of the DDF op: forward, dx, and the fused filter gradients.

These are plain `@triton.jit` kernels over raw pointers. `kernels/jax_triton.py`
launches them from JAX with `jax_triton.triton_call`; tests also run them on a
CPU under Triton's interpreter (`TRITON_INTERPRET=1`). This module imports
`triton` at import time, so only import it when that implementation is asked
for (`import ddf_jax` never imports it).

Memory layout (all arrays contiguous, row-major, NHWC):

    x, dx            (N, H, W, C)             element (n, y, x, c) at ((n*H + y)*W + x)*C + c
    grad_out, out    (N, Ho, Wo, C)
    channel_filter   (N, C, K)                K = k*k, tap t = ky*k + kx
    spatial_filter   (N, Ho, Wo, G, K)        channel c uses head c // (C // G)
    dcf_partials     (N, P, K, C)             P = number of output-pixel tiles; in the accumulation
                                              dtype: float32, or float64 when FP64

Math, for r = (k - 1) // 2 and tap offsets dy_t = (ky - r)*d, dx_t = (kx - r)*d:

    out[n, i, j, c] = sum_t x[n, i*s + dy_t, j*s + dx_t, c] * comb(sf[n, i, j, g(c), t], cf[n, c, t])
    dx[n, y, x, c]  = sum_t g[n, i, j, c] * comb(sf[n, i, j, g(c), t], cf[n, c, t])
                      over the taps with y = i*s + dy_t and x = j*s + dx_t for an output (i, j)
    dsf[n, i, j, h, t] = sum_{c in head h} g[n, i, j, c] * x[n, i*s + dy_t, j*s + dx_t, c] (* cf[n, c, t])
    dcf[n, c, t]       = sum_{i, j} g[n, i, j, c] * x[n, i*s + dy_t, j*s + dx_t, c] (* sf[n, i, j, g(c), t])

(the factor in brackets only for comb = multiply), with x zero outside the image.

Tiling. Every kernel works on a 2-D tile of BLOCK_P *flattened* pixels times
BLOCK_C channels, so no lanes are lost when W is not a power of two. Channels are
the contiguous axis, so each pixel row of a tile is one coalesced access. Halos
are handled without padding x: each of the k*k taps does one masked
gather-load of its shifted (BLOCK_P, BLOCK_C) window. Tap rows (ky) are a loop
and tap columns (kx) are unrolled, so code size and compile time grow with k
rather than k*k.

- `ddf_fwd_kernel`: grid (N * cdiv(Ho*Wo, BLOCK_P), cdiv(C, BLOCK_C)).
- `ddf_bwd_dx_kernel`: the transposed stencil written as a gather over *input*
  pixels (no atomics, deterministic): for input row y and tap offset dy the
  source output row is i = (y - dy) / s, valid when y - dy >= 0, divisible by s
  and i < Ho. Grid (N * cdiv(H*W, BLOCK_P), cdiv(C, BLOCK_C)).
- `ddf_bwd_filter_kernel`: one program per (image, output-pixel tile); it loops
  over taps, heads and channel tiles. It owns its pixels' d_spatial_filter
  entries outright and writes one partial sum of d_channel_filter per pixel
  tile, in the accumulation dtype (float32, or float64 when FP64), which the
  caller sums (a deterministic two-stage reduction).
  Grid (N * cdiv(Ho*Wo, BLOCK_P),).

Indexing. Pixel indices inside one image (< H*W or Ho*Wo, checked by the caller
to be below 2**31) are int32; every offset that multiplies by the channel count
or adds the per-image base is int64, so tensors with more than 2**31 elements
are addressed correctly. Loads use the unclamped indices under a mask; Triton
never dereferences a masked-off lane.

Precision. Inputs may be float16, bfloat16, float32 or float64 (each array its
own dtype). Products and sums are formed in float32 (float64 when FP64), and the
result is cast once at the store. The reduction order is fixed, so results are
bitwise reproducible for a given configuration.

All shapes and options are `tl.constexpr`, so each distinct shape compiles once.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
    # One head for the whole channel tile: the spatial filter is then a (BLOCK_P,)
    # vector per tap instead of a (BLOCK_P, BLOCK_C) gather.
    ONE_HEAD_PER_TILE: tl.constexpr = HEADS == 1 or GROUP % BLOCK_C == 0

    pid = tl.program_id(0)
    n = (pid // PIXEL_TILES).to(tl.int64)
    tile = pid % PIXEL_TILES
    c_start = tl.program_id(1) * BLOCK_C

    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)  # flattened output pixel i*Wo + j
    p_mask = p < OUT_PIXELS
    i = p // OUT_W
    j = p % OUT_W
    c = c_start + tl.arange(0, BLOCK_C)
    c_mask = c < C

    x_image = x_ptr + n * (H * W * C)
    cf_image = channel_filter_ptr + n * (C * TAPS)
    sf_image = spatial_filter_ptr + n * (OUT_PIXELS * HEADS * TAPS)
    sf_pixel = p.to(tl.int64) * (HEADS * TAPS)
    if ONE_HEAD_PER_TILE:
        sf_offset = sf_pixel + (c_start // GROUP) * TAPS
        sf_mask = p_mask
    else:
        sf_offset = sf_pixel[:, None] + ((c // GROUP) * TAPS)[None, :]
        sf_mask = p_mask[:, None] & c_mask[None, :]

    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    # Rows of taps are a loop and columns are unrolled: code size grows with k, not k*k.
    for ky in range(KERNEL_SIZE):
        y = i * STRIDE + (ky - RADIUS) * DILATION
        row_valid = p_mask & (y >= 0) & (y < H)
        for kx in tl.static_range(KERNEL_SIZE):
            t = ky * KERNEL_SIZE + kx
            xx = j * STRIDE + (kx - RADIUS) * DILATION
            valid = row_valid & (xx >= 0) & (xx < W)
            x_offset = (y * W + xx).to(tl.int64) * C
            x_tap = tl.load(
                x_image + (x_offset[:, None] + c[None, :]),
                mask=valid[:, None] & c_mask[None, :],
                other=0.0,
            ).to(ACC)
            cf_tap = tl.load(cf_image + (c * TAPS + t), mask=c_mask, other=0.0).to(ACC)
            sf_tap = tl.load(sf_image + (sf_offset + t), mask=sf_mask, other=0.0).to(ACC)
            if ONE_HEAD_PER_TILE:
                sf_tap = sf_tap[:, None]
            if MUL:
                acc += x_tap * (sf_tap * cf_tap[None, :])
            else:
                acc += x_tap * (sf_tap + cf_tap[None, :])

    out_offset = (n * OUT_PIXELS + p.to(tl.int64)) * C
    tl.store(
        out_ptr + (out_offset[:, None] + c[None, :]),
        acc.to(out_ptr.dtype.element_ty),
        mask=p_mask[:, None] & c_mask[None, :],
    )


@triton.jit
def ddf_bwd_dx_kernel(
    grad_out_ptr,
    channel_filter_ptr,
    spatial_filter_ptr,
    dx_ptr,
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
    """dx tile (BLOCK_P input pixels, BLOCK_C channels) of one image, as a gather."""
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    TAPS: tl.constexpr = KERNEL_SIZE * KERNEL_SIZE
    RADIUS: tl.constexpr = (KERNEL_SIZE - 1) // 2
    IN_PIXELS: tl.constexpr = H * W
    OUT_PIXELS: tl.constexpr = OUT_H * OUT_W
    PIXEL_TILES: tl.constexpr = (IN_PIXELS + BLOCK_P - 1) // BLOCK_P
    GROUP: tl.constexpr = C // HEADS
    ONE_HEAD_PER_TILE: tl.constexpr = HEADS == 1 or GROUP % BLOCK_C == 0

    pid = tl.program_id(0)
    n = (pid // PIXEL_TILES).to(tl.int64)
    tile = pid % PIXEL_TILES
    c_start = tl.program_id(1) * BLOCK_C

    q = tile * BLOCK_P + tl.arange(0, BLOCK_P)  # flattened input pixel y*W + x
    q_mask = q < IN_PIXELS
    yq = q // W
    xq = q % W
    c = c_start + tl.arange(0, BLOCK_C)
    c_mask = c < C

    g_image = grad_out_ptr + n * (OUT_PIXELS * C)
    cf_image = channel_filter_ptr + n * (C * TAPS)
    sf_image = spatial_filter_ptr + n * (OUT_PIXELS * HEADS * TAPS)
    if ONE_HEAD_PER_TILE:
        head_offset = (c_start // GROUP) * TAPS
    else:
        head_offset = (c // GROUP) * TAPS

    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    # Output (i, j) reads input (i*s + dy, j*s + dx) at tap (ky, kx), so input
    # (y, x) receives from i = (y - dy) / s and j = (x - dx) / s when those are
    # exact and in range. `%` and `//` truncate towards zero; negative values
    # are masked out by the `>= 0` tests.
    for ky in range(KERNEL_SIZE):
        rows = yq - (ky - RADIUS) * DILATION
        if STRIDE == 1:
            i = rows
            row_valid = q_mask & (rows >= 0) & (rows < OUT_H)
        else:
            i = rows // STRIDE
            row_valid = q_mask & (rows >= 0) & (rows % STRIDE == 0) & (i < OUT_H)
        for kx in tl.static_range(KERNEL_SIZE):
            t = ky * KERNEL_SIZE + kx
            cols = xq - (kx - RADIUS) * DILATION
            if STRIDE == 1:
                j = cols
                valid = row_valid & (cols >= 0) & (cols < OUT_W)
            else:
                j = cols // STRIDE
                valid = row_valid & (cols >= 0) & (cols % STRIDE == 0) & (j < OUT_W)
            o = (i * OUT_W + j).to(tl.int64)
            g_tap = tl.load(
                g_image + (o[:, None] * C + c[None, :]),
                mask=valid[:, None] & c_mask[None, :],
                other=0.0,
            ).to(ACC)
            cf_tap = tl.load(cf_image + (c * TAPS + t), mask=c_mask, other=0.0).to(ACC)
            if ONE_HEAD_PER_TILE:
                sf_tap = tl.load(sf_image + (o * (HEADS * TAPS) + head_offset + t), mask=valid, other=0.0)
                sf_tap = sf_tap.to(ACC)[:, None]
            else:
                sf_tap = tl.load(
                    sf_image + (o[:, None] * (HEADS * TAPS) + head_offset[None, :] + t),
                    mask=valid[:, None] & c_mask[None, :],
                    other=0.0,
                ).to(ACC)
            if MUL:
                acc += g_tap * (sf_tap * cf_tap[None, :])
            else:
                acc += g_tap * (sf_tap + cf_tap[None, :])

    dx_offset = (n * IN_PIXELS + q.to(tl.int64)) * C
    tl.store(
        dx_ptr + (dx_offset[:, None] + c[None, :]),
        acc.to(dx_ptr.dtype.element_ty),
        mask=q_mask[:, None] & c_mask[None, :],
    )


@triton.jit
def ddf_bwd_filter_kernel(
    x_ptr,
    grad_out_ptr,
    channel_filter_ptr,
    spatial_filter_ptr,
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
    """d_spatial_filter for BLOCK_P output pixels of one image, and their d_channel_filter partials.

    Writes d_spatial_filter[n, p, h, t] for the tile's pixels p, every head h and
    tap t, and dcf_partials[n, tile, t, c] = sum over the tile's pixels, for every
    channel c and tap t. Tap columns are unrolled; tap rows, heads and channel
    tiles are loops, so one accumulator of shape (BLOCK_P,) is live at a time. The grad_out tile is
    re-read once per tap; it stays in cache between taps.
    """
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    TAPS: tl.constexpr = KERNEL_SIZE * KERNEL_SIZE
    RADIUS: tl.constexpr = (KERNEL_SIZE - 1) // 2
    OUT_PIXELS: tl.constexpr = OUT_H * OUT_W
    PIXEL_TILES: tl.constexpr = (OUT_PIXELS + BLOCK_P - 1) // BLOCK_P
    GROUP: tl.constexpr = C // HEADS

    pid = tl.program_id(0)
    n = (pid // PIXEL_TILES).to(tl.int64)
    tile = pid % PIXEL_TILES

    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < OUT_PIXELS
    i = p // OUT_W
    j = p % OUT_W
    p64 = p.to(tl.int64)
    lanes = tl.arange(0, BLOCK_C)

    x_image = x_ptr + n * (H * W * C)
    g_image = grad_out_ptr + n * (OUT_PIXELS * C)
    cf_image = channel_filter_ptr + n * (C * TAPS)
    sf_image = spatial_filter_ptr + n * (OUT_PIXELS * HEADS * TAPS)
    dsf_image = d_spatial_filter_ptr + n * (OUT_PIXELS * HEADS * TAPS)
    # pid == n * PIXEL_TILES + tile indexes the partials' leading (N * P) axes.
    partials_tile = dcf_partials_ptr + pid.to(tl.int64) * (TAPS * C)

    for ky in range(KERNEL_SIZE):
        y = i * STRIDE + (ky - RADIUS) * DILATION
        row_valid = p_mask & (y >= 0) & (y < H)
        for kx in tl.static_range(KERNEL_SIZE):
            t = ky * KERNEL_SIZE + kx
            xx = j * STRIDE + (kx - RADIUS) * DILATION
            valid = row_valid & (xx >= 0) & (xx < W)
            x_offset = (y * W + xx).to(tl.int64) * C
            for h in range(HEADS):
                sf_offset = p64 * (HEADS * TAPS) + h * TAPS + t
                if MUL:
                    sf_tap = tl.load(sf_image + sf_offset, mask=p_mask, other=0.0).to(ACC)
                d_spatial = tl.zeros((BLOCK_P,), dtype=ACC)
                for c_in_head in range(0, GROUP, BLOCK_C):
                    c = h * GROUP + c_in_head + lanes
                    c_mask = (c_in_head + lanes) < GROUP
                    g_tile = tl.load(
                        g_image + (p64[:, None] * C + c[None, :]),
                        mask=p_mask[:, None] & c_mask[None, :],
                        other=0.0,
                    ).to(ACC)
                    x_tap = tl.load(
                        x_image + (x_offset[:, None] + c[None, :]),
                        mask=valid[:, None] & c_mask[None, :],
                        other=0.0,
                    ).to(ACC)
                    gx = g_tile * x_tap
                    if MUL:
                        cf_tap = tl.load(cf_image + (c * TAPS + t), mask=c_mask, other=0.0).to(ACC)
                        d_spatial += tl.sum(gx * cf_tap[None, :], axis=1)
                        d_channel = tl.sum(gx * sf_tap[:, None], axis=0)
                    else:
                        d_spatial += tl.sum(gx, axis=1)
                        d_channel = tl.sum(gx, axis=0)
                    tl.store(
                        partials_tile + (t * C + c),
                        d_channel.to(dcf_partials_ptr.dtype.element_ty),
                        mask=c_mask,
                    )
                tl.store(
                    dsf_image + sf_offset,
                    d_spatial.to(d_spatial_filter_ptr.dtype.element_ty),
                    mask=p_mask,
                )
