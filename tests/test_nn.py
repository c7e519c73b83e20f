"""Tests of the NNX layers (ddf_jax.nn): DDF and DDFUp against an independent reference.

The reference is tests/layer_reference.py: an independent float64 NumPy forward
of the official modules, fed with the parameters read from the NNX modules.
"""

import doctest
import math

import chex
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
import ddf_jax.pointwise_conv
import ddf_jax.utils
from ddf_jax.kernels import DDFConfig, get_op
from ddf_jax.nn import DDF, DDFUp, FilterNorm
from tests.layer_reference import assert_close, call, normal, np_ddf, np_ddf_up, param_grads, random_module

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
    layer = random_module(
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
    x = normal(1, shape)
    out = call(layer, x)
    assert out.shape == (shape[0], -(-shape[1] // stride), -(-shape[2] // stride), shape[3])
    assert_close(out, np_ddf(x, layer, stride, dilation, heads, kernel_size, combine, nonlinearity))


@pytest.mark.parametrize(
    "scale, heads, guide_features, dw_kernel_size, combine",
    [(2, 1, None, 3, "mul"), (2, 2, None, 5, "add"), (2, 2, 3, 3, "mul"), (3, 1, 5, 3, "mul")],
)
def test_ddf_up_matches_numpy(scale, heads, guide_features, dw_kernel_size, combine):
    c = 6
    layer = random_module(
        DDFUp,
        c,
        scale,
        heads=heads,
        guide_features=guide_features,
        dw_kernel_size=dw_kernel_size,
        combine=combine,
        se_ratio=0.5,
    )
    x = normal(1, (2, 5, 4, c))
    args = (x,) if guide_features is None else (x, normal(2, (2, 5, 4, guide_features)))
    out = call(layer, *args)
    assert out.shape == (2, 5 * scale, 4 * scale, c)
    assert_close(out, np_ddf_up(x, layer, scale, 1, heads, 3, combine, "linear", *args[1:]))


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
    layer = random_module(DDF, c, k, stride=stride, heads=heads, se_ratio=0.5)
    _identity_spatial(layer.spatial_branch, heads, k * k, centre=4)
    _identity_channel(layer.channel_branch, c, k * k, 4, math.sqrt(2.0) / k, 1.0, seed=0)
    x = normal(1, (2, 7, 6, c))
    expected = np.asarray(x[:, ::stride, ::stride])
    np.testing.assert_allclose(np.asarray(call(layer, x)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("guide_features", [None, 3])
def test_ddf_up_identity_filters_give_ordered_subpixels(guide_features):
    # Branch b = i*r + j filters with b+1 times the identity, so sub-pixel (i, j) is (b+1) * x.
    c, r, k = 6, 2, 3
    layer = random_module(DDFUp, c, r, k, heads=2, guide_features=guide_features, se_ratio=0.5)
    for b in range(r * r):
        _identity_spatial(layer.spatial_branches[b], 2, k * k, centre=4)
        _identity_channel(layer.channel_branches[b], c, k * k, 4, 1.0 / k, b + 1.0, seed=b)
    x = normal(1, (2, 5, 4, c))
    args = (x,) if guide_features is None else (x, normal(2, (2, 5, 4, guide_features)))
    out = np.asarray(call(layer, *args))
    for i in range(r):
        for j in range(r):
            expected = (i * r + j + 1) * np.asarray(x)
            np.testing.assert_allclose(out[:, i::r, j::r], expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Transformations.


def test_jit_grad_and_split_merge():
    layer = random_module(DDF, 6, heads=3, stride=2, se_ratio=1.0)
    x = normal(1, (2, 7, 5, 6))
    eager = layer(x)
    chex.assert_trees_all_close(call(layer, x), eager, rtol=1e-5, atol=1e-6)

    graphdef, state = nnx.split(layer)
    restored = nnx.merge(graphdef, state)
    assert restored.implementation is None and restored.stride == 2 and restored.heads == 3
    functional = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)
    chex.assert_trees_all_close(functional, eager, rtol=1e-5, atol=1e-6)

    # Every parameter gets a finite, non-zero gradient; and x does too.
    flat = nnx.to_flat_state(param_grads(layer, x))
    assert len(flat) == 7
    for path, leaf in flat:
        value = np.asarray(leaf[...])
        assert np.isfinite(value).all() and np.abs(value).max() > 0, path
    dx = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)))))(x))
    assert np.isfinite(dx).all() and np.abs(dx).max() > 0


def test_ddf_float64_gradients():
    with jax.enable_x64(True):
        layer = random_module(DDF, 4, stride=2, heads=2, se_ratio=0.5, param_dtype=jnp.float64)
        graphdef, state = nnx.split(layer)
        x = normal(1, (1, 5, 4, 4), jnp.float64)
        apply = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
        check_grads(apply, (state, x), order=1, modes=("rev",), eps=1e-5)


@pytest.mark.parametrize("guide_features", [None, 2], ids=["plain", "guided"])
def test_ddf_up_float64_gradients(guide_features):
    """check_grads through the parameters (inputs fixed) and through x and the guide (parameters fixed)."""
    with jax.enable_x64(True):
        layer = random_module(
            DDFUp, 4, 2, heads=2, guide_features=guide_features, se_ratio=0.5, param_dtype=jnp.float64
        )
        graphdef, state = nnx.split(layer)
        inputs = (normal(1, (1, 3, 4, 4), jnp.float64),)
        if guide_features is not None:
            inputs += (normal(2, (1, 3, 4, guide_features), jnp.float64),)
        apply = jax.jit(lambda state, *inputs: nnx.merge(graphdef, state)(*inputs))
        assert len(nnx.to_flat_state(state)) == 4 * (9 if guide_features is None else 7)
        check_grads(lambda state: apply(state, *inputs), (state,), order=1, modes=("rev",), eps=1e-5)
        check_grads(lambda *inputs: apply(state, *inputs), inputs, order=1, modes=("rev",), eps=1e-5)


def test_data_parallel_pmap_and_sharded_jit():
    devices = jax.devices()
    if len(devices) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py forces 4 CPU devices)")
    layer = random_module(DDF, 6, stride=2, heads=2, se_ratio=0.5)
    graphdef, state = nnx.split(layer)

    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    x = normal(1, (8, 7, 5, 6))
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
    x = normal(1, (2, 8, 6, 6))
    reference = random_module(DDF, 6, stride=2, se_ratio=0.5)
    layer = random_module(DDF, 6, stride=2, se_ratio=0.5, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(layer, nnx.Param))} == {jnp.dtype(jnp.float32)}
    assert jax.eval_shape(layer.channel_branch, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    assert jax.eval_shape(layer.spatial_branch, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    out = call(layer, x)
    assert out.dtype == jnp.bfloat16
    expected = np.asarray(call(reference, x))
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=0.05 * np.abs(expected).max())
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32) ** 2)))(layer)
    for leaf in jax.tree.leaves(grads):
        assert leaf.dtype == jnp.float32 and np.isfinite(np.asarray(leaf)).all()

    up = random_module(DDFUp, 6, 2, se_ratio=0.5, dtype=jnp.bfloat16)
    up_out = call(up, x)
    assert up_out.dtype == jnp.bfloat16 and up_out.shape == (2, 16, 12, 6)
    up_expected = np.asarray(call(random_module(DDFUp, 6, 2, se_ratio=0.5), x))
    np.testing.assert_allclose(np.asarray(up_out, np.float32), up_expected, atol=0.05 * np.abs(up_expected).max())


# ---------------------------------------------------------------------------
# An op as the implementation.


def test_an_op_as_implementation_is_called_with_the_configuration():
    calls = []

    def spy(x, channel_filter, spatial_filter, config):
        calls.append((x.shape, channel_filter.shape, spatial_filter.shape, config))
        return jnp.full((x.shape[0], 3, 2, x.shape[3]), 7.0)

    layer = random_module(DDF, 4, 5, stride=2, dilation=2, heads=2, combine="add", se_ratio=0.5, implementation=spy)
    assert layer.implementation is spy
    out = call(layer, normal(0, (2, 6, 4, 4)))  # the spy records while jit traces
    np.testing.assert_array_equal(np.asarray(out), 7.0)
    assert calls == [((2, 6, 4, 4), (2, 4, 25), (2, 3, 2, 2, 25), DDFConfig(5, 2, 2, "add"))]

    recorded = []
    xla = get_op("xla", jax.default_backend())

    def passthrough(*args):
        recorded.append(args[3])
        return xla(*args)

    up = random_module(DDFUp, 6, 2, dilation=2, se_ratio=0.5, implementation=passthrough)
    x = normal(1, (2, 5, 4, 6))
    graphdef, state = nnx.split(up)
    by_name = nnx.merge(nnx.graphdef(random_module(DDFUp, 6, 2, dilation=2, se_ratio=0.5)), state)
    chex.assert_trees_all_close(call(up, x), call(by_name, x), rtol=0, atol=0)
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


@pytest.mark.slow
def test_docstring_examples():
    # The examples run eagerly; with the "unsafe_rbg" PRNG their parameter
    # initialisers compile about twice as fast on CPU. They print only shapes
    # and counts, which do not depend on the PRNG.
    with jax.default_prng_impl("unsafe_rbg"):
        for module in (ddf_jax.nn, ddf_jax.filter_norm, ddf_jax.branches, ddf_jax.pointwise_conv, ddf_jax.linen,
                       ddf_jax.utils):
            result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
            assert result.attempted > 0 and result.failed == 0, module.__name__
