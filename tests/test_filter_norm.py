"""Tests of FilterNorm (ddf_jax.filter_norm) against the official formula, and of the channel branch's shapes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from ddf_jax.nn import DDF, ChannelBranch, FilterNorm, SpatialBranch, standardize_filters
from tests.layer_reference import GAIN, assert_close, call, normal, np_ddf, np_filter_norm, param_grads, random_module


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
    branch = random_module(SpatialBranch, 6, kernel_size, stride=2, heads=3, nonlinearity=nonlinearity)
    filters = np.asarray(call(branch, normal(1, (2, 7, 6, 6))), np.float64)
    assert filters.shape == (2, 4, 3, 3, kernel_size**2)
    np.testing.assert_allclose(filters.mean(-1), 0.0, atol=1e-6)
    np.testing.assert_allclose(filters.std(-1, ddof=1), GAIN[nonlinearity] / kernel_size, rtol=1e-5)


def test_filter_norm_matches_official_formula():
    filters = normal(0, (3, 4, 5, 9)) * 0.7 + 0.2
    expected = np_filter_norm(np.asarray(filters, np.float64), 1.0)
    np.testing.assert_allclose(np.asarray(standardize_filters(filters)), expected, rtol=2e-6, atol=1e-6)
    norm = FilterNorm(3, nonlinearity="linear")
    np.testing.assert_allclose(np.asarray(norm(filters)), expected / 3, rtol=2e-6, atol=1e-6)


def test_filter_norm_gradient_finite_on_constant_taps():
    # Rows 1 and 2 have all taps equal (values whose mean is exact in float32).
    filters = normal(0, (4, 9)).at[1].set(0.0).at[2].set(0.5)
    weights = normal(1, (4, 9))

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
    layer = random_module(DDF, 6, se_ratio=0.5)
    layer.spatial_branch.conv.bias[...] = jnp.full(layer.spatial_branch.conv.bias.shape, 0.25)
    x = normal(2, (2, 7, 6, 6)).at[:, 2, 3, :].set(0.0)
    sf = np.asarray(call(layer.spatial_branch, x))
    np.testing.assert_array_equal(sf[:, 2, 3], 0.0)
    for leaf in jax.tree.leaves(param_grads(layer, x)):
        assert np.isfinite(np.asarray(leaf)).all()


@pytest.mark.parametrize("taps", [9, 25])
def test_filter_norm_float64_gradients(taps):
    with jax.enable_x64(True):
        filters = normal(0, (3, 2, taps), jnp.float64)
        check_grads(jax.jit(standardize_filters), (filters,), order=2, modes=("rev",), eps=1e-4)


@pytest.mark.parametrize("taps", [9, 25, 49])
def test_filter_norm_gradient_equals_autodiff_of_the_official_formula(taps):
    """The written-out gradient against autodiff of `_official_filter_norm_jnp` (float64, no constant filters)."""
    with jax.enable_x64(True):
        filters = normal(0, (4, 3, taps), jnp.float64) * 0.7 + 0.2
        weights = normal(1, (4, 3, taps), jnp.float64)
        ours = jax.grad(lambda f: jnp.sum(standardize_filters(f) * weights))(filters)
        official = jax.grad(lambda f: jnp.sum(_official_filter_norm_jnp(f) * weights))(filters)
        # Two float64 evaluations of the same derivative: sums over K taps in another order, so
        # element-wise within K unit roundoffs of the largest element.
        ours, official = np.asarray(ours), np.asarray(official)
        bound = taps * np.finfo(np.float64).eps * np.abs(official).max()
        np.testing.assert_array_less(np.abs(ours - official), bound)


def test_filter_norm_kernel_size_one():
    filters = normal(0, (2, 3, 3, 2, 1))
    out = FilterNorm(1)(filters)
    np.testing.assert_allclose(np.asarray(out), np.asarray(filters) * math.sqrt(2.0), rtol=1e-6)
    norm = FilterNorm(1, filter_type="channel", features=3, rngs=nnx.Rngs(0))
    cf = normal(1, (2, 3, 1))
    np.testing.assert_allclose(np.asarray(norm(cf)), np.asarray(cf) * np.asarray(norm.scale[...])[None, :, None])
    # A 1x1 DDF is a dynamic gate x * spatial * channel, with finite gradients.
    layer = random_module(DDF, 6, 1, se_ratio=0.5)
    x = normal(2, (2, 7, 6, 6))
    assert_close(call(layer, x), np_ddf(x, layer, 1, 1, 1, 1, "mul", "relu"))
    for leaf in jax.tree.leaves(param_grads(layer, x)):
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
    filters = normal(1, (2, features, 9))
    ratio = np.asarray(norm(filters)) / np.asarray(standardize_filters(filters))
    np.testing.assert_allclose(ratio, np.broadcast_to(scale.reshape(features, 9), ratio.shape), rtol=1e-5)
    # The linear gain.
    linear = FilterNorm(5, filter_type="channel", features=64, nonlinearity="linear", rngs=nnx.Rngs(1))
    assert abs(np.asarray(linear.scale[...]).std() / 0.2 - 1) < 0.1


def test_channel_branch_shapes():
    branch = random_module(ChannelBranch, 10, 5, se_ratio=0.25)
    assert branch.fc1.kernel.shape == (10, 2) and branch.fc2.kernel.shape == (2, 250)
    assert branch.norm.scale.shape == (250,)
    out = call(branch, normal(1, (3, 7, 6, 10)))
    assert out.shape == (3, 10, 25) and out.dtype == jnp.float32
    # Dividing out the per-tap scale leaves standardised filters.
    unscaled = np.asarray(out, np.float64) / np.asarray(branch.norm.scale[...]).reshape(10, 25)
    np.testing.assert_allclose(unscaled.mean(-1), 0.0, atol=1e-4)
    np.testing.assert_allclose(unscaled.std(-1, ddof=1), 1.0, rtol=1e-4)
