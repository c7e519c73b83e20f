"""Times the DDF op against XLA's depthwise conv and the naive unfold port.

Usage:
    python -m experiments.benchmark_op                 # the CPU set off a GPU, the GPU set on one
    python -m experiments.benchmark_op --set official  # the official test_time shapes (NHWC)
    python -m experiments.benchmark_op --set gpu --dtype bfloat16 --json rows.jsonl --markdown out.md

For each shape it times the forward ("fwd") and the forward with the
backward ("fwd+bwd": `jax.vjp` with a random cotangent, returning the output
and every gradient) of every DDF implementation and of two baselines, all
on the same data, in the same run:

- ``depthwise``: ``lax.conv_general_dilated`` with ``feature_group_count=C``,
  a plain k*k depthwise conv (cuDNN on a GPU), what DDF should cost about as
  much as;
- ``unfold``: the naive port of the official op, ``conv_general_dilated_patches``
  into a (N, Ho, Wo, C, K) tensor and an einsum with the combined filter.

Method (`experiments/device_timing.py`): each row is the median over runs of
one compiled program that calls the function many times in a loop, with no
host synchronisation between calls, rotating among enough distinct input sets
that their bytes exceed the cache three times (`--cache-mb`). A method's
"fwd" and "fwd+bwd" runs take turns, so that their ratio is not moved by the
machine's speed changing between the two. Each row
reports the fewest bytes the call must move (`min_bytes`), the achieved
bandwidth (those bytes over the time) and its fraction of the device's copy
bandwidth, measured in the same run with the same method; the ratio to the
depthwise conv of the same shape and mode; for "fwd+bwd", the ratio to the
same method's "fwd"; for DDF implementations, the worst relative error of
the timed outputs against "xla" (max |a - b| / max |b|); with `--temp`, the
compiled single call's temporary memory over the bytes of x.

`--budget-seconds` stops before a shape that would not finish in time; rows
are appended to `--json` (JSON lines) and `--markdown` as they are measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

import ddf_jax
from experiments import device_timing

# (N, H, W, C, k, stride) -- NHWC versions of the official test_time.py shapes.
OFFICIAL_SHAPES = [(2, 200, 300, 256, 3, 1)] + [(32, s, s, 256, 3, 1) for s in (224, 112, 56, 28, 14, 7)]
# Shows how the cost grows with k (the official op's weak spot).
KERNEL_SWEEP = [(32, 56, 56, 256, k, 1) for k in (3, 5, 7)]
# The shape the performance goals are stated at.
GOAL_SHAPE = [(32, 56, 56, 256, 3, 1)]
CPU_SHAPES = [(8, 56, 56, 64, 3, 1), (8, 56, 56, 64, 5, 1), (8, 28, 28, 128, 3, 2), (4, 15, 13, 48, 3, 2)]
# The GPU check's order: the goal shape, k = 5 and 7 there, then the other
# official shapes from the smallest up (so that as many as possible fit in time).
_OTHERS = sorted((s for s in OFFICIAL_SHAPES if s not in GOAL_SHAPE), key=lambda s: s[0] * s[1] * s[2] * s[3])
GPU_SHAPES = GOAL_SHAPE + KERNEL_SWEEP[1:] + _OTHERS
# Tiny stand-ins for the GPU check's dry run on a CPU: the goal shape's k, then another k
# (k=1: larger k compile for many seconds in Pallas interpret mode).
DRY_SHAPES = [(2, 9, 7, 12, 3, 1), (2, 9, 7, 12, 1, 1)]
SHAPE_SETS = {
    "cpu": CPU_SHAPES,
    "official": OFFICIAL_SHAPES,
    "ksweep": KERNEL_SWEEP,
    "goal": GOAL_SHAPE,
    "gpu": GPU_SHAPES,
    "dry": DRY_SHAPES,
}
BASELINES = ("depthwise", "unfold")
MODES = ("fwd", "fwd+bwd")


@dataclasses.dataclass
class Row:
    """One timing of `method` in `mode` on `shape` (N, H, W, C, k, stride)."""

    shape: tuple
    method: str
    mode: str  # "fwd" or "fwd+bwd"
    seconds: float  # median per call
    min_bytes: int
    sets: int
    spread: float
    copy_bandwidth: Optional[float] = None  # bytes/s, measured in the same run
    vs_depthwise: Optional[float] = None
    bwd_over_fwd: Optional[float] = None  # fwd+bwd rows: this time over the same method's fwd
    error_vs_xla: Optional[float] = None
    temp_over_x: Optional[float] = None
    backend: str = ""

    @property
    def bandwidth(self) -> float:
        """Achieved bytes/s: `min_bytes` over `seconds`."""
        return self.min_bytes / self.seconds

    def as_dict(self) -> dict:
        """A JSON-ready dict, with the derived bandwidth figures."""
        n, h, w, c, k, s = self.shape
        out = dataclasses.asdict(self)
        out.update(shape=[n, h, w, c], kernel_size=k, stride=s, ms=self.seconds * 1e3, gbps=self.bandwidth / 1e9)
        out["copy_fraction"] = self.bandwidth / self.copy_bandwidth if self.copy_bandwidth else None
        # On a GPU, moving the fewest bytes faster than a plain copy means cache hits or work the
        # compiler left out. (On the CPU the copy, one XLA loop, need not reach the memory bandwidth.)
        out["suspect"] = bool(self.backend != "cpu" and out["copy_fraction"] and out["copy_fraction"] > 1.0)
        return out


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


def make_inputs(shape, dtype, seed: int) -> dict:
    """Random x, cf, sf, the depthwise kernel and a cotangent g for one shape, standard normal."""
    n, h, w, c, k, s = shape
    ho, wo = -(-h // s), -(-w // s)
    keys = jax.random.split(jax.random.key(seed), 5)
    return {
        "x": jax.random.normal(keys[0], (n, h, w, c), dtype),
        "cf": jax.random.normal(keys[1], (n, c, k * k), dtype),
        "sf": jax.random.normal(keys[2], (n, ho, wo, k * k), dtype),
        "kernel": jax.random.normal(keys[3], (k, k, 1, c), dtype),
        "g": jax.random.normal(keys[4], (n, ho, wo, c), dtype),
    }


def method_function(method: str, k: int, s: int) -> tuple[Callable, tuple]:
    """(f, names of f's array arguments) for a method: a DDF implementation or a baseline."""
    if method == "depthwise":
        return (lambda x, kernel: depthwise_conv(x, kernel, s)), ("x", "kernel")
    if method == "unfold":
        return (lambda x, cf, sf: unfold_ddf(x, cf, sf, k, s)), ("x", "cf", "sf")
    return (
        lambda x, cf, sf: ddf_jax.ddf(x, cf, sf, kernel_size=k, stride=s, implementation=method)
    ), ("x", "cf", "sf")


def with_vjp(f: Callable) -> Callable:
    """f(*args, g) -> (out, *grads): the forward and the backward for cotangent g."""

    def forward_and_vjp(*args_and_g):
        *args, g = args_and_g
        out, vjp = jax.vjp(f, *args)
        return (out, *vjp(g))

    return forward_and_vjp


def _temp_over_x(timing: device_timing.Timing, fn, args, x_bytes) -> Optional[float]:
    """The compiled single call's temporary bytes over the bytes of x (compiled again unless it was timed so)."""
    compiled = timing.compiled if timing.single_call else jax.jit(fn).lower(*args).compile()
    analysis = compiled.memory_analysis()
    return analysis.temp_size_in_bytes / x_bytes if analysis is not None else None


def bench_shape(
    shape,
    dtype,
    methods,
    *,
    cache_bytes: int,
    target_seconds: float,
    copy_bw: Optional[float],
    temp: bool = False,
    deadline: Optional[float] = None,
    on_row: Optional[Callable[[Row], None]] = None,
    log=sys.stderr,
) -> list[Row]:
    """Times every method in both modes on one shape; see the module docstring.

    Rows are passed to `on_row` as they are measured (with their ratios), so
    that a run cut short keeps them. Stops early, with the rows so far, once
    `time.monotonic()` passes `deadline`.
    """
    n, h, w, c, k, s = shape
    itemsize = jnp.dtype(dtype).itemsize
    nbytes = {mode: min_bytes(n, h, w, c, k, s, itemsize, mode) for mode in MODES}
    count = device_timing.num_sets(nbytes["fwd"], cache_bytes)
    sets = [make_inputs(shape, dtype, seed) for seed in range(count)]
    rows: list[Row] = []
    reference = {}  # mode -> "xla" outputs of set 0
    for method in methods:
        if deadline is not None and time.monotonic() > deadline:
            print(f"  stop: time budget spent before {method}", file=log, flush=True)
            return rows
        f, names = method_function(method, k, s)
        # Both modes' runs take turns (`time_interleaved`), so fwd+bwd / fwd compares like with like.
        calls = []
        for mode in MODES:
            fn, arg_names = (f, names) if mode == "fwd" else (with_vjp(f), names + ("g",))
            arg_sets = [tuple(inputs[a] for a in arg_names) for inputs in sets]
            calls.append((fn, arg_sets, device_timing.iterations_for(nbytes[mode], count, target_seconds)))
        try:
            timings = device_timing.time_interleaved(calls, max_seconds=2 * (8 * target_seconds + 0.3))
        except ddf_jax.ImplementationUnavailable as error:
            print(f"  skip {method}: {str(error).splitlines()[0]}", file=log, flush=True)
            continue
        for mode, (fn, arg_sets, _), timing in zip(MODES, calls, timings):
            outputs = timing.outputs[0] if mode == "fwd+bwd" else (timing.outputs[0],)
            row = Row(shape, method, mode, timing.seconds, nbytes[mode], timing.sets, timing.spread, copy_bw,
                      backend=jax.default_backend())
            if method == "xla":
                reference[mode] = outputs
            if method in ddf_jax.IMPLEMENTATIONS and mode in reference:
                errors = [device_timing.relative_errors(a, b)["rel_max"] for a, b in zip(outputs, reference[mode])]
                row.error_vs_xla = float("nan") if any(e != e for e in errors) else max(errors)
            if temp:
                row.temp_over_x = _temp_over_x(timing, fn, arg_sets[0], sets[0]["x"].nbytes)
            _add_ratios(row, rows)
            rows.append(row)
            print(f"  {method:>14} {mode:>8}: {timing.seconds * 1e3:9.3f} ms", file=log, flush=True)
            if on_row is not None:
                on_row(row)
    return rows


def _add_ratios(row: Row, earlier: list[Row]) -> None:
    """Sets `row`'s ratios to the depthwise conv and to its own fwd, from the rows measured before it."""
    for r in earlier:
        if r.method == "depthwise" and r.mode == row.mode:
            row.vs_depthwise = row.seconds / r.seconds
        if row.mode == "fwd+bwd" and r.method == row.method and r.mode == "fwd":
            row.bwd_over_fwd = row.seconds / r.seconds
    if row.method == "depthwise":
        row.vs_depthwise = 1.0


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


TABLE_HEADER = (
    "| shape (N,H,W,C) | k | s | mode | method | ms | vs depthwise | fwd+bwd / fwd | min MB | GB/s "
    "| of copy BW | error vs xla | temp / x | sets |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def table_rows(rows: list[Row]) -> str:
    """Markdown rows for `TABLE_HEADER`."""
    lines = []
    for r in rows:
        n, h, w, c, k, s = r.shape
        d = r.as_dict()
        copy = _fmt(d["copy_fraction"] and 100 * d["copy_fraction"], ".0f", "%") + (" (suspect)" if d["suspect"] else "")
        lines.append(
            f"| ({n},{h},{w},{c}) | {k} | {s} | {r.mode} | {r.method} | {r.seconds * 1e3:.3f} "
            f"| {_fmt(r.vs_depthwise, '.2f', 'x')} | {_fmt(r.bwd_over_fwd, '.2f', 'x')} | {r.min_bytes / 1e6:.1f} "
            f"| {r.bandwidth / 1e9:.1f} | {copy} | {_fmt(r.error_vs_xla, '.1e')} | {_fmt(r.temp_over_x, '.2f')} | {r.sets} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    on_gpu = jax.default_backend() == "gpu"
    parser.add_argument("--set", choices=sorted(SHAPE_SETS), default="gpu" if on_gpu else "cpu", help="which shapes")
    parser.add_argument("--dtype", default="bfloat16" if on_gpu else "float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--implementations", default=None,
        help="comma-separated DDF implementations (default: xla, plus the GPU kernels on a GPU)",
    )
    parser.add_argument("--no-baselines", action="store_true", help="skip depthwise and unfold")
    parser.add_argument("--cache-mb", type=float, default=device_timing.DEFAULT_CACHE_BYTES / 2**20,
                        help="rotate among input sets whose bytes exceed this 3 times (0: one set)")
    parser.add_argument("--copy-mb", type=float, default=1024 if on_gpu else 64,
                        help="buffer size for the copy-bandwidth measurement")
    parser.add_argument("--target-seconds", type=float, default=0.025, help="about how long one timed run lasts")
    parser.add_argument("--temp", action=argparse.BooleanOptionalAction, default=not on_gpu,
                        help="also report the compiled single call's temporaries (on a GPU, one more compile per row)")
    parser.add_argument("--budget-seconds", type=float, default=None, help="start no shape after this long")
    parser.add_argument("--json", default=None, help="append one JSON line per row to this file")
    parser.add_argument("--markdown", default=None, help="append the table to this file")
    args = parser.parse_args(argv)

    start = time.monotonic()
    deadline = start + args.budget_seconds if args.budget_seconds else None
    if args.implementations:
        impls = args.implementations.split(",")
        unknown = [i for i in impls if i not in ddf_jax.IMPLEMENTATIONS]
        if unknown:
            parser.error(f"--implementations must name only {ddf_jax.IMPLEMENTATIONS}, got {unknown}")
    else:
        impls = ["xla"] + (["pallas_triton", "jax_triton"] if on_gpu else [])
    if "xla" in impls:  # the reference of the error column comes first
        impls = ["xla"] + [i for i in impls if i != "xla"]
    methods = impls if args.no_baselines else ["depthwise", *impls, "unfold"]
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}", file=sys.stderr)
    copy_bw = device_timing.copy_bandwidth(int(args.copy_mb * 2**20), target_seconds=args.target_seconds)
    print(f"measured copy bandwidth: {copy_bw / 1e9:.1f} GB/s ({args.copy_mb:.0f} MB buffer)", file=sys.stderr)
    title = (
        f"DDF op, {args.dtype}, set '{args.set}', {device.device_kind}, jax {jax.__version__}, "
        f"{datetime.date.today().isoformat()}, copy bandwidth {copy_bw / 1e9:.1f} GB/s"
    )
    command = " ".join(argv if argv is not None else sys.argv[1:])
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(f"### {title}\n\n`python -m experiments.benchmark_op {command}`\n\n{TABLE_HEADER}\n")

    def write_row(row: Row) -> None:
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({**row.as_dict(), "dtype": args.dtype, "device": device.device_kind}) + "\n")
        if args.markdown:
            with open(args.markdown, "a") as f:
                f.write(table_rows([row]) + "\n")

    rows: list[Row] = []
    last_shape_seconds = 0.0
    for shape in SHAPE_SETS[args.set]:
        now = time.monotonic()
        if deadline is not None and now + last_shape_seconds > deadline:
            print(f"stop: the time budget ({args.budget_seconds:.0f} s) leaves no room for {shape}", file=sys.stderr)
            break
        print(f"shape {shape} {args.dtype}", file=sys.stderr, flush=True)
        rows += bench_shape(
            shape, dtype, methods, cache_bytes=int(args.cache_mb * 2**20), target_seconds=args.target_seconds,
            copy_bw=copy_bw, temp=args.temp, deadline=deadline, on_row=write_row,
        )
        last_shape_seconds = time.monotonic() - now
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n")
    print(f"\n{title}\n\n{TABLE_HEADER}\n{table_rows(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
