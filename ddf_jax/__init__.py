"""ddf-jax: Decoupled Dynamic Filter networks in JAX and Flax.

Public names:
    ddf: the DDF op (NHWC), with selectable implementations.
    default_implementation: which implementation `ddf` uses by default.
    IMPLEMENTATIONS: the implementation names.
"""

from ddf_jax.kernels import IMPLEMENTATIONS, ImplementationUnavailable
from ddf_jax.ops import ddf, default_implementation

__version__ = "0.1.0"

__all__ = [
    "IMPLEMENTATIONS",
    "ImplementationUnavailable",
    "ddf",
    "default_implementation",
]
