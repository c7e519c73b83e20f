"""Tests of the NNX layers (ddf_jax.nn), their Linen versions and count_params.

The module-level reference below is an independent float64 NumPy forward of the
official modules (FilterNorm with the official formula, 1x1 / depthwise convs,
the channel MLP, and the loop reference of the op from tests/reference.py),
fed with the parameters read from the NNX modules.
"""

import dataclasses
import doctest
import inspect
import math

import chex
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import ddf_jax
import ddf_jax.branches
import ddf_jax.filter_norm
import ddf_jax.linen
import ddf_jax.nn
import ddf_jax.utils
from ddf_jax.kernels import DDFConfig, get_op
from ddf_jax.nn import DDF, ChannelBranch, DDFUp, FilterNorm, SpatialBranch, standardize_filters
from tests.reference import ddf_reference

GAIN = {"relu": math.sqrt(2.0), "linear": 1.0}


def _normal(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _np(param):
    return np.asarray(param[...], np.float64)


def _random_module(cls, *args, seed=0, **kwargs):
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
_call = nnx.jit(lambda module, *args: module(*args))
_param_grads = nnx.jit(nnx.grad(lambda module, *args: jnp.sum(jnp.sin(module(*args)))))


# ---------------------------------------------------------------------------
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
    kernel, bias = _np(conv.kernel), _np(conv.bias)
    return x[:, ::stride, ::stride, :] @ kernel[0, 0] + bias


def np_depthwise(x, conv):
    kernel, bias = _np(conv.kernel), _np(conv.bias)  # (k, k, 1, C)
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
    hidden = np.maximum(pooled @ _np(branch.fc1.kernel) + _np(branch.fc1.bias), 0.0)
    filters = (hidden @ _np(branch.fc2.kernel) + _np(branch.fc2.bias)).reshape(n, c, kernel_size**2)
    return np_filter_norm(filters, _np(branch.norm.scale).reshape(c, kernel_size**2))


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


def _assert_close(actual, expected, rtol=2e-4):
    actual = np.asarray(actual, np.float64)
    atol = rtol * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------
# FilterNorm.


def _official_filter_norm_jnp(filters):
    """The official formula in jnp, to show its gradient is NaN on constant taps."""
    taps = filters.shape[-1]
    centred = filters - filters.mean(-1, keepdims=True)
    std = jnp.sqrt(jnp.sum(centred**2, -1, keepdims=True) / (taps - 1))
    return centred / (std + 1e-10)


@pytest.mark.parametrize("nonlinearity, kernel_size", [("relu", 3), ("linear", 5)])
def test_spatial_filter_norm_zero_mean_and_std(nonlinearity, kernel_size):
    branch = _random_module(SpatialBranch, 6, kernel_size, stride=2, heads=3, nonlinearity=nonlinearity)
    filters = np.asarray(_call(branch, _normal(1, (2, 7, 6, 6))), np.float64)
    assert filters.shape == (2, 4, 3, 3, kernel_size**2)
    np.testing.assert_allclose(filters.mean(-1), 0.0, atol=1e-6)
    np.testing.assert_allclose(filters.std(-1, ddof=1), GAIN[nonlinearity] / kernel_size, rtol=1e-5)


def test_filter_norm_matches_official_formula():
    filters = _normal(0, (3, 4, 5, 9)) * 0.7 + 0.2
    expected = np_filter_norm(np.asarray(filters, np.float64), 1.0)
    np.testing.assert_allclose(np.asarray(standardize_filters(filters)), expected, rtol=2e-6, atol=1e-6)
    norm = FilterNorm(3, nonlinearity="linear")
    np.testing.assert_allclose(np.asarray(norm(filters)), expected / 3, rtol=2e-6, atol=1e-6)


def test_filter_norm_gradient_finite_on_constant_taps():
    # Rows 1 and 2 have all taps equal (values whose mean is exact in float32).
    filters = _normal(0, (4, 9)).at[1].set(0.0).at[2].set(0.5)
    weights = _normal(1, (4, 9))

    def loss(f, norm_fn):
        return jnp.sum(norm_fn(f) * weights)

    grad = np.asarray(jax.grad(loss)(filters, standardize_filters))
    assert np.isfinite(grad).all()
    np.testing.assert_array_equal(grad[1:3], 0.0)
    np.testing.assert_array_equal(np.asarray(standardize_filters(filters))[1:3], 0.0)
    # The official formula: the same value, but a NaN gradient on the constant rows.
    official_grad = np.asarray(jax.grad(loss)(filters, _official_filter_norm_jnp))
    assert np.isnan(official_grad[1]).all() and np.isnan(official_grad[2]).all()
    # Elsewhere the gradients agree.
    np.testing.assert_allclose(grad[[0, 3]], official_grad[[0, 3]], rtol=1e-5, atol=1e-6)
    # Through a whole layer: a zero input pixel with equal spatial biases gives constant taps.
    layer = _random_module(DDF, 6, se_ratio=0.5)
    layer.spatial_branch.conv.bias[...] = jnp.full(layer.spatial_branch.conv.bias.shape, 0.25)
    x = _normal(2, (2, 7, 6, 6)).at[:, 2, 3, :].set(0.0)
    sf = np.asarray(_call(layer.spatial_branch, x))
    np.testing.assert_array_equal(sf[:, 2, 3], 0.0)
    for leaf in jax.tree.leaves(_param_grads(layer, x)):
        assert np.isfinite(np.asarray(leaf)).all()


def test_filter_norm_float64_gradients():
    with jax.enable_x64(True):
        filters = _normal(0, (3, 2, 9), jnp.float64)
        check_grads(jax.jit(standardize_filters), (filters,), order=2, modes=("rev",), eps=1e-4)


def test_filter_norm_kernel_size_one():
    filters = _normal(0, (2, 3, 3, 2, 1))
    out = FilterNorm(1)(filters)
    np.testing.assert_allclose(np.asarray(out), np.asarray(filters) * math.sqrt(2.0), rtol=1e-6)
    norm = FilterNorm(1, filter_type="channel", features=3, rngs=nnx.Rngs(0))
    cf = _normal(1, (2, 3, 1))
    np.testing.assert_allclose(np.asarray(norm(cf)), np.asarray(cf) * np.asarray(norm.scale[...])[None, :, None])
    # A 1x1 DDF is a dynamic gate x * spatial * channel, with finite gradients.
    layer = _random_module(DDF, 6, 1, se_ratio=0.5)
    x = _normal(2, (2, 7, 6, 6))
    _assert_close(_call(layer, x), np_ddf(x, layer, 1, 1, 1, 1, "mul", "relu"))
    for leaf in jax.tree.leaves(_param_grads(layer, x)):
        assert np.isfinite(np.asarray(leaf)).all()


def test_channel_filter_norm_scale_init_and_indexing():
    features, kernel_size = 64, 3
    norm = FilterNorm(kernel_size, filter_type="channel", features=features, rngs=nnx.Rngs(0))
    scale = np.asarray(norm.scale[...])
    assert isinstance(norm.scale, nnx.Param) and scale.shape == (features * 9,)
    # normal * gain / k: 576 samples, the std is within ~10% of sqrt(2)/3.
    assert abs(scale.std() / (math.sqrt(2.0) / 3) - 1) < 0.1
    assert abs(scale.mean()) < 0.05
    # Scale entry c*K + t multiplies tap t of channel c.
    filters = _normal(1, (2, features, 9))
    ratio = np.asarray(norm(filters)) / np.asarray(standardize_filters(filters))
    np.testing.assert_allclose(ratio, np.broadcast_to(scale.reshape(features, 9), ratio.shape), rtol=1e-5)
    # The linear gain.
    linear = FilterNorm(5, filter_type="channel", features=64, nonlinearity="linear", rngs=nnx.Rngs(1))
    assert abs(np.asarray(linear.scale[...]).std() / 0.2 - 1) < 0.1


def test_channel_branch_shapes():
    branch = _random_module(ChannelBranch, 10, 5, se_ratio=0.25)
    assert branch.fc1.kernel.shape == (10, 2) and branch.fc2.kernel.shape == (2, 250)
    assert branch.norm.scale.shape == (250,)
    out = _call(branch, _normal(1, (3, 7, 6, 10)))
    assert out.shape == (3, 10, 25) and out.dtype == jnp.float32
    # Dividing out the per-tap scale leaves standardised filters.
    unscaled = np.asarray(out, np.float64) / np.asarray(branch.norm.scale[...]).reshape(10, 25)
    np.testing.assert_allclose(unscaled.mean(-1), 0.0, atol=1e-4)
    np.testing.assert_allclose(unscaled.std(-1, ddof=1), 1.0, rtol=1e-4)


# ---------------------------------------------------------------------------
# Structure and parameter counts.


def test_attribute_names():
    layer = nnx.eval_shape(lambda: DDF(8, heads=2, rngs=nnx.Rngs(0)))
    assert isinstance(layer.spatial_branch.conv, nnx.Conv)
    assert layer.spatial_branch.conv.kernel.shape == (1, 1, 8, 18)
    assert isinstance(layer.spatial_branch.norm, FilterNorm)
    assert not jax.tree.leaves(nnx.state(layer.spatial_branch.norm, nnx.Param))
    assert isinstance(layer.channel_branch.fc1, nnx.Linear) and isinstance(layer.channel_branch.fc2, nnx.Linear)
    assert isinstance(layer.channel_branch.norm.scale, nnx.Param)
    up = nnx.eval_shape(lambda: DDFUp(8, scale=3, rngs=nnx.Rngs(0)))
    assert len(up.spatial_branches) == len(up.channel_branches) == 9
    branch = up.spatial_branches[4]
    assert branch.depthwise.kernel.shape == (3, 3, 1, 8) and branch.depthwise.feature_group_count == 8
    assert branch.conv.kernel.shape == (1, 1, 8, 9)
    guided = nnx.eval_shape(lambda: DDFUp(8, guide_features=3, rngs=nnx.Rngs(0)))
    assert guided.spatial_branches[0].depthwise is None
    assert guided.spatial_branches[0].conv.kernel.shape == (1, 1, 3, 9)


def test_parameter_counts():
    assert ddf_jax.count_params(nnx.eval_shape(lambda: DDF(64, rngs=nnx.Rngs(0)))) == 9_429
    assert ddf_jax.count_params(nnx.eval_shape(lambda: DDFUp(64, scale=2, rngs=nnx.Rngs(0)))) == 40_276
    # The formula holds for heads and guides.
    abstract = nnx.eval_shape(lambda: DDF(64, 5, heads=4, rngs=nnx.Rngs(0)))
    c, taps, g, mid = 64, 25, 4, 12
    spatial = c * g * taps + g * taps
    channel = c * mid + mid + mid * c * taps + c * taps + c * taps
    assert ddf_jax.count_params(abstract) == spatial + channel
    guided = nnx.eval_shape(lambda: DDFUp(64, scale=2, guide_features=3, rngs=nnx.Rngs(0)))
    assert ddf_jax.count_params(guided) == 4 * ((3 * 9 + 9) + (64 * 12 + 12 + 12 * 576 + 576 + 576))


def test_default_initialisation():
    # Real initialisers: Flax's defaults (lecun normal kernels, zero biases), overridable.
    layer = DDF(8, se_ratio=0.5, rngs=nnx.Rngs(0))
    assert np.abs(np.asarray(layer.spatial_branch.conv.kernel[...])).max() > 0
    np.testing.assert_array_equal(np.asarray(layer.channel_branch.fc1.bias[...]), 0.0)
    custom = DDF(
        8,
        se_ratio=0.5,
        kernel_init=nnx.initializers.constant(0.5),
        bias_init=nnx.initializers.constant(-1.0),
        scale_init=nnx.initializers.constant(2.0),
        rngs=nnx.Rngs(0),
    )
    for conv in (custom.spatial_branch.conv, custom.channel_branch.fc1, custom.channel_branch.fc2):
        np.testing.assert_array_equal(np.asarray(conv.kernel[...]), 0.5)
        np.testing.assert_array_equal(np.asarray(conv.bias[...]), -1.0)
    np.testing.assert_array_equal(np.asarray(custom.channel_branch.norm.scale[...]), 2.0)
    up = DDFUp(8, 1, se_ratio=0.5, bias_init=nnx.initializers.constant(-1.0), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(up.spatial_branches[0].depthwise.bias[...]), -1.0)


# ---------------------------------------------------------------------------
# Forward against the NumPy reference.


@pytest.mark.parametrize(
    "shape, kernel_size, stride, dilation, heads, combine, nonlinearity",
    [
        ((2, 15, 13, 6), 3, 2, 1, 1, "mul", "relu"),  # odd size, stride 2: 15 x 13 -> 8 x 7
        ((1, 9, 7, 6), 3, 1, 2, 2, "add", "relu"),
        ((2, 8, 6, 6), 5, 3, 1, 3, "mul", "linear"),
    ],
    ids=["stride2-odd", "dilation2-heads2-add", "k5-stride3-heads3"],
)
def test_ddf_matches_numpy(shape, kernel_size, stride, dilation, heads, combine, nonlinearity):
    layer = _random_module(
        DDF,
        shape[-1],
        kernel_size,
        stride=stride,
        dilation=dilation,
        heads=heads,
        combine=combine,
        nonlinearity=nonlinearity,
        se_ratio=0.5,
    )
    x = _normal(1, shape)
    out = _call(layer, x)
    assert out.shape == (shape[0], -(-shape[1] // stride), -(-shape[2] // stride), shape[3])
    _assert_close(out, np_ddf(x, layer, stride, dilation, heads, kernel_size, combine, nonlinearity))


@pytest.mark.parametrize(
    "scale, heads, guide_features, dw_kernel_size, combine",
    [(2, 1, None, 3, "mul"), (2, 2, None, 5, "add"), (2, 2, 3, 3, "mul"), (3, 1, 5, 3, "mul")],
)
def test_ddf_up_matches_numpy(scale, heads, guide_features, dw_kernel_size, combine):
    c = 6
    layer = _random_module(
        DDFUp,
        c,
        scale,
        heads=heads,
        guide_features=guide_features,
        dw_kernel_size=dw_kernel_size,
        combine=combine,
        se_ratio=0.5,
    )
    x = _normal(1, (2, 5, 4, c))
    args = (x,) if guide_features is None else (x, _normal(2, (2, 5, 4, guide_features)))
    out = _call(layer, *args)
    assert out.shape == (2, 5 * scale, 4 * scale, c)
    _assert_close(out, np_ddf_up(x, layer, scale, 1, heads, 3, combine, "linear", *args[1:]))


# ---------------------------------------------------------------------------
# Identity filters set through the parameters.


def _identity_spatial(branch, heads, taps, centre):
    """Spatial filter, every pixel and head: +2 at the centre, -2 at tap 0 (unit unbiased std)."""
    pattern = np.zeros(taps)
    pattern[centre], pattern[0] = 2.0, -2.0
    branch.conv.kernel[...] = jnp.zeros(branch.conv.kernel.shape)
    branch.conv.bias[...] = jnp.asarray(np.tile(pattern, heads), jnp.float32)


def _identity_channel(branch, channels, taps, centre, spatial_scale, factor, seed):
    """Channel filters: +2 at the centre, -2 at a tap that differs per channel (never 0 or centre).

    Only the centre tap survives the product with `_identity_spatial`'s filter,
    and the FilterNorm scale at c*K + centre makes it `factor`; the other scales
    stay random, so a wrong c*K + t indexing breaks the identity.
    """
    rng = np.random.default_rng(seed)
    others = [t for t in range(1, taps) if t != centre]
    bias = np.zeros((channels, taps))
    bias[:, centre] = 2.0
    bias[np.arange(channels), rng.choice(others, channels)] = -2.0
    branch.fc2.kernel[...] = jnp.zeros(branch.fc2.kernel.shape)
    branch.fc2.bias[...] = jnp.asarray(bias.reshape(-1), jnp.float32)
    scale = rng.normal(size=(channels, taps))
    scale[:, centre] = factor / (4.0 * spatial_scale)
    branch.norm.scale[...] = jnp.asarray(scale.reshape(-1), jnp.float32)


@pytest.mark.parametrize("stride", [1, 2])
def test_ddf_identity_filters_return_input(stride):
    c, heads, k = 6, 2, 3
    layer = _random_module(DDF, c, k, stride=stride, heads=heads, se_ratio=0.5)
    _identity_spatial(layer.spatial_branch, heads, k * k, centre=4)
    _identity_channel(layer.channel_branch, c, k * k, 4, math.sqrt(2.0) / k, 1.0, seed=0)
    x = _normal(1, (2, 7, 6, c))
    expected = np.asarray(x[:, ::stride, ::stride])
    np.testing.assert_allclose(np.asarray(_call(layer, x)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("guide_features", [None, 3])
def test_ddf_up_identity_filters_give_ordered_subpixels(guide_features):
    # Branch b = i*r + j filters with b+1 times the identity, so sub-pixel (i, j) is (b+1) * x.
    c, r, k = 6, 2, 3
    layer = _random_module(DDFUp, c, r, k, heads=2, guide_features=guide_features, se_ratio=0.5)
    for b in range(r * r):
        _identity_spatial(layer.spatial_branches[b], 2, k * k, centre=4)
        _identity_channel(layer.channel_branches[b], c, k * k, 4, 1.0 / k, b + 1.0, seed=b)
    x = _normal(1, (2, 5, 4, c))
    args = (x,) if guide_features is None else (x, _normal(2, (2, 5, 4, guide_features)))
    out = np.asarray(_call(layer, *args))
    for i in range(r):
        for j in range(r):
            expected = (i * r + j + 1) * np.asarray(x)
            np.testing.assert_allclose(out[:, i::r, j::r], expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Transformations.


def test_jit_grad_and_split_merge():
    layer = _random_module(DDF, 6, heads=3, stride=2, se_ratio=1.0)
    x = _normal(1, (2, 7, 5, 6))
    eager = layer(x)
    chex.assert_trees_all_close(_call(layer, x), eager, rtol=1e-5, atol=1e-6)

    graphdef, state = nnx.split(layer)
    restored = nnx.merge(graphdef, state)
    assert restored.implementation is None and restored.stride == 2 and restored.heads == 3
    functional = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)
    chex.assert_trees_all_close(functional, eager, rtol=1e-5, atol=1e-6)

    # Every parameter gets a finite, non-zero gradient; and x does too.
    flat = nnx.to_flat_state(_param_grads(layer, x))
    assert len(flat) == 7
    for path, leaf in flat:
        value = np.asarray(leaf[...])
        assert np.isfinite(value).all() and np.abs(value).max() > 0, path
    dx = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)))))(x))
    assert np.isfinite(dx).all() and np.abs(dx).max() > 0


def test_ddf_float64_gradients():
    with jax.enable_x64(True):
        layer = _random_module(DDF, 4, stride=2, heads=2, se_ratio=0.5, param_dtype=jnp.float64)
        graphdef, state = nnx.split(layer)
        x = _normal(1, (1, 5, 4, 4), jnp.float64)
        apply = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
        check_grads(apply, (state, x), order=1, modes=("rev",), eps=1e-5)


@pytest.mark.parametrize("guide_features", [None, 2], ids=["plain", "guided"])
def test_ddf_up_float64_gradients(guide_features):
    """check_grads through the parameters (inputs fixed) and through x and the guide (parameters fixed)."""
    with jax.enable_x64(True):
        layer = _random_module(
            DDFUp, 4, 2, heads=2, guide_features=guide_features, se_ratio=0.5, param_dtype=jnp.float64
        )
        graphdef, state = nnx.split(layer)
        inputs = (_normal(1, (1, 3, 4, 4), jnp.float64),)
        if guide_features is not None:
            inputs += (_normal(2, (1, 3, 4, guide_features), jnp.float64),)
        apply = jax.jit(lambda state, *inputs: nnx.merge(graphdef, state)(*inputs))
        assert len(nnx.to_flat_state(state)) == 4 * (9 if guide_features is None else 7)
        check_grads(lambda state: apply(state, *inputs), (state,), order=1, modes=("rev",), eps=1e-5)
        check_grads(lambda *inputs: apply(state, *inputs), inputs, order=1, modes=("rev",), eps=1e-5)


def test_data_parallel_pmap_and_sharded_jit():
    devices = jax.devices()
    if len(devices) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py forces 4 CPU devices)")
    layer = _random_module(DDF, 6, stride=2, heads=2, se_ratio=0.5)
    graphdef, state = nnx.split(layer)

    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    x = _normal(1, (8, 7, 5, 6))
    expected = jax.jit(apply)(state, x)

    pmapped = jax.pmap(apply, in_axes=(None, 0))(state, x.reshape(4, 2, 7, 5, 6))
    chex.assert_trees_all_close(pmapped.reshape(expected.shape), expected, rtol=1e-5, atol=1e-6)

    mesh = Mesh(np.array(devices[:4]), ("data",))
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    state_replicated = jax.device_put(state, NamedSharding(mesh, P()))
    sharded = jax.jit(apply, out_shardings=NamedSharding(mesh, P("data")))(state_replicated, x_sharded)
    assert len(sharded.addressable_shards) == 4
    assert {shard.data.shape for shard in sharded.addressable_shards} == {(2, 4, 3, 6)}
    chex.assert_trees_all_close(sharded, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Mixed precision.


def test_bfloat16_compute_with_float32_params():
    x = _normal(1, (2, 8, 6, 6))
    reference = _random_module(DDF, 6, stride=2, se_ratio=0.5)
    layer = _random_module(DDF, 6, stride=2, se_ratio=0.5, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(layer, nnx.Param))} == {jnp.dtype(jnp.float32)}
    assert jax.eval_shape(layer.channel_branch, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    assert jax.eval_shape(layer.spatial_branch, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    out = _call(layer, x)
    assert out.dtype == jnp.bfloat16
    expected = np.asarray(_call(reference, x))
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=0.05 * np.abs(expected).max())
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32) ** 2)))(layer)
    for leaf in jax.tree.leaves(grads):
        assert leaf.dtype == jnp.float32 and np.isfinite(np.asarray(leaf)).all()

    up = _random_module(DDFUp, 6, 2, se_ratio=0.5, dtype=jnp.bfloat16)
    up_out = _call(up, x)
    assert up_out.dtype == jnp.bfloat16 and up_out.shape == (2, 16, 12, 6)
    up_expected = np.asarray(_call(_random_module(DDFUp, 6, 2, se_ratio=0.5), x))
    np.testing.assert_allclose(np.asarray(up_out, np.float32), up_expected, atol=0.05 * np.abs(up_expected).max())


# ---------------------------------------------------------------------------
# An op as the implementation.


def test_an_op_as_implementation_is_called_with_the_configuration():
    calls = []

    def spy(x, channel_filter, spatial_filter, config):
        calls.append((x.shape, channel_filter.shape, spatial_filter.shape, config))
        return jnp.full((x.shape[0], 3, 2, x.shape[3]), 7.0)

    layer = _random_module(DDF, 4, 5, stride=2, dilation=2, heads=2, combine="add", se_ratio=0.5, implementation=spy)
    assert layer.implementation is spy
    out = _call(layer, _normal(0, (2, 6, 4, 4)))  # the spy records while jit traces
    np.testing.assert_array_equal(np.asarray(out), 7.0)
    assert calls == [((2, 6, 4, 4), (2, 4, 25), (2, 3, 2, 2, 25), DDFConfig(5, 2, 2, "add"))]

    recorded = []
    xla = get_op("xla", jax.default_backend())

    def passthrough(*args):
        recorded.append(args[3])
        return xla(*args)

    up = _random_module(DDFUp, 6, 2, dilation=2, se_ratio=0.5, implementation=passthrough)
    x = _normal(1, (2, 5, 4, 6))
    graphdef, state = nnx.split(up)
    by_name = nnx.merge(nnx.graphdef(_random_module(DDFUp, 6, 2, dilation=2, se_ratio=0.5)), state)
    chex.assert_trees_all_close(_call(up, x), _call(by_name, x), rtol=0, atol=0)
    assert recorded == [DDFConfig(3, 1, 2, "mul")] * 4


# ---------------------------------------------------------------------------
# Errors.


class _UnhashableOp:
    """A callable op that cannot be a static argument of jit."""

    __hash__ = None

    def __call__(self, x, channel_filter, spatial_filter, config):
        raise AssertionError("never called")

@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda r: DDF(6, heads=4, rngs=r), ValueError, "heads must divide"),
        (lambda r: DDF(6, heads=0, rngs=r), ValueError, "heads must be >= 1"),
        (lambda r: DDF(4, se_ratio=0.2, rngs=r), ValueError, "se_ratio"),
        (lambda r: DDF(8, se_ratio=-1.0, rngs=r), ValueError, "se_ratio must be > 0"),
        (lambda r: DDF(8, se_ratio="0.2", rngs=r), TypeError, "se_ratio"),
        (lambda r: DDF(8, nonlinearity="gelu", rngs=r), ValueError, "nonlinearity"),
        (lambda r: DDF(8, 4, rngs=r), ValueError, "kernel_size must be odd"),
        (lambda r: DDF(8, 3.0, rngs=r), TypeError, "kernel_size must be an int"),
        (lambda r: DDF(8, stride=0, rngs=r), ValueError, "stride must be >= 1"),
        (lambda r: DDF(8, dilation=0, rngs=r), ValueError, "dilation"),
        (lambda r: DDF(8, combine="sum", rngs=r), ValueError, "combine"),
        (lambda r: DDF(8, implementation="cuda", rngs=r), ValueError, "implementation must be one of .* 'cuda'"),
        (lambda r: DDF(8, implementation=3, rngs=r), TypeError, "implementation must be one of .* type int"),
        (lambda r: DDF(8, implementation=_UnhashableOp(), rngs=r), TypeError, "implementation must be hashable"),
        (lambda r: DDFUp(8, implementation="XLA", rngs=r), ValueError, "implementation must be one of .* 'XLA'"),
        (lambda r: DDF(0, rngs=r), ValueError, "in_features"),
        (lambda r: DDFUp(8, scale=0, rngs=r), ValueError, "scale must be >= 1"),
        (lambda r: DDFUp(8, dw_kernel_size=1, rngs=r), ValueError, "dw_kernel_size must be >= 3"),
        (lambda r: DDFUp(8, dw_kernel_size=4, rngs=r), ValueError, "dw_kernel_size must be odd"),
        (lambda r: DDFUp(8, guide_features=0, rngs=r), ValueError, "guide_features"),
        (lambda r: DDFUp(6, heads=4, rngs=r), ValueError, "heads must divide"),
        (lambda r: DDFUp(4, rngs=r), ValueError, "se_ratio"),
        (lambda r: FilterNorm(3, filter_type="pixel"), ValueError, "filter_type"),
        (lambda r: FilterNorm(3, filter_type="channel", features=4), TypeError, "rngs"),
        (lambda r: FilterNorm(3, features=4), ValueError, "features must be None"),
    ],
)
def test_construction_errors(make, error, match):
    with pytest.raises(error, match=match):
        nnx.eval_shape(lambda: make(nnx.Rngs(0)))


def test_call_errors():
    layer = nnx.eval_shape(lambda: DDF(4, se_ratio=0.5, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="4-D"):
        layer(jnp.ones((5, 5, 4)))
    with pytest.raises(ValueError, match="in_features=4"):
        layer(jnp.ones((1, 5, 5, 3)))
    up = nnx.eval_shape(lambda: DDFUp(4, se_ratio=0.5, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="guide_features=None"):
        up(jnp.ones((1, 3, 3, 4)), jnp.ones((1, 3, 3, 4)))
    guided = nnx.eval_shape(lambda: DDFUp(4, guide_features=2, se_ratio=0.5, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="needs a guide"):
        guided(jnp.ones((1, 3, 3, 4)))
    with pytest.raises(ValueError, match="height and width"):
        guided(jnp.ones((1, 3, 3, 4)), jnp.ones((1, 6, 6, 2)))
    with pytest.raises(ValueError, match="guide_features=2"):
        guided(jnp.ones((1, 3, 3, 4)), jnp.ones((1, 3, 3, 4)))
    with pytest.raises(ValueError, match="taps"):
        FilterNorm(3)(jnp.ones((2, 3, 3, 1, 4)))


# ---------------------------------------------------------------------------
# Linen layers and count_params.


# Linen init draws one key per parameter; the "unsafe_rbg" PRNG compiles much
# faster on CPU than the default threefry, and randomness quality is irrelevant here.
def _linen_key(seed):
    return jax.random.key(seed, impl="unsafe_rbg")


@pytest.mark.parametrize("linen_cls, nnx_cls", [(ddf_jax.linen.DDF, DDF), (ddf_jax.linen.DDFUp, DDFUp)])
def test_linen_fields_are_the_nnx_arguments_in_order(linen_cls, nnx_cls):
    fields = [f for f in dataclasses.fields(linen_cls) if f.name not in ("parent", "name")]
    arguments = [p for p in inspect.signature(nnx_cls.__init__).parameters.values() if p.name not in ("self", "rngs")]
    assert [f.name for f in fields] == [p.name for p in arguments]
    for field, argument in zip(fields, arguments):
        expected = dataclasses.MISSING if argument.default is inspect.Parameter.empty else argument.default
        assert field.default is expected or field.default == expected, field.name


def _linen_params(nnx_module):
    return {"params": nnx.to_pure_dict(nnx.state(nnx_module, nnx.Param))}


@pytest.mark.parametrize("guide_features", [None, 3])
def test_linen_layers_give_the_nnx_outputs_and_gradients(guide_features):
    """The same (random, non-zero) parameters give the NNX layer's outputs and gradients; positional == keyword."""
    x = _normal(1, (2, 7, 5, 6))
    if guide_features is None:
        positional = ddf_jax.linen.DDF(6, 3, 2, 1, 2, 0.5)
        keyword = ddf_jax.linen.DDF(in_features=6, stride=2, heads=2, se_ratio=0.5)
        module = _random_module(DDF, 6, stride=2, heads=2, se_ratio=0.5)
        inputs = (x,)
    else:
        positional = ddf_jax.linen.DDFUp(6, 2, 3, 1, 2, 0.5, "mul", "linear", 3, guide_features)
        keyword = ddf_jax.linen.DDFUp(in_features=6, heads=2, se_ratio=0.5, guide_features=guide_features)
        module = _random_module(DDFUp, 6, heads=2, se_ratio=0.5, guide_features=guide_features)
        inputs = (x, _normal(2, (2, 7, 5, guide_features)))
    assert positional == keyword

    # Linen's init makes the NNX layer's parameter tree: names, shapes and dtypes.
    params = _linen_params(module)
    chex.assert_trees_all_equal_shapes_and_dtypes(jax.eval_shape(keyword.init, _linen_key(0), *inputs), params)

    # The NNX layer's parameters in Linen give its outputs and its gradients.
    def linen_loss(params):
        out = positional.apply(params, *inputs)
        return jnp.sum(jnp.sin(out)), out

    def nnx_loss(module):
        out = module(*inputs)
        return jnp.sum(jnp.sin(out)), out

    (_, out), grads = jax.jit(jax.value_and_grad(linen_loss, has_aux=True))(params)
    (_, nnx_out), nnx_grads = nnx.jit(nnx.value_and_grad(nnx_loss, has_aux=True))(module)
    chex.assert_trees_all_close(out, nnx_out, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(grads["params"], nnx.to_pure_dict(nnx_grads), rtol=1e-5, atol=1e-6)


def test_linen_model_init_apply_jit_and_grad():
    class Model(linen.Module):
        @linen.compact
        def __call__(self, x):
            y = linen.Conv(8, (3, 3))(x)
            y = ddf_jax.linen.DDF(8)(y)
            y = ddf_jax.linen.DDF(in_features=8, kernel_size=3, stride=2, heads=2, se_ratio=0.5)(linen.relu(y))
            return ddf_jax.linen.DDFUp(8, 2)(y)

    x = _normal(1, (2, 6, 5, 3))
    model = Model()
    variables = jax.jit(model.init)(_linen_key(2), x)
    params = variables["params"]
    assert set(params) == {"Conv_0", "DDF_0", "DDF_1", "DDFUp_0"}
    assert params["DDF_0"]["spatial_branch"]["conv"]["kernel"].shape == (1, 1, 8, 9)
    assert params["DDFUp_0"]["spatial_branches"][3]["depthwise"]["kernel"].shape == (3, 3, 1, 8)
    expected_params = (
        (3 * 3 * 3 * 8 + 8)
        + ddf_jax.count_params(nnx.eval_shape(lambda: DDF(8, rngs=nnx.Rngs(0))))
        + ddf_jax.count_params(nnx.eval_shape(lambda: DDF(8, heads=2, se_ratio=0.5, rngs=nnx.Rngs(0))))
        + ddf_jax.count_params(nnx.eval_shape(lambda: DDFUp(8, 2, rngs=nnx.Rngs(0))))
    )
    assert ddf_jax.count_params(params) == expected_params

    def loss(params, x):
        out = model.apply({"params": params}, x)
        return jnp.sum(jnp.sin(out)), out

    (_, out), (grads, dx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    assert out.shape == (2, 6, 6, 8) and np.isfinite(np.asarray(out)).all()
    assert np.isfinite(np.asarray(dx)).all() and np.abs(np.asarray(dx)).max() > 0
    # Every gradient is finite and every layer gets one. (With 8 channels and se_ratio=0.2
    # a channel MLP has one hidden ReLU unit; if it is inactive for the whole batch, that
    # branch pair rightly gets a zero gradient. The test above compares every gradient
    # with the NNX layer's.)
    for name, layer_grads in grads.items():
        leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(layer_grads)]
        assert all(np.isfinite(leaf).all() for leaf in leaves), name
        assert max(np.abs(leaf).max() for leaf in leaves) > 0, name


@pytest.mark.parametrize(
    "layer, match",
    [
        (ddf_jax.linen.DDF(8, 4), "kernel_size must be odd"),
        (ddf_jax.linen.DDF(8, implementation="cuda"), "implementation must be one of"),
        (ddf_jax.linen.DDFUp(8, 0), "scale must be >= 1"),
    ],
)
def test_linen_errors_name_the_field(layer, match):
    with pytest.raises(ValueError, match=match):
        layer.init(_linen_key(0), jnp.ones((1, 4, 4, 8)))


def test_count_params_counts_only_params():
    class WithStats(nnx.Module):
        def __init__(self):
            self.dense = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
            self.stats = nnx.BatchStat(jnp.zeros(100))

    assert ddf_jax.count_params(WithStats()) == 16
    assert ddf_jax.count_params({"a": jnp.ones((2, 3)), "b": [jnp.ones(4)]}) == 10
    assert ddf_jax.count_params({}) == 0


def test_docstring_examples():
    # The examples run eagerly; with the "unsafe_rbg" PRNG their parameter
    # initialisers compile about twice as fast on CPU. They print only shapes
    # and counts, which do not depend on the PRNG.
    with jax.default_prng_impl("unsafe_rbg"):
        for module in (ddf_jax.nn, ddf_jax.filter_norm, ddf_jax.branches, ddf_jax.linen, ddf_jax.utils):
            result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
            assert result.attempted > 0 and result.failed == 0, module.__name__
