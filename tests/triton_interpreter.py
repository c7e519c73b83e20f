"""Triton's CPU interpreter as a `jax_triton.triton_call` stand-in, for the jax-triton tests.

`interpreter_launch` has `triton_call`'s signature and runs the kernel in
Triton's interpreter (`TRITON_INTERPRET=1`, torch CPU tensors) inside
`jax.pure_callback`. Outputs start as NaN, so an element that no program
writes fails the comparisons.

The interpreter must be chosen before `triton` is first imported, so importing
this module sets `TRITON_INTERPRET=1` on machines without a GPU (where the
compiled kernels could not run anyway). Import it before anything that
imports triton.
"""

import functools
import importlib
import os
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np

from tests.utils import has_gpu

HAS_GPU = has_gpu()
if not HAS_GPU and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@functools.lru_cache(maxsize=None)
def interpreter_state():
    """(torch, triton_kernels) when the Triton interpreter can run here, else a skip reason."""
    try:
        torch = importlib.import_module("torch")
        triton = importlib.import_module("triton")
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError as error:
        return f"needs triton and torch for Triton's CPU interpreter ({error})"
    from ddf_jax.kernels import triton_kernels

    if not (
        isinstance(triton_kernels.ddf_fwd_kernel, InterpretedFunction)
        and isinstance(triton.language.zeros, InterpretedFunction)
    ):
        return (
            "Triton's interpreter is off (a GPU is present, or triton was imported "
            "before TRITON_INTERPRET=1 could be set)"
        )
    return torch, triton_kernels


def _torch_dtype(torch, dtype):
    return {
        jnp.dtype(jnp.float16): torch.float16,
        jnp.dtype(jnp.bfloat16): torch.bfloat16,
        jnp.dtype(jnp.float32): torch.float32,
        jnp.dtype(jnp.float64): torch.float64,
    }[jnp.dtype(dtype)]


def _to_torch(torch, array):
    array = np.asarray(array)
    if array.dtype == jnp.bfloat16:  # numpy has no native bfloat16: move the bits.
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def _to_numpy(torch, tensor):
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(jnp.bfloat16)
    return tensor.numpy()


# Triton's interpreter is not thread-safe: under pmap each device's callback runs in its own thread
# (concurrent launches abort the process), so launches take turns.
_INTERPRETER_LOCK = threading.Lock()


def interpreter_launch(*arrays, kernel, out_shape, grid, num_warps=None, num_stages=None, **constexprs):
    """`jax_triton.triton_call`'s contract, run by Triton's interpreter inside `jax.pure_callback`."""
    del num_warps, num_stages  # meaningless to the interpreter
    torch, _ = interpreter_state()
    out_shape = tuple(out_shape)

    def host(*host_arrays):
        inputs = [_to_torch(torch, a) for a in host_arrays]
        # NaN-filled, so an element that no program writes is caught by the comparisons.
        outputs = [
            torch.full(s.shape, float("nan"), dtype=_torch_dtype(torch, s.dtype)) for s in out_shape
        ]
        with _INTERPRETER_LOCK:
            kernel[grid](*inputs, *outputs, **constexprs)
        return tuple(_to_numpy(torch, t) for t in outputs)

    return jax.pure_callback(host, out_shape, *arrays)
