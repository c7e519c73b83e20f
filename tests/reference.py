"""An independent NumPy reference of the DDF op and its gradients (float64), a loop over the taps.

Written directly from the definition, sharing no code with `ddf_jax`:

    out[n, i, j, c] = sum_{ky, kx} x[n, i*s + (ky - r)*d, j*s + (kx - r)*d, c]
                      * comb(sf[n, i, j, c // (C // G), ky*k + kx], cf[n, c, ky*k + kx])

and, for a cotangent g of out, the three gradients of <g, out>: each term of
the sum above adds g * comb to dx at the tap's input pixel, g * x (* sf for
"mul") to dcf, and g * x (* cf for "mul"), summed over the head's channels,
to dsf.

`plain_ddf` is a second formulation of the same sum in jnp (no loops over
pixels), for gradients by autodiff.
"""

import jax.numpy as jnp
import numpy as np


def _output_size(x, stride):
    """(Ho, Wo) = (ceil(H / stride), ceil(W / stride))."""
    return -(-x.shape[1] // stride), -(-x.shape[2] // stride)


def _inside(out_size, in_size, stride, offset):
    """The output indices i whose input index i*stride + offset is inside [0, in_size), and those inputs."""
    out = np.arange(out_size)
    inp = out * stride + offset
    keep = (inp >= 0) & (inp < in_size)
    return out[keep], inp[keep]


def _taps(x, kernel_size, stride, dilation):
    """Yields (t, out_pixels, in_pixels) for every tap t.

    out_pixels and in_pixels index the (H, W) axes (`np.ix_` pairs): output
    pixel (i, j) reads input pixel (i*s + (ky - r)*d, j*s + (kx - r)*d), kept
    only when that is inside the image (x is zero outside).
    """
    _, h, w, _ = x.shape
    out_h, out_w = _output_size(x, stride)
    k, s, d = kernel_size, stride, dilation
    r = (k - 1) // 2
    for ky in range(k):
        for kx in range(k):
            rows, in_rows = _inside(out_h, h, s, (ky - r) * d)
            cols, in_cols = _inside(out_w, w, s, (kx - r) * d)
            yield ky * k + kx, np.ix_(rows, cols), np.ix_(in_rows, in_cols)


def _canonical(x, channel_filter, spatial_filter):
    """float64 copies, spatial_filter 5-D, and each channel's head index."""
    x = np.asarray(x, np.float64)
    cf = np.asarray(channel_filter, np.float64)
    sf = np.asarray(spatial_filter, np.float64)
    if sf.ndim == 4:
        sf = sf[:, :, :, None, :]
    c, heads = x.shape[3], sf.shape[3]
    return x, cf, sf, np.arange(c) // (c // heads)


def ddf_reference(x, channel_filter, spatial_filter, kernel_size, stride=1, dilation=1, combine="mul"):
    """Returns the DDF output in float64. spatial_filter may be 4-D or 5-D."""
    x, cf, sf, head_of_channel = _canonical(x, channel_filter, spatial_filter)
    n, _, _, c = x.shape
    out = np.zeros((n,) + _output_size(x, stride) + (c,))
    for t, (i, j), (y, xx) in _taps(x, kernel_size, stride, dilation):
        spatial = sf[..., t][:, i, j][..., head_of_channel]  # (n, rows, cols, c)
        channel = cf[:, None, None, :, t]
        weight = spatial * channel if combine == "mul" else spatial + channel
        out[:, i, j, :] += x[:, y, xx, :] * weight
    return out


def ddf_reference_vjp(x, channel_filter, spatial_filter, grad_out, kernel_size, stride=1, dilation=1,
                      combine="mul"):
    """Returns (dx, d_channel_filter, d_spatial_filter) of <grad_out, ddf(...)> in float64.

    d_spatial_filter has spatial_filter's shape (4-D or 5-D).
    """
    sf_shape = np.shape(spatial_filter)
    x, cf, sf, head_of_channel = _canonical(x, channel_filter, spatial_filter)
    g = np.asarray(grad_out, np.float64)
    n, _, _, c = x.shape
    heads = sf.shape[3]
    dx, dcf, dsf = np.zeros_like(x), np.zeros_like(cf), np.zeros_like(sf)
    for t, (i, j), (y, xx) in _taps(x, kernel_size, stride, dilation):
        spatial = sf[..., t][:, i, j][..., head_of_channel]  # (n, rows, cols, c)
        channel = cf[:, None, None, :, t]
        weight = spatial * channel if combine == "mul" else spatial + channel
        g_tap = g[:, i, j, :]
        # Each output pixel reads a different input pixel at one tap: no index repeats.
        dx[:, y, xx, :] += g_tap * weight
        gx = g_tap * x[:, y, xx, :]
        dcf[:, :, t] += (gx * spatial if combine == "mul" else gx).sum(axis=(1, 2))
        per_channel = gx * channel if combine == "mul" else gx
        d_spatial_tap = dsf[..., t]  # a view: (n, Ho, Wo, G)
        d_spatial_tap[:, i, j, :] += per_channel.reshape(per_channel.shape[:3] + (heads, c // heads)).sum(axis=4)
    return dx, dcf, dsf.reshape(sf_shape)


def plain_ddf(x, cf, sf, k, s, d, combine, accumulate=None):
    """The op as a jnp formula: zero-pad, gather each tap's strided window, sum (sf 4-D or 5-D).

    Products in the inputs' dtype, sums in `accumulate` (default: the inputs' dtype).
    """
    if sf.ndim == 4:
        sf = sf[:, :, :, None, :]
    r = (k - 1) // 2
    heads, ho, wo = sf.shape[3], sf.shape[1], sf.shape[2]
    accumulate = accumulate or x.dtype
    xp = jnp.pad(x, ((0, 0), (r * d, r * d + s), (r * d, r * d + s), (0, 0)))
    sf_c = jnp.repeat(sf, x.shape[-1] // heads, axis=3)  # (N, Ho, Wo, C, K)
    out = jnp.zeros((x.shape[0], ho, wo, x.shape[3]), accumulate)
    for ky in range(k):
        for kx in range(k):
            t = ky * k + kx
            window = xp[:, ky * d : ky * d + ho * s : s, kx * d : kx * d + wo * s : s, :]
            spatial, channel = sf_c[..., t], cf[:, None, None, :, t]
            weight = spatial * channel if combine == "mul" else spatial + channel
            out = out + (window * weight).astype(accumulate)
    return out
