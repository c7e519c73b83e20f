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

import math
import numbers
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from ddf_jax import ops
from ddf_jax._checks import check_combine, check_int, check_odd

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

# Flax's defaults for Conv and Linear.
default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()

# Gains of the nonlinearity that follows the filtering (torch.nn.init.calculate_gain).
GAINS = {"linear": 1.0, "relu": math.sqrt(2.0)}
FILTER_TYPES = ("spatial", "channel")

# The official epsilon, added to the standard deviation.
_STD_EPSILON = 1e-10


# ---------------------------------------------------------------------------
# Validation helpers.


def _check_heads(heads, in_features: int) -> int:
    heads = check_int(heads, "heads")
    if in_features % heads:
        raise ValueError(f"heads must divide in_features={in_features}, got heads={heads}")
    return heads


def _gain(nonlinearity) -> float:
    if nonlinearity not in GAINS:
        raise ValueError(f"nonlinearity must be one of {tuple(GAINS)}, got {nonlinearity!r}")
    return GAINS[nonlinearity]


def _mid_features(in_features: int, se_ratio) -> int:
    if isinstance(se_ratio, bool) or not isinstance(se_ratio, numbers.Real):
        raise TypeError(f"se_ratio must be a number, got {se_ratio!r} of type {type(se_ratio).__name__}")
    if not se_ratio > 0:
        raise ValueError(f"se_ratio must be > 0, got {se_ratio}")
    mid = int(in_features * se_ratio)
    if mid < 1:
        raise ValueError(
            f"int(se_ratio * in_features) is the channel branch's hidden width and must be >= 1, "
            f"got int({se_ratio} * {in_features}) = {mid}"
        )
    return mid


def _check_input(x, name: str, features: int, argument: str = "in_features") -> None:
    if jnp.ndim(x) != 4:
        raise ValueError(f"{name} must be 4-D (N, H, W, C), got shape {jnp.shape(x)}")
    if jnp.shape(x)[-1] != features:
        raise ValueError(
            f"{name} must have {argument}={features} channels (last axis), got shape {jnp.shape(x)}"
        )


# ---------------------------------------------------------------------------
# FilterNorm.


def standardize_filters(filters: Array) -> Array:
    """Standardises filters over their last (tap) axis, the official way, with safe gradients.

    For K = filters.shape[-1] > 1 taps this is the official FilterNorm formula

        (f - mean(f)) / (std(f) + 1e-10),  std unbiased: sqrt(sum((f - mean)^2) / (K - 1)),

    evaluated exactly as written wherever the computed variance is positive, so
    imported official weights give the official outputs. Where it is exactly 0
    (all K taps equal, e.g. a zero input pixel and equal biases), the official
    formula's value is 0 (below about 1e-9 in float32 if tiny deviations
    underflow when squared) but its gradient is NaN: the derivative of sqrt at
    0, times 0. Here such a filter standardises to exactly 0 with a zero
    gradient (a constant filter has no pattern to normalise); sqrt never sees a
    zero, so no NaN or inf arises. Only this degenerate case differs from the official formula. A
    `sqrt(var + eps)` alternative was not used because it would change every
    output slightly and, for nearly constant filters, still give gradients of
    order 1/sqrt(eps).

    For K = 1 the unbiased std divides by K - 1 = 0 and the centred filter is
    always 0, so standardisation has nothing to act on. The filter is returned
    unchanged (only FilterNorm's scale applies), which keeps a 1x1 DDF a useful
    dynamic gate instead of a layer whose output is always zero.

    Statistics are computed in float32 (float64 for float64 input).

    Args:
        filters: (..., K), any floating dtype.

    Returns:
        (..., K) in float32 (float64 for float64 input).
    """
    compute_dtype = jnp.promote_types(jnp.result_type(filters), jnp.float32)
    filters = jnp.asarray(filters, compute_dtype)
    taps = filters.shape[-1]
    if taps == 1:
        return filters
    centred = filters - jnp.mean(filters, axis=-1, keepdims=True)
    variance = jnp.sum(centred * centred, axis=-1, keepdims=True) / (taps - 1)
    nonconstant = variance > 0
    # sqrt only ever sees positive values, so its gradient stays finite.
    std = jnp.sqrt(jnp.where(nonconstant, variance, 1.0))
    standardized = centred / (std + _STD_EPSILON)
    return jnp.where(nonconstant, standardized, 0.0)


class FilterNorm(nnx.Module):
    """Standardises dynamic filters over their K = k*k taps and rescales them.

    ``out = (f - mean) / std * scale`` per filter, with the unbiased std of the
    official module (see `standardize_filters` for the epsilon and ``k = 1``).

    * ``filter_type="spatial"``: one filter per (pixel, head); ``scale`` is the
      constant ``gain / kernel_size`` (a Python float; no parameters).
    * ``filter_type="channel"``: one filter per (sample, channel); ``scale`` is a
      learnable `nnx.Param` of shape (features * K,), indexed ``c * K + t``
      (the official ``std`` parameter), initialised ``normal * gain / kernel_size``.

    Attributes:
        scale: float (spatial) or nnx.Param of shape (features * K,) (channel).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from ddf_jax.nn import FilterNorm
        >>> norm = FilterNorm(3, filter_type="channel", features=8, rngs=nnx.Rngs(0))
        >>> norm.scale.shape
        (72,)
        >>> norm(jax.random.normal(jax.random.key(1), (2, 8, 9))).shape
        (2, 8, 9)
        >>> FilterNorm(3)(jnp.ones((2, 5, 5, 1, 9))).shape
        (2, 5, 5, 1, 9)
    """

    def __init__(
        self,
        kernel_size: int,
        *,
        filter_type: str = "spatial",
        features: Optional[int] = None,
        nonlinearity: str = "relu",
        dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        scale_init: Optional[Initializer] = None,
        rngs: Optional[nnx.Rngs] = None,
    ):
        """Builds the normalisation.

        Args:
            kernel_size: the filter size k (odd, >= 1); filters have K = k*k taps.
            filter_type: "spatial" or "channel".
            features: the number of channels C; required for "channel", must
                be None for "spatial".
            nonlinearity: "relu" (gain sqrt(2)) or "linear" (gain 1).
            dtype: the output dtype; None keeps the input's dtype.
            param_dtype: the dtype of the channel scale.
            scale_init: initializer of the channel scale; default
                ``normal(stddev=gain / kernel_size)``.
            rngs: random streams; required for "channel".
        """
        self.kernel_size = check_odd(kernel_size, "kernel_size")
        self.taps = self.kernel_size**2
        if filter_type not in FILTER_TYPES:
            raise ValueError(f"filter_type must be one of {FILTER_TYPES}, got {filter_type!r}")
        self.filter_type = filter_type
        self.nonlinearity = nonlinearity
        self.gain = _gain(nonlinearity)
        self.dtype = dtype
        if filter_type == "spatial":
            if features is not None:
                raise ValueError(f"features must be None for a spatial FilterNorm, got {features!r}")
            self.features = None
            self.scale = self.gain / self.kernel_size
        else:
            self.features = check_int(features, "features")
            if rngs is None:
                raise TypeError("a channel FilterNorm has parameters and needs rngs=nnx.Rngs(...)")
            init = scale_init or nnx.initializers.normal(stddev=self.gain / self.kernel_size)
            self.scale = nnx.Param(init(rngs.params(), (self.features * self.taps,), param_dtype))

    def __call__(self, filters: Array) -> Array:
        """Normalises `filters`.

        Args:
            filters: spatial: (..., K), e.g. (N, Ho, Wo, G, K); channel:
                (N, C, K). Any floating dtype.

        Returns:
            The same shape, in ``dtype`` (default: the input's dtype). Statistics
            are computed in float32.
        """
        shape = jnp.shape(filters)
        if not shape or shape[-1] != self.taps:
            raise ValueError(
                f"filters must have kernel_size**2 = {self.taps} taps on the last axis, got shape {shape}"
            )
        out_dtype = self.dtype or jnp.result_type(filters)
        normalized = standardize_filters(filters)
        if self.filter_type == "spatial":
            out = normalized * self.scale
        else:
            if len(shape) != 3 or shape[1] != self.features:
                raise ValueError(
                    f"channel filters must have shape (N, features={self.features}, {self.taps}), got {shape}"
                )
            scale = jnp.reshape(self.scale[...], (self.features, self.taps))
            out = normalized * scale.astype(normalized.dtype)
        return out.astype(out_dtype)


# ---------------------------------------------------------------------------
# Filter-generating branches.


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
        conv: nnx.Conv 1x1 (C -> G*K).
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
        self.conv = nnx.Conv(
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
        _check_input(x, "x", self.in_features)
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
        self.mid_features = _mid_features(self.in_features, se_ratio)
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
        _check_input(x, "x", self.in_features)
        accumulate = jnp.promote_types(x.dtype, jnp.float32)
        pooled = jnp.mean(x, axis=(1, 2), dtype=accumulate).astype(x.dtype)
        hidden = nnx.relu(self.fc1(pooled))
        filters = self.fc2(hidden)
        filters = jnp.reshape(filters, (filters.shape[0], self.in_features, self.taps))
        return self.norm(filters)


# ---------------------------------------------------------------------------
# DDF layers.


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
        self.heads = _check_heads(heads, self.in_features)
        self.combine = check_combine(combine)
        _gain(nonlinearity)
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
        _check_input(x, "x", self.in_features)
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
        self.heads = _check_heads(heads, self.in_features)
        self.combine = check_combine(combine)
        _gain(nonlinearity)
        self.nonlinearity = nonlinearity
        _mid_features(self.in_features, se_ratio)
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
        _check_input(x, "x", self.in_features)
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
            _check_input(guide, "guide", self.guide_features, "guide_features")
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
    "FilterNorm",
    "GAINS",
    "SpatialBranch",
    "standardize_filters",
]
