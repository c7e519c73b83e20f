"""An independent, loop-based NumPy reference of the DDF op (float64).

Written directly from the definition, sharing no code with `ddf_jax`:

    out[n, i, j, c] = sum_{ky, kx} x[n, i*s + (ky - r)*d, j*s + (kx - r)*d, c]
                      * comb(sf[n, i, j, c // (C // G), ky*k + kx], cf[n, c, ky*k + kx])
"""

import numpy as np


def ddf_reference(x, channel_filter, spatial_filter, kernel_size, stride=1, dilation=1, combine="mul"):
    """Returns the DDF output in float64. spatial_filter may be 4-D or 5-D."""
    x = np.asarray(x, np.float64)
    cf = np.asarray(channel_filter, np.float64)
    sf = np.asarray(spatial_filter, np.float64)
    if sf.ndim == 4:
        sf = sf[:, :, :, None, :]
    n, h, w, c = x.shape
    heads = sf.shape[3]
    group = c // heads
    k, s, d = kernel_size, stride, dilation
    r = (k - 1) // 2
    out_h, out_w = -(-h // s), -(-w // s)
    out = np.zeros((n, out_h, out_w, c))
    head_of_channel = np.arange(c) // group
    for i in range(out_h):
        for j in range(out_w):
            for ky in range(k):
                for kx in range(k):
                    y, xx = i * s + (ky - r) * d, j * s + (kx - r) * d
                    if not (0 <= y < h and 0 <= xx < w):
                        continue
                    t = ky * k + kx
                    spatial = sf[:, i, j, head_of_channel, t]  # (n, c)
                    channel = cf[:, :, t]  # (n, c)
                    weight = spatial * channel if combine == "mul" else spatial + channel
                    out[:, i, j, :] += x[:, y, xx, :] * weight
    return out
