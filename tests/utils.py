"""Helpers shared by the test files."""

import jax
import jax.numpy as jnp
import numpy as np


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
