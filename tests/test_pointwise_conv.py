"""PointwiseConv against the nnx.Conv it stands for."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddf_jax.pointwise_conv import PointwiseConv


@pytest.mark.parametrize("stride, use_bias", [(1, True), (2, False), (3, True)])
def test_pointwise_conv_matches_nnx_conv_and_its_gradients_float64(stride, use_bias):
    with jax.enable_x64(True):
        kwargs = dict(strides=stride, padding="VALID", use_bias=use_bias, param_dtype=jnp.float64)
        ours = PointwiseConv(6, 5, (1, 1), rngs=nnx.Rngs(0), **kwargs)
        conv = nnx.Conv(6, 5, (1, 1), rngs=nnx.Rngs(0), **kwargs)
        if use_bias:  # a bias that is not zero
            conv.bias[...] = ours.bias[...] = jnp.asarray(np.random.default_rng(2).normal(size=5))
        x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 7, 6)))
        g = jnp.asarray(np.random.default_rng(3).normal(size=ours(x).shape))

        def value_and_grads(layer):
            graphdef, params = nnx.split(layer)
            loss = lambda params, x: jnp.sum(nnx.merge(graphdef, params)(x) * g)
            return nnx.merge(graphdef, params)(x), jax.grad(loss, argnums=(0, 1))(params, x)

        out, grads = value_and_grads(ours)
        want_out, want_grads = value_and_grads(conv)
        assert out.shape == (2, -(-9 // stride), -(-7 // stride), 5)
        chex.assert_trees_all_close(out, want_out, rtol=1e-12, atol=1e-12)
        chex.assert_trees_all_close(grads, want_grads, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs, name", [
    (dict(kernel_size=(3, 3)), "kernel_size"),
    (dict(kernel_size=1), "kernel_size"),
    (dict(padding="SAME"), "padding"),
    (dict(feature_group_count=2), "feature_group_count"),
    (dict(kernel_dilation=2), "kernel_dilation"),
    (dict(strides=(1, 2)), "strides"),
])
def test_pointwise_conv_rejects_what_a_1x1_valid_conv_is_not(kwargs, name):
    arguments = dict(kernel_size=(1, 1), padding="VALID") | kwargs
    with pytest.raises(ValueError, match=name):
        PointwiseConv(4, 4, rngs=nnx.Rngs(0), **arguments)
