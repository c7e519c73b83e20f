"""The ResNet building blocks (NHWC): the shortcut projection, the basic block and the
bottleneck, whose 3x3 conv may be a DDF.

Attribute names follow the official PyTorch modules (`conv1`, `bn1`, `conv2`,
`downsample.conv`, ...) so that `ddf_jax.models.load_official_checkpoint` maps a
state dict onto them key by key. Initialisation follows timm (see
`ddf_jax.models.resnet`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ddf_jax.nn import DDF
from ddf_jax.ops import Implementation
from ddf_jax.pointwise_conv import PointwiseConv

CONV2_KINDS = ("conv", "ddf_mul", "ddf_add")

# Kaiming normal, fan_out, ReLU gain (timm's `kaiming_normal_(mode="fan_out")`):
# variance 2 / fan_out with fan_out = kh * kw * out_channels (HWIO) or
# out_features (a dense (in, out) kernel, i.e. a 1x1 conv).
kaiming_normal_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv_layer(in_features, out_features, kernel_size, stride, *, dtype, param_dtype, rngs) -> nnx.Conv:
    """A bias-free conv with PyTorch-style symmetric padding (k // 2 on each side); a
    `PointwiseConv` for kernel_size 1."""
    pad = kernel_size // 2
    if kernel_size == 1:
        return PointwiseConv(
            in_features, out_features, (1, 1), strides=stride, padding="VALID", use_bias=False, dtype=dtype,
            param_dtype=param_dtype, kernel_init=kaiming_normal_fan_out, rngs=rngs,
        )
    return nnx.Conv(
        in_features,
        out_features,
        (kernel_size, kernel_size),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=kaiming_normal_fan_out,
        rngs=rngs,
    )


class BatchNormFactory:
    """Builds BatchNorms with shared settings (PyTorch momentum 0.1 -> 0.9 here)."""

    def __init__(self, momentum, epsilon, dtype, param_dtype):
        self.momentum, self.epsilon = momentum, epsilon
        self.dtype, self.param_dtype = dtype, param_dtype

    def __call__(self, features: int, *, zero_init: bool = False, rngs: nnx.Rngs) -> nnx.BatchNorm:
        return nnx.BatchNorm(
            features,
            momentum=self.momentum,
            epsilon=self.epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scale_init=nnx.initializers.zeros_init() if zero_init else nnx.initializers.ones_init(),
            rngs=rngs,
        )


class Downsample(nnx.Module):
    """The shortcut projection: 1x1 conv (stride s, no bias) then BatchNorm.

    Official keys: `downsample.0.weight` (conv) and `downsample.1.*` (norm).
    Input (N, H, W, in_features) -> (N, ceil(H/s), ceil(W/s), out_features).
    """

    def __init__(self, in_features, out_features, stride, *, norm: BatchNormFactory, dtype, param_dtype, rngs):
        self.conv = conv_layer(in_features, out_features, 1, stride, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.bn = norm(out_features, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


def shortcut_projection(in_features, out_features, stride, *, norm, dtype, param_dtype, rngs) -> Downsample | None:
    """The block's `Downsample`, or None when the identity shortcut fits (stride 1, same width)."""
    if stride == 1 and in_features == out_features:
        return None
    return Downsample(in_features, out_features, stride, norm=norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class BasicBlock(nnx.Module):
    """ResNet basic block: 3x3 conv (stride s) -> BN -> ReLU -> 3x3 conv -> BN, + shortcut, ReLU.

    Input (N, H, W, in_features) -> (N, ceil(H/s), ceil(W/s), planes).
    """

    expansion = 1

    def __init__(
        self,
        in_features: int,
        planes: int,
        stride: int = 1,
        *,
        norm: BatchNormFactory,
        zero_init_last: bool = True,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        out_features = planes * self.expansion
        self.conv1 = conv_layer(in_features, planes, 3, stride, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.bn1 = norm(planes, rngs=rngs)
        self.conv2 = conv_layer(planes, out_features, 3, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.bn2 = norm(out_features, zero_init=zero_init_last, rngs=rngs)
        self.downsample = shortcut_projection(
            in_features, out_features, stride, norm=norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return jax.nn.relu(y + shortcut)


class Bottleneck(nnx.Module):
    """ResNet v1.5 bottleneck, optionally with DDF as its 3x3 conv.

    1x1 conv -> BN -> ReLU -> conv2 (stride s) -> BN -> ReLU -> 1x1 conv -> BN,
    + shortcut, ReLU. conv2 is a 3x3 conv ("conv") or
    `ddf_jax.nn.DDF(planes, 3, stride=s, combine=...)` ("ddf_mul", "ddf_add").

    Input (N, H, W, in_features) -> (N, ceil(H/s), ceil(W/s), 4 * planes).
    """

    expansion = 4

    def __init__(
        self,
        in_features: int,
        planes: int,
        stride: int = 1,
        *,
        norm: BatchNormFactory,
        conv2: str = "conv",
        se_ratio: float = 0.2,
        implementation: Implementation = None,
        zero_init_last: bool = True,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if conv2 not in CONV2_KINDS:
            raise ValueError(f"conv2 must be one of {CONV2_KINDS}, got {conv2!r}")
        width = planes
        out_features = planes * self.expansion
        self.conv1 = conv_layer(in_features, width, 1, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.bn1 = norm(width, rngs=rngs)
        if conv2 == "conv":
            self.conv2 = conv_layer(width, width, 3, stride, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        else:
            self.conv2 = DDF(
                width,
                3,
                stride=stride,
                heads=1,
                se_ratio=se_ratio,
                combine="mul" if conv2 == "ddf_mul" else "add",
                nonlinearity="relu",
                dtype=dtype,
                param_dtype=param_dtype,
                implementation=implementation,
                kernel_init=kaiming_normal_fan_out,
                rngs=rngs,
            )
        self.bn2 = norm(width, rngs=rngs)
        self.conv3 = conv_layer(width, out_features, 1, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.bn3 = norm(out_features, zero_init=zero_init_last, rngs=rngs)
        self.downsample = shortcut_projection(
            in_features, out_features, stride, norm=norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return jax.nn.relu(y + shortcut)
