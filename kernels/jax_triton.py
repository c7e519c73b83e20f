"""DDF on the GPU with hand-written Triton kernels launched by jax-triton.

`implementation="jax_triton"` in `ddf_jax.ddf`. The kernels live in
`triton_kernels.py` (their docstring gives the math, the memory layout and the
tiling); this module wires them into JAX:

- each kernel is launched with `jax_triton.triton_call` (inputs first, then
  one pointer per output; every shape and option is a `tl.constexpr`);
- forward and backward are wrapped in `jax.custom_batching.custom_vmap`, whose
  rule folds a vmapped axis into the batch axis N (every image is independent,
  so `vmap` gives exactly what a Python loop over the mapped axis gives);
- `common.make_ddf_op` adds the `jax.custom_vjp`: residuals are the three
  inputs, and the backward pass is two kernels: a gather-based dx and a fused
  filter kernel that writes d_spatial_filter and per-pixel-tile partial sums
  of d_channel_filter in the accumulation dtype (float32, or float64 for
  float64 inputs), summed here by XLA (deterministic, no atomics).

Neither `jax_triton` nor `triton` is imported until the op is first used;
`import ddf_jax` never needs them. Asking for this implementation on a
platform other than a CUDA GPU (`common.GPU_PLATFORMS`) or without the
packages raises `ImplementationUnavailable`.

Limits: first-order gradients only (the backward kernels are not themselves
differentiable); a single image must have fewer than 2**31 pixels (tensors
may have more than 2**31 elements). Tiles come from `tuning.BlockSizes` (one
`LaunchConfig` per kernel), whose `get_default` takes them from a tuned table
entry for the launch's shape class on this device kind, else from untuned
heuristic starting points: channel tiles capped at 64 (forward, dx) or 32
(filters, per head), and pixel tiles of about 4096 elements, at most 256
pixels and no more than the image has (rounded up to a power of two, at
least 16).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from . import tuning
from .common import (
    GPU_PLATFORMS,
    DDFConfig,
    ImplementationUnavailable,
    accumulation_dtype,
    make_ddf_op,
    skip_empty_backward,
    skip_empty_forward,
)
from .tuning import BlockSizes

INSTALL_HINT = (
    'it needs a CUDA GPU, a CUDA-enabled jax (pip install "jax[cuda13]") and the packages '
    'jax-triton 0.3.1 and triton 3.6.0 (pip install "ddf-jax[triton]")'
)
_MAX_GRID_X = 2**31 - 1
_MAX_GRID_Y = 65535
_MAX_PIXELS = 2**31 - 1

# `launch(*arrays, kernel=..., out_shape=..., grid=..., num_warps=..., num_stages=..., **constexprs)`,
# the signature of `jax_triton.triton_call`.
Launcher = Callable[..., Any]


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


def _shape_constexprs(x_shape, spatial_filter_shape, config: DDFConfig, fp64: bool) -> dict:
    _, h, w, c = x_shape
    _, out_h, out_w, heads, _ = spatial_filter_shape
    if h * w > _MAX_PIXELS:
        raise ValueError(f"one image must have fewer than 2**31 pixels, got H*W = {h}*{w} = {h * w}")
    return dict(
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
        FP64=bool(fp64),
    )


def _check_grid(grid: tuple, kernel_name: str) -> tuple:
    if grid[0] > _MAX_GRID_X or (len(grid) > 1 and grid[1] > _MAX_GRID_Y):
        raise ValueError(
            f"{kernel_name}: launch grid {grid} exceeds the CUDA limits ({_MAX_GRID_X}, {_MAX_GRID_Y}); "
            "use larger BlockSizes"
        )
    return tuple(int(g) for g in grid)


def _resolve_blocks(block_sizes: Optional[BlockSizes], x, spatial_filter, role: str) -> tuning.LaunchConfig:
    """One kernel's tiles and launch options: from `block_sizes`, else `BlockSizes.get_default`."""
    if block_sizes is None:
        _, h, w, c = x.shape
        _, out_h, out_w, heads, taps = spatial_filter.shape
        block_sizes = BlockSizes.get_default(
            "jax_triton",
            channels=c,
            taps=taps,
            heads=heads,
            dtype=x.dtype,
            in_pixels=h * w,
            out_pixels=out_h * out_w,
        )
    return block_sizes.for_role(role)


def forward_launch(x, channel_filter, spatial_filter, config: DDFConfig, block_sizes=None) -> LaunchSpec:
    """The forward kernel's launch for inputs with these shapes and dtypes.

    Args:
        x: (N, H, W, C) array or `jax.ShapeDtypeStruct`.
        channel_filter: (N, C, K).
        spatial_filter: (N, Ho, Wo, G, K).
        config: the static DDF configuration.
        block_sizes: tiles; None for `tuning.BlockSizes.get_default`.

    Returns:
        A `LaunchSpec` whose single output is `out`, (N, Ho, Wo, C) in x's dtype.
    """
    n, _, _, c = x.shape
    _, out_h, out_w, _, _ = spatial_filter.shape
    blocks = _resolve_blocks(block_sizes, x, spatial_filter, "forward")
    fp64 = accumulation_dtype(x.dtype, channel_filter.dtype, spatial_filter.dtype) == jnp.float64
    constexprs = _shape_constexprs(x.shape, spatial_filter.shape, config, fp64)
    constexprs.update(BLOCK_P=blocks.block_pixels, BLOCK_C=blocks.block_channels)
    grid = (n * _cdiv(out_h * out_w, blocks.block_pixels), _cdiv(c, blocks.block_channels))
    return LaunchSpec(
        "ddf_fwd_kernel",
        (jax.ShapeDtypeStruct((n, out_h, out_w, c), x.dtype),),
        _check_grid(grid, "ddf_fwd_kernel"),
        blocks.num_warps,
        blocks.num_stages,
        constexprs,
    )


def dx_launch(x, channel_filter, spatial_filter, grad_out, config: DDFConfig, block_sizes=None) -> LaunchSpec:
    """The dx kernel's launch; its inputs are (grad_out, channel_filter, spatial_filter).

    Returns:
        A `LaunchSpec` whose single output is dx, (N, H, W, C) in x's dtype.
    """
    n, h, w, c = x.shape
    blocks = _resolve_blocks(block_sizes, x, spatial_filter, "dx")
    fp64 = (
        accumulation_dtype(x.dtype, channel_filter.dtype, spatial_filter.dtype, grad_out.dtype)
        == jnp.float64
    )
    constexprs = _shape_constexprs(x.shape, spatial_filter.shape, config, fp64)
    constexprs.update(BLOCK_P=blocks.block_pixels, BLOCK_C=blocks.block_channels)
    grid = (n * _cdiv(h * w, blocks.block_pixels), _cdiv(c, blocks.block_channels))
    return LaunchSpec(
        "ddf_bwd_dx_kernel",
        (jax.ShapeDtypeStruct((n, h, w, c), x.dtype),),
        _check_grid(grid, "ddf_bwd_dx_kernel"),
        blocks.num_warps,
        blocks.num_stages,
        constexprs,
    )


def filter_launch(
    x, channel_filter, spatial_filter, grad_out, config: DDFConfig, block_sizes=None
) -> LaunchSpec:
    """The filter-gradient kernel's launch; inputs (x, grad_out, channel_filter, spatial_filter).

    Returns:
        A `LaunchSpec` with two outputs: d_spatial_filter, (N, Ho, Wo, G, K) in
        spatial_filter's dtype, and the d_channel_filter partials, (N, P, K, C)
        in the accumulation dtype (float32, or float64 for float64 inputs),
        where P is the number of output-pixel tiles.
    """
    n, _, _, c = x.shape
    _, out_h, out_w, _, taps = spatial_filter.shape
    blocks = _resolve_blocks(block_sizes, x, spatial_filter, "filters")
    acc = accumulation_dtype(x.dtype, channel_filter.dtype, spatial_filter.dtype, grad_out.dtype)
    constexprs = _shape_constexprs(x.shape, spatial_filter.shape, config, acc == jnp.float64)
    constexprs.update(BLOCK_P=blocks.block_pixels, BLOCK_C=blocks.block_channels)
    pixel_tiles = _cdiv(out_h * out_w, blocks.block_pixels)
    return LaunchSpec(
        "ddf_bwd_filter_kernel",
        (
            jax.ShapeDtypeStruct(spatial_filter.shape, spatial_filter.dtype),
            jax.ShapeDtypeStruct((n, pixel_tiles, taps, c), acc),
        ),
        _check_grid((n * pixel_tiles,), "ddf_bwd_filter_kernel"),
        blocks.num_warps,
        blocks.num_stages,
        constexprs,
    )


def _kernels_module():
    return importlib.import_module(".triton_kernels", __package__)


def _launch(launch: Launcher, spec: LaunchSpec, *arrays) -> Sequence[jax.Array]:
    kernel = getattr(_kernels_module(), spec.kernel_name)
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


def _fold_vmapped_axis(fn: Callable) -> Callable:
    """Wraps `fn` (arrays and outputs with the batch axis N first) so that `jax.vmap` folds into N.

    Under vmap every argument gets the mapped axis first (unmapped ones are
    broadcast), (B, N, ...) is reshaped to (B*N, ...), `fn` runs once, and each
    output is reshaped back to (B, N, ...).
    """
    wrapped = jax.custom_batching.custom_vmap(fn)

    @wrapped.def_vmap
    def rule(axis_size, in_batched, *args):
        folded = []
        for arg, batched in zip(args, in_batched):
            if not batched:
                arg = jnp.broadcast_to(arg, (axis_size,) + arg.shape)
            folded.append(arg.reshape((axis_size * arg.shape[1],) + arg.shape[2:]))
        n = args[0].shape[1] if in_batched[0] else args[0].shape[0]
        outs = wrapped(*folded)
        unfolded = jax.tree.map(lambda o: o.reshape((axis_size, n) + o.shape[1:]), outs)
        return unfolded, jax.tree.map(lambda _: True, outs)

    return wrapped


def _triton_call() -> Launcher:
    jax_triton = importlib.import_module("jax_triton")
    return jax_triton.triton_call


def build_op(launch: Optional[Launcher] = None, block_sizes: Optional[BlockSizes] = None):
    """Builds the custom-VJP DDF op on the Triton kernels.

    Args:
        launch: a function with the signature of `jax_triton.triton_call`;
            None uses `jax_triton.triton_call`, imported at the first call.
        block_sizes: fixed tiles; None picks `tuning.BlockSizes.get_default` per shape.

    Returns:
        `op(x, channel_filter, spatial_filter, config) -> out` with canonical
        arguments (see `common`), differentiable once in its three arrays and
        batchable with `jax.vmap`.
    """

    def launcher() -> Launcher:
        return launch if launch is not None else _triton_call()

    def forward_kernels(x, channel_filter, spatial_filter, config: DDFConfig):
        spec = forward_launch(x, channel_filter, spatial_filter, config, block_sizes)
        (out,) = _launch(launcher(), spec, x, channel_filter, spatial_filter)
        return out

    def backward_kernels(x, channel_filter, spatial_filter, grad_out, config: DDFConfig):
        args = (x, channel_filter, spatial_filter, grad_out, config, block_sizes)
        (dx,) = _launch(launcher(), dx_launch(*args), grad_out, channel_filter, spatial_filter)
        d_spatial, partials = _launch(
            launcher(), filter_launch(*args), x, grad_out, channel_filter, spatial_filter
        )
        # (N, P, K, C) -> (N, K, C) -> (N, C, K): the second stage of the reduction.
        d_channel = jnp.transpose(jnp.sum(partials, axis=1), (0, 2, 1))
        return dx, d_channel, d_spatial

    # `make_ddf_op` skips empty inputs, but under `jax.vmap` over an axis of
    # size 0 it sees the per-example shapes; the folded arrays seen here are
    # then empty, so the same guards are applied after folding (a launch grid
    # of 0 programs is invalid).
    guarded_forward = skip_empty_forward(forward_kernels)
    guarded_backward = skip_empty_backward(backward_kernels)

    @functools.lru_cache(maxsize=None)
    def forward_for(config: DDFConfig):
        return _fold_vmapped_axis(lambda x, cf, sf: guarded_forward(x, cf, sf, config))

    @functools.lru_cache(maxsize=None)
    def backward_for(config: DDFConfig):
        return _fold_vmapped_axis(lambda x, cf, sf, g: guarded_backward(x, cf, sf, g, config))

    def forward(x, channel_filter, spatial_filter, config: DDFConfig):
        return forward_for(config)(x, channel_filter, spatial_filter)

    def backward(x, channel_filter, spatial_filter, grad_out, config: DDFConfig):
        return backward_for(config)(x, channel_filter, spatial_filter, grad_out)

    return make_ddf_op(forward, backward, "jax_triton")


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


@functools.lru_cache(maxsize=None)
def _default_op():
    return build_op()


def get_op(platform: str):
    """The jax-triton op for `platform`.

    Raises:
        ImplementationUnavailable: `platform` is not a GPU, or triton / jax_triton
            cannot be imported.
    """
    check_available(platform)
    return _default_op()


__all__ = [
    "BlockSizes",
    "GPU_PLATFORMS",
    "INSTALL_HINT",
    "LaunchSpec",
    "build_op",
    "check_available",
    "dx_launch",
    "filter_launch",
    "forward_launch",
    "get_op",
]
