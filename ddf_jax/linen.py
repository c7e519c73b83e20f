"""Flax Linen versions of the DDF layers: `DDF` and `DDFUp` (NHWC).

Each is a Linen module whose dataclass fields are the constructor arguments of
the NNX layer (`ddf_jax.nn.DDF`, `ddf_jax.nn.DDFUp`) in the same order, all
positional as in Linen's own layers (``DDF(8)``, ``DDFUp(8, 2)``,
``DDF(8, 3, 2)``), without ``rngs``: Linen's ``params`` stream initialises the
parameters, with the NNX layer's initializers.

The NNX layer does the work. `flax.nnx.bridge.ToLinen` builds it from the
fields and keeps its state in Linen variables, and `flax.linen.share_scope`
puts that state in this module's own scope. So the parameters have the NNX
attribute names (``params/spatial_branch/conv/kernel``,
``params/channel_branch/norm/scale``, ...), the same parameters give the same
outputs as the NNX layer, and `nnx.update(nnx_layer, variables["params"])`
moves them across. `ToLinen` rebuilds the NNX layer on every ``apply``; under
`jax.jit` the initializers it runs are unused and compiled away.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import ddf_jax.linen
    >>> class Block(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         x = nn.Conv(8, (3, 3))(x)
    ...         x = ddf_jax.linen.DDF(8, 3, 2)(x)
    ...         return ddf_jax.linen.DDFUp(8, 2)(x)
    >>> x = jnp.ones((2, 6, 5, 4))
    >>> variables = Block().init(jax.random.key(0), x)
    >>> Block().apply(variables, x).shape
    (2, 6, 6, 8)
    >>> variables["params"]["DDF_0"]["spatial_branch"]["conv"]["kernel"].shape
    (1, 1, 8, 9)
"""

from __future__ import annotations

import inspect
from typing import Optional

import flax.linen as linen
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from ddf_jax import nn as _nn
from ddf_jax._types import Array, Dtype, Initializer, default_bias_init, default_kernel_init
from ddf_jax.ops import Implementation


def _nnx_arguments(nnx_class: type) -> tuple[str, ...]:
    """The constructor arguments of `nnx_class` without ``rngs``: the Linen fields."""
    names = tuple(inspect.signature(nnx_class.__init__).parameters)
    return tuple(name for name in names[1:] if name != "rngs")


class _NNXLayer(linen.Module):
    """Runs ``nnx_class(**fields)`` through `nnx.bridge.ToLinen`, in this module's scope."""

    # Set by each subclass; not a dataclass field.
    nnx_class = None

    def setup(self):
        arguments = {name: getattr(self, name) for name in _nnx_arguments(self.nnx_class)}
        self.layer = nnx.bridge.ToLinen(self.nnx_class, kwargs=FrozenDict(arguments))
        linen.share_scope(self, self.layer)


class DDF(_NNXLayer):
    """Linen version of `ddf_jax.nn.DDF`: (N, H, W, C) -> (N, ceil(H/s), ceil(W/s), C).

    The fields are `ddf_jax.nn.DDF`'s arguments, in its order; see there for
    their meaning and checks (an invalid value raises at ``init``, naming it).

    Attributes:
        in_features: channels C of the input and the output.
        kernel_size: filter size k, odd, >= 1.
        stride: s >= 1.
        dilation: tap spacing d >= 1.
        heads: G spatial filters per pixel; must divide C.
        se_ratio: the channel branch's hidden width is int(se_ratio * C) >= 1.
        combine: "mul" or "add".
        nonlinearity: "relu" or "linear": the FilterNorm gain.
        dtype: compute and output dtype (None: inferred from the input and
            the parameters).
        param_dtype: parameter dtype.
        implementation: how `ddf_jax.ddf` computes the filtering: "xla",
            "pallas_triton", "jax_triton", None (the platform default) or an op.
        kernel_init: initializer of every conv and dense kernel.
        bias_init: initializer of every conv and dense bias.
        scale_init: initializer of the channel FilterNorm scale.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import ddf_jax.linen
        >>> layer = ddf_jax.linen.DDF(8, 3, stride=2)
        >>> x = jnp.ones((2, 7, 5, 8))
        >>> variables = layer.init(jax.random.key(0), x)
        >>> layer.apply(variables, x).shape
        (2, 4, 3, 8)
        >>> variables["params"]["channel_branch"]["norm"]["scale"].shape
        (72,)
    """

    nnx_class = _nn.DDF

    in_features: int
    kernel_size: int = 3
    stride: int = 1
    dilation: int = 1
    heads: int = 1
    se_ratio: float = 0.2
    combine: str = "mul"
    nonlinearity: str = "relu"
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    implementation: Implementation = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = default_bias_init
    scale_init: Optional[Initializer] = None

    def __call__(self, x: Array) -> Array:
        """Applies the layer.

        Args:
            x: (N, H, W, C) with C = in_features, floating.

        Returns:
            (N, ceil(H/s), ceil(W/s), C) in ``dtype`` (default: x's dtype).
        """
        return self.layer(x)


class DDFUp(_NNXLayer):
    """Linen version of `ddf_jax.nn.DDFUp`: (N, H, W, C) -> (N, scale*H, scale*W, C).

    The fields are `ddf_jax.nn.DDFUp`'s arguments, in its order; see there for
    their meaning and checks (an invalid value raises at ``init``, naming it).

    Attributes:
        in_features: channels C of x and the output.
        scale: upsampling factor r >= 1.
        kernel_size: filter size k, odd, >= 1.
        dilation: tap spacing d >= 1.
        heads: G spatial filters per pixel; must divide C.
        se_ratio: the channel branches' hidden width is int(se_ratio * C) >= 1.
        combine: "mul" or "add".
        nonlinearity: "linear" or "relu": the FilterNorm gain.
        dw_kernel_size: odd size >= 3 of the unguided branches' depthwise conv.
        guide_features: channels of the guide image; None for no guide.
        dtype: compute and output dtype (None: inferred from the input and
            the parameters).
        param_dtype: parameter dtype.
        implementation: how `ddf_jax.ddf` computes the filtering; see `DDF`.
        kernel_init: initializer of every conv and dense kernel.
        bias_init: initializer of every conv and dense bias.
        scale_init: initializer of the channel FilterNorm scales.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import ddf_jax.linen
        >>> layer = ddf_jax.linen.DDFUp(8, 2, guide_features=3)
        >>> x, guide = jnp.ones((2, 4, 3, 8)), jnp.ones((2, 4, 3, 3))
        >>> variables = layer.init(jax.random.key(0), x, guide)
        >>> layer.apply(variables, x, guide).shape
        (2, 8, 6, 8)
        >>> sorted(variables["params"]["spatial_branches"])
        [0, 1, 2, 3]
    """

    nnx_class = _nn.DDFUp

    in_features: int
    scale: int = 2
    kernel_size: int = 3
    dilation: int = 1
    heads: int = 1
    se_ratio: float = 0.2
    combine: str = "mul"
    nonlinearity: str = "linear"
    dw_kernel_size: int = 3
    guide_features: Optional[int] = None
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    implementation: Implementation = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = default_bias_init
    scale_init: Optional[Initializer] = None

    def __call__(self, x: Array, guide: Optional[Array] = None) -> Array:
        """Upsamples x.

        Args:
            x: (N, H, W, C) with C = in_features, floating.
            guide: (N, H, W, guide_features) when ``guide_features`` is set;
                None otherwise.

        Returns:
            (N, scale*H, scale*W, C) in ``dtype`` (default: x's dtype).
        """
        return self.layer(x, guide)


__all__ = ["DDF", "DDFUp"]
