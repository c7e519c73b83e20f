"""Flax Linen versions of the DDF layers, generated from the NNX layers.

`DDF` and `DDFUp` subclass classes made by ``nnx.bridge.to_linen_class``. They
take the NNX constructor's arguments **as keywords** (without ``rngs``: Linen's
``params`` stream initialises the parameters), keep the parameters in Linen's
``params`` collection under the NNX attribute names
(``spatial_branch/conv/kernel``, ``channel_branch/norm/scale``, ...), and are
called like the NNX layers. See `ddf_jax.nn.DDF` and `ddf_jax.nn.DDFUp` for the
arguments, shapes (NHWC) and dtypes.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import ddf_jax.linen
    >>> class Block(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         x = nn.Conv(8, (3, 3))(x)
    ...         return ddf_jax.linen.DDF(in_features=8, kernel_size=3)(x)
    >>> x = jnp.ones((2, 6, 5, 4))
    >>> variables = Block().init(jax.random.key(0), x)
    >>> Block().apply(variables, x).shape
    (2, 6, 5, 8)
"""

from __future__ import annotations

from flax import nnx
from flax.nnx.bridge import wrappers as _wrappers

from ddf_jax import nn as _nn

# Newer Flax exports it from nnx.bridge; 0.12 keeps it in the wrappers module.
# The generated class takes the NNX keyword arguments only once subclassed.
_to_linen_class = getattr(nnx.bridge, "to_linen_class", None) or _wrappers.to_linen_class


class DDF(_to_linen_class(_nn.DDF)):
    """Linen version of `ddf_jax.nn.DDF`: (N, H, W, C) -> (N, ceil(H/s), ceil(W/s), C).

    Construct with the `ddf_jax.nn.DDF` arguments as keywords (``in_features=``,
    ``kernel_size=``, ``stride=``, ...), without ``rngs``. Call with x of shape
    (N, H, W, C).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import ddf_jax.linen
        >>> layer = ddf_jax.linen.DDF(in_features=8, kernel_size=3, stride=2)
        >>> x = jnp.ones((2, 7, 5, 8))
        >>> variables = layer.init(jax.random.key(0), x)
        >>> layer.apply(variables, x).shape
        (2, 4, 3, 8)
    """


class DDFUp(_to_linen_class(_nn.DDFUp)):
    """Linen version of `ddf_jax.nn.DDFUp`: (N, H, W, C) -> (N, scale*H, scale*W, C).

    Construct with the `ddf_jax.nn.DDFUp` arguments as keywords (``in_features=``,
    ``scale=``, ``guide_features=``, ...), without ``rngs``. Call with x of shape
    (N, H, W, C) and, when built with ``guide_features``, a guide of shape
    (N, H, W, guide_features).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import ddf_jax.linen
        >>> layer = ddf_jax.linen.DDFUp(in_features=8, scale=2, guide_features=3)
        >>> x, guide = jnp.ones((2, 4, 3, 8)), jnp.ones((2, 4, 3, 3))
        >>> variables = layer.init(jax.random.key(0), x, guide)
        >>> layer.apply(variables, x, guide).shape
        (2, 8, 6, 8)
    """


__all__ = ["DDF", "DDFUp"]
