"""DDF in pure `jax.lax`: the reference implementation and the fallback.

Runs on every backend. The op is written as a sum over the k*k taps of
shifted (strided) views of x, each multiplied by that tap's combined filter:

    out = sum_t  window_t(x) * comb(sf[..., t], cf[:, t])

`window_t(x)[n, i, j, c] = x[n, i*s + dy_t, j*s + dx_t, c]` is a pad plus a
strided slice, so XLA fuses the whole sum into one loop over the output: the
k*k-times larger unfolded tensor is never built. Accumulation is in float32
(float64 for float64 inputs).

The backward pass is written out rather than derived by autodiff:

- dx is the transposed stencil as a gather: each tap's `g * comb_t` is moved
  back to the input grid by one `lax.pad` whose interior padding (s - 1)
  undoes the stride and whose (possibly negative) edge padding undoes the
  shift and crops. Again one fused loop, no scatter.
- d_spatial_filter[n, i, j, g, t] = sum over head g's channels of
  g * window_t(x) (* cf[:, t] for "mul").
- d_channel_filter[n, c, t] = sum over output pixels of
  g * window_t(x) (* sf[..., t] for "mul").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .common import DDFConfig, accumulation_dtype, make_ddf_op


def _padded_input(x: jax.Array, config: DDFConfig, out_h: int, out_w: int) -> jax.Array:
    """Zero-pads x so that every tap's strided window is in range."""
    _, h, w, _ = x.shape
    margin = config.radius * config.dilation
    high_h = max(0, (out_h - 1) * config.stride + margin - (h - 1))
    high_w = max(0, (out_w - 1) * config.stride + margin - (w - 1))
    return jnp.pad(x, ((0, 0), (margin, high_h), (margin, high_w), (0, 0)))


def _window(x_padded: jax.Array, dy: int, dx: int, config: DDFConfig, out_h: int, out_w: int):
    """`x[n, i*s + dy, j*s + dx, c]` for the output grid, from the padded input."""
    margin = config.radius * config.dilation
    s = config.stride
    start = (0, margin + dy, margin + dx, 0)
    limit = (
        x_padded.shape[0],
        margin + dy + (out_h - 1) * s + 1,
        margin + dx + (out_w - 1) * s + 1,
        x_padded.shape[3],
    )
    return lax.slice(x_padded, start, limit, (1, s, s, 1))


def _per_channel(spatial_tap: jax.Array, channels: int) -> jax.Array:
    """(N, Ho, Wo, G) head values -> (N, Ho, Wo, C): channel c reads head c // (C // G)."""
    heads = spatial_tap.shape[-1]
    if heads == 1:
        return spatial_tap
    return jnp.repeat(spatial_tap, channels // heads, axis=-1)


def _combine(spatial: jax.Array, channel: jax.Array, combine: str) -> jax.Array:
    return spatial * channel if combine == "mul" else spatial + channel


def forward(x, channel_filter, spatial_filter, config: DDFConfig):
    """DDF forward. See the module docstring for the layout."""
    n, _, _, c = x.shape
    _, out_h, out_w, _, _ = spatial_filter.shape
    acc = accumulation_dtype(x.dtype, channel_filter.dtype, spatial_filter.dtype)
    xp = _padded_input(x, config, out_h, out_w).astype(acc)
    sf = spatial_filter.astype(acc)
    cf = channel_filter.astype(acc)
    out = jnp.zeros((n, out_h, out_w, c), acc)
    for t, dy, dx in config.tap_offsets():
        weight = _combine(_per_channel(sf[..., t], c), cf[:, None, None, :, t], config.combine)
        out = out + _window(xp, dy, dx, config, out_h, out_w) * weight
    return out.astype(x.dtype)


def backward(x, channel_filter, spatial_filter, grad_out, config: DDFConfig):
    """DDF backward: (dx, d_channel_filter, d_spatial_filter), in the accumulation dtype."""
    n, h, w, c = x.shape
    _, out_h, out_w, heads, _ = spatial_filter.shape
    s = config.stride
    acc = accumulation_dtype(x.dtype, channel_filter.dtype, spatial_filter.dtype, grad_out.dtype)
    g = grad_out.astype(acc)
    xp = _padded_input(x, config, out_h, out_w).astype(acc)
    sf = spatial_filter.astype(acc)
    cf = channel_filter.astype(acc)

    dx_total = jnp.zeros((n, h, w, c), acc)
    d_spatial, d_channel = [], []
    for t, dy, dx in config.tap_offsets():
        sf_t = _per_channel(sf[..., t], c)
        cf_t = cf[:, None, None, :, t]
        # dx: output pixel i feeds input row i*s + dy; pad with interior s-1
        # places it there, the edge pads shift and crop to the input size.
        contribution = g * _combine(sf_t, cf_t, config.combine)
        dx_total = dx_total + lax.pad(
            contribution,
            jnp.zeros((), acc),
            (
                (0, 0, 0),
                (dy, h - (out_h - 1) * s - 1 - dy, s - 1),
                (dx, w - (out_w - 1) * s - 1 - dx, s - 1),
                (0, 0, 0),
            ),
        )
        gx = g * _window(xp, dy, dx, config, out_h, out_w)
        ds = gx * cf_t if config.combine == "mul" else gx
        d_spatial.append(ds.reshape(n, out_h, out_w, heads, c // heads).sum(axis=-1))
        dc = gx * sf_t if config.combine == "mul" else gx
        d_channel.append(dc.sum(axis=(1, 2)))
    return dx_total, jnp.stack(d_channel, axis=-1), jnp.stack(d_spatial, axis=-1)


ddf_xla = make_ddf_op(forward, backward, "xla")


def get_op(platform: str):
    """The XLA implementation runs on every platform."""
    del platform
    return ddf_xla
