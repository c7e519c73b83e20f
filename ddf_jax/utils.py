"""Small utilities: parameter counting."""

from __future__ import annotations

import math
from typing import Any

import jax


def count_params(tree: Any) -> int:
    """The number of trainable parameters (scalars) in a module or a parameter tree.

    Args:
        tree: a Flax NNX module (its `nnx.Param` variables are counted; other
            variables such as batch statistics are not), or any pytree of
            arrays, e.g. a Linen ``variables["params"]`` dict or an
            `nnx.State` (every array leaf is counted). Abstract leaves such as
            `jax.ShapeDtypeStruct` (from `nnx.eval_shape`) are counted too.

    Returns:
        The total number of scalars, as a Python int.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import ddf_jax
        >>> ddf_jax.count_params(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
        16
        >>> ddf_jax.count_params({"w": jnp.ones((2, 3)), "b": jnp.ones(3)})
        9
    """
    from flax import nnx  # Imported here so that `import ddf_jax` stays light.

    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    return sum(math.prod(getattr(leaf, "shape", ())) for leaf in jax.tree.leaves(tree))


__all__ = ["count_params"]
