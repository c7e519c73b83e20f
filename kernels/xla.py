"""DDF in pure `jax.lax`: the reference implementation and the fallback.

Runs on every backend. Layout and semantics are those of `common.py`.

**Padding and windows.** x is zero-padded by m = r*d on the top and left (and
enough on the bottom and right). Tap t with offset (dy, dx) then reads the
strided window

    window_t[n, i, j, c] = x_padded[n, m + dy + i*s, m + dx + j*s, c]
                         = x[n, i*s + dy, j*s + dx, c]      (zero outside the image)

on the output grid. Every pass below is written as a sum over the k*k taps of
such windows, unrolled, so that XLA fuses it into one loop over its output and
never builds the k*k-times larger unfolded tensor. The forward and the
backward pad x with the same instruction, so a jitted forward+backward keeps
a single padded copy. Accumulation is in float32
(float64 for float64 inputs); lower-precision inputs are cast inside the
fused loops.

**Forward.** `out = sum_t window_t * comb(sf[..., t], cf[:, t])`.

**Backward**, written out (not autodiff of the forward):

- dx: the transposed stencil as a gather over output positions. Input pixel
  (y, x) with stride phase (py, px) = (y % s, x % s) receives tap t from
  output pixel ((y - dy) / s, (x - dx) / s) when both divisions are exact, so
  each phase is a fused sum over its taps of contiguous windows of the
  zero-padded `grad_out`, times the matching window of `spatial_filter` (a
  pad fused into the loop, so sf is never copied), times `cf[:, t]`.
  The s*s phases are interleaved into dx by one fused stack and reshape.
- d_spatial_filter[n, i, j, g, t] = sum over head g's channels of
  `grad_out * window_t` (times cf[:, t] for "mul").
- d_channel_filter[n, c, t] = sum over output pixels of `grad_out * window_t`
  (times sf[..., t] for "mul").

All three passes read the cotangent from one zero-padded copy, the one the
dx gather needs. Read directly, grad_out's producer (in a network, the
backward of the next layer: a BatchNorm, an activation) would be fused into
every pass at every tap and recomputed k*k times over.

**Why the filter gradients are summed in stages.** XLA:CPU (jax 0.10.2) emits a
reduction of a fused expression as a scalar loop (no fast-math
reassociation), and its vectorised YNNPACK reductions take only operands
already in memory: handed a window, it first copies the window. Two forms do
run at the speed of an elementwise loop:

- *sums by eights*: a variadic reduce of a few operands over a non-minor
  axis of at most 8 elements. LLVM unrolls it and vectorises the loop over the
  minor axis. Each step divides the data by 8, so the first partial sum holds
  K/8 of the elements of grad_out.
- *unrolled blocks*: an explicit sum of strided slices, one term per pixel of
  a block, fused into one elementwise loop; the block partials of a few taps
  are stacked into one fused loop, and YNNPACK reduces the stack. Compile time
  grows with the number of terms.

Each filter gradient uses the fastest form whose first partial sum fits a
budget of temporaries, else one scalar pass: `spatial_filter_method` and
`channel_filter_method` decide, and their docstrings give the rules.
When both use sums by eights, the channel filter's reads of x depend (through
an added zero) on the finished spatial filter gradient, so that XLA schedules
the two one after the other and never holds both first partials at once.

**The filters are stored once.** Each pass over the taps reads a spatial
filter value for every channel and a channel filter value for every pixel.
Left to itself, XLA fuses the filters' producers (in a network, FilterNorm)
into those loops and recomputes them at every read, in the forward and in
each backward pass. `store_filters`, the hook `make_ddf_op` calls before the
forward, prevents that with a construct XLA does not fuse into the loops that
read it, a dot: an exact product with the K x K identity. Its outputs are the
backward's residuals, so the backward reads the same stored arrays.
`lax.optimization_barrier` would say the same more plainly, but XLA:CPU
removes barriers before it fuses. Every pass reads the channel filter as
(N, K, C), row-major, stored by one more such product, batched over N
(`_channel_filter_along_c`): read as (N, C, K), `cf[:, :, t]` is a strided
load for every element of every tap. The measured costs are in BENCHMARKS.md.

The identity products are the only dots, taken at the highest precision, so
float32 inputs never run at reduced (TF32) precision on a GPU. The constants
were tuned on the CPU. The same code runs on GPUs, but it has not been timed
there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .common import DDFConfig, accumulation_dtype, combine_filters, make_ddf_op

# Channel lanes of the spatial-filter partial sums: 8 float32 = one 256-bit vector.
LANES = 8
# Operands per variadic reduce in a sum by eights (more and LLVM no longer unrolls it).
REDUCE_OPERANDS = 3
# Largest first partial sum of each filter gradient, in elements of x (all taps together).
PARTIAL_BUDGET = 1.25
# Unrolled blocks of the channel-filter gradient: at most BLOCK_ROWS rows and
# BLOCK_PIXELS pixels per block, and MAX_UNROLLED_TERMS terms over all taps
# (compile time grows with them).
BLOCK_ROWS = 32
BLOCK_PIXELS = 64
MAX_UNROLLED_TERMS = 1600
# XLA:CPU fuses a concatenate of at most this many operands into one loop.
MAX_FUSED_STACK = 8

def _pad_hw(a: jax.Array, top: int, bottom: int, left: int, right: int) -> jax.Array:
    """Zero-pads axes 1 and 2 of an (N, H, W, ...) array.

    Written as a pad of the (N, H, W * rest) view: XLA:CPU emits that as a
    vectorised copy, while the 4- or 5-D pad becomes a scalar loop.
    """
    n, h, w = a.shape[:3]
    rest = int(np.prod(a.shape[3:]))
    flat = lax.pad(
        a.reshape(n, h, w * rest),
        jnp.zeros((), a.dtype),
        [(0, 0, 0), (top, bottom, 0), (left * rest, right * rest, 0)],
    )
    return flat.reshape(n, h + top + bottom, w + left + right, *a.shape[3:])


def _padded_input(x: jax.Array, config: DDFConfig, out_h: int, out_w: int) -> jax.Array:
    """x zero-padded by m on the top and left and enough on the bottom and right for every window."""
    _, h, w, _ = x.shape
    s, m = config.stride, config.radius * config.dilation
    # Covers every tap of every output (2m + (out-1)s + 1) and all of x.
    hp = max(2 * m + (out_h - 1) * s + 1, m + h)
    wp = max(2 * m + (out_w - 1) * s + 1, m + w)
    # A plain pad: XLA rewrites windows of a flat pad (see `_pad_hw`) differently
    # in different consumers and then keeps two padded copies.
    return jnp.pad(x, ((0, 0), (m, hp - m - h), (m, wp - m - w), (0, 0)))


def _window(xp, config: DDFConfig, dy, dx, out_h, out_w, rows=(0, 1), cols=(0, 1), channels=slice(None)):
    """`x[n, i*s + dy, j*s + dx, channels]` for output rows i = rows[0] + a*rows[1] < out_h, columns likewise."""
    s, m = config.stride, config.radius * config.dilation
    (row0, row_step), (col0, col_step) = rows, cols
    row_count, col_count = -(-(out_h - row0) // row_step), -(-(out_w - col0) // col_step)
    y0, x0 = m + dy + row0 * s, m + dx + col0 * s
    return xp[
        :,
        y0 : y0 + (row_count - 1) * s * row_step + 1 : s * row_step,
        x0 : x0 + (col_count - 1) * s * col_step + 1 : s * col_step,
        channels,
    ]


def _block_step(size: int, step: int) -> int:
    """A block length of at most `step` for an axis of `size`: a divisor of `size`
    when one is at least half of `step` (no short last block), else `size` split
    into equal-as-possible blocks."""
    step = max(1, min(step, size))
    for candidate in range(step, (step - 1) // 2, -1):
        if size % candidate == 0:
            return candidate
    return -(-size // -(-size // step))


def _per_channel(spatial_tap: jax.Array, channels: int) -> jax.Array:
    """(N, Ho, Wo, G) head values -> (N, Ho, Wo, C): channel c reads head c // (C // G)."""
    heads = spatial_tap.shape[-1]
    if heads == 1:
        return spatial_tap
    return jnp.repeat(spatial_tap, channels // heads, axis=-1)


def store_filters(channel_filter, spatial_filter):
    """The filters, unchanged in value, shape and dtype, as arrays XLA must store.

    `make_ddf_op`'s hook: the forward reads these, and so does the backward (they
    are its residuals). Each is a product with the K x K identity, accumulated
    in float32 (float64 for float64) and cast back, which is exact for finite
    filters (each output element is 1 * value plus 0 * the other values; an
    inf or NaN tap makes the other taps of its filter NaN, where the output is
    non-finite anyway). XLA does not fuse a dot into the loops that read it, so
    the filters' producers run once, instead of once per channel (sf) or per
    pixel (cf) in every pass over the taps.

    The stored sf is a residual as large as sf: G*K/C times the bytes of x at
    stride 1. It is stored only where G*K is small against C
    (`_spatial_filter_is_stored`), so that the residual adds little to the
    vjp's temporaries; elsewhere both filters are passed on as given (storing
    cf alone also moved XLA:CPU's schedule to more temporaries there).
    """
    if not _spatial_filter_is_stored(channel_filter, spatial_filter):
        return channel_filter, spatial_filter
    return _stored(channel_filter, "nct,tk->nck"), _stored(spatial_filter, "nijgt,tk->nijgk")


def _spatial_filter_is_stored(channel_filter, spatial_filter) -> bool:
    """Whether `store_filters` stores the filters: G*K at most 3/4 of C for 3x3 filters, at most
    2/5 of C for larger ones (whose backward holds more temporaries of its own)."""
    heads, taps = spatial_filter.shape[-2:]
    channels = channel_filter.shape[1]
    if taps <= 9:
        return 4 * heads * taps <= 3 * channels
    return 5 * heads * taps <= 2 * channels


def _stored(a: jax.Array, subscripts: str, dtype=None) -> jax.Array:
    """`a` (in `dtype`, default a's), laid out by `subscripts`, through an exact product with the identity."""
    acc = accumulation_dtype(a.dtype)  # (XLA:CPU has no bfloat16 x bfloat16 -> float32 dot)
    eye = jnp.eye(a.shape[-1], dtype=acc)
    highest = lax.Precision.HIGHEST  # exact on GPUs too (no TF32 rounding)
    return jnp.einsum(subscripts, a.astype(acc), eye, precision=highest).astype(dtype or a.dtype)


def _channel_filter_along_c(channel_filter: jax.Array, dtype) -> jax.Array:
    """The (N, C, K) channel filter as a stored (N, K, C) array in `dtype`, row-major.

    An exact product with the identity, batched over N, so that the product's
    own output is (N, K, C) in row-major order. Unbatched ("nct,tk->nkc"), the
    product comes out as (K, N, C), XLA keeps that order as the array's layout,
    and a sample's successive taps lie N * C elements apart: on XLA:CPU the
    passes over the taps ran slower with it (BENCHMARKS.md).
    """
    acc = accumulation_dtype(channel_filter.dtype)
    n, _, taps = channel_filter.shape
    eye = jnp.broadcast_to(jnp.eye(taps, dtype=acc), (n, taps, taps))
    highest = lax.Precision.HIGHEST
    return jnp.einsum("nkt,nct->nkc", eye, channel_filter.astype(acc), precision=highest).astype(dtype)


def _zero_after(a: jax.Array) -> jax.Array:
    """A scalar 0 that XLA can only compute once `a` is computed (finite or not)."""
    first = a.reshape(-1)[0]
    return jnp.where(jnp.isfinite(first), first, 0) * 0


def _stacked_groups(items: list) -> list[list]:
    """Splits items into the fewest nearly equal groups of at most MAX_FUSED_STACK."""
    if not items:
        return []
    count = -(-len(items) // MAX_FUSED_STACK)
    size = -(-len(items) // count)
    return [items[i : i + size] for i in range(0, len(items), size)]


def _sum_reduce(operands: list[jax.Array], axes: tuple[int, ...]) -> list[jax.Array]:
    """Sums of same-shaped arrays over `axes`, as one variadic reduce (one pass over all of them).

    A lone operand is passed twice: XLA:CPU hands a single-operand sum to
    YNNPACK, which first copies a fused input (such as a window) into memory.
    """
    operands = list(operands)
    count = len(operands)
    if count == 1:
        operands = operands * 2
    zeros = tuple(jnp.zeros((), a.dtype) for a in operands)
    sums = lax.reduce(tuple(operands), zeros, lambda a, b: tuple(u + v for u, v in zip(a, b)), axes)
    return list(sums[:count])


def _sum_by_eights(operands: list[jax.Array], axis: int) -> list[jax.Array]:
    """Sums each operand over `axis` (at most 8 long), a few operands per variadic reduce.

    LLVM fully unrolls such a short sum over a non-minor axis, and then
    vectorises the loop over the minor axis: unlike a long reduction, this
    runs at the speed of an elementwise loop on XLA:CPU.
    """
    sums = []
    for i in range(0, len(operands), REDUCE_OPERANDS):
        sums += _sum_reduce(operands[i : i + REDUCE_OPERANDS], (axis,))
    return sums


def _pad_axis(a: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero-pads `axis` of `a` at the end to `size`."""
    if a.shape[axis] == size:
        return a
    pads = [(0, 0)] * a.ndim
    pads[axis] = (0, size - a.shape[axis])
    return jnp.pad(a, pads)


def forward(x, channel_filter, spatial_filter, config: DDFConfig):
    """DDF forward, the op's contract in `common` (layouts in the module docstring).

    Args:
        x: (N, H, W, C), float16/bfloat16/float32/float64.
        channel_filter: (N, C, K).
        spatial_filter: (N, Ho, Wo, G, K).
        config: the static `DDFConfig`.

    Returns:
        (N, Ho, Wo, C) in x's dtype, accumulated in float32 (float64 for float64).
    """
    n, _, _, c = x.shape
    _, out_h, out_w, _, _ = spatial_filter.shape
    acc = accumulation_dtype(x.dtype, channel_filter.dtype, spatial_filter.dtype)
    xp = _padded_input(x, config, out_h, out_w)
    # cf as (N, K, C), read contiguously along C, stored (a transpose would be
    # fused into the loop below as a strided read); sf stored unless `store_filters` did.
    cf = _channel_filter_along_c(channel_filter, acc)
    stored = _spatial_filter_is_stored(channel_filter, spatial_filter)
    sf = spatial_filter.astype(acc) if stored else _stored(spatial_filter, "nijgt,tk->nijgk", acc)
    out = jnp.zeros((n, out_h, out_w, c), acc)
    for t, dy, dx in config.tap_offsets():
        weight = combine_filters(_per_channel(sf[..., t], c), cf[:, None, None, t, :], config.combine)
        out = out + _window(xp, config, dy, dx, out_h, out_w).astype(acc) * weight
    return out.astype(x.dtype)


def _cotangent_padding(config: DDFConfig) -> tuple[int, int]:
    """Rows (and columns) of zeros before and after grad_out that the dx gather reads.

    Phase (py, px), tap (dy, dx) reads output row a + (py - dy) / s for input
    row a*s + py, and (py - dy) // s lies in [-ceil(m/s), (m + s - 1) // s].
    """
    s, m = config.stride, config.radius * config.dilation
    return -(-m // s), (m + s - 1) // s


def _input_gradient(gp, sf, cf, config: DDFConfig, h: int, w: int, acc) -> jax.Array:
    """dx (N, H, W, C) from gp, grad_out padded by `_cotangent_padding`, and cf as
    (N, K, C): per input stride phase, a fused sum of windows of gp and sf."""
    s = config.stride
    before, after = _cotangent_padding(config)
    n, c = gp.shape[0], gp.shape[3]
    out_h, out_w = gp.shape[1] - before - after, gp.shape[2] - before - after
    phases = []
    for py in range(s):
        row = []
        for px in range(s):
            total = jnp.zeros((n, out_h, out_w, c), acc)
            for t, dy, dx in config.tap_offsets():
                if (py - dy) % s or (px - dx) % s:
                    continue  # tap t never lands on this phase
                a, b = before + (py - dy) // s, before + (px - dx) // s
                g_window = gp[:, a : a + out_h, b : b + out_w, :].astype(acc)
                # sf is read through a pad fused into the loop (no padded copy):
                # rows a - before ... of sf, zero outside.
                shift = [(0, 0, 0), (before - a, a - before, 0), (before - b, b - before, 0), (0, 0, 0)]
                sf_window = _per_channel(lax.pad(sf[..., t], jnp.zeros((), sf.dtype), shift).astype(acc), c)
                total = total + g_window * combine_filters(sf_window, cf[:, None, None, t, :], config.combine)
            row.append(total)
        phases.append(row)
    if s == 1:
        return phases[0][0]
    dx = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)  # (N, Ho, py, Wo, px, C)
    return dx.reshape(n, out_h * s, out_w * s, c)[:, :h, :w, :]


def _chunks_sum_by_eights(chunks: int) -> bool:
    """Whether `chunks` is at most 8, or 8 times such a number, recursively."""
    while chunks > 8:
        if chunks % 8:
            return False
        chunks //= 8
    return True


def spatial_filter_method(g_shape, heads: int, taps: int, x_size: int) -> str:
    """How `backward` sums d_spatial_filter: "eights" (vectorised stages) or "scalar" (one reduce).

    Sums by eights need whole lanes of 8 channels per head, a chunk count that
    sums by eights, and a first partial sum within PARTIAL_BUDGET elements of x.
    """
    n, out_h, out_w, c = g_shape
    group = c // heads
    chunks = group // LANES
    if group % LANES or not _chunks_sum_by_eights(chunks):
        return "scalar"
    # Elements per tap of the first partial sum: the lanes, times the chunks left after one step.
    first_partial = heads * LANES * (chunks // 8 if chunks > 8 else 1) * n * out_h * out_w
    return "eights" if taps * first_partial <= PARTIAL_BUDGET * x_size else "scalar"


def _channel_pixels_per_partial(g_shape, taps: int, x_size: int) -> int:
    """Output pixels each element of the channel-filter partial must sum to stay within its budget."""
    return -(-taps * int(np.prod(g_shape)) // max(1, int(PARTIAL_BUDGET * x_size)))


def channel_filter_method(g_shape, taps: int, x_size: int) -> str:
    """How `backward` sums d_channel_filter: "eights", "blocks" (unrolled) or "scalar" (one reduce).

    Sums by eights (8 rows, then 8 columns) when a partial of 1/8 of the
    pixels fits PARTIAL_BUDGET elements of x; otherwise unrolled
    blocks of up to BLOCK_PIXELS pixels, unless that needs bigger blocks or
    more than MAX_UNROLLED_TERMS terms.
    """
    pixels = _channel_pixels_per_partial(g_shape, taps, x_size)
    if pixels <= 8:
        return "eights"
    if pixels > BLOCK_PIXELS or taps * pixels > MAX_UNROLLED_TERMS:
        return "scalar"
    return "blocks"


def _spatial_filter_gradient(xp, g, cf, config: DDFConfig, heads: int, x_size: int, acc) -> jax.Array:
    """d_spatial_filter (N, Ho, Wo, G, K): per tap, the sum over each head's channels of g * window_t
    (* cf_t, with cf as (N, K, C))."""
    n, out_h, out_w, c = g.shape
    group = c // heads
    taps = config.tap_offsets()
    products = []
    for t, dy, dx in taps:
        product = g.astype(acc) * _window(xp, config, dy, dx, out_h, out_w).astype(acc)
        if config.combine == "mul":
            product = product * cf[:, None, None, t, :]
        products.append(product)

    if spatial_filter_method(g.shape, heads, len(taps), x_size) == "scalar":
        # One scalar pass: a variadic reduce over the channels, all taps at once.
        return jnp.stack(_sum_reduce([p.reshape(n, out_h, out_w, heads, group) for p in products], (4,)), axis=-1)

    # Channel c = 8a + l of a head becomes (chunk a, lane l); chunks are summed by eights.
    chunks = group // LANES
    sums = [p.reshape(n, out_h, out_w, heads, chunks, LANES) for p in products]
    while chunks > 1:
        step = min(chunks, 8)
        sums = [s.reshape(n, out_h, out_w, heads, chunks // step, step, LANES) for s in sums]
        sums = _sum_by_eights(sums, axis=5)
        chunks //= step
    # The lanes: a short scalar sum.
    return jnp.stack(_sum_reduce([s.reshape(n, out_h, out_w, heads, LANES) for s in sums], (4,)), axis=-1)


def _channel_filter_gradient(xp, g, sf, config: DDFConfig, x_size: int, acc, after=None) -> jax.Array:
    """d_channel_filter (N, C, K): per tap, the sum over output pixels of g * window_t (* sf_t).

    `after` (the spatial filter gradient, in `backward`): sums by eights start
    only once it is computed, so that the two gradients' first partial sums are
    never held at the same time.
    """
    n, out_h, out_w, c = g.shape
    taps = config.tap_offsets()

    def product(t, dy, dx, pixels=(slice(None),) * 3, rows=(0, 1), cols=(0, 1)):
        window = _window(xp, config, dy, dx, out_h, out_w, rows=rows, cols=cols)
        term = g[pixels].astype(acc) * window.astype(acc)
        if config.combine == "mul":
            term = term * _per_channel(sf[pixels + (slice(None), t)].astype(acc), c)
        return term

    method = channel_filter_method(g.shape, len(taps), x_size)
    if method == "eights" and after is not None:
        # A (numerically void) data dependence: XLA schedules the reads of xp below after `after`.
        xp = xp + _zero_after(after).astype(xp.dtype)
    if method == "eights":
        # Sums by eights: 8 rows, then 8 columns, then a short scalar sum.
        rows, cols = -(-out_h // 8), -(-out_w // 8)
        sums = [_pad_axis(product(*tap), 1, 8 * rows).reshape(n, rows, 8, out_w, c) for tap in taps]
        sums = _sum_by_eights(sums, axis=2)
        sums = [_pad_axis(s, 2, 8 * cols).reshape(n, rows, cols, 8, c) for s in sums]
        sums = _sum_by_eights(sums, axis=3)
        return jnp.stack(_sum_reduce(sums, (1, 2)), axis=-1)
    if method == "scalar":
        # One scalar pass over all pixels, all taps at once.
        return jnp.stack(_sum_reduce([product(*tap) for tap in taps], (1, 2)), axis=-1)

    # Blocks of pixels summed by unrolled elementwise adds, then reduced.
    pixels_per_partial = _channel_pixels_per_partial(g.shape, len(taps), x_size)
    row_step = _block_step(out_h, min(BLOCK_ROWS, pixels_per_partial))
    col_step = _block_step(out_w, -(-pixels_per_partial // row_step))
    blocks = (-(-out_h // row_step), -(-out_w // col_step))

    def block_partial(t, dy, dx):
        # (N, row blocks, column blocks, C): block (a, b) sums the output pixels
        # (a*row_step + i, b*col_step + j) over i < row_step, j < col_step.
        total = None
        for i in range(row_step):
            for j in range(col_step):
                pixels = (slice(None), slice(i, None, row_step), slice(j, None, col_step))
                term = product(t, dy, dx, pixels, rows=(i, row_step), cols=(j, col_step))
                # The last block is short where a step does not divide Ho or Wo.
                term = _pad_axis(_pad_axis(term, 1, blocks[0]), 2, blocks[1])
                total = term if total is None else total + term
        return total

    # Stacked on a leading tap axis, so the fused loop's minor axis stays C.
    stacks = _stacked_groups(taps)
    groups = [jnp.stack([block_partial(*tap) for tap in stack], axis=0).sum((2, 3)) for stack in stacks]
    return jnp.moveaxis(jnp.concatenate(groups, axis=0), 0, -1)


def backward(x, channel_filter, spatial_filter, grad_out, config: DDFConfig):
    """DDF backward, written out (see the module docstring).

    Args:
        x, channel_filter, spatial_filter, config: as for `forward`.
        grad_out: (N, Ho, Wo, C), the cotangent of the output.

    Returns:
        (dx (N, H, W, C), d_channel_filter (N, C, K), d_spatial_filter
        (N, Ho, Wo, G, K)), in the accumulation dtype (float32, or float64 for
        float64); `common.make_ddf_op` casts each to its input's dtype.
    """
    _, h, w, _ = x.shape
    _, out_h, out_w, heads, _ = spatial_filter.shape
    acc = accumulation_dtype(x.dtype, channel_filter.dtype, spatial_filter.dtype, grad_out.dtype)
    # cf as (N, K, C), stored, as in the forward: every pass reads cf[:, t] along C.
    cf = _channel_filter_along_c(channel_filter, acc)
    # Every pass reads the cotangent from one padded copy (which the dx gather
    # needs anyway). Read directly, the cotangent's producer (in a network, a
    # BatchNorm backward, say) would be fused into every pass and every tap.
    before, after = _cotangent_padding(config)
    gp = _pad_hw(grad_out, before, after, before, after)
    xp = _padded_input(x, config, out_h, out_w)
    interior = (slice(None), slice(before, before + out_h), slice(before, before + out_w))
    d_spatial = _spatial_filter_gradient(xp, gp[interior], cf, config, heads, x.size, acc)
    d_channel = _channel_filter_gradient(xp, gp[interior], spatial_filter, config, x.size, acc, after=d_spatial)
    dx = _input_gradient(gp, spatial_filter, cf, config, h, w, acc)
    return dx, d_channel, d_spatial


ddf_xla = make_ddf_op(forward, backward, "xla", store_filters=store_filters)


def get_op(platform: str):
    """The XLA implementation runs on every platform."""
    del platform
    return ddf_xla
