"""DDF in pure `jax.lax`: the reference implementation and the fallback.

Runs on every backend. Layout and semantics are those of `common.py`.

**Stride phases.** x is zero-padded by m = r*d on the top and left (and enough
on the bottom and right), then split into its s*s stride phases:

    phases[p, q, n, a, b, c] = x_padded[n, a*s + p, b*s + q, c]     (s, s, N, Hp/s, Wp/s, C)

Tap t with offset (dy, dx) then reads the *contiguous* window
`phases[(m+dy) % s, (m+dx) % s, :, (m+dy)//s : ... + Ho, (m+dx)//s : ... + Wo, :]`,
which equals `x[n, i*s + dy, j*s + dx, c]` on the output grid. For s = 1 the
split is a free reshape.

**Forward.** `out = sum_t window_t * comb(sf[..., t], cf[:, t])`, unrolled over
the k*k taps. Accumulation is in float32 (float64 for float64 inputs). The sum
is written so that XLA can fuse it into one loop over the output and never
build the k*k-times larger unfolded tensor. On the CPU backend (jax 0.10.2)
this holds: at x (8, 56, 56, 64) float32 and k=3 the jitted forward's
temporaries are 1.07x the bytes of x and the jitted gradient's 2.3x (an
unfolded tensor alone would be 9x). On GPUs the same fusion is intended but
has not been measured yet.

**Backward**, written out (not autodiff of the forward), as one `lax.scan`
over the taps so that only one tap's temporaries are alive at a time:

- dx: the transposed stencil as a gather. Each tap adds `g * comb_t` into the
  same window of a phase-split gradient buffer (a dynamic-update-slice, no
  scatter); merging the phases and cropping the padding gives dx.
- d_spatial_filter[n, i, j, g, t] = sum over head g's channels of
  `g * window_t` (times cf[:, t] for "mul"): a batched mat-vec.
- d_channel_filter[n, c, t] = sum over output pixels of `g * window_t`
  (times sf[..., t] for "mul"): a batched mat-vec.

The mat-vecs use `Precision.HIGHEST`, meant to keep float32 products in full
float32 on GPUs (no TF32); that has not been checked on a GPU yet.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .common import DDFConfig, accumulation_dtype, combine_filters, make_ddf_op


def _phase_split(x: jax.Array, config: DDFConfig, out_h: int, out_w: int) -> jax.Array:
    """Zero-pads x and splits it into stride phases, (s, s, N, Hp/s, Wp/s, C)."""
    n, h, w, c = x.shape
    s, m = config.stride, config.radius * config.dilation

    def padded_length(size, out):
        # Covers every tap of every output (2m + (out-1)s + 1) and all of x,
        # rounded up to a multiple of s.
        needed = max(2 * m + (out - 1) * s + 1, m + size)
        return -(-needed // s) * s

    hp, wp = padded_length(h, out_h), padded_length(w, out_w)
    xp = jnp.pad(x, ((0, 0), (m, hp - m - h), (m, wp - m - w), (0, 0)))
    return xp.reshape(n, hp // s, s, wp // s, s, c).transpose(2, 4, 0, 1, 3, 5)


def _phase_merge(phases: jax.Array, h: int, w: int, config: DDFConfig) -> jax.Array:
    """Inverse of `_phase_split`: (s, s, N, Hp/s, Wp/s, C) -> (N, H, W, C), padding cropped."""
    s, _, n, hs, ws, c = phases.shape
    m = config.radius * config.dilation
    xp = phases.transpose(2, 3, 0, 4, 1, 5).reshape(n, hs * s, ws * s, c)
    return xp[:, m : m + h, m : m + w, :]


def _tap_table(config: DDFConfig) -> np.ndarray:
    """Per tap: (phase row, phase col, window row start, window col start, t)."""
    s, m = config.stride, config.radius * config.dilation
    return np.array(
        [((m + dy) % s, (m + dx) % s, (m + dy) // s, (m + dx) // s, t) for t, dy, dx in config.tap_offsets()],
        np.int32,
    )


def _per_channel(spatial_tap: jax.Array, channels: int) -> jax.Array:
    """(N, Ho, Wo, G) head values -> (N, Ho, Wo, C): channel c reads head c // (C // G)."""
    heads = spatial_tap.shape[-1]
    if heads == 1:
        return spatial_tap
    return jnp.repeat(spatial_tap, channels // heads, axis=-1)


def forward(x, channel_filter, spatial_filter, config: DDFConfig):
    """DDF forward. See the module docstring for the layout."""
    n, _, _, c = x.shape
    _, out_h, out_w, _, _ = spatial_filter.shape
    acc = accumulation_dtype(x.dtype, channel_filter.dtype, spatial_filter.dtype)
    phases = _phase_split(x, config, out_h, out_w)
    sf = spatial_filter.astype(acc)
    cf = channel_filter.astype(acc)
    out = jnp.zeros((n, out_h, out_w, c), acc)
    for py, px, sy, sx, t in _tap_table(config):
        window = phases[py, px, :, sy : sy + out_h, sx : sx + out_w, :].astype(acc)
        weight = combine_filters(_per_channel(sf[..., t], c), cf[:, None, None, :, t], config.combine)
        out = out + window * weight
    return out.astype(x.dtype)


def backward(x, channel_filter, spatial_filter, grad_out, config: DDFConfig):
    """DDF backward: (dx, d_channel_filter, d_spatial_filter), in the accumulation dtype."""
    n, h, w, c = x.shape
    _, out_h, out_w, heads, _ = spatial_filter.shape
    group = c // heads
    acc = accumulation_dtype(x.dtype, channel_filter.dtype, spatial_filter.dtype, grad_out.dtype)
    g = grad_out.astype(acc)
    phases = _phase_split(x, config, out_h, out_w)
    window_size = (1, 1, n, out_h, out_w, c)
    zero = jnp.zeros((), jnp.int32)

    def tap_step(dx_phases, tap):
        py, px, sy, sx, t = (tap[i] for i in range(5))
        start = (py, px, zero, sy, sx, zero)
        window = lax.dynamic_slice(phases, start, window_size)[0, 0].astype(acc)
        sf_t = lax.dynamic_index_in_dim(spatial_filter, t, axis=4, keepdims=False).astype(acc)
        cf_t = lax.dynamic_index_in_dim(channel_filter, t, axis=2, keepdims=False).astype(acc)

        weight = combine_filters(_per_channel(sf_t, c), cf_t[:, None, None, :], config.combine)
        dx_window = lax.dynamic_slice(dx_phases, start, window_size) + (g * weight)[None, None]
        dx_phases = lax.dynamic_update_slice(dx_phases, dx_window, start)

        gx = (g * window).reshape(n, out_h * out_w, heads, group)
        if config.combine == "mul":
            highest = lax.Precision.HIGHEST
            d_spatial = jnp.einsum("npgc,ngc->npg", gx, cf_t.reshape(n, heads, group), precision=highest)
            d_channel = jnp.einsum("npgc,npg->ngc", gx, sf_t.reshape(n, out_h * out_w, heads), precision=highest)
        else:
            d_spatial, d_channel = gx.sum(axis=3), gx.sum(axis=1)
        return dx_phases, (d_spatial.reshape(n, out_h, out_w, heads), d_channel.reshape(n, c))

    dx_phases, (d_spatial, d_channel) = lax.scan(
        tap_step, jnp.zeros(phases.shape, acc), jnp.asarray(_tap_table(config))
    )
    dx = _phase_merge(dx_phases, h, w, config)
    return dx, jnp.moveaxis(d_channel, 0, -1), jnp.moveaxis(d_spatial, 0, -1)


ddf_xla = make_ddf_op(forward, backward, "xla")


def get_op(platform: str):
    """The XLA implementation runs on every platform."""
    del platform
    return ddf_xla
