"""An independent float64 NumPy forward of the official DDF modules, and helpers for the layer tests.

FilterNorm with the official formula, the 1x1 and depthwise convs, the channel
MLP and the loop reference of the op (tests/reference.py), fed with parameters
read from the NNX modules.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.reference import ddf_reference

GAIN = {"relu": math.sqrt(2.0), "linear": 1.0}


def normal(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def as_float64(param):
    return np.asarray(param[...], np.float64)


def random_module(cls, *args, seed=0, **kwargs):
    """Builds `cls(*args, **kwargs)` with NumPy-random parameters.

    The structure comes from `nnx.eval_shape` (nothing is compiled); every
    parameter is then filled from NumPy, normal(0, 0.5). Random, non-zero biases
    and scales make the reference comparisons see every parameter. The real
    initialisers are tested separately.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(*args, rngs=nnx.Rngs(0), **kwargs)))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda leaf: jnp.asarray(rng.normal(0.0, 0.5, leaf.shape).astype(leaf.dtype)), state)
    return nnx.merge(graphdef, state)


# Jitted calls: one compilation per configuration instead of op-by-op dispatch.
call = nnx.jit(lambda module, *args: module(*args))
param_grads = nnx.jit(nnx.grad(lambda module, *args: jnp.sum(jnp.sin(module(*args)))))


# Independent NumPy forward (float64) of the official modules.


def np_filter_norm(filters, scale):
    """Official FilterNorm: (f - mean) / (unbiased std + 1e-10) * scale; K = 1 keeps f."""
    taps = filters.shape[-1]
    if taps == 1:
        return filters * scale
    centred = filters - filters.mean(-1, keepdims=True)
    std = np.sqrt((centred**2).sum(-1, keepdims=True) / (taps - 1))
    return centred / (std + 1e-10) * scale


def np_conv1x1(x, conv, stride):
    kernel, bias = as_float64(conv.kernel), as_float64(conv.bias)
    return x[:, ::stride, ::stride, :] @ kernel[0, 0] + bias


def np_depthwise(x, conv):
    kernel, bias = as_float64(conv.kernel), as_float64(conv.bias)  # (k, k, 1, C)
    size = kernel.shape[0]
    pad = size // 2
    _, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.zeros_like(x) + bias
    for dy in range(size):
        for dx in range(size):
            out += padded[:, dy : dy + h, dx : dx + w, :] * kernel[dy, dx, 0]
    return out


def np_spatial_branch(source, branch, stride, heads, kernel_size, nonlinearity):
    if branch.depthwise is not None:
        source = np_depthwise(source, branch.depthwise)
        stride = 1
    filters = np_conv1x1(source, branch.conv, stride)
    n, h, w, _ = filters.shape
    filters = filters.reshape(n, h, w, heads, kernel_size**2)
    return np_filter_norm(filters, GAIN[nonlinearity] / kernel_size)


def np_channel_branch(x, branch, kernel_size):
    n, _, _, c = x.shape
    pooled = x.mean(axis=(1, 2))
    hidden = np.maximum(pooled @ as_float64(branch.fc1.kernel) + as_float64(branch.fc1.bias), 0.0)
    filters = (hidden @ as_float64(branch.fc2.kernel) + as_float64(branch.fc2.bias)).reshape(n, c, kernel_size**2)
    return np_filter_norm(filters, as_float64(branch.norm.scale).reshape(c, kernel_size**2))


def np_ddf(x, layer, stride, dilation, heads, kernel_size, combine, nonlinearity):
    x = np.asarray(x, np.float64)
    cf = np_channel_branch(x, layer.channel_branch, kernel_size)
    sf = np_spatial_branch(x, layer.spatial_branch, stride, heads, kernel_size, nonlinearity)
    return ddf_reference(x, cf, sf, kernel_size, stride, dilation, combine)


def np_ddf_up(x, layer, scale, dilation, heads, kernel_size, combine, nonlinearity, guide=None):
    x = np.asarray(x, np.float64)
    source = x if guide is None else np.asarray(guide, np.float64)
    n, h, w, c = x.shape
    out = np.zeros((n, h * scale, w * scale, c))
    for i in range(scale):
        for j in range(scale):
            b = i * scale + j
            cf = np_channel_branch(x, layer.channel_branches[b], kernel_size)
            sf = np_spatial_branch(source, layer.spatial_branches[b], 1, heads, kernel_size, nonlinearity)
            out[:, i::scale, j::scale, :] = ddf_reference(x, cf, sf, kernel_size, 1, dilation, combine)
    return out


def assert_close(actual, expected, rtol=2e-4):
    actual = np.asarray(actual, np.float64)
    atol = rtol * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)
