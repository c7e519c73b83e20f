"""The two filter-generating branches of a DDF layer (NNX, NHWC).

`SpatialBranch` predicts a filter per output pixel, `ChannelBranch` a filter per
channel of every sample; both end in a `FilterNorm`.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from flax import nnx

from ddf_jax._checks import channel_branch_width, check_int, check_nhwc, check_odd
from ddf_jax._types import Array, Dtype, Initializer, default_bias_init, default_kernel_init
from ddf_jax.filter_norm import FilterNorm
from ddf_jax.pointwise_conv import PointwiseConv


class SpatialBranch(nnx.Module):
    """Generates per-pixel filters: [depthwise conv ->] 1x1 conv -> spatial FilterNorm.

    The 1x1 conv (with bias) maps C -> G*K; output channel ``g*K + t`` is tap t
    of head g. With stride s the branch samples input pixel (i*s, j*s) for
    output pixel (i, j), the pixel the DDF op centres its window on, so
    Ho = ceil(H / s). With ``dw_kernel_size`` set (the unguided DDF-Up branch),
    a depthwise conv (kernel dw_k, padding dw_k // 2, bias, stride s) comes first
    and the 1x1 conv has stride 1.

    Attributes:
        depthwise: nnx.Conv (C -> C, feature_group_count=C), or None.
        conv: PointwiseConv, a 1x1 nnx.Conv (C -> G*K).
        norm: FilterNorm("spatial"), no parameters.

    Example:
        >>> import jax
        >>> from flax import nnx
        >>> from ddf_jax.nn import SpatialBranch
        >>> branch = SpatialBranch(8, 3, stride=2, heads=2, rngs=nnx.Rngs(0))
        >>> branch(jax.random.normal(jax.random.key(1), (2, 9, 7, 8))).shape
        (2, 5, 4, 2, 9)
    """

    def __init__(
        self,
        in_features: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        heads: int = 1,
        dw_kernel_size: Optional[int] = None,
        nonlinearity: str = "relu",
        dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        rngs: nnx.Rngs,
    ):
        """Builds the branch.

        Args:
            in_features: input channels C.
            kernel_size: DDF filter size k (odd); K = k*k.
            stride: s >= 1.
            heads: G, the number of spatial filters per pixel (the DDF layer
                needs G to divide its channel count).
            dw_kernel_size: odd size of an optional leading depthwise conv.
            nonlinearity: "relu" or "linear"; sets the FilterNorm gain.
            dtype: compute dtype (None: inferred from input and parameters).
            param_dtype: parameter dtype.
            kernel_init: initializer of the conv kernels.
            bias_init: initializer of the conv biases.
            rngs: random streams.
        """
        self.in_features = check_int(in_features, "in_features")
        self.kernel_size = check_odd(kernel_size, "kernel_size")
        self.stride = check_int(stride, "stride")
        self.heads = check_int(heads, "heads")
        self.taps = self.kernel_size**2
        conv_kwargs = dict(
            dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, bias_init=bias_init, rngs=rngs
        )
        if dw_kernel_size is None:
            self.depthwise = None
            conv_stride = self.stride
        else:
            dw_kernel_size = check_odd(dw_kernel_size, "dw_kernel_size")
            self.depthwise = nnx.Conv(
                self.in_features,
                self.in_features,
                (dw_kernel_size, dw_kernel_size),
                strides=self.stride,
                padding=dw_kernel_size // 2,
                feature_group_count=self.in_features,
                **conv_kwargs,
            )
            conv_stride = 1
        self.dw_kernel_size = dw_kernel_size
        # A 1x1 conv without padding reads input (i*s, j*s): ceil(H / s) rows.
        self.conv = PointwiseConv(
            self.in_features, self.heads * self.taps, (1, 1), strides=conv_stride, padding="VALID", **conv_kwargs
        )
        self.norm = FilterNorm(self.kernel_size, filter_type="spatial", nonlinearity=nonlinearity, dtype=dtype)

    def __call__(self, x: Array) -> Array:
        """Computes the spatial filter.

        Args:
            x: (N, H, W, C).

        Returns:
            (N, ceil(H/s), ceil(W/s), G, K), in the compute dtype.
        """
        check_nhwc(x, "x", self.in_features)
        if self.depthwise is not None:
            x = self.depthwise(x)
        filters = self.conv(x)
        n, h, w, _ = filters.shape
        filters = jnp.reshape(filters, (n, h, w, self.heads, self.taps))
        return self.norm(filters)


class ChannelBranch(nnx.Module):
    """Generates per-channel filters from pooled context (squeeze-and-excitation style).

    Global average pool over the full-resolution input -> Dense(C -> mid, bias)
    -> ReLU -> Dense(mid -> C*K, bias) -> channel FilterNorm, with
    mid = int(se_ratio * C). In the C*K vector, channel c's taps are ``c*K + t``.

    Attributes:
        fc1: nnx.Linear(C, mid).
        fc2: nnx.Linear(mid, C*K).
        norm: FilterNorm("channel") with the learnable ``scale`` of shape (C*K,).

    Example:
        >>> import jax
        >>> from flax import nnx
        >>> from ddf_jax.nn import ChannelBranch
        >>> branch = ChannelBranch(10, 3, rngs=nnx.Rngs(0))
        >>> branch.fc1.kernel.shape, branch.fc2.kernel.shape
        ((10, 2), (2, 90))
        >>> branch(jax.random.normal(jax.random.key(1), (2, 9, 7, 10))).shape
        (2, 10, 9)
    """

    def __init__(
        self,
        in_features: int,
        kernel_size: int = 3,
        *,
        se_ratio: float = 0.2,
        nonlinearity: str = "relu",
        dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        scale_init: Optional[Initializer] = None,
        rngs: nnx.Rngs,
    ):
        """Builds the branch.

        Args:
            in_features: input channels C.
            kernel_size: DDF filter size k (odd); K = k*k.
            se_ratio: hidden width ratio; int(se_ratio * C) must be >= 1.
            nonlinearity: "relu" or "linear"; sets the FilterNorm gain.
            dtype: compute dtype (None: inferred from input and parameters).
            param_dtype: parameter dtype.
            kernel_init: initializer of the dense kernels.
            bias_init: initializer of the dense biases.
            scale_init: initializer of the FilterNorm scale (default
                normal * gain / kernel_size).
            rngs: random streams.
        """
        self.in_features = check_int(in_features, "in_features")
        self.kernel_size = check_odd(kernel_size, "kernel_size")
        self.taps = self.kernel_size**2
        self.se_ratio = se_ratio
        self.mid_features = channel_branch_width(self.in_features, se_ratio)
        dense_kwargs = dict(
            dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, bias_init=bias_init, rngs=rngs
        )
        self.fc1 = nnx.Linear(self.in_features, self.mid_features, **dense_kwargs)
        self.fc2 = nnx.Linear(self.mid_features, self.in_features * self.taps, **dense_kwargs)
        self.norm = FilterNorm(
            self.kernel_size,
            filter_type="channel",
            features=self.in_features,
            nonlinearity=nonlinearity,
            dtype=dtype,
            param_dtype=param_dtype,
            scale_init=scale_init,
            rngs=rngs,
        )

    def __call__(self, x: Array) -> Array:
        """Computes the channel filter.

        Args:
            x: (N, H, W, C).

        Returns:
            (N, C, K), in the compute dtype.
        """
        check_nhwc(x, "x", self.in_features)
        accumulate = jnp.promote_types(x.dtype, jnp.float32)
        pooled = jnp.mean(x, axis=(1, 2), dtype=accumulate).astype(x.dtype)
        hidden = nnx.relu(self.fc1(pooled))
        filters = self.fc2(hidden)
        filters = jnp.reshape(filters, (filters.shape[0], self.in_features, self.taps))
        return self.norm(filters)
