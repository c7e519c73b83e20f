"""MAC counting: the zoo's published figures, a DDF layer and a conv ResNet counted by hand, plain functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import ddf_jax
from ddf_jax import models
from ddf_jax.nn import DDF
from tests.utils import built_model, small_model


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet50", 4.09e9),
        ("ddf_mul_resnet50", 2.27e9),
        pytest.param("resnet101", 7.80e9, marks=pytest.mark.slow),
        pytest.param("ddf_mul_resnet101", 4.03e9, marks=pytest.mark.slow),
    ],
)
def test_macs_at_224(name, expected):
    macs = ddf_jax.count_macs(built_model(name), (1, 224, 224, 3))
    assert abs(macs - expected) / expected < 0.03, macs


def test_macs_of_a_ddf_layer_count_the_op_as_k2_per_output():
    n, h, w, c, k, s = 2, 9, 7, 10, 3, 2
    layer = DDF(c, k, stride=s, rngs=nnx.Rngs(0))
    ho, wo, mid = -(-h // s), -(-w // s), int(0.2 * c)
    spatial_conv = n * ho * wo * (k * k) * c
    dense = n * (c * mid + mid * c * k * k)
    ddf_op = n * ho * wo * c * k * k
    assert ddf_jax.count_macs(layer, (n, h, w, c)) == spatial_conv + dense + ddf_op


def test_macs_of_a_conv_resnet_match_the_formula():
    # resnet20_cifar at 16x16 with 1 input channel and 10 classes, counted by hand.
    def conv(h, cin, cout, k=1):
        return h * h * cin * cout * k * k

    def bottleneck(h_in, cin, planes, stride):
        h = -(-h_in // stride)
        macs = conv(h_in, cin, planes) + conv(h, planes, planes, 3) + conv(h, planes, 4 * planes)
        if stride != 1 or cin != 4 * planes:
            macs += conv(h, cin, 4 * planes)
        return macs, h

    total, h, cin = conv(16, 1, 16, 3), 16, 16
    for i, planes in enumerate((16, 32, 64)):
        for j in range(2):
            macs, h = bottleneck(h, cin, planes, 2 if i > 0 and j == 0 else 1)
            total, cin = total + macs, 4 * planes
    total += 256 * 10
    model = nnx.eval_shape(
        lambda: models.create_model("resnet20_cifar", num_classes=10, in_chans=1, rngs=nnx.Rngs(0))
    )
    assert ddf_jax.count_macs(model, (1, 16, 16, 1)) == total
    assert ddf_jax.count_macs(model, (3, 16, 16, 1)) == 3 * total


def test_count_macs_of_a_plain_function_and_bad_shapes():
    kernel = jnp.ones((5, 4))
    assert ddf_jax.count_macs(lambda x: x @ kernel, (3, 5)) == 3 * 5 * 4

    def repeated(x):
        return jax.lax.scan(lambda carry, _: (carry @ jnp.ones((5, 5)), None), x, None, length=4)[0]

    assert ddf_jax.count_macs(repeated, (2, 5)) == 4 * 2 * 5 * 5
    with pytest.raises(ValueError, match="input_shape must be"):
        ddf_jax.count_macs(lambda x: x, (3, 0))


def test_count_macs_does_not_change_the_model_mode():
    model = small_model("resnet20_cifar")
    model.train()
    ddf_jax.count_macs(model, (1, 16, 16, 1))
    assert model.bn1.use_running_average is False
