"""Searches the GPU kernels' tiles on a CUDA GPU and writes the tuning table.

Usage:
    python -m experiments.autotune --write kernels/tuning_table.json           # on a GPU
    python -m experiments.autotune --implementations pallas_triton --dtypes bfloat16 \
        --shapes 32x56x56x256:3 --budget-seconds 120 --write kernels/tuning_table.json
    python -m experiments.autotune --dry-run       # any machine: the classes and candidates, nothing run

For every requested shape (NHWC and k; the default is the goal shape at
k = 3, 5, 7 and the official test_time shapes), dtype and implementation, the
call's shape class (`ddf_jax.kernels.tuning.shape_class`) is tuned on the
first shape that reaches it, one kernel at a time ("forward", then
"backward", the other kept at the heuristic):

1. the heuristic (`BlockSizes.get_default` without a table) and the
   candidates around it (`candidates`: half and double the pixel and channel
   tiles, 4 or 8 warps) are each compiled, checked against "xla" on the same
   random inputs (a candidate that fails or differs is skipped), and timed;
2. timing: two input sets (more bytes than the H200's 60 MB L2) alternate,
   `--calls` calls are dispatched back to back with one wait at the end, the
   first round is not timed, and the median over `--repeats` rounds is kept;
3. the fastest candidate becomes the entry if it beats the heuristic by
   `--min-gain`.

With `--write PATH`, this device's entries (`jax.devices()[0].device_kind`)
are merged into the table at PATH (a missing file is an empty table) and the
file is replaced atomically after every class, so an interrupted run keeps
what it finished. `--budget-seconds` stops starting new candidates once
spent. On anything but a CUDA GPU it exits with status 2, except with
`--dry-run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from ddf_jax.kernels import DDFConfig, tuning, xla
from ddf_jax.kernels.common import LaunchConfig

EXIT_NOT_GPU = 2
OFFICIAL_SHAPES = ["2x200x300x256:3"] + [f"32x{s}x{s}x256:3" for s in (224, 112, 56, 28, 14, 7)]
DEFAULT_SHAPES = ["32x56x56x256:3", "32x56x56x256:5", "32x56x56x256:7"] + OFFICIAL_SHAPES
# Largest max |kernel - xla| / max |xla| accepted, by x's dtype.
TOLERANCE = {"bfloat16": 2e-2, "float16": 4e-3, "float32": 1e-4}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One call to tune on: x (n, h, w, c) in `dtype`, kernel size k."""

    n: int
    h: int
    w: int
    c: int
    k: int
    dtype: str

    @property
    def config(self) -> DDFConfig:
        return DDFConfig(self.k)

    def specs(self):
        """ShapeDtypeStructs of (x, channel_filter, spatial_filter (5-D), grad_out)."""
        shapes = ((self.n, self.h, self.w, self.c), (self.n, self.c, self.k**2))
        shapes += ((self.n, self.h, self.w, 1, self.k**2), (self.n, self.h, self.w, self.c))
        return [jax.ShapeDtypeStruct(shape, self.dtype) for shape in shapes]

    def label(self) -> str:
        return f"{self.n}x{self.h}x{self.w}x{self.c} k{self.k} {self.dtype}"


def parse_shape(text: str, dtype: str) -> Problem:
    """A `Problem` from "NxHxWxC:k"."""
    try:
        dims, k = text.split(":")
        n, h, w, c = (int(v) for v in dims.lower().split("x"))
        return Problem(n, h, w, c, int(k), dtype)
    except ValueError:
        raise ValueError(f"--shapes items must look like 32x56x56x256:3, got {text!r}") from None


def block_sizes_class(implementation: str):
    return importlib.import_module(f"ddf_jax.kernels.{implementation}").BlockSizes


def candidates(implementation: str, problem: Problem, role: str, limit: int) -> list:
    """BlockSizes to try for one kernel: the heuristic first, then half / double tiles and 4 or 8 warps."""
    cls = block_sizes_class(implementation)
    x, cf, sf, _ = problem.specs()
    heuristic = cls.heuristic(x, sf, problem.config)
    base = getattr(heuristic, role)
    found = {}
    for pixels in (base.block_pixels, base.block_pixels // 2, base.block_pixels * 2):
        for channels in (base.block_channels, base.block_channels // 2, base.block_channels * 2):
            for warps in (base.num_warps, 4, 8):
                if pixels >= 16 and channels >= 1 and pixels * channels <= 8192:
                    launch = LaunchConfig(pixels, channels, warps, base.num_stages)
                    old = (base.block_pixels, base.block_channels, base.num_warps)
                    changes = sum(a != b for a, b in zip((pixels, channels, warps), old))
                    found.setdefault(dataclasses.replace(heuristic, **{role: launch}), changes)
    return sorted(found, key=found.get)[:limit]  # the heuristic (no change) first, then the nearest


def plan(implementations, problems) -> list[tuple]:
    """[(implementation, problem, shape class)]: each class once, with the first problem that reaches it."""
    units, seen = [], set()
    for problem in problems:
        for implementation in implementations:
            key = tuning.shape_class(implementation, problem.dtype, problem.c, 1, problem.k**2)
            if key not in seen:
                seen.add(key)
                units.append((implementation, problem, key))
    return units


def kernel_function(implementation: str, role: str, problem: Problem, blocks):
    """jit(f(x, cf, sf, g)) running one kernel: out for "forward", the three gradients for "backward"."""
    module = importlib.import_module(f"ddf_jax.kernels.{implementation}")
    config = problem.config
    if role == "forward":
        return jax.jit(lambda x, cf, sf, g: module.forward(x, cf, sf, config, block_sizes=blocks))
    return jax.jit(lambda x, cf, sf, g: module.backward(x, cf, sf, g, config, block_sizes=blocks))


def reference(role: str, problem: Problem, inputs):
    x, cf, sf, g = inputs
    if role == "forward":
        return xla.forward(x, cf, sf, problem.config)
    return xla.backward(x, cf, sf, g, problem.config)


def relative_error(actual, expected) -> float:
    worst = 0.0
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        worst = max(worst, float(np.max(np.abs(a - e)) / max(float(np.max(np.abs(e))), 1e-30)))
    return worst if np.isfinite(worst) else float("inf")


def time_function(fn, input_sets, calls: int, repeats: int) -> float:
    """Median seconds per call: `calls` calls alternating over the input sets, one wait per round."""
    samples = []
    for round_ in range(repeats + 1):
        start = time.perf_counter()
        for i in range(calls):
            out = fn(*input_sets[i % len(input_sets)])
        jax.block_until_ready(out)
        if round_:  # the first round warms up
            samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def tune(implementation, problem, args, deadline, log) -> dict | None:
    """{"forward": [...], "backward": [...]}, each kernel's best launch; None when the heuristic won both."""
    keys = jax.random.split(jax.random.key(0), 8)
    input_sets = [
        [jax.random.normal(key, s.shape, s.dtype) for key, s in zip(keys[4 * i : 4 * i + 4], problem.specs())]
        for i in range(2)
    ]
    entry, improved = {}, False
    for role in tuning.ROLES:
        expected = reference(role, problem, input_sets[0])
        best, best_seconds, heuristic_seconds = None, None, None
        for index, blocks in enumerate(candidates(implementation, problem, role, args.max_candidates)):
            if index and time.perf_counter() > deadline:
                log(f"  budget spent after {index} candidates")
                break
            launch = getattr(blocks, role)
            try:
                fn = kernel_function(implementation, role, problem, blocks)
                error = relative_error(fn(*input_sets[0]), expected)
                if error > TOLERANCE[problem.dtype]:
                    log(f"  {role} {launch.describe()}: wrong, relative error {error:.1e}")
                    continue
                seconds = time_function(fn, input_sets, args.calls, args.repeats)
            except Exception as failure:  # noqa: BLE001 - a candidate that fails to compile or run is skipped
                log(f"  {role} {launch.describe()}: failed, {type(failure).__name__}: {str(failure)[:200]}")
                continue
            log(f"  {role} {launch.describe()}: {seconds * 1e3:.3f} ms")
            if index == 0:
                heuristic_seconds = seconds
            if best_seconds is None or seconds < best_seconds:
                best, best_seconds = launch, seconds
        heuristic = getattr(candidates(implementation, problem, role, 1)[0], role)
        if heuristic_seconds and best_seconds <= (1 - args.min_gain) * heuristic_seconds:
            entry[role], improved = dataclasses.astuple(best), True
        else:
            entry[role] = dataclasses.astuple(heuristic)
    return entry if improved else None


def write_table(path: pathlib.Path, entries: dict) -> None:
    """Merges this device's {shape class: entry} into the table at `path`, replacing the file atomically."""
    data = {"format_version": tuning.FORMAT_VERSION, "devices": {}}
    if path.exists():
        data = json.loads(path.read_text())
    device = data["devices"].setdefault(jax.devices()[0].device_kind, {"entries": []})
    old = {tuple(e[name] for name in tuning.KEY_FIELDS): e for e in device["entries"]}
    for key, entry in entries.items():
        old[key] = {**dict(zip(tuning.KEY_FIELDS, key)), **{role: list(entry[role]) for role in tuning.ROLES}}
    today = datetime.date.today().isoformat()
    device.update(jax_version=jax.__version__, date=today, entries=[old[key] for key in sorted(old)])
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(handle, "w") as file:
        file.write(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)
    tuning.read_table.cache_clear()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.autotune",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--implementations", default="pallas_triton,jax_triton", help="comma-separated")
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="comma-separated NxHxWxC:k items")
    parser.add_argument("--dtypes", default="bfloat16,float32", help=f"comma-separated, of {list(TOLERANCE)}")
    parser.add_argument("--budget-seconds", type=float, default=240.0, help="no new candidate after this")
    parser.add_argument("--max-candidates", type=int, default=8, help="per kernel, the heuristic included")
    parser.add_argument("--calls", type=int, default=20, help="calls per timing round")
    parser.add_argument("--repeats", type=int, default=5, help="timing rounds (median)")
    parser.add_argument("--min-gain", type=float, default=0.03, help="a winner beats the heuristic by this")
    parser.add_argument("--write", type=pathlib.Path, default=None, help="the table to update")
    parser.add_argument("--dry-run", action="store_true", help="print the classes and candidates only")
    args = parser.parse_args(argv)
    implementations = [name for name in args.implementations.split(",") if name]
    dtypes = [name for name in args.dtypes.split(",") if name]
    bad = [i for i in implementations if i not in ("pallas_triton", "jax_triton")] + [
        d for d in dtypes if d not in TOLERANCE
    ]
    if bad or not implementations or not dtypes:
        parser.error(f"unknown implementations or dtypes: {bad}")
    try:
        problems = [parse_shape(text, dtype) for dtype in dtypes for text in args.shapes.split(",") if text]
    except ValueError as error:
        parser.error(str(error))
    units = plan(implementations, problems)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.dry_run:
        for implementation, problem, key in units:
            for role in tuning.ROLES:
                found = candidates(implementation, problem, role, args.max_candidates)
                tried = [getattr(blocks, role).describe() for blocks in found]
                print(f"{implementation} {problem.label()} {key} {role}: {', '.join(tried)}")
        return 0
    if jax.default_backend() != "gpu":
        backend = jax.default_backend()
        log(f"autotune needs a CUDA GPU; JAX's default backend is {backend!r} (--dry-run runs anywhere)")
        return EXIT_NOT_GPU

    if "jax_triton" in implementations:
        try:
            importlib.import_module("ddf_jax.kernels.jax_triton").check_available("gpu")
        except RuntimeError as error:
            log(f"skipping jax_triton: {error}")
            units = [unit for unit in units if unit[0] != "jax_triton"]
    deadline = time.perf_counter() + args.budget_seconds
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}\n")
    print("| implementation | tuned on | forward | backward |\n|---|---|---|---|")
    for implementation, problem, key in units:
        log(f"{implementation} {problem.label()}")
        entry = tune(implementation, problem, args, deadline, log)
        kept = entry or {role: "heuristic" for role in tuning.ROLES}
        row = f"| {implementation} | {problem.label()} | {kept['forward']} | {kept['backward']} |"
        print(row, flush=True)
        if args.write and entry:
            write_table(args.write, {key: entry})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
