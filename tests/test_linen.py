"""Tests of the Linen layers (ddf_jax.linen) against the NNX ones, inside a Linen model, and of count_params."""

import dataclasses
import inspect

import chex
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ddf_jax
import ddf_jax.linen
from ddf_jax.nn import DDF, DDFUp
from tests.layer_reference import normal, random_module


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
    x = normal(1, (2, 7, 5, 6))
    if guide_features is None:
        positional = ddf_jax.linen.DDF(6, 3, 2, 1, 2, 0.5)
        keyword = ddf_jax.linen.DDF(in_features=6, stride=2, heads=2, se_ratio=0.5)
        module = random_module(DDF, 6, stride=2, heads=2, se_ratio=0.5)
        inputs = (x,)
    else:
        positional = ddf_jax.linen.DDFUp(6, 2, 3, 1, 2, 0.5, "mul", "linear", 3, guide_features)
        keyword = ddf_jax.linen.DDFUp(in_features=6, heads=2, se_ratio=0.5, guide_features=guide_features)
        module = random_module(DDFUp, 6, heads=2, se_ratio=0.5, guide_features=guide_features)
        inputs = (x, normal(2, (2, 7, 5, guide_features)))
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

    x = normal(1, (2, 6, 5, 3))
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
