"""DDF on the GPU with hand-written Triton kernels launched by jax-triton.

`implementation="jax_triton"` in `ddf_jax.ddf`. The kernels live in
`triton_kernels.py` (their docstring gives the math, the memory layout, the
tiling and the bytes each moves); this module wires them into JAX:

- each kernel is launched with `jax_triton.triton_call` (inputs first, then
  one pointer per output; every shape and option is a `tl.constexpr`);
- `common.make_kernel_op` (shared with the Pallas kernels) wraps forward and
  backward in `jax.custom_batching.custom_vmap`, whose rule folds a vmapped
  axis into the batch axis N (every image is independent, so `vmap` gives
  exactly what a Python loop over the mapped axis gives), and adds the
  `jax.custom_vjp` of `common.make_ddf_op`: residuals are the three
  inputs, and the backward pass is one fused kernel that writes dx,
  d_spatial_filter and per-pixel-tile partial sums of d_channel_filter in the
  accumulation dtype (float32, or float64 for float64 inputs), summed here by
  XLA (deterministic, no atomics).

Neither `jax_triton` nor `triton` is imported until the op is first used;
`import ddf_jax` never needs them. Asking for this implementation on a
platform other than a CUDA GPU (`common.GPU_PLATFORMS`) or without the
packages raises `ImplementationUnavailable`.

Limits: first-order gradients only (the backward kernel is not itself
differentiable); a single image must have fewer than 2**31 pixels (tensors
may have more than 2**31 elements). Tiles are a `BlockSizes`: a tuned entry of
`tuning_table.json` for the device, else the heuristic of `common.BlockSizes`,
shared with `pallas_triton` (the kernels of both have the same structure).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from . import common
from .common import (
    GPU_PLATFORMS,
    DDFConfig,
    ImplementationUnavailable,
    accumulation_dtype,
    make_kernel_op,
)

INSTALL_HINT = (
    'it needs a CUDA GPU, a CUDA-enabled jax (pip install "jax[cuda13]") and the packages '
    'jax-triton 0.3.1 and triton 3.6.0 (pip install "ddf-jax[triton]")'
)
_MAX_GRID_X = 2**31 - 1
_MAX_GRID_Y = 65535
_MAX_PIXELS = 2**31 - 1
KERNEL_NAMES = {"forward": "ddf_fwd_kernel", "backward": "ddf_bwd_kernel"}

# `launch(*arrays, kernel=..., out_shape=..., grid=..., num_warps=..., num_stages=..., **constexprs)`,
# the signature of `jax_triton.triton_call`.
Launcher = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class BlockSizes(common.BlockSizes):
    """Launch configurations of `ddf_fwd_kernel` and `ddf_bwd_kernel` (see `common.BlockSizes`)."""

    implementation = "jax_triton"


class LaunchSpec(NamedTuple):
    """Everything `triton_call` needs besides the input arrays.

    Attributes:
        kernel_name: the kernel's name in `triton_kernels`.
        out_shapes: one `jax.ShapeDtypeStruct` per output pointer.
        grid: the launch grid.
        num_warps: warps per program.
        num_stages: pipelining depth.
        constexprs: the kernel's `tl.constexpr` arguments.
    """

    kernel_name: str
    out_shapes: tuple
    grid: tuple
    num_warps: int
    num_stages: int
    constexprs: dict


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def launch_spec(
    role: str, x, channel_filter, spatial_filter, config: DDFConfig, block_sizes=None
) -> LaunchSpec:
    """The launch of the "forward" or "backward" kernel for inputs with these shapes and dtypes.

    Args:
        role: "forward" (inputs x, channel_filter, spatial_filter; output out
            (N, Ho, Wo, C) in x's dtype) or "backward" (inputs x,
            channel_filter, spatial_filter, grad_out; outputs dx in x's dtype,
            d_spatial_filter in the spatial filter's dtype, and the
            d_channel_filter partials (N, P, K, C) in the accumulation dtype,
            P the number of output-pixel tiles).
        x: (N, H, W, C) array or `jax.ShapeDtypeStruct`.
        channel_filter: (N, C, K).
        spatial_filter: (N, Ho, Wo, G, K).
        config: the static DDF configuration.
        block_sizes: tiles; None for `BlockSizes.get_default`.

    Raises:
        ValueError: an image has 2**31 pixels or more, or the grid exceeds
            the CUDA limits.
    """
    n, h, w, c = x.shape
    _, out_h, out_w, heads, taps = spatial_filter.shape
    if h * w > _MAX_PIXELS:
        raise ValueError(f"one image must have fewer than 2**31 pixels, got H*W = {h}*{w} = {h * w}")
    blocks = block_sizes or BlockSizes.get_default(x, channel_filter, spatial_filter, config)
    launch = getattr(blocks, role)
    acc_dtype = accumulation_dtype(x.dtype, channel_filter.dtype, spatial_filter.dtype)
    pixel_tiles = _cdiv(out_h * out_w, launch.block_pixels)
    if role == "forward":
        out_shapes = (jax.ShapeDtypeStruct((n, out_h, out_w, c), x.dtype),)
        grid = (n * pixel_tiles, _cdiv(c, launch.block_channels))
    else:
        out_shapes = (
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct(spatial_filter.shape, spatial_filter.dtype),
            jax.ShapeDtypeStruct((n, pixel_tiles, taps, c), acc_dtype),
        )
        grid = (n * pixel_tiles, heads)
    if grid[0] > _MAX_GRID_X or grid[1] > _MAX_GRID_Y:
        raise ValueError(
            f"{KERNEL_NAMES[role]}: launch grid {grid} exceeds the CUDA limits "
            f"({_MAX_GRID_X}, {_MAX_GRID_Y}); use larger BlockSizes"
        )
    constexprs = dict(
        H=int(h),
        W=int(w),
        C=int(c),
        OUT_H=int(out_h),
        OUT_W=int(out_w),
        HEADS=int(heads),
        KERNEL_SIZE=config.kernel_size,
        STRIDE=config.stride,
        DILATION=config.dilation,
        MUL=config.combine == "mul",
        FP64=acc_dtype == jnp.float64,
        BLOCK_P=launch.block_pixels,
        BLOCK_C=launch.block_channels,
    )
    grid = tuple(int(g) for g in grid)
    return LaunchSpec(KERNEL_NAMES[role], out_shapes, grid, launch.num_warps, launch.num_stages, constexprs)


def launch_specs(x, channel_filter, spatial_filter, grad_out, config: DDFConfig, block_sizes=None) -> list:
    """[(`LaunchSpec`, its input arrays)] of the forward and backward kernels, as the op launches them."""
    filters = (x, channel_filter, spatial_filter)
    inputs = {"forward": filters, "backward": filters + (grad_out,)}
    return [
        (launch_spec(role, x, channel_filter, spatial_filter, config, block_sizes), inputs[role])
        for role in KERNEL_NAMES
    ]


def _launch(launch: Launcher, spec: LaunchSpec, *arrays) -> tuple:
    kernel = getattr(importlib.import_module(".triton_kernels", __package__), spec.kernel_name)
    outs = launch(
        *arrays,
        kernel=kernel,
        out_shape=spec.out_shapes,
        grid=spec.grid,
        num_warps=spec.num_warps,
        num_stages=spec.num_stages,
        **spec.constexprs,
    )
    return tuple(outs)


def _triton_call() -> Launcher:
    return importlib.import_module("jax_triton").triton_call


def forward(x, channel_filter, spatial_filter, config: DDFConfig, *, block_sizes=None, launch=None):
    """DDF forward with `ddf_fwd_kernel`: (N, Ho, Wo, C) in x's dtype.

    Args:
        x: (N, H, W, C), float16/bfloat16/float32/float64.
        channel_filter: (N, C, K).
        spatial_filter: (N, Ho, Wo, G, K).
        config: the static `DDFConfig`.
        block_sizes: tiles; None for `BlockSizes.get_default`.
        launch: the launcher (`jax_triton.triton_call` when None).
    """
    spec = launch_spec("forward", x, channel_filter, spatial_filter, config, block_sizes)
    (out,) = _launch(launch or _triton_call(), spec, x, channel_filter, spatial_filter)
    return out


def backward(
    x, channel_filter, spatial_filter, grad_out, config: DDFConfig, *, block_sizes=None, launch=None
):
    """DDF backward with `ddf_bwd_kernel`, then XLA's sum of the d_channel_filter partials.

    Returns:
        (dx (N, H, W, C) in x's dtype, d_channel_filter (N, C, K) in the
        accumulation dtype, d_spatial_filter (N, Ho, Wo, G, K) in the spatial
        filter's dtype).
    """
    spec = launch_spec("backward", x, channel_filter, spatial_filter, config, block_sizes)
    arrays = (x, channel_filter, spatial_filter, grad_out)
    dx, d_spatial, partials = _launch(launch or _triton_call(), spec, *arrays)
    # (N, P, K, C) -> (N, K, C) -> (N, C, K): the second stage of the reduction.
    return dx, jnp.swapaxes(jnp.sum(partials, axis=1), 1, 2), d_spatial


@functools.lru_cache(maxsize=None)
def _op(launch: Optional[Launcher], block_sizes: Optional[BlockSizes]):
    options = dict(block_sizes=block_sizes, launch=launch)
    return make_kernel_op(functools.partial(forward, **options), functools.partial(backward, **options), "jax_triton")


def check_available(platform: str) -> None:
    """Raises `ImplementationUnavailable` unless jax_triton can run on `platform` here."""
    if platform not in GPU_PLATFORMS:
        raise ImplementationUnavailable(
            f'implementation="jax_triton" cannot run on platform {platform!r}: {INSTALL_HINT}. '
            'Use implementation="xla" on this platform.'
        )
    for package in ("triton", "jax_triton"):
        try:
            importlib.import_module(package)
        except (ImportError, AttributeError) as error:  # AttributeError: a jax API mismatch
            raise ImplementationUnavailable(
                f'implementation="jax_triton" could not import {package} ({error}): {INSTALL_HINT}.'
            ) from error


def get_op(platform: str, block_sizes: Optional[BlockSizes] = None, launch: Optional[Launcher] = None):
    """The jax-triton op for `platform`.

    Args:
        platform: a JAX platform name; the kernels run on CUDA GPUs
            (`GPU_PLATFORMS`) through `jax_triton.triton_call`.
        block_sizes: fixed launch configurations for every call; None picks
            `BlockSizes.get_default` per call.
        launch: a function with the signature of `jax_triton.triton_call`
            that runs the kernels instead (tests pass one that runs Triton's
            CPU interpreter); then `platform` is not checked.

    Returns:
        `op(x, channel_filter, spatial_filter, config) -> out` with canonical
        arguments (see `common`), differentiable once in its three arrays and
        batchable with `jax.vmap`; cached per (block_sizes, launch).

    Raises:
        ImplementationUnavailable: without `launch`, when `platform` is not a
            CUDA GPU or triton / jax_triton cannot be imported.
    """
    if launch is None:
        check_available(platform)
    return _op(launch, block_sizes)


__all__ = [
    "BlockSizes",
    "GPU_PLATFORMS",
    "INSTALL_HINT",
    "LaunchSpec",
    "backward",
    "check_available",
    "forward",
    "get_op",
    "launch_spec",
    "launch_specs",
]
