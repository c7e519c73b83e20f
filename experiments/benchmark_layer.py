"""One DDF layer against the 3x3 conv it replaces in a ResNet, forward and forward+backward, in one run.

Usage (defaults: (8,56,56,64) float32, k = 3, stride 1):
    python -m experiments.benchmark_layer
    python -m experiments.benchmark_layer --shapes 8,56,56,64 64,16,16,16 --kernel-size 3 --stride 2

Per shape (N,H,W,C), three layers with the same input and output shapes:

- "conv": the ResNets' conv2, `ddf_jax.models.blocks.conv_layer(C, C, k, s)`
  (bias-free, padding k // 2);
- "ddf": `ddf_jax.nn.DDF(C, k)` with `--implementation` (branches, FilterNorm, op);
- "ddf, op free": the same DDF layer with its op replaced by a stand-in that
  reads both filters and costs almost nothing, so the row is the cost of the
  branches and FilterNorm.

"fwd" is the jitted layer; "fwd+bwd" is the jitted gradient of sum(layer(x) * g)
with respect to the parameters and x, for a random cotangent g. Timing is
`experiments.device_timing.time_interleaved` over argument sets whose bytes exceed
the cache: the six (layer, mode) runs of a shape take turns. Reported: ms per
call, the ratio to the conv in the same run, and the compiled program's
temporaries over the bytes of x.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ddf_jax
from ddf_jax.models.blocks import conv_layer
from ddf_jax.nn import DDF
from experiments import device_timing

LAYERS = ("conv", "ddf", "ddf, op free")


def free_op(x, channel_filter, spatial_filter, config):
    """A stand-in for the DDF op, of the op's output shape, that reads x and both filters and does
    almost no work."""
    s = config.stride
    return x[:, ::s, ::s] * (jnp.sum(channel_filter) + jnp.sum(spatial_filter)).astype(x.dtype)


def make_layer(name: str, channels: int, kernel_size: int, stride: int, dtype, implementation=None):
    """The layer of row `name` (one of LAYERS), in compute dtype `dtype`, float32 parameters."""
    if name == "conv":
        return conv_layer(channels, channels, kernel_size, stride, dtype=dtype, param_dtype=jnp.float32,
                          rngs=nnx.Rngs(0))
    op = free_op if name == "ddf, op free" else implementation
    return DDF(channels, kernel_size, stride=stride, dtype=dtype, implementation=op, rngs=nnx.Rngs(0))


def measure(shape, kernel_size: int, stride: int, dtype, implementation=None, cache_bytes=None) -> list[dict]:
    """One row per layer and mode ("fwd", "fwd+bwd") at input shape `shape` (N, H, W, C)."""
    n, h, w, c = shape
    out_shape = (n, -(-h // stride), -(-w // stride), c)
    x_bytes = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
    sets = device_timing.num_sets(3 * x_bytes, cache_bytes or device_timing.DEFAULT_CACHE_BYTES)
    rng = np.random.default_rng(0)
    arg_sets = [(jnp.asarray(rng.normal(size=shape), dtype), jnp.asarray(rng.normal(size=out_shape), dtype))
                for _ in range(sets)]
    calls, rows = [], []
    for name in LAYERS:
        graphdef, params = nnx.split(make_layer(name, c, kernel_size, stride, dtype, implementation))

        def forward(x, g, params=params, graphdef=graphdef):
            del g
            return nnx.merge(graphdef, params)(x)

        def loss(params, x, g, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, params)(x).astype(jnp.float32) * g.astype(jnp.float32))

        def forward_backward(x, g, params=params, loss=loss):
            return jax.grad(loss, argnums=(0, 1))(params, x, g)

        for mode, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
            calls.append((fn, arg_sets, 1))
            rows.append({"shape": list(shape), "k": kernel_size, "stride": stride, "dtype": jnp.dtype(dtype).name,
                         "layer": name, "mode": mode, "sets": sets})
    # All six runs take turns, so that the ratios to the conv compare like with like.
    for row, timing in zip(rows, device_timing.time_interleaved(calls, max_seconds=2.0 * len(calls))):
        memory = timing.compiled.memory_analysis()
        row.update(ms=timing.seconds * 1e3, spread=timing.spread,
                   temp_over_x=memory.temp_size_in_bytes / x_bytes if memory is not None else None)
    for row in rows:
        conv = next(r for r in rows if r["layer"] == "conv" and r["mode"] == row["mode"])
        row["vs_conv"] = row["ms"] / conv["ms"]
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table of `measure` rows."""
    lines = ["| shape (N,H,W,C) | k | s | layer | mode | ms | vs conv | temp / x | sets |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        temp = f"{r['temp_over_x']:.2f}" if r["temp_over_x"] is not None else "-"
        lines.append(f"| ({','.join(map(str, r['shape']))}) | {r['k']} | {r['stride']} | {r['layer']} | {r['mode']} "
                     f"| {r['ms']:.3f} | {r['vs_conv']:.2f}x | {temp} | {r['sets']} |")
    return "\n".join(lines)


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be N,H,W,C (four integers), got {text!r}") from None
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"must be N,H,W,C (four positive integers), got {text!r}")
    return shape


def main(argv=None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=_shape, nargs="+", default=[(8, 56, 56, 64)], metavar="N,H,W,C")
    parser.add_argument("--kernel-size", type=int, default=3)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--implementation", default=None, help=f"the DDF implementation, one of {ddf_jax.IMPLEMENTATIONS}")
    parser.add_argument("--json", default=None, help="append one JSON line per row to this file")
    args = parser.parse_args(argv)
    if args.implementation is not None and args.implementation not in ddf_jax.IMPLEMENTATIONS:
        parser.error(f"--implementation must be one of {ddf_jax.IMPLEMENTATIONS}, got {args.implementation!r}")
    if args.kernel_size < 1 or args.kernel_size % 2 == 0:
        parser.error(f"--kernel-size must be odd and positive, got {args.kernel_size}")
    if args.stride < 1:
        parser.error(f"--stride must be positive, got {args.stride}")
    rows = []
    for shape in args.shapes:
        print(f"measuring {shape} ...", file=sys.stderr, flush=True)
        rows += measure(shape, args.kernel_size, args.stride, jnp.dtype(args.dtype), args.implementation)
    device = jax.devices()[0].device_kind
    print(f"\nOne DDF layer against a {args.kernel_size}x{args.kernel_size} conv, {args.dtype}, {device}, "
          f"jax {jax.__version__}, {datetime.date.today().isoformat()}\n\n{table(rows)}")
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
