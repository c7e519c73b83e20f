"""The benchmark baselines compute what they claim to, aligned with the DDF op."""

import chex
import jax.numpy as jnp
import pytest

import ddf_jax
from experiments.benchmark_op import depthwise_conv, min_bytes, unfold_ddf
from tests.utils import random_ddf_inputs


@pytest.mark.parametrize("k,stride,dilation", [(3, 1, 1), (3, 2, 1), (5, 2, 2), (3, 3, 1)])
def test_unfold_port_equals_ddf(k, stride, dilation):
    x, cf, sf, _ = random_ddf_inputs(0, 2, 11, 8, 6, k, stride)
    expected = ddf_jax.ddf(x, cf, sf, kernel_size=k, stride=stride, dilation=dilation)
    chex.assert_trees_all_close(unfold_ddf(x, cf, sf, k, stride, dilation), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,stride,dilation", [(3, 1, 1), (3, 2, 1), (5, 2, 2)])
def test_depthwise_baseline_is_ddf_with_a_static_filter(k, stride, dilation):
    x, cf, sf, _ = random_ddf_inputs(1, 2, 11, 8, 6, k, stride)
    kernel = cf[0].T.reshape(k, k, 1, 6)  # one static (k, k) filter per channel
    static_cf = jnp.broadcast_to(cf[:1], cf.shape)
    expected = ddf_jax.ddf(x, static_cf, jnp.ones_like(sf), kernel_size=k, stride=stride, dilation=dilation)
    chex.assert_trees_all_close(depthwise_conv(x, kernel, stride, dilation), expected, rtol=1e-5, atol=1e-5)


def test_min_bytes_counts_each_tensor_once():
    # x 1*4*4*2=32, sf 1*2*2*9=36, cf 1*2*9=18, out 1*2*2*2=8 elements, float32.
    assert min_bytes(1, 4, 4, 2, 3, 2, 4, "fwd") == (32 + 36 + 18 + 8) * 4
    # + backward: read g, x, sf, cf and write dx, dsf, dcf.
    assert min_bytes(1, 4, 4, 2, 3, 2, 4, "fwd+bwd") == (32 + 36 + 18 + 8 + 8 + 32 + 36 + 18 + 32 + 36 + 18) * 4
