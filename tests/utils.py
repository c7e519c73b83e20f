"""Helpers shared by the test files."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddf_jax import models


def has_gpu() -> bool:
    """Whether JAX sees a GPU."""
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def random_ddf_inputs(seed, n, h, w, c, k, stride=1, heads=None, dtype=np.float32):
    """Random (x, channel_filter, spatial_filter, grad_out) for the DDF op, standard normal.

    x is (N,H,W,C), channel_filter (N,C,K), grad_out (N,Ho,Wo,C) with Ho = ceil(H/stride);
    spatial_filter is (N,Ho,Wo,K) when heads is None, else (N,Ho,Wo,heads,K).
    """
    rng = np.random.default_rng(seed)
    ho, wo = -(-h // stride), -(-w // stride)
    x = rng.normal(size=(n, h, w, c))
    cf = rng.normal(size=(n, c, k * k))
    sf = rng.normal(size=(n, ho, wo, k * k) if heads is None else (n, ho, wo, heads, k * k))
    g = rng.normal(size=(n, ho, wo, c))
    return tuple(jnp.asarray(a, dtype) for a in (x, cf, sf, g))


# XLA CPU options that cut the compile time of test functions (most of all the
# unrolled taps of interpret-mode kernels): optimisation level 0, no expensive LLVM passes, the elemental emitters
# instead of the fusion emitters, one codegen thread. They change how the
# code is generated, not what it computes.
_FAST_CPU_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
    "xla_cpu_parallel_codegen_split_count": 1,
}


@functools.lru_cache(maxsize=None)
def fast_compile_options() -> dict:
    """The options of `_FAST_CPU_COMPILE` that this jaxlib accepts on the CPU; {} on other backends."""
    if jax.default_backend() != "cpu":
        return {}
    accepted = {}
    for name, value in _FAST_CPU_COMPILE.items():
        try:
            jax.jit(lambda a: a + 1).lower(1.0).compile({name: value})
        except jax.errors.JaxRuntimeError:  # an option that this XLA does not have
            continue
        accepted[name] = value
    return accepted


@functools.lru_cache(maxsize=None)
def built_model(name, num_classes=1000):
    """The model, initialised (cached).

    Built for real: under `nnx.eval_shape` each draw from `nnx.Rngs` costs time
    proportional to the layers traced so far (flax 0.12.8 asks the traced counter
    for its sharding, and JAX's error message for that walks the whole trace), so
    a 152-layer model builds several times faster for real.
    """
    return models.create_model(name, num_classes=num_classes, rngs=nnx.Rngs(0))


@functools.lru_cache(maxsize=None)
def small_model(name):
    """A real (initialised) CIFAR-style model: 1 input channel, 10 classes."""
    return models.create_model(name, num_classes=10, in_chans=1, rngs=nnx.Rngs(0))
