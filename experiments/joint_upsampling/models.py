"""Guided depth up-sampling networks: `ddf_up_net` and its `plain_net` control.

Both networks share one layout (NHWC throughout):

    guide (N, H, W, 3) in [0, 1]                low_res (N, H/s, W/s, 1) disparity
            |                                            |
    GuidePyramid: 2 convs at H x W, then          DepthEncoder: convs at H/s
    one stride-2 conv per level, giving                  |
    g[0] (H), g[1] (H/2), ..., g[L] (H/2^L)              x
                                                         |
    L = log2(s) stages; stage m takes x from resolution H/2^l (l = L - m) to
    H/2^(l-1):
        ddf_up_net:  up = DDFUp(x, guide=g[l]) + bilinear_x2(x)
                     (filters from the guide at x's own resolution: the
                     stride-2 pyramid carries the sub-pixel detail down;
                     DDF-Up learns a guided correction to bilinear feature
                     up-sampling. Options: bilinear_skip=False drops the
                     bilinear term; guide_unshuffle=True also feeds DDF-Up
                     pixel_unshuffle(g[l-1]))
        plain_net:   up = Conv3x3(bilinear_x2(x))   (in place of DDF-Up)
        both:        x  = relu(Conv3x3(concat(up, g[l-1]))); x = relu(Conv3x3(x))
                                                         |
    head: Conv3x3 -> 1 channel, a residual added to bilinear(low_res)

The only difference between the two networks is the x2 up-sampling operator
(the bilinear skip is parameter-free), so any gap between them measures DDF-Up
against a learned conv after bilinear up-sampling. Disparities
enter divided by `disparity_scale` and the residual leaves multiplied by it,
so callers pass and receive raw disparities (pixels, or metres for NYU).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

UPSAMPLERS = ("ddf", "bilinear")
HEAD_INIT_STDDEV = 1e-2


def num_stages(scale) -> int:
    """log2(scale), the number of x2 stages of a network for `scale`.

    Raises:
      ValueError: `scale` is not a power of two >= 2.
    """
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 2 or scale & (scale - 1):
        raise ValueError(f"scale must be a power of two >= 2 (e.g. 4, 8, 16), got {scale!r}")
    return int(math.log2(scale))


def _conv(in_features, out_features, *, strides=1, dtype, param_dtype, rngs):
    return nnx.Conv(
        in_features,
        out_features,
        (3, 3),
        strides=strides,
        padding="SAME",
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def upsample_bilinear(x: jax.Array, factor: int) -> jax.Array:
    """Bilinear up-sampling of (N, h, w, C) to (N, factor*h, factor*w, C) (half-pixel centres)."""
    n, h, w, c = x.shape
    return jax.image.resize(x, (n, factor * h, factor * w, c), method="linear")


def level_features(level: int, base: int, maximum: int) -> int:
    """Channels at pyramid level `level` (resolution H / 2**level): min(maximum, base * 2**level)."""
    return min(maximum, base * 2**level)


def pixel_unshuffle(x: jax.Array, factor: int) -> jax.Array:
    """Space-to-depth: (N, f*h, f*w, C) -> (N, h, w, f*f*C), channel (i*f + j)*C + c = x[f*y+i, f*x+j, c]."""
    n, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"pixel_unshuffle needs H and W divisible by {factor}, got shape {x.shape}")
    x = x.reshape(n, h // factor, factor, w // factor, factor, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, h // factor, w // factor, factor * factor * c)


class GuidePyramid(nnx.Module):
    """RGB guide features at full resolution and at `levels` halvings.

    Args:
      levels: number of stride-2 levels L.
      base_features: channels at full resolution; doubled per level up to
        `max_features`.
      max_features: channel cap.
      dtype: compute dtype (None: inferred).
      param_dtype: parameter dtype.
      rngs: `nnx.Rngs`.

    Call with guide (N, H, W, 3) float (expected in [0, 1]); returns a list of
    L + 1 arrays, level l being (N, ceil(H/2^l), ceil(W/2^l),
    level_features(l, base_features, max_features)).
    """

    def __init__(
        self,
        levels: int,
        base_features: int,
        max_features: int,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        widths = [level_features(level, base_features, max_features) for level in range(levels + 1)]
        self.stem = nnx.List([_conv(3, widths[0], **kw), _conv(widths[0], widths[0], **kw)])
        self.down = nnx.List(
            [_conv(widths[level], widths[level + 1], strides=2, **kw) for level in range(levels)]
        )

    def __call__(self, guide: jax.Array) -> list[jax.Array]:
        g = guide - 0.5
        for conv in self.stem:
            g = jax.nn.relu(conv(g))
        pyramid = [g]
        for conv in self.down:
            g = jax.nn.relu(conv(g))
            pyramid.append(g)
        return pyramid


class UpStage(nnx.Module):
    """One x2 stage: up-sample x, fuse the guide at the new resolution, refine.

    Args:
      in_features: channels of x.
      out_features: channels of the output.
      guide_in_features: channels of the guide at x's resolution.
      guide_out_features: channels of the guide at the output resolution.
      upsampler: 'ddf' (DDF-Up guided by the guide at x's resolution) or
        'bilinear' (bilinear x2 then a 3x3 conv).
      kernel_size: DDF-Up kernel size.
      guide_unshuffle: 'ddf' only: also give DDF-Up the output-resolution
        guide, pixel-unshuffled to x's resolution (4 * guide_out_features
        channels), so each sub-pixel branch sees its own guide pixels.
      bilinear_skip: 'ddf' only: up = DDFUp(x) + bilinear_x2(x), so DDF-Up
        learns a guided correction to bilinear feature up-sampling.
      dtype, param_dtype, implementation, rngs: as in `JointUpsamplingNet`.

    Call with x (N, h, w, in_features), guide_in (N, h, w, guide_in_features)
    and guide_out (N, 2h, 2w, guide_out_features); returns (N, 2h, 2w,
    out_features).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        guide_in_features: int,
        guide_out_features: int,
        upsampler: str,
        *,
        kernel_size: int = 3,
        guide_unshuffle: bool = False,
        bilinear_skip: bool = True,
        dtype=None,
        param_dtype=jnp.float32,
        implementation: Optional[str] = None,
        rngs: nnx.Rngs,
    ):
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {upsampler!r}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.upsampler = upsampler
        self.guide_unshuffle = guide_unshuffle
        self.bilinear_skip = bilinear_skip
        if upsampler == "ddf":
            from ddf_jax.nn import DDFUp

            ddf_guide_features = guide_in_features + (4 * guide_out_features if guide_unshuffle else 0)
            self.up = DDFUp(
                in_features,
                scale=2,
                kernel_size=kernel_size,
                guide_features=ddf_guide_features,
                implementation=implementation,
                **kw,
            )
        else:
            self.up = _conv(in_features, in_features, **kw)
        self.fuse = _conv(in_features + guide_out_features, out_features, **kw)
        self.refine = _conv(out_features, out_features, **kw)

    def __call__(self, x: jax.Array, guide_in: jax.Array, guide_out: jax.Array) -> jax.Array:
        if self.upsampler == "ddf":
            guide = guide_in.astype(x.dtype)
            if self.guide_unshuffle:
                # Every sub-pixel's guide features, at x's resolution.
                guide = jnp.concatenate([guide, pixel_unshuffle(guide_out.astype(x.dtype), 2)], axis=-1)
            up = self.up(x, guide=guide)
            if self.bilinear_skip:
                up = up + upsample_bilinear(x, 2)
        else:
            up = self.up(upsample_bilinear(x, 2))
        y = jax.nn.relu(self.fuse(jnp.concatenate([up, guide_out.astype(up.dtype)], axis=-1)))
        return jax.nn.relu(self.refine(y))


class JointUpsamplingNet(nnx.Module):
    """Guided depth up-sampling by `scale` (a power of two): residual over bilinear.

    Channel widths grow as resolution falls: the depth path has
    `level_features(l, base_features, max_features)` channels at resolution
    H / 2**l, the guide pyramid `level_features(l, guide_base_features,
    guide_max_features)`; this keeps the full-resolution layers cheap.

    Args:
      scale: up-sampling factor, 2**L (L stages of x2).
      upsampler: 'ddf' for `ddf_up_net`, 'bilinear' for `plain_net`.
      base_features: depth-path channels at full resolution.
      max_features: depth-path channel cap.
      guide_base_features: guide channels at full resolution.
      guide_max_features: guide channel cap.
      encoder_layers: 3x3 conv layers of the depth encoder (>= 1).
      kernel_size: DDF-Up kernel size.
      guide_unshuffle: DDF-Up also reads the pixel-unshuffled guide of the
        stage's output resolution (see `UpStage`); ignored by 'bilinear'.
      bilinear_skip: DDF-Up's output is added to the bilinear up-sampling of
        its input (see `UpStage`); ignored by 'bilinear'.
      disparity_scale: disparities are divided by this on the way in and the
        residual multiplied by it on the way out.
      dtype, param_dtype: compute and parameter dtypes.
      implementation: DDF op implementation (None: the backend default).
      rngs: `nnx.Rngs`.

    Call with guide (N, H, W, 3) float in [0, 1] and low_res (N, H/scale,
    W/scale, 1) float disparity; H and W must be multiples of `scale`. Returns
    the (N, H, W, 1) float32 disparity.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> net = JointUpsamplingNet(4, "bilinear", base_features=4, rngs=nnx.Rngs(0))
      >>> net(jnp.ones((1, 16, 24, 3)), jnp.ones((1, 4, 6, 1))).shape
      (1, 16, 24, 1)
    """

    def __init__(
        self,
        scale: int,
        upsampler: str = "ddf",
        *,
        base_features: int = 8,
        max_features: int = 32,
        guide_base_features: int = 8,
        guide_max_features: int = 16,
        encoder_layers: int = 2,
        kernel_size: int = 3,
        guide_unshuffle: bool = False,
        bilinear_skip: bool = True,
        disparity_scale: float = 32.0,
        dtype=None,
        param_dtype=jnp.float32,
        implementation: Optional[str] = None,
        rngs: nnx.Rngs,
    ):
        levels = num_stages(scale)
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {upsampler!r}")
        for name, value in (
            ("base_features", base_features),
            ("max_features", max_features),
            ("guide_base_features", guide_base_features),
            ("guide_max_features", guide_max_features),
            ("encoder_layers", encoder_layers),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not disparity_scale > 0:
            raise ValueError(f"disparity_scale must be > 0, got {disparity_scale}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.scale = scale
        self.upsampler = upsampler
        self.disparity_scale = float(disparity_scale)
        self.dtype = dtype
        width = [level_features(level, base_features, max_features) for level in range(levels + 1)]
        guide_width = [
            level_features(level, guide_base_features, guide_max_features) for level in range(levels + 1)
        ]
        self.guide = GuidePyramid(levels, guide_base_features, guide_max_features, **kw)
        self.encoder = nnx.List(
            [_conv(1 if i == 0 else width[levels], width[levels], **kw) for i in range(encoder_layers)]
        )
        self.stages = nnx.List(
            [
                UpStage(
                    width[level],
                    width[level - 1],
                    guide_width[level],
                    guide_width[level - 1],
                    upsampler,
                    kernel_size=kernel_size,
                    guide_unshuffle=guide_unshuffle,
                    bilinear_skip=bilinear_skip,
                    implementation=implementation,
                    **kw,
                )
                for level in range(levels, 0, -1)
            ]
        )
        self.head = nnx.Conv(
            width[0],
            1,
            (3, 3),
            padding="SAME",
            # Small, not zero: a zero head blocks the gradient to every other layer
            # at the start, and the residual must start near 0.
            kernel_init=nnx.initializers.normal(HEAD_INIT_STDDEV),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, guide: jax.Array, low_res: jax.Array) -> jax.Array:
        if guide.ndim != 4 or guide.shape[-1] != 3:
            raise ValueError(f"guide must be (N, H, W, 3), got shape {guide.shape}")
        n, h, w, _ = guide.shape
        expected = (n, h // self.scale, w // self.scale, 1)
        if h % self.scale or w % self.scale or tuple(low_res.shape) != expected:
            raise ValueError(
                f"low_res must be (N, H/scale, W/scale, 1) = {expected} for guide {tuple(guide.shape)} "
                f"and scale {self.scale} (H, W multiples of scale), got {tuple(low_res.shape)}"
            )
        compute = self.dtype or jnp.float32
        pyramid = self.guide(guide.astype(compute))
        low_res = low_res.astype(jnp.float32)
        x = (low_res / self.disparity_scale).astype(compute)
        for conv in self.encoder:
            x = jax.nn.relu(conv(x))
        levels = len(self.stages)
        for m, stage in enumerate(self.stages):
            level = levels - m
            x = stage(x, pyramid[level], pyramid[level - 1])
        residual = self.head(x).astype(jnp.float32)
        return upsample_bilinear(low_res, self.scale) + residual * self.disparity_scale


def ddf_up_net(scale: int, *, rngs: nnx.Rngs, **overrides: Any) -> JointUpsamplingNet:
    """The DDF-Up network: `JointUpsamplingNet(scale, 'ddf', ...)`."""
    return JointUpsamplingNet(scale, "ddf", rngs=rngs, **overrides)


def plain_net(scale: int, *, rngs: nnx.Rngs, **overrides: Any) -> JointUpsamplingNet:
    """The control: the same network with bilinear x2 + 3x3 conv in place of DDF-Up."""
    return JointUpsamplingNet(scale, "bilinear", rngs=rngs, **overrides)


MODELS = {"ddf_up_net": ddf_up_net, "plain_net": plain_net}


def create_model(name: str, scale: int, *, rngs: nnx.Rngs, **overrides: Any) -> JointUpsamplingNet:
    """Builds 'ddf_up_net' or 'plain_net' for `scale`.

    Raises:
      ValueError: an unknown name.
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {name!r}")
    return MODELS[name](scale, rngs=rngs, **overrides)

