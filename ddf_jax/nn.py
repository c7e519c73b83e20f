"""Flax NNX layers for Decoupled Dynamic Filter networks (NHWC).

The layers follow the official PyTorch modules (``DDFPack`` and ``DDFUpPack``
of the DDF paper, Zhou et al., CVPR 2021) with the same parameters, so weights
can be imported one to one, and with the official bugs fixed:

* ``FilterNorm`` keeps the official unbiased standard deviation but gives
  finite gradients when all taps of a filter are equal (the official
  ``std + 1e-10`` gives NaN there), and handles ``kernel_size=1``.
* ``DDF`` uses ``ceil(H / stride)`` output rows, so odd sizes work with
  stride 2 (the official op expects ``floor``, which the branch cannot give).
* ``DDFUp`` builds the guide branch with the guide's channel count and pads its
  depthwise conv with ``dw_kernel_size // 2``.

Layers:
    FilterNorm: standardises dynamic filters over their K = k*k taps.
    SpatialBranch: x (N, H, W, C) -> spatial filter (N, Ho, Wo, G, K).
    ChannelBranch: x (N, H, W, C) -> channel filter (N, C, K).
    DDF: the decoupled dynamic filter layer, (N, H, W, C) -> (N, Ho, Wo, C).
    DDFUp: DDF upsampling, (N, H, W, C) -> (N, scale*H, scale*W, C).

Tap t of a k x k filter is ``ky * k + kx`` (row-major), as in `ddf_jax.ddf`.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from flax import nnx

from ddf_jax import ops
from ddf_jax._checks import (
    GAINS,
    channel_branch_width,
    check_combine,
    check_heads,
    check_int,
    check_nhwc,
    check_odd,
    nonlinearity_gain,
)
from ddf_jax._types import Array, Dtype, Initializer, default_bias_init, default_kernel_init
from ddf_jax.branches import ChannelBranch, SpatialBranch
from ddf_jax.filter_norm import FILTER_TYPES, FilterNorm, standardize_filters


class DDF(nnx.Module):
    """Decoupled dynamic filter layer (the official ``DDFPack``), NHWC.

    ``ddf_jax.ddf(x, channel_branch(x), spatial_branch(x), ...)``: a k x k depthwise
    filtering whose filter at pixel (i, j), channel c is
    ``comb(spatial[i, j, head(c)], channel[c])`` (product for "mul", sum for
    "add"); no bias. Output pixel (i, j) is centred on input (i*s, j*s), and
    Ho = ceil(H / s), so odd sizes work with stride 2 (15 x 13 -> 8 x 7).

    Parameters (C = in_features, K = k*k, G = heads, mid = int(se_ratio*C)):
    C*G*K + G*K (spatial 1x1 conv) + C*mid + mid + mid*C*K + C*K (dense layers)
    + C*K (FilterNorm scale); 9,429 for C=64, k=3, G=1, se_ratio=0.2, as the
    official module.

    Attributes:
        spatial_branch: SpatialBranch (``.conv``, ``.norm``).
        channel_branch: ChannelBranch (``.fc1``, ``.fc2``, ``.norm.scale``).

    Example:
        >>> import jax
        >>> from flax import nnx
        >>> import ddf_jax
        >>> layer = ddf_jax.nn.DDF(16, 3, stride=2, rngs=nnx.Rngs(0))
        >>> x = jax.random.normal(jax.random.key(1), (2, 15, 13, 16))
        >>> layer(x).shape
        (2, 8, 7, 16)
        >>> ddf_jax.count_params(ddf_jax.nn.DDF(64, rngs=nnx.Rngs(0)))
        9429
    """

    def __init__(
        self,
        in_features: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        dilation: int = 1,
        heads: int = 1,
        se_ratio: float = 0.2,
        combine: str = "mul",
        nonlinearity: str = "relu",
        dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        implementation: ops.Implementation = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        scale_init: Optional[Initializer] = None,
        rngs: nnx.Rngs,
    ):
        """Builds the layer.

        Args:
            in_features: channels C of the input (and the output).
            kernel_size: filter size k, odd, >= 1.
            stride: s >= 1.
            dilation: tap spacing d >= 1.
            heads: G spatial filters per pixel; must divide C. Channel c uses
                head c // (C // G).
            se_ratio: the channel branch's hidden width is int(se_ratio * C),
                which must be >= 1.
            combine: "mul" or "add".
            nonlinearity: "relu" or "linear": the FilterNorm gain.
            dtype: compute dtype, e.g. jnp.bfloat16 (None: inferred from the
                input and the parameters). The output has this dtype.
            param_dtype: parameter dtype.
            implementation: how `ddf_jax.ddf` computes the filtering: "xla",
                "pallas_triton", "jax_triton", None for the platform default,
                or an op ``op(x, channel_filter, spatial_filter, config)``
                (e.g. a stand-in in a test); see `ddf_jax.ddf`.
            kernel_init: initializer of every conv and dense kernel.
            bias_init: initializer of every conv and dense bias.
            scale_init: initializer of the channel FilterNorm scale (default
                normal * gain / kernel_size).
            rngs: random streams.

        Raises:
            ValueError, TypeError: invalid arguments (named in the message).
        """
        self.in_features = check_int(in_features, "in_features")
        self.kernel_size = check_odd(kernel_size, "kernel_size")
        self.stride = check_int(stride, "stride")
        self.dilation = check_int(dilation, "dilation")
        self.heads = check_heads(heads, self.in_features)
        self.combine = check_combine(combine)
        nonlinearity_gain(nonlinearity)
        self.nonlinearity = nonlinearity
        self.dtype = dtype
        self.implementation = ops.check_implementation(implementation)
        self.spatial_branch = SpatialBranch(
            self.in_features,
            self.kernel_size,
            stride=self.stride,
            heads=self.heads,
            nonlinearity=nonlinearity,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            bias_init=bias_init,
            rngs=rngs,
        )
        self.channel_branch = ChannelBranch(
            self.in_features,
            self.kernel_size,
            se_ratio=se_ratio,
            nonlinearity=nonlinearity,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            bias_init=bias_init,
            scale_init=scale_init,
            rngs=rngs,
        )

    def __call__(self, x: Array) -> Array:
        """Applies the layer.

        Args:
            x: (N, H, W, C), floating.

        Returns:
            (N, ceil(H/s), ceil(W/s), C) in ``dtype`` (default: x's dtype).
        """
        check_nhwc(x, "x", self.in_features)
        if self.dtype is not None:
            x = jnp.asarray(x, self.dtype)
        channel_filter = self.channel_branch(x)
        spatial_filter = self.spatial_branch(x)
        return ops.ddf(
            x,
            channel_filter,
            spatial_filter,
            kernel_size=self.kernel_size,
            stride=self.stride,
            dilation=self.dilation,
            combine=self.combine,
            implementation=self.implementation,
        )


class DDFUp(nnx.Module):
    """DDF upsampling (the official ``DDFUpPack``), NHWC.

    ``scale * scale`` (spatial, channel) branch pairs; pair ``i * scale + j``
    gives a stride-1 DDF output that becomes sub-pixel (i, j) of the result:
    ``out[n, h*scale + i, w*scale + j, c] = ddf_{i*scale+j}(x)[n, h, w, c]``
    (pixel shuffle). The channel branches read x. The spatial branches read x
    (depthwise conv -> 1x1 conv -> FilterNorm) or, with ``guide_features`` set,
    a guide image of x's height and width (1x1 conv -> FilterNorm), for joint
    upsampling.

    Parameters for C=64, scale=2, k=3, no guide, dw_kernel_size=3: 40,276, as
    the official module.

    Attributes:
        spatial_branches: nnx.List of scale*scale SpatialBranch; unguided ones
            have ``.depthwise``, ``.conv``, ``.norm``; guided ones ``.conv``
            (guide_features -> G*K) and ``.norm``.
        channel_branches: nnx.List of scale*scale ChannelBranch.

    Example:
        >>> import jax
        >>> from flax import nnx
        >>> import ddf_jax
        >>> up = ddf_jax.nn.DDFUp(8, scale=2, rngs=nnx.Rngs(0))
        >>> up(jax.random.normal(jax.random.key(1), (2, 5, 3, 8))).shape
        (2, 10, 6, 8)
        >>> joint = ddf_jax.nn.DDFUp(8, scale=2, guide_features=3, rngs=nnx.Rngs(0))
        >>> guide = jax.random.normal(jax.random.key(2), (2, 5, 3, 3))
        >>> joint(jax.random.normal(jax.random.key(1), (2, 5, 3, 8)), guide).shape
        (2, 10, 6, 8)
    """

    def __init__(
        self,
        in_features: int,
        scale: int = 2,
        kernel_size: int = 3,
        *,
        dilation: int = 1,
        heads: int = 1,
        se_ratio: float = 0.2,
        combine: str = "mul",
        nonlinearity: str = "linear",
        dw_kernel_size: int = 3,
        guide_features: Optional[int] = None,
        dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        implementation: ops.Implementation = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        scale_init: Optional[Initializer] = None,
        rngs: nnx.Rngs,
    ):
        """Builds the layer.

        Args:
            in_features: channels C of x (and the output).
            scale: upsampling factor r >= 1.
            kernel_size: filter size k, odd, >= 1.
            dilation: tap spacing d >= 1.
            heads: G spatial filters per pixel; must divide C.
            se_ratio: the channel branches' hidden width is int(se_ratio * C),
                which must be >= 1.
            combine: "mul" or "add".
            nonlinearity: "linear" or "relu": the FilterNorm gain.
            dw_kernel_size: odd size >= 3 of the unguided branches' depthwise
                conv (padding dw_kernel_size // 2). Unused with a guide.
            guide_features: channels of the guide image; None for no guide.
            dtype: compute dtype (None: inferred from the input and parameters).
            param_dtype: parameter dtype.
            implementation: how `ddf_jax.ddf` computes the filtering; see
                `DDF`.
            kernel_init: initializer of every conv and dense kernel.
            bias_init: initializer of every conv and dense bias.
            scale_init: initializer of the channel FilterNorm scales.
            rngs: random streams.

        Raises:
            ValueError, TypeError: invalid arguments (named in the message).
        """
        self.in_features = check_int(in_features, "in_features")
        self.scale = check_int(scale, "scale")
        self.kernel_size = check_odd(kernel_size, "kernel_size")
        self.dilation = check_int(dilation, "dilation")
        self.heads = check_heads(heads, self.in_features)
        self.combine = check_combine(combine)
        nonlinearity_gain(nonlinearity)
        self.nonlinearity = nonlinearity
        channel_branch_width(self.in_features, se_ratio)
        if guide_features is None:
            dw_kernel_size = check_odd(dw_kernel_size, "dw_kernel_size", minimum=3)
        else:
            guide_features = check_int(guide_features, "guide_features")
        self.dw_kernel_size = dw_kernel_size
        self.guide_features = guide_features
        self.dtype = dtype
        self.implementation = ops.check_implementation(implementation)
        common = dict(
            dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, bias_init=bias_init, rngs=rngs
        )
        spatial, channel = [], []
        for _ in range(self.scale * self.scale):
            if guide_features is None:
                spatial.append(
                    SpatialBranch(
                        self.in_features,
                        self.kernel_size,
                        heads=self.heads,
                        dw_kernel_size=dw_kernel_size,
                        nonlinearity=nonlinearity,
                        **common,
                    )
                )
            else:
                spatial.append(
                    SpatialBranch(
                        guide_features, self.kernel_size, heads=self.heads, nonlinearity=nonlinearity, **common
                    )
                )
            channel.append(
                ChannelBranch(
                    self.in_features,
                    self.kernel_size,
                    se_ratio=se_ratio,
                    nonlinearity=nonlinearity,
                    scale_init=scale_init,
                    **common,
                )
            )
        self.spatial_branches = nnx.List(spatial)
        self.channel_branches = nnx.List(channel)

    def __call__(self, x: Array, guide: Optional[Array] = None) -> Array:
        """Upsamples x.

        Args:
            x: (N, H, W, C), floating.
            guide: (N, H, W, guide_features) when the layer was built with
                ``guide_features``; must be None otherwise.

        Returns:
            (N, scale*H, scale*W, C) in ``dtype`` (default: x's dtype).
        """
        check_nhwc(x, "x", self.in_features)
        if self.guide_features is None:
            if guide is not None:
                raise ValueError("guide was given, but this DDFUp was built with guide_features=None")
            source = x
        else:
            if guide is None:
                raise ValueError(
                    f"this DDFUp was built with guide_features={self.guide_features} and needs a guide "
                    f"of shape (N, H, W, {self.guide_features})"
                )
            check_nhwc(guide, "guide", self.guide_features, "guide_features")
            if jnp.shape(guide)[:3] != jnp.shape(x)[:3]:
                raise ValueError(
                    f"guide must have x's batch, height and width {jnp.shape(x)[:3]}, "
                    f"got guide shape {jnp.shape(guide)}"
                )
            source = guide
        if self.dtype is not None:
            x = jnp.asarray(x, self.dtype)
            source = jnp.asarray(source, self.dtype)
        outs = []
        for spatial_branch, channel_branch in zip(self.spatial_branches, self.channel_branches):
            outs.append(
                ops.ddf(
                    x,
                    channel_branch(x),
                    spatial_branch(source),
                    kernel_size=self.kernel_size,
                    stride=1,
                    dilation=self.dilation,
                    combine=self.combine,
                    implementation=self.implementation,
                )
            )
        n, h, w, c = outs[0].shape
        r = self.scale
        out = jnp.stack(outs, axis=3).reshape(n, h, w, r, r, c)  # [..., i, j, :] = branch i*r + j
        out = jnp.transpose(out, (0, 1, 3, 2, 4, 5))  # (N, H, i, W, j, C)
        return out.reshape(n, h * r, w * r, c)


__all__ = [
    "ChannelBranch",
    "DDF",
    "DDFUp",
    "FILTER_TYPES",
    "FilterNorm",
    "GAINS",
    "SpatialBranch",
    "standardize_filters",
]
