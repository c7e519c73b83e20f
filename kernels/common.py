"""The contract every DDF implementation shares.

An implementation provides two pure functions over *canonical* arguments:

    forward(x, channel_filter, spatial_filter, config) -> out
    backward(x, channel_filter, spatial_filter, grad_out, config)
        -> (dx, d_channel_filter, d_spatial_filter)

with the NHWC layout

    x               (N, H, W, C)
    channel_filter  (N, C, K)            K = k * k, tap t = ky * k + kx
    spatial_filter  (N, Ho, Wo, G, K)    always 5-D here; channel c uses head c // (C // G)
    out / grad_out  (N, Ho, Wo, C)       Ho = ceil(H / s), Wo = ceil(W / s)

and the semantics

    r = (k - 1) // 2
    out[n, i, j, c] = sum_t x[n, i*s + (ky - r)*d, j*s + (kx - r)*d, c]
                            * comb(sf[n, i, j, c // (C // G), t], cf[n, c, t])

with x zero outside the image and comb = multiply ("mul") or add ("add").

`make_ddf_op` turns such a pair into a `jax.custom_vjp` function. Residuals are
the three inputs (the filters as an implementation's `store_filters` hook
returns them, if it has one); nothing else is saved. Gradients come back in each input's
own dtype. Arguments reaching an implementation are already validated by
`ddf_jax.ops.ddf`, and are never empty: when x, a filter or the output has no
elements, `make_ddf_op` returns zeros (and zero gradients) of the right shapes
and dtypes without calling the implementation, so no kernel is launched on an
empty grid.

It also holds what both GPU implementations share: `LaunchConfig` (one
kernel's tile and launch options) and `BlockSizes` (both kernels' launch
configurations, the tuned-table lookup and the one tile heuristic).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, ClassVar, Literal, Optional

import jax
import jax.numpy as jnp

from . import tuning

Combine = Literal["mul", "add"]
COMBINES = ("mul", "add")
# JAX platform names on which the GPU implementations compile their kernels
# (CUDA only: they are neither built nor tested for ROCm).
GPU_PLATFORMS = ("gpu", "cuda")


@dataclasses.dataclass(frozen=True)
class DDFConfig:
    """Static configuration of one DDF call (hashable, passed as nondiff arg).

    Attributes:
        kernel_size: odd filter size k >= 1; K = k * k taps.
        stride: output stride s >= 1.
        dilation: tap spacing d >= 1.
        combine: "mul" or "add", how the two filters are combined per tap.
    """

    kernel_size: int
    stride: int = 1
    dilation: int = 1
    combine: Combine = "mul"

    @property
    def taps(self) -> int:
        """Number of taps K = k * k."""
        return self.kernel_size * self.kernel_size

    @property
    def radius(self) -> int:
        """r = (k - 1) // 2: the centre tap's row and column."""
        return (self.kernel_size - 1) // 2

    def output_size(self, size: int) -> int:
        """Output length ceil(size / stride) for an input length."""
        return -(-size // self.stride)

    def tap_offsets(self) -> list[tuple[int, int, int]]:
        """(t, dy, dx) for every tap: the input offset of tap t from the centre."""
        r, d, k = self.radius, self.dilation, self.kernel_size
        return [(ky * k + kx, (ky - r) * d, (kx - r) * d) for ky in range(k) for kx in range(k)]


class ImplementationUnavailable(RuntimeError):
    """An implementation cannot run here (wrong platform or missing package)."""


def next_power_of_2(value: int) -> int:
    """The smallest power of two >= value (1 for value <= 1)."""
    return 1 if value <= 1 else 1 << (int(value) - 1).bit_length()


def _is_power_of_2(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1 and value & (value - 1) == 0


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How one GPU kernel is launched: its tile and Triton's options.

    Attributes:
        block_pixels: flattened pixels per tile (a power of two: the Triton
            lowering needs power-of-two array sizes).
        block_channels: channels per tile (a power of two).
        num_warps: warps per program (a power of two).
        num_stages: Triton's software-pipelining stages (>= 1).
    """

    block_pixels: int
    block_channels: int
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        for name in ("block_pixels", "block_channels", "num_warps"):
            if not _is_power_of_2(getattr(self, name)):
                value = getattr(self, name)
                raise ValueError(f"LaunchConfig.{name} must be a positive power of two, got {value!r}")
        if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"LaunchConfig.num_stages must be a positive int, got {self.num_stages!r}")

    def describe(self) -> str:
        """Short text such as "64x32 w4 s1" (pixels x channels, warps, stages)."""
        return f"{self.block_pixels}x{self.block_channels} w{self.num_warps} s{self.num_stages}"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Launch configurations of a GPU implementation's two kernels (frozen, hashable).

    Each GPU implementation subclasses it and names itself in
    `implementation` (the key of its tuned entries). Tiles change speed, never
    results: every kernel masks the edges of partial tiles.

    Attributes:
        forward: the forward kernel: a tile of output pixels x channels.
        backward: the fused backward kernel: a tile of output pixels x the
            channels of one step of its loop over a head's channels.
    """

    implementation: ClassVar[str] = ""
    forward: LaunchConfig
    backward: LaunchConfig

    def __post_init__(self):
        for role in tuning.ROLES:
            if not isinstance(getattr(self, role), LaunchConfig):
                raise TypeError(f"BlockSizes.{role} must be a LaunchConfig, got {getattr(self, role)!r}")

    @classmethod
    def get_default(cls, x, channel_filter, spatial_filter, config: DDFConfig):
        """The tuned configuration of this call's shape class on this device, else `heuristic`.

        Args:
            x: (N, H, W, C) array or `jax.ShapeDtypeStruct`.
            channel_filter: (N, C, K).
            spatial_filter: (N, Ho, Wo, G, K).
            config: the static `DDFConfig`.
        """
        del channel_filter
        heads = spatial_filter.shape[3]
        key = tuning.shape_class(cls.implementation, x.dtype, x.shape[-1], heads, config.taps)
        tuned = tuning.lookup(key)
        if tuned is not None:
            return cls(**{role: LaunchConfig(*tuned[role]) for role in tuning.ROLES})
        return cls.heuristic(x, spatial_filter, config)

    @classmethod
    def heuristic(cls, x, spatial_filter, config: DDFConfig):
        """Untuned starting points for both GPU implementations, whose kernels have the same structure.

        Chosen from the sm_90 compile report (`experiments/kernel_report.py`;
        BENCHMARKS.md, "static, no GPU"), not from GPU timings:

        - forward: rows of 128 bytes of channels and 4 KB of x per tap and
          tile (2 KB when K > 9), 4 warps, aiming at no more than 128
          registers for the accumulator and the loads in flight;
        - backward: rows of 32 bytes of channels (one DRAM sector) and 8 tile
          elements per thread (4 to 8 warps); BP = 128 pixels for K <= 9 and
          64 above, as large as the (BP, kp, kp) d_spatial_filter accumulator
          allows, because the d_channel_filter partials cost 4K / (BP *
          itemsize) of grad_out's bytes, twice.

        Pixel tiles never exceed the image (rounded up to a power of two, at
        least 16).
        """
        itemsize = jnp.dtype(x.dtype).itemsize
        channels, group = x.shape[-1], x.shape[-1] // spatial_filter.shape[3]
        pixel_cap = max(16, next_power_of_2(spatial_filter.shape[1] * spatial_filter.shape[2]))
        forward_channels = min(next_power_of_2(channels), 128 // itemsize)
        tile_bytes = 4096 if config.taps <= 9 else 2048
        forward_pixels = min(max(tile_bytes // (forward_channels * itemsize), 16), 256, pixel_cap)
        backward_channels = min(next_power_of_2(group), max(1, 32 // itemsize))
        backward_pixels = min(128 if config.taps <= 9 else 64, pixel_cap)
        backward_warps = max(4, min(8, backward_pixels * backward_channels // 256))
        return cls(
            LaunchConfig(forward_pixels, forward_channels, num_warps=4),
            LaunchConfig(backward_pixels, backward_channels, num_warps=backward_warps),
        )


def accumulation_dtype(*dtypes) -> jnp.dtype:
    """float32 for 16- and 32-bit inputs, float64 when any input is float64."""
    return jnp.result_type(jnp.float32, *dtypes)


def combine_filters(spatial, channel, combine: str):
    """comb(spatial, channel): their product for "mul", their sum for "add" (broadcasting)."""
    return spatial * channel if combine == "mul" else spatial + channel


def output_shape(x, spatial_filter) -> tuple[int, int, int, int]:
    """(N, Ho, Wo, C) of the output for canonical x (N, H, W, C) and spatial_filter (N, Ho, Wo, G, K)."""
    return (x.shape[0], spatial_filter.shape[1], spatial_filter.shape[2], x.shape[3])


def is_empty(x, channel_filter, spatial_filter) -> bool:
    """Whether x, channel_filter, spatial_filter or the output has no elements (a static check)."""
    shapes = (x.shape, channel_filter.shape, spatial_filter.shape, output_shape(x, spatial_filter))
    return any(math.prod(shape) == 0 for shape in shapes)


ForwardFn = Callable[[jax.Array, jax.Array, jax.Array, DDFConfig], jax.Array]
BackwardFn = Callable[
    [jax.Array, jax.Array, jax.Array, jax.Array, DDFConfig],
    tuple[jax.Array, jax.Array, jax.Array],
]


def skip_empty_forward(forward: ForwardFn) -> ForwardFn:
    """`forward`, except that it returns zeros of the output's shape and x's dtype when `is_empty`."""

    @functools.wraps(forward)
    def guarded(x, channel_filter, spatial_filter, config):
        if is_empty(x, channel_filter, spatial_filter):
            return jnp.zeros(output_shape(x, spatial_filter), x.dtype)
        return forward(x, channel_filter, spatial_filter, config)

    return guarded


def skip_empty_backward(backward: BackwardFn) -> BackwardFn:
    """`backward`, except that it returns zero gradients, each in its input's dtype, when `is_empty`.

    Every gradient of an empty op is an empty sum: zero.
    """

    @functools.wraps(backward)
    def guarded(x, channel_filter, spatial_filter, grad_out, config):
        if is_empty(x, channel_filter, spatial_filter):
            return tuple(jnp.zeros(a.shape, a.dtype) for a in (x, channel_filter, spatial_filter))
        return backward(x, channel_filter, spatial_filter, grad_out, config)

    return guarded


def make_ddf_op(forward: ForwardFn, backward: BackwardFn, name: str, store_filters: Optional[Callable] = None):
    """Wraps an implementation's forward and backward in one `jax.custom_vjp`.

    When x, a filter or the output has no elements (`is_empty`), neither
    function is called: the op returns zeros of the output's shape in x's
    dtype, and zero gradients.

    Args:
        forward: `forward(x, channel_filter, spatial_filter, config) -> out`.
        backward: `backward(x, channel_filter, spatial_filter, grad_out, config)
            -> (dx, d_channel_filter, d_spatial_filter)`.
        name: the implementation's name, used for the function's `__name__`.
        store_filters: optional `store_filters(channel_filter, spatial_filter)
            -> (channel_filter, spatial_filter)`: the same values, shapes and
            dtypes, in arrays that the compiler must store. The forward reads
            them, and they are the residuals the backward reads, so that the
            filters' producers (in a network, FilterNorm) run once instead of
            being recomputed inside the passes that read the filters.

    Returns:
        `op(x, channel_filter, spatial_filter, config) -> out`, differentiable in
        its three array arguments; `config` is static.
    """
    forward = skip_empty_forward(forward)
    backward = skip_empty_backward(backward)

    store = store_filters or (lambda channel_filter, spatial_filter: (channel_filter, spatial_filter))

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def op(x, channel_filter, spatial_filter, config):
        return forward(x, *store(channel_filter, spatial_filter), config)

    def op_fwd(x, channel_filter, spatial_filter, config):
        channel_filter, spatial_filter = store(channel_filter, spatial_filter)
        out = forward(x, channel_filter, spatial_filter, config)
        return out, (x, channel_filter, spatial_filter)

    def op_bwd(config, residuals, grad_out):
        x, channel_filter, spatial_filter = residuals
        dx, dcf, dsf = backward(x, channel_filter, spatial_filter, grad_out, config)
        return (
            dx.astype(x.dtype),
            dcf.astype(channel_filter.dtype),
            dsf.astype(spatial_filter.dtype),
        )

    op.defvjp(op_fwd, op_bwd)
    op.__name__ = f"ddf_{name}"
    op.__qualname__ = op.__name__
    return op


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


def make_kernel_op(forward: ForwardFn, backward: BackwardFn, name: str):
    """`make_ddf_op` for kernels that launch one grid over the batch axis N.

    Under `jax.vmap` the mapped axis is folded into N, so the kernels run once
    on B*N images instead of through a batching rule. `make_ddf_op` skips
    empty inputs, but under vmap over an axis of size 0 it sees the non-empty
    per-example shapes; the folded arrays are then empty, so the same guards
    are applied again after folding (a launch grid of 0 programs is invalid).

    Args:
        forward, backward: the implementation's pair, as for `make_ddf_op`.
        name: the implementation's name, used for the function's `__name__`.

    Returns:
        The `jax.custom_vjp` op of `make_ddf_op`.
    """
    guarded_forward = skip_empty_forward(forward)
    guarded_backward = skip_empty_backward(backward)

    @functools.lru_cache(maxsize=None)
    def forward_for(config: DDFConfig):
        return _fold_vmapped_axis(lambda x, cf, sf: guarded_forward(x, cf, sf, config))

    @functools.lru_cache(maxsize=None)
    def backward_for(config: DDFConfig):
        return _fold_vmapped_axis(lambda x, cf, sf, g: guarded_backward(x, cf, sf, g, config))

    def op_forward(x, channel_filter, spatial_filter, config: DDFConfig):
        return forward_for(config)(x, channel_filter, spatial_filter)

    def op_backward(x, channel_filter, spatial_filter, grad_out, config: DDFConfig):
        return backward_for(config)(x, channel_filter, spatial_filter, grad_out)

    return make_ddf_op(op_forward, op_backward, name)
