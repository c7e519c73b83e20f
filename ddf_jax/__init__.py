"""ddf-jax: Decoupled Dynamic Filter networks in JAX and Flax.

Public names:
    ddf: the DDF op (NHWC), with selectable implementations.
    default_implementation: which implementation `ddf` uses by default.
    IMPLEMENTATIONS: the implementation names.
    count_params: the number of trainable parameters of a module or tree.
    count_macs: multiply-accumulates of one forward pass, counted from its trace.
    nn: Flax NNX layers (FilterNorm, DDF, DDFUp); imported on first use.
    linen: Flax Linen versions of the layers; imported on first use.
    models: ResNets and DDF-ResNets, registry, official checkpoints; imported on first use.
"""

from ddf_jax.kernels import IMPLEMENTATIONS, ImplementationUnavailable
from ddf_jax.ops import ddf, default_implementation
from ddf_jax.flops import count_macs
from ddf_jax.utils import count_params

__version__ = "0.1.0"

__all__ = [
    "IMPLEMENTATIONS",
    "ImplementationUnavailable",
    "count_macs",
    "count_params",
    "ddf",
    "default_implementation",
]

# Submodules that need Flax, imported on first attribute access (`ddf_jax.nn`).
_LAZY_SUBMODULES = ("nn", "linen", "models")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"ddf_jax.{name}")
    raise AttributeError(f"module 'ddf_jax' has no attribute {name!r}")
