"""Times the DDF op against XLA's depthwise conv and the naive unfold port.

Usage:
    python -m experiments.benchmark_op                # CPU set (the default off-GPU)
    python -m experiments.benchmark_op --set official # the official test_time shapes (NHWC)
    python -m experiments.benchmark_op --set all --dtype bfloat16 --markdown out.md

For each shape it times forward and forward+backward of every available
implementation and of two baselines on the same data:

- ``depthwise``: ``lax.conv_general_dilated`` with ``feature_group_count=C``,
  a plain k*k depthwise conv (what DDF should cost about as much as);
- ``unfold``: the naive port of the official op, ``conv_general_dilated_patches``
  into a (N, Ho, Wo, C, K) tensor and an einsum with the combined filter.

Every number is the median of ``--repeats`` timed calls after a warm-up, and
the table gives ratios to ``depthwise`` measured in the same run, plus the
compiled program's temporary memory over the bytes of x. On a GPU it
also measures the device's copy bandwidth and reports each DDF call's achieved
bandwidth (minimum bytes moved / time) as a fraction of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

import ddf_jax
from ddf_jax.kernels import ImplementationUnavailable

# (N, H, W, C, k, stride) -- NHWC versions of the official test_time.py shapes.
OFFICIAL_SHAPES = [(2, 200, 300, 256, 3, 1)] + [(32, s, s, 256, 3, 1) for s in (224, 112, 56, 28, 14, 7)]
# Shows how the cost grows with k (the official op's weak spot).
KERNEL_SWEEP = [(32, 56, 56, 256, k, 1) for k in (3, 5, 7)]
# The shape the performance goals are stated at.
GOAL_SHAPE = [(32, 56, 56, 256, 3, 1)]
CPU_SHAPES = [(8, 56, 56, 64, 3, 1), (8, 56, 56, 64, 5, 1), (8, 28, 28, 128, 3, 2), (4, 15, 13, 48, 3, 2)]
SHAPE_SETS = {
    "cpu": CPU_SHAPES,
    "official": OFFICIAL_SHAPES,
    "ksweep": KERNEL_SWEEP,
    "goal": GOAL_SHAPE,
    "gpu": OFFICIAL_SHAPES + KERNEL_SWEEP[1:],
}


@dataclasses.dataclass
class Row:
    """One timing: `seconds` per call of `method` on `shape` (N, H, W, C, k, stride)."""

    shape: tuple
    method: str
    mode: str  # "fwd" or "fwd+bwd"
    seconds: float
    min_bytes: int
    temp_over_x: Optional[float] = None  # compiled temporaries / bytes of x


def _timeit(fn: Callable, args, repeats: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def min_bytes(n, h, w, c, k, s, itemsize, mode) -> int:
    """Fewest bytes the op must move: fwd reads x, sf, cf and writes out;
    bwd also reads g and writes dx, dsf, dcf."""
    ho, wo = -(-h // s), -(-w // s)
    x = n * h * w * c
    sf = n * ho * wo * k * k
    cf = n * c * k * k
    out = n * ho * wo * c
    fwd = x + sf + cf + out
    if mode == "fwd":
        return fwd * itemsize
    bwd = out + x + sf + cf + x + sf + cf  # read g, x, sf, cf; write dx, dsf, dcf
    return (fwd + bwd) * itemsize


def _centred_padding(k: int, dilation: int):
    """Pads r*d on every side, so output (i, j) is centred on input (i*s, j*s) as in DDF."""
    margin = (k - 1) // 2 * dilation
    return ((margin, margin), (margin, margin))


def depthwise_conv(x, kernel, stride, dilation=1):
    """XLA's depthwise conv (`feature_group_count=C`), aligned with the DDF op.

    Args:
        x: (N, H, W, C).
        kernel: (k, k, 1, C).
        stride, dilation: as in `ddf_jax.ddf`.

    Returns:
        (N, ceil(H/stride), ceil(W/stride), C).
    """
    k = kernel.shape[0]
    return lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        _centred_padding(k, dilation),
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


def unfold_ddf(x, channel_filter, spatial_filter, k, stride, dilation=1):
    """The naive port of the official op: materialise all k*k shifted copies, then contract.

    Same arguments and result as `ddf_jax.ddf` with a 4-D spatial filter and "mul".
    """
    c = x.shape[-1]
    patches = lax.conv_general_dilated_patches(
        x,
        (k, k),
        (stride, stride),
        _centred_padding(k, dilation),
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # (N, Ho, Wo, C * K), channel-major
    patches = patches.reshape(*patches.shape[:3], c, k * k)
    weight = spatial_filter[:, :, :, None, :] * channel_filter[:, None, None, :, :]
    return jnp.einsum("nhwck,nhwck->nhwc", patches, weight.astype(patches.dtype))


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Measured device copy bandwidth in bytes/s (reads + writes)."""
    a = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda v: v + 1.0)
    seconds = _timeit(copy, (a,), repeats)
    return 2 * nbytes / seconds


def bench_shape(shape, dtype, implementations, repeats, baselines=True) -> list[Row]:
    """Times forward and forward+backward of each implementation (and the baselines) on one shape."""
    n, h, w, c, k, s = shape
    ho, wo = -(-h // s), -(-w // s)
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (n, h, w, c), dtype)
    cf = jax.random.normal(keys[1], (n, c, k * k), dtype)
    sf = jax.random.normal(keys[2], (n, ho, wo, k * k), dtype)
    kernel = jax.random.normal(keys[3], (k, k, 1, c), dtype)
    itemsize = jnp.dtype(dtype).itemsize
    candidates: dict[str, tuple[Callable, tuple]] = {}
    if baselines:
        candidates["depthwise"] = (lambda x, kern: depthwise_conv(x, kern, s), (x, kernel))
    for impl in implementations:
        candidates[impl] = (
            lambda x, cf, sf, impl=impl: ddf_jax.ddf(x, cf, sf, kernel_size=k, stride=s, implementation=impl),
            (x, cf, sf),
        )
    if baselines:
        candidates["unfold"] = (lambda x, cf, sf: unfold_ddf(x, cf, sf, k, s), (x, cf, sf))
    rows = []
    for name, (fn, args) in candidates.items():
        fwd = jax.jit(fn)

        def loss(*a, fn=fn):
            return jnp.sum(fn(*a).astype(jnp.float32))

        fwd_bwd = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
        for mode, f in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            try:
                seconds = _timeit(f, args, repeats)
            except ImplementationUnavailable as e:
                print(f"  skip {name}: {e}", file=sys.stderr)
                break
            analysis = f.lower(*args).compile().memory_analysis()
            temp = analysis.temp_size_in_bytes / x.nbytes if analysis is not None else None
            rows.append(Row(shape, name, mode, seconds, min_bytes(n, h, w, c, k, s, itemsize, mode), temp))
            print(f"  {name:>14} {mode:>8}: {seconds * 1e3:9.3f} ms", file=sys.stderr, flush=True)
    return rows


def table_header(bandwidth: Optional[float]) -> str:
    """The markdown table header (with bandwidth columns on a GPU)."""
    header = "| shape (N,H,W,C) | k | s | mode | method | ms | vs depthwise | temp / bytes of x |"
    sep = "|---|---|---|---|---|---|---|---|"
    if bandwidth:
        header += " GB/s | % of copy BW |"
        sep += "---|---|"
    return header + "\n" + sep


def table_rows(rows: list[Row], bandwidth: Optional[float]) -> str:
    """Markdown rows; ratios are to the depthwise conv of the same shape and mode."""
    lines = []
    base = {(r.shape, r.mode): r.seconds for r in rows if r.method == "depthwise"}
    for r in rows:
        n, h, w, c, k, s = r.shape
        ref = base.get((r.shape, r.mode))
        ratio = f"{r.seconds / ref:.2f}x" if ref else "-"
        temp = f"{r.temp_over_x:.2f}" if r.temp_over_x is not None else "-"
        line = f"| ({n},{h},{w},{c}) | {k} | {s} | {r.mode} | {r.method} | {r.seconds * 1e3:.3f} | {ratio} | {temp} |"
        if bandwidth:
            achieved = r.min_bytes / r.seconds
            is_ddf = r.method in ddf_jax.IMPLEMENTATIONS
            line += f" {achieved / 1e9:.0f} | {100 * achieved / bandwidth:.0f}% |" if is_ddf else " - | - |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_set = "gpu" if jax.default_backend() == "gpu" else "cpu"
    parser.add_argument("--set", choices=sorted(SHAPE_SETS), default=default_set, help="which shapes")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--implementations",
        default=None,
        help="comma-separated DDF implementations (default: xla, plus the GPU kernels on a GPU)",
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-baselines", action="store_true", help="skip depthwise/unfold")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)

    on_gpu = jax.default_backend() == "gpu"
    if args.implementations:
        impls = args.implementations.split(",")
    else:
        impls = ["xla"] + (["pallas_triton", "jax_triton"] if on_gpu else [])
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}", file=sys.stderr)
    bandwidth = copy_bandwidth() if on_gpu else None
    if bandwidth:
        print(f"measured copy bandwidth: {bandwidth / 1e9:.0f} GB/s", file=sys.stderr)
    title = (
        f"DDF op, {args.dtype}, set '{args.set}', {device.device_kind}, jax {jax.__version__}, "
        f"{datetime.date.today().isoformat()}"
    )
    if bandwidth:
        title += f", copy bandwidth {bandwidth / 1e9:.0f} GB/s"
    if args.markdown:
        # Written shape by shape, so a run cut short keeps what it measured.
        with open(args.markdown, "a") as f:
            command = " ".join(argv if argv is not None else sys.argv[1:])
            f.write(f"### {title}\n\n`python -m experiments.benchmark_op {command}`\n\n")
            f.write(table_header(bandwidth) + "\n")
    rows = []
    for shape in SHAPE_SETS[args.set]:
        print(f"shape {shape} {args.dtype}", file=sys.stderr, flush=True)
        shape_rows = bench_shape(shape, dtype, impls, args.repeats, baselines=not args.no_baselines)
        rows += shape_rows
        if args.markdown:
            with open(args.markdown, "a") as f:
                f.write(table_rows(shape_rows, bandwidth) + "\n")
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n")
    print(f"\n{title}\n\n{table_header(bandwidth)}\n{table_rows(rows, bandwidth)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
