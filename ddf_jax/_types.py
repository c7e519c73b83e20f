"""Type aliases and default initializers shared by the NNX and Linen layers."""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

# Flax's defaults for Conv and Linear.
default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()
