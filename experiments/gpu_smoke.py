"""Smoke check of every DDF implementation against "xla": forward, the three gradients, device time.

Usage:
    python -m experiments.gpu_smoke                         # (32,56,56,256) bfloat16 k=3
    python -m experiments.gpu_smoke --shape 2,9,7,12 --json smoke.json

For each implementation in `ddf_jax.IMPLEMENTATIONS`, on the same random
inputs and the same random cotangent, it computes the output and the three
gradients (dx, d_channel_filter, d_spatial_filter) through `jax.vjp` and
reports their relative errors against "xla" (norm-wise `rel_l2` and
max-normalised `rel_max`, see `device_timing.relative_errors`), and the
device time per call of the forward and of the forward with backward (timed
with `device_timing.time_calls`; the errors are taken from the very outputs
that were timed). The forward is also timed by plain back-to-back dispatch
(`device_timing.time_dispatched`), a check on the first method. The "xla" row's errors are those of "xla" in the given
dtype against "xla" in float32 on the same (upcast) inputs: the rounding
scale that the other rows are read against.

An implementation passes when every error is finite and at most
`TOLERANCE_ULPS` units of roundoff of the dtype. One that cannot run here
(`ddf_jax.ImplementationUnavailable`) is reported as unavailable, not failed.
Exit code: 1 if an implementation that ran failed, else 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import jax
import jax.numpy as jnp

import ddf_jax
from experiments import device_timing

# Errors allowed, in units of roundoff of the dtype (bfloat16: 2**-8): each of
# the two results is rounded once to the dtype (up to one unit of roundoff of
# the largest value each), and both accumulate in float32.
TOLERANCE_ULPS = 4
OUTPUTS = ("out", "dx", "d_channel_filter", "d_spatial_filter")


def unit_roundoff(dtype) -> float:
    """2**-p for a floating dtype with p significand bits (bfloat16: 2**-8)."""
    return float(jnp.finfo(dtype).eps) / 2


def make_sets(shape, k, dtype, count, seed=0):
    """`count` random (x, channel_filter, spatial_filter, grad_out) sets, standard normal."""
    n, h, w, c = shape
    sets = []
    for i in range(count):
        keys = jax.random.split(jax.random.key(seed + i), 4)
        sets.append(
            (
                jax.random.normal(keys[0], (n, h, w, c), dtype),
                jax.random.normal(keys[1], (n, c, k * k), dtype),
                jax.random.normal(keys[2], (n, h, w, k * k), dtype),
                jax.random.normal(keys[3], (n, h, w, c), dtype),
            )
        )
    return sets


def op_functions(k: int, implementation: str):
    """(forward(x, cf, sf), forward_and_vjp(x, cf, sf, g) -> (out, dx, dcf, dsf))."""

    def forward(x, cf, sf):
        return ddf_jax.ddf(x, cf, sf, kernel_size=k, implementation=implementation)

    def forward_and_vjp(x, cf, sf, g):
        out, vjp = jax.vjp(forward, x, cf, sf)
        return (out, *vjp(g))

    return forward, forward_and_vjp


def errors_of(actual: tuple, expected: tuple) -> dict:
    """{output name: relative_errors} for the four outputs."""
    return {name: device_timing.relative_errors(a, e) for name, a, e in zip(OUTPUTS, actual, expected)}


def worst(errors: dict) -> float:
    """The largest error of any output (NaN if any is NaN)."""
    values = [v for e in errors.values() for v in e.values()]
    return float("nan") if any(v != v for v in values) else max(values)


def check(implementation, sets, k, tolerance, target_seconds, reference=None) -> dict:
    """Times one implementation and compares it with `reference` (the "xla" outputs of set 0)."""
    row = {"implementation": implementation}
    forward, forward_and_vjp = op_functions(k, implementation)
    bytes_fwd = sum(a.nbytes for a in sets[0][:3]) + sets[0][0].nbytes
    iterations = device_timing.iterations_for(bytes_fwd, len(sets), target_seconds)
    try:
        fwd = device_timing.time_calls(forward, [s[:3] for s in sets], iterations=iterations)
        both = device_timing.time_calls(forward_and_vjp, sets, iterations=max(1, iterations // 3))
    except ddf_jax.ImplementationUnavailable as error:
        return {**row, "status": "unavailable", "message": str(error).splitlines()[0]}
    except Exception as error:  # report and go on with the next implementation
        traceback.print_exc()
        return {**row, "status": "error", "message": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
    outputs = both.outputs[0]
    row.update(fwd_ms=fwd.seconds * 1e3, fwd_bwd_ms=both.seconds * 1e3, sets=fwd.sets, spread=max(fwd.spread, both.spread))
    # The same forward timed a second way (no loop, no barriers), as a check on the first.
    row["fwd_ms_dispatched"] = 1e3 * device_timing.time_dispatched(
        forward, [s[:3] for s in sets], calls=fwd.calls_per_run
    )
    if reference is None:  # "xla" itself: against float32 xla on the same inputs
        upcast = [a.astype(jnp.float32) for a in sets[0]]
        expected = jax.jit(op_functions(k, "xla")[1])(*upcast)
        row["against"] = "xla float32"
    else:
        expected = reference
        row["against"] = "xla"
    row["errors"] = errors_of(outputs, expected)
    row["worst_error"] = worst(row["errors"])
    fwd_err = device_timing.relative_errors(fwd.outputs[0], expected[0])
    row["errors"]["out (forward program)"] = fwd_err
    row["worst_error"] = max(row["worst_error"], fwd_err["rel_l2"], fwd_err["rel_max"])
    ok = row["worst_error"] <= tolerance  # False for NaN
    row["status"] = "pass" if ok else "fail"
    row["_outputs"] = outputs
    return row


def main(argv=None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="32,56,56,256", help="N,H,W,C of x (default: the goal shape)")
    parser.add_argument("--kernel-size", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument(
        "--cache-mb", type=float, default=device_timing.DEFAULT_CACHE_BYTES / 2**20,
        help="rotate among input sets whose bytes exceed this cache size (0: one set)",
    )
    parser.add_argument("--target-seconds", type=float, default=0.025, help="about how long one timed run lasts")
    parser.add_argument("--implementations", default=",".join(ddf_jax.IMPLEMENTATIONS))
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args(argv)

    try:
        shape = tuple(int(v) for v in args.shape.split(","))
    except ValueError:
        parser.error(f"--shape must be four comma-separated integers N,H,W,C, got {args.shape!r}")
    if len(shape) != 4 or min(shape) < 1:
        parser.error(f"--shape must be four positive integers N,H,W,C, got {args.shape!r}")
    implementations = args.implementations.split(",")
    unknown = [i for i in implementations if i not in ddf_jax.IMPLEMENTATIONS]
    if unknown or "xla" not in implementations:
        parser.error(f"--implementations must include 'xla' and name only {ddf_jax.IMPLEMENTATIONS}, got {unknown or implementations}")
    implementations.remove("xla")
    dtype = jnp.dtype(args.dtype)
    k = args.kernel_size
    tolerance = TOLERANCE_ULPS * unit_roundoff(dtype)
    x_bytes = shape[0] * shape[1] * shape[2] * shape[3] * dtype.itemsize
    count = device_timing.num_sets(3 * x_bytes, int(args.cache_mb * 2**20))
    sets = make_sets(shape, k, dtype, count)
    device = jax.devices()[0]
    print(
        f"smoke: {shape} {args.dtype} k={k}, {count} input set(s), tolerance {tolerance:.2e} "
        f"({TOLERANCE_ULPS} units of roundoff), {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}",
        flush=True,
    )
    header = {
        "shape": shape, "kernel_size": k, "dtype": args.dtype, "tolerance": tolerance,
        "sets": count, "device": device.device_kind, "backend": jax.default_backend(),
    }
    rows = []

    def add(row):
        """Keeps the row and rewrites the JSON, so that a run cut short keeps the verdicts it reached."""
        rows.append(row)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({**header, "rows": [{k: v for k, v in r.items() if k != "_outputs"} for r in rows]}, f, indent=1)

    start = time.perf_counter()
    add(check("xla", sets, k, tolerance, args.target_seconds))
    reference = rows[0].get("_outputs")
    for implementation in implementations:
        print(f"  {implementation} ...", flush=True)
        if reference is None:
            add({"implementation": implementation, "status": "error", "message": "the xla reference failed"})
        else:
            add(check(implementation, sets, k, tolerance, args.target_seconds, reference))
    elapsed = time.perf_counter() - start

    print("\n| implementation | status | worst error | against | fwd ms | fwd ms (dispatched) | fwd+bwd ms |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "errors" in row:
            print(
                f"| {row['implementation']} | {row['status']} | {row['worst_error']:.2e} | {row['against']} | "
                f"{row['fwd_ms']:.3f} | {row['fwd_ms_dispatched']:.3f} | {row['fwd_bwd_ms']:.3f} |"
            )
        else:
            print(f"| {row['implementation']} | {row['status']} | - | - | - | - | - |  {row.get('message', '')}")
    print(f"({elapsed:.1f} s)")
    return 1 if any(row["status"] in ("fail", "error") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
