"""Autotunes the tiles of the GPU DDF kernels and writes the tuning table.

Usage:
    # On a GPU: tune everything the budget allows, write the shipped table.
    python -m experiments.autotune --budget-seconds 240 --write kernels/tuning_table.json
    # A narrower run.
    python -m experiments.autotune --implementations pallas_triton --shapes official \
        --dtype bfloat16 --roles forward,dx --write kernels/tuning_table.json
    # Any machine: the plan (shape classes, tuning shapes, candidates), nothing run.
    python -m experiments.autotune --dry-run

What it does. The requested shapes (NHWC; `SHAPE_SETS`, default "all": the
official test_time shapes (2,200,300,256) and (32,S,S,256) for S = 224 ... 7
with k=3, plus k = 3, 5, 7 at (32,56,56,256)) are grouped into the shape
classes of `ddf_jax.kernels.tuning` (implementation, role, dtype width,
channel bucket, taps). A *unit* is one class; for each unit:

1. Tuning shapes: up to `--shapes-per-class` of the class's shapes, the one
   with the most pixels (N*H*W) first, then the median one.
2. Baseline: the heuristic tiles each tuning shape gets without a table.
3. Candidates: a pruned list around the heuristic (`candidate_configs`):
   channel tiles x tile sizes x warps (and pipelining stages where the kernel
   has a loop), nearest to the heuristic first, at most `--max-candidates`.
4. Each candidate is compiled and timed on every tuning shape with only its
   own kernel running (forward, dx or filters), and its output compared with
   the "xla" implementation on the same inputs. A candidate that fails to
   compile or run, or gives a wrong result, is skipped.
5. Score: the geometric mean over the tuning shapes of time / baseline time.
   The best candidate becomes the class's table entry if it beats the
   baseline by at least `--min-gain` and also matches "xla" on a small odd
   shape (13 x 11 pixels, so tiles do not divide it); otherwise the class gets
   no entry and keeps the heuristic.

Budget. `--budget-seconds` is shared among the units still to run: each unit
gets (time left) / (units left), so time a unit does not use goes to later
ones. A unit stops starting new candidates when its share is spent (a compile
that has started is not interrupted, so a run can overshoot by one compile).
Units left when the whole budget is spent are reported as not tuned.

Timing. Every kernel call is jitted on device-resident random inputs; the
first call (compile and run) is not timed; each of `--repeats` samples is the
mean of enough back-to-back calls to last about 2 ms, and the median sample is
reported.

Output. With `--write PATH` the table at PATH is read (a missing file is an
empty table), this device's entries for the tuned classes are replaced
(`--replace` drops all of this device's old entries first), and the file is
rewritten after every unit, so an interrupted run keeps what it finished. A
markdown summary goes to stdout; progress goes to stderr. `--results PATH`
also writes every measurement as JSON (likewise after every unit).

On a non-GPU backend it exits with status 2 and a message (except with
`--dry-run`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import math
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from ddf_jax.kernels import DDFConfig, tuning
from ddf_jax.kernels.common import ImplementationUnavailable

EXIT_NOT_GPU = 2
GPU_BACKEND = "gpu"
ROLE_ORDER = tuning.ROLES
# Largest normalised error (max |kernel - xla| / max |xla|) accepted, by x's dtype width.
TOLERANCE = {16: 2e-2, 32: 1e-3, 64: 1e-8}
SAMPLE_SECONDS = 2e-3


# --------------------------------------------------------------------------
# Shapes.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, order=True)
class Problem:
    """One DDF call to tune on: x is (n, h, w, c), kernel size k.

    Attributes:
        n: batch N.
        h: height H.
        w: width W.
        c: channels C.
        k: kernel size (K = k * k taps).
        stride: output stride.
        dilation: tap spacing.
        heads: G, spatial-filter heads (divides c).
        combine: "mul" or "add".
    """

    n: int
    h: int
    w: int
    c: int
    k: int
    stride: int = 1
    dilation: int = 1
    heads: int = 1
    combine: str = "mul"

    @property
    def config(self) -> DDFConfig:
        """The `DDFConfig` of this call."""
        return DDFConfig(self.k, self.stride, self.dilation, self.combine)

    @property
    def taps(self) -> int:
        """K = k * k."""
        return self.k * self.k

    @property
    def out_hw(self) -> tuple[int, int]:
        """(Ho, Wo) = (ceil(H / stride), ceil(W / stride))."""
        return -(-self.h // self.stride), -(-self.w // self.stride)

    @property
    def work(self) -> int:
        """N * H * W, used to order the shapes of a class."""
        return self.n * self.h * self.w

    def label(self) -> str:
        """Text such as "32x56x56x256 k3" (NHWC, kernel size; stride, dilation, heads if not 1)."""
        text = f"{self.n}x{self.h}x{self.w}x{self.c} k{self.k}"
        for name, value in (("s", self.stride), ("d", self.dilation), ("g", self.heads)):
            if value != 1:
                text += f" {name}{value}"
        return text + ("" if self.combine == "mul" else f" {self.combine}")


OFFICIAL = [Problem(2, 200, 300, 256, 3)] + [Problem(32, s, s, 256, 3) for s in (224, 112, 56, 28, 14, 7)]
KSWEEP = [Problem(32, 56, 56, 256, k) for k in (3, 5, 7)]
SHAPE_SETS = {
    "official": OFFICIAL,
    "ksweep": KSWEEP,
    "all": OFFICIAL + KSWEEP,
    # A quick check of the tool itself on a GPU.
    "smoke": [Problem(4, 28, 28, 64, 3), Problem(2, 15, 13, 64, 5)],
}


def parse_shapes(spec: str) -> list[Problem]:
    """Shapes from a comma-separated list of set names and "NxHxWxC:k" items, without repeats.

    Raises:
        ValueError: an item is neither a set name nor "NxHxWxC:k".
    """
    problems = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if item in SHAPE_SETS:
            problems += SHAPE_SETS[item]
            continue
        try:
            dims, k = item.split(":")
            n, h, w, c = (int(v) for v in dims.lower().split("x"))
            problems.append(Problem(n, h, w, c, int(k)))
        except ValueError:
            raise ValueError(
                f"--shapes item must be one of {sorted(SHAPE_SETS)} or NxHxWxC:k (e.g. 32x56x56x256:3), "
                f"got {item!r}"
            ) from None
    return list(dict.fromkeys(problems))


# --------------------------------------------------------------------------
# Candidates.
# --------------------------------------------------------------------------


def _has_loop(implementation: str, role: str) -> bool:
    """Whether the kernel loops (so that num_stages can matter).

    The jax_triton kernels loop over tap rows; the Pallas forward and dx
    kernels unroll every tap and only the filters kernel loops (over channel
    tiles).
    """
    return implementation == "jax_triton" or role == "filters"


def _distance(a: tuning.LaunchConfig, b: tuning.LaunchConfig) -> float:
    """Steps between two configurations: log2 ratios of tiles and warps, plus the stage difference."""
    return (
        abs(math.log2(a.block_pixels / b.block_pixels))
        + abs(math.log2(a.block_channels / b.block_channels))
        + abs(math.log2(a.num_warps / b.num_warps))
        + abs(a.num_stages - b.num_stages)
    )


def candidate_configs(
    implementation: str, role: str, *, channels: int, taps: int, heads: int = 1, max_candidates: int = 8
) -> list[tuning.LaunchConfig]:
    """A pruned list of launch configurations for one kernel role, the heuristic first.

    The pool: channel tiles (forward, dx: 32, 64, 128; filters: 16 to 128, at
    most the next power of two of the channels a tile spans) times tiles of
    2K, 4K or 8K elements (1K to 4K for the Pallas filters kernel, whose K
    accumulators of BP pixels must fit in registers: K * BP <= 4096), with 4
    warps up to 4K elements and 8 warps from 4K; pixel tiles from 16 to 512.
    Where the kernel loops, the heuristic tile with 1, 2 or 3 pipelining
    stages is added. The pool is sorted by distance from the heuristic and
    cut to `max_candidates`.

    Args:
        implementation: "pallas_triton" or "jax_triton".
        role: "forward", "dx" or "filters".
        channels: C.
        taps: K = kernel_size ** 2.
        heads: G (divides C).
        max_candidates: length limit, heuristic included (>= 1).

    Returns:
        Distinct `LaunchConfig`s, the heuristic (without image-size caps) first.
    """
    if max_candidates < 1:
        raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
    default = tuning.heuristic_config(implementation, role, channels=channels, taps=taps, heads=heads)
    span = tuning.next_power_of_2(channels // max(1, heads) if role == "filters" else channels)
    pallas_filters = implementation == "pallas_triton" and role == "filters"
    if role == "filters":
        channel_tiles = (16, 32, 64, 128)
        element_targets = (1024, 2048, 4096) if pallas_filters else (2048, 4096, 8192)
    else:
        channel_tiles = (32, 64, 128)
        element_targets = (2048, 4096, 8192)
    channel_tiles = tuple(tile for tile in channel_tiles if tile <= span) or (span,)

    pool = set()
    for block_channels in channel_tiles:
        for elements in element_targets:
            block_pixels = elements // block_channels
            if not 16 <= block_pixels <= 512 or (pallas_filters and taps * block_pixels > 4096):
                continue
            warps = (4, 8) if elements == 4096 else ((4,) if elements < 4096 else (8,))
            for num_warps in warps:
                pool.add(tuning.LaunchConfig(block_pixels, block_channels, num_warps, default.num_stages))
    if _has_loop(implementation, role):
        pool.update(dataclasses.replace(default, num_stages=stages) for stages in (1, 2, 3))
    pool.discard(default)
    others = sorted(pool, key=lambda config: (_distance(config, default), dataclasses.astuple(config)))
    return [default] + others[: max_candidates - 1]


def block_sizes_for(implementation: str, role: str, config: tuning.LaunchConfig, problem: Problem):
    """A `tuning.BlockSizes` for `implementation`: `config` for `role`, the heuristic for the other roles."""
    configs = {
        other: tuning.heuristic_config(
            implementation, other, channels=problem.c, taps=problem.taps, heads=problem.heads
        )
        for other in ROLE_ORDER
    }
    configs[role] = config
    return tuning.BlockSizes(**configs)


def baseline_config(implementation: str, role: str, problem: Problem) -> tuning.LaunchConfig:
    """The heuristic configuration `problem` gets without a table (with jax_triton's image-size caps)."""
    out_h, out_w = problem.out_hw
    return tuning.heuristic_config(
        implementation,
        role,
        channels=problem.c,
        taps=problem.taps,
        heads=problem.heads,
        in_pixels=problem.h * problem.w,
        out_pixels=out_h * out_w,
    )


# --------------------------------------------------------------------------
# The plan.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Unit:
    """One shape class to tune.

    Attributes:
        key: the `tuning.ShapeClass`.
        dtype: the dtype name used for the inputs ("bfloat16", "float32", ...).
        problems: the tuning shapes (timed).
        class_problems: every requested shape in the class.
        candidates: the candidate configurations, the heuristic first.
    """

    key: tuning.ShapeClass
    dtype: str
    problems: tuple[Problem, ...]
    class_problems: tuple[Problem, ...]
    candidates: tuple[tuning.LaunchConfig, ...]


def tuning_problems(problems: Sequence[Problem], limit: int) -> list[Problem]:
    """Up to `limit` shapes of one class: most pixels (N*H*W) first, then the median, then by size."""
    by_work = sorted(problems, key=lambda p: (-p.work, p))
    order = [by_work[0]]
    if len(by_work) > 1:
        order.append(by_work[len(by_work) // 2])
    order += [p for p in by_work if p not in order]
    return order[: max(1, limit)]


def plan_units(
    implementations: Sequence[str],
    problems: Sequence[Problem],
    dtypes: Sequence[str],
    roles: Sequence[str] = ROLE_ORDER,
    *,
    shapes_per_class: int = 2,
    max_candidates: int = 8,
) -> list[Unit]:
    """Groups the shapes into shape classes and lists what to time for each.

    Units are ordered class by class (in the order the shapes first reach
    them), then by dtype, implementation and role, so consecutive units share
    inputs.

    Returns:
        The `Unit`s.
    """
    groups: dict[tuple, list[Problem]] = {}
    for problem in problems:
        for dtype in dtypes:
            for implementation in implementations:
                for role in roles:
                    key = tuning.shape_class(
                        implementation,
                        role,
                        channels=problem.c,
                        taps=problem.taps,
                        dtype=dtype,
                        heads=problem.heads,
                    )
                    groups.setdefault((key, dtype), []).append(problem)

    def order(item):
        (key, dtype), members = item
        first = problems.index(members[0])
        return (
            first,
            list(dtypes).index(dtype),
            list(implementations).index(key.implementation),
            list(roles).index(key.role),
        )

    units = []
    for (key, dtype), members in sorted(groups.items(), key=order):
        chosen = tuning_problems(members, shapes_per_class)
        head = chosen[0]
        candidates = candidate_configs(
            key.implementation,
            key.role,
            channels=head.c,
            taps=head.taps,
            heads=head.heads,
            max_candidates=max_candidates,
        )
        units.append(Unit(key, dtype, tuple(chosen), tuple(members), tuple(candidates)))
    return units


def format_plan(units: Sequence[Unit]) -> str:
    """Markdown list of the units, their tuning shapes and candidates, and the number of compilations."""
    lines = []
    compiles = 0
    for unit in units:
        implementation, role = unit.key.implementation, unit.key.role
        baselines = {baseline_config(implementation, role, p) for p in unit.problems} - set(unit.candidates)
        count = (len(unit.candidates) + len(baselines)) * len(unit.problems)
        compiles += count + 1  # + the small-shape check of the winner
        lines.append(
            f"- {unit.key.describe()} ({unit.dtype}): tuned on {', '.join(p.label() for p in unit.problems)} "
            f"(class has {len(unit.class_problems)} shapes); {len(unit.candidates)} candidates: "
            + ", ".join(config.describe() for config in unit.candidates)
        )
    lines.append(f"\n{len(units)} units, at most {compiles} kernel compilations.")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Choosing and recording winners (pure functions, tested on CPU).
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Measurement:
    """One configuration on one shape.

    Attributes:
        problem: the shape.
        config: the launch configuration of the role being tuned.
        status: "ok", "failed" (compile or run error) or "wrong" (differs from xla).
        seconds: median time of one call, for "ok".
        compile_seconds: time of the first (compiling) call.
        error: max |kernel - xla| / max |xla|, when compared.
        message: the error text for "failed" and "wrong".
    """

    problem: Problem
    config: tuning.LaunchConfig
    status: str
    seconds: Optional[float] = None
    compile_seconds: Optional[float] = None
    error: Optional[float] = None
    message: str = ""

    def to_json(self) -> dict:
        """A JSON-ready dict."""
        return {
            "shape": self.problem.label(),
            "config": dataclasses.asdict(self.config),
            "status": self.status,
            "ms": None if self.seconds is None else self.seconds * 1e3,
            "compile_s": self.compile_seconds,
            "error": self.error,
            "message": self.message,
        }


@dataclasses.dataclass
class UnitResult:
    """What tuning one unit found.

    Attributes:
        unit: the unit.
        baseline: the heuristic's measurement per tuning shape.
        measurements: every candidate's measurements, in the order taken.
        winner: the configuration chosen for the table, or None (heuristic kept).
        score: the winner's geometric-mean time ratio to the baseline.
        note: why there is no winner, or other remarks.
        seconds: wall time spent on the unit.
    """

    unit: Unit
    baseline: dict = dataclasses.field(default_factory=dict)
    measurements: list = dataclasses.field(default_factory=list)
    winner: Optional[tuning.LaunchConfig] = None
    score: Optional[float] = None
    note: str = ""
    seconds: float = 0.0

    def times(self, config: tuning.LaunchConfig) -> dict:
        """{problem: seconds} of a configuration's successful measurements."""
        return {m.problem: m.seconds for m in self.measurements if m.config == config and m.status == "ok"}

    def timed_configs(self) -> list[tuning.LaunchConfig]:
        """Configurations with at least one measurement, in order."""
        return list(dict.fromkeys(m.config for m in self.measurements))


def rank_candidates(
    problems: Sequence[Problem],
    baseline_seconds: dict,
    candidate_seconds: dict,
) -> list[tuple[float, tuning.LaunchConfig]]:
    """Candidates timed successfully on every problem, best first, with their scores.

    Args:
        problems: the tuning shapes.
        baseline_seconds: {problem: seconds} of the heuristic.
        candidate_seconds: {config: {problem: seconds}}; a missing problem
            means the candidate failed or was not timed there.

    Returns:
        [(score, config)] sorted by score (ties: the config's tuple), where
        score is the geometric mean over problems of seconds / baseline
        seconds. Empty when a baseline time is missing.
    """
    if any(baseline_seconds.get(p) is None for p in problems):
        return []
    ranked = []
    for config, seconds in candidate_seconds.items():
        if all(seconds.get(p) is not None for p in problems):
            logs = [math.log(seconds[p] / baseline_seconds[p]) for p in problems]
            ranked.append((math.exp(sum(logs) / len(logs)), config))
    return sorted(ranked, key=lambda item: (item[0], dataclasses.astuple(item[1])))


def entry_measured(result: UnitResult) -> dict:
    """The informational "measured" record of a table entry."""
    problems = result.unit.problems
    winner_times = result.times(result.winner)
    return {
        "dtype": result.unit.dtype,
        "shapes": [p.label() for p in problems],
        "ms": [round(winner_times[p] * 1e3, 4) for p in problems],
        "heuristic_ms": [round(result.baseline[p].seconds * 1e3, 4) for p in problems],
        "speedup": round(1.0 / result.score, 3),
        "candidates_timed": len(result.timed_configs()),
        "candidates_failed": len({m.config for m in result.measurements if m.status != "ok"}),
    }


def device_table_update(results: Sequence[UnitResult], device: tuning.DeviceTable) -> tuning.DeviceTable:
    """`device` (metadata) with one entry per result that has a winner."""
    entries, measured = {}, {}
    for result in results:
        if result.winner is not None:
            entries[result.unit.key] = result.winner
            measured[result.unit.key] = entry_measured(result)
    return dataclasses.replace(device, entries=entries, measured=measured)


def format_summary(results: Sequence[UnitResult], title: str) -> str:
    """Markdown table: one row per unit with the chosen and heuristic configurations and times."""
    lines = [
        f"### {title}",
        "",
        "| implementation | role | dtype | C | K | tuned on | chosen | heuristic | ms chosen | ms heuristic "
        "| speedup | timed / failed | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        unit = result.unit
        key = unit.key
        heuristic = ", ".join(sorted({m.config.describe() for m in result.baseline.values()})) or "-"
        baseline_seconds = [
            result.baseline[p].seconds if p in result.baseline else None for p in unit.problems
        ]
        baseline_ms = "/".join("-" if t is None else f"{t * 1e3:.3f}" for t in baseline_seconds)
        if result.winner is not None:
            times = result.times(result.winner)
            chosen = result.winner.describe()
            chosen_ms = "/".join(f"{times[p] * 1e3:.3f}" for p in unit.problems)
            speedup = f"{1.0 / result.score:.2f}x"
        else:
            chosen, chosen_ms, speedup = "(heuristic)", "-", "-"
        failed = len({m.config for m in result.measurements if m.status != "ok"})
        lines.append(
            f"| {key.implementation} | {key.role} | {unit.dtype} | {key.channels} | {key.taps} "
            f"| {'; '.join(p.label() for p in unit.problems)} | {chosen} | {heuristic} | {chosen_ms} "
            f"| {baseline_ms} | {speedup} | {len(result.timed_configs())} / {failed} | {result.note} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Running kernels (GPU).
# --------------------------------------------------------------------------


def make_inputs(problem: Problem, dtype, seed: int = 0):
    """Random (x, channel_filter, spatial_filter (N, Ho, Wo, G, K), grad_out) on the default device."""
    out_h, out_w = problem.out_hw
    keys = jax.random.split(jax.random.key(seed), 4)
    shapes = [
        (problem.n, problem.h, problem.w, problem.c),
        (problem.n, problem.c, problem.taps),
        (problem.n, out_h, out_w, problem.heads, problem.taps),
        (problem.n, out_h, out_w, problem.c),
    ]
    return tuple(jax.random.normal(key, shape, dtype) for key, shape in zip(keys, shapes))


@functools.lru_cache(maxsize=None)
def _xla_functions(config: DDFConfig):
    from ddf_jax.kernels import xla

    forward = jax.jit(lambda x, cf, sf: xla.forward(x, cf, sf, config))
    backward = jax.jit(lambda x, cf, sf, g: xla.backward(x, cf, sf, g, config))
    return forward, backward


def reference_outputs(problem: Problem, role: str, inputs):
    """The "xla" implementation's outputs of `role`: out, dx, or (d_channel_filter, d_spatial_filter)."""
    forward, backward = _xla_functions(problem.config)
    x, cf, sf, g = inputs
    if role == "forward":
        return forward(x, cf, sf)
    dx, dcf, dsf = backward(x, cf, sf, g)
    return dx if role == "dx" else (dcf, dsf)


def role_function(implementation: str, role: str, problem: Problem, block_sizes) -> Callable:
    """A jitted `f(x, channel_filter, spatial_filter, grad_out)` running one kernel role only.

    Returns out (forward), dx (dx) or (d_channel_filter, d_spatial_filter)
    (filters), like `reference_outputs`.
    """
    config = problem.config
    if implementation == "pallas_triton":
        from ddf_jax.kernels import pallas_triton as pt

        options = dict(interpret=False, block_sizes=block_sizes)
        if role == "forward":
            return jax.jit(lambda x, cf, sf, g: pt.forward(x, cf, sf, config, **options))
        if role == "dx":
            return jax.jit(lambda x, cf, sf, g: pt.backward_dx(x, cf, sf, g, config, **options))
        return jax.jit(lambda x, cf, sf, g: pt.backward_filters(x, cf, sf, g, config, **options))

    from ddf_jax.kernels import jax_triton as jt

    triton_call = importlib.import_module("jax_triton").triton_call
    kernels = importlib.import_module("ddf_jax.kernels.triton_kernels")

    def launch(spec, *arrays):
        return triton_call(
            *arrays,
            kernel=getattr(kernels, spec.kernel_name),
            out_shape=spec.out_shapes,
            grid=spec.grid,
            num_warps=spec.num_warps,
            num_stages=spec.num_stages,
            **spec.constexprs,
        )

    def run(x, cf, sf, g):
        if role == "forward":
            (out,) = launch(jt.forward_launch(x, cf, sf, config, block_sizes), x, cf, sf)
            return out
        if role == "dx":
            (dx,) = launch(jt.dx_launch(x, cf, sf, g, config, block_sizes), g, cf, sf)
            return dx
        d_spatial, partials = launch(jt.filter_launch(x, cf, sf, g, config, block_sizes), x, g, cf, sf)
        # (N, P, K, C) -> (N, C, K): the second stage of the reduction, as in the op.
        return jnp.transpose(jnp.sum(partials, axis=1), (0, 2, 1)), d_spatial

    return jax.jit(run)


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| over every array of the outputs (inf for NaN)."""
    worst = 0.0
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        if a.shape != e.shape:
            return math.inf
        a, e = a.astype(jnp.float32), e.astype(jnp.float32)
        scale = float(jnp.max(jnp.abs(e)))
        diff = float(jnp.max(jnp.abs(a - e)))
        if not math.isfinite(diff):
            return math.inf
        worst = max(worst, diff / max(scale, 1e-30))
    return worst


def time_function(fn: Callable, args, repeats: int) -> tuple[float, float, object]:
    """(compile_seconds, median seconds per call, first output) of a jitted function."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    single = max(time.perf_counter() - start, 1e-7)
    inner = max(1, min(100, math.ceil(SAMPLE_SECONDS / single)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            result = fn(*args)
        jax.block_until_ready(result)
        samples.append((time.perf_counter() - start) / inner)
    return compile_seconds, statistics.median(samples), out


class Tuner:
    """Runs units on the GPU: times candidates, checks them against xla, picks winners."""

    def __init__(self, repeats: int, min_gain: float, log=print):
        self.repeats = repeats
        self.min_gain = min_gain
        self.log = log
        self._inputs: dict = {}
        self._references: dict = {}

    def inputs(self, problem: Problem, dtype: str):
        key = (problem, dtype)
        if key not in self._inputs:
            if len(self._inputs) >= 4:  # keep device memory bounded: drop the oldest shape
                oldest = next(iter(self._inputs))
                del self._inputs[oldest]
                for ref_key in [k for k in self._references if k[:2] == oldest]:
                    del self._references[ref_key]
            self._inputs[key] = make_inputs(problem, jnp.dtype(dtype))
        return self._inputs[key]

    def reference(self, problem: Problem, dtype: str, role: str):
        key = (problem, dtype, role)
        if key not in self._references:
            self._references[key] = jax.block_until_ready(
                reference_outputs(problem, role, self.inputs(problem, dtype))
            )
        return self._references[key]

    def measure(
        self, unit: Unit, config: tuning.LaunchConfig, problem: Problem, *, timed: bool = True
    ) -> Measurement:
        """Compiles, checks and (if `timed`) times one configuration on one shape."""
        implementation, role = unit.key.implementation, unit.key.role
        try:
            block_sizes = block_sizes_for(implementation, role, config, problem)
            fn = role_function(implementation, role, problem, block_sizes)
            args = self.inputs(problem, unit.dtype)
            if timed:
                compile_seconds, seconds, out = time_function(fn, args, self.repeats)
            else:
                start = time.perf_counter()
                out = jax.block_until_ready(fn(*args))
                compile_seconds, seconds = time.perf_counter() - start, None
            error = relative_error(out, self.reference(problem, unit.dtype, role))
        except Exception as exception:  # a compile or launch failure skips the candidate
            first_line = (str(exception).splitlines() or [""])[0]
            message = f"{type(exception).__name__}: {first_line}"
            return Measurement(problem, config, "failed", message=message[:300])
        if error > TOLERANCE[unit.key.dtype_bits]:
            message = f"relative error {error:.2e}"
            return Measurement(problem, config, "wrong", None, compile_seconds, error, message)
        return Measurement(problem, config, "ok", seconds, compile_seconds, error)

    def _log_measurement(self, unit: Unit, m: Measurement, elapsed: float) -> None:
        timing = f"{m.seconds * 1e3:8.3f} ms" if m.seconds is not None else m.status.upper()
        compile_text = f" (first call {m.compile_seconds:.1f} s)" if m.compile_seconds is not None else ""
        extra = f" {m.message}" if m.status != "ok" else ""
        self.log(
            f"[{elapsed:6.1f} s] {unit.key.describe()} {unit.dtype} | {m.problem.label()} | "
            f"{m.config.describe():>16} | {timing}{compile_text}{extra}"
        )

    def run_unit(self, unit: Unit, seconds_allowed: float, clock: Callable[[], float]) -> UnitResult:
        """Tunes one unit within `seconds_allowed` (always timing the baseline and the first candidate)."""
        start = time.perf_counter()
        result = UnitResult(unit)
        implementation, role = unit.key.implementation, unit.key.role
        # The heuristic each tuning shape gets without a table.
        for problem in unit.problems:
            m = self.measure(unit, baseline_config(implementation, role, problem), problem)
            result.baseline[problem] = m
            self._log_measurement(unit, m, clock())
            if m.config in unit.candidates:
                result.measurements.append(m)
        if any(m.status != "ok" for m in result.baseline.values()):
            result.note = "the heuristic failed on a tuning shape; no entry"
            result.seconds = time.perf_counter() - start
            return result
        for index, config in enumerate(unit.candidates):
            if index > 0 and time.perf_counter() - start > seconds_allowed:
                result.note = f"unit budget spent after {index} of {len(unit.candidates)} candidates"
                break
            for problem in unit.problems:
                if any(m.config == config and m.problem == problem for m in result.measurements):
                    continue
                m = self.measure(unit, config, problem)
                result.measurements.append(m)
                self._log_measurement(unit, m, clock())
                if m.status != "ok":
                    break
        self._choose(result)
        result.seconds = time.perf_counter() - start
        return result

    def _choose(self, result: UnitResult) -> None:
        unit = result.unit
        baseline_seconds = {p: m.seconds for p, m in result.baseline.items()}
        candidate_seconds = {config: result.times(config) for config in result.timed_configs()}
        for score, config in rank_candidates(unit.problems, baseline_seconds, candidate_seconds):
            if score > 1.0 - self.min_gain:
                if not result.note:
                    result.note = f"nothing beat the heuristic by {self.min_gain:.0%}"
                return
            check = self.small_check(unit, config)
            if check.status == "ok":
                result.winner, result.score = config, score
                return
            result.measurements.append(check)
            self.log(f"  {config.describe()} failed the small-shape check: {check.message}")
        if not result.note:
            result.note = "no faster candidate completed (and passed the small-shape check)"

    def small_check(self, unit: Unit, config: tuning.LaunchConfig) -> Measurement:
        """The configuration against xla on a small odd shape (13 x 11 pixels: partial tiles everywhere)."""
        head = unit.problems[0]
        problem = dataclasses.replace(head, n=2, h=13, w=11)
        return self.measure(unit, config, problem, timed=False)


# --------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.autotune",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--implementations", default="pallas_triton,jax_triton", help="comma-separated")
    parser.add_argument(
        "--shapes", default="all", help=f"comma-separated set names {sorted(SHAPE_SETS)} or NxHxWxC:k items"
    )
    parser.add_argument("--dtype", default="bfloat16,float32", help="comma-separated input dtypes")
    parser.add_argument("--roles", default=",".join(ROLE_ORDER), help="comma-separated kernel roles")
    parser.add_argument("--budget-seconds", type=float, default=240.0, help="wall-time budget of the tuning")
    parser.add_argument(
        "--max-candidates", type=int, default=8, help="candidates per class, heuristic included"
    )
    parser.add_argument("--shapes-per-class", type=int, default=2, help="tuning shapes timed per class")
    parser.add_argument("--repeats", type=int, default=5, help="timing samples per measurement")
    parser.add_argument(
        "--min-gain", type=float, default=0.03, help="a winner must be this much faster than the heuristic"
    )
    parser.add_argument(
        "--write", default=None, help="tuning table to update (e.g. kernels/tuning_table.json)"
    )
    parser.add_argument(
        "--replace",
        action="store_true",
        help="drop this device's old entries (when the first new one is written)",
    )
    parser.add_argument("--results", default=None, help="also write every measurement to this JSON file")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and candidates; run nothing")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parses and validates the command line (errors exit with status 2 through argparse)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.implementations = _split(args.implementations)
    args.roles = _split(args.roles)
    args.dtype = _split(args.dtype)
    for name, values, choices in (
        ("--implementations", args.implementations, tuning.IMPLEMENTATIONS),
        ("--roles", args.roles, ROLE_ORDER),
        ("--dtype", args.dtype, ("bfloat16", "float16", "float32")),
    ):
        bad = [v for v in values if v not in choices]
        if bad or not values:
            parser.error(f"{name} must be a comma-separated subset of {list(choices)}, got {bad or values}")
    try:
        args.problems = parse_shapes(args.shapes)
    except ValueError as error:
        parser.error(str(error))
    if not args.problems:
        parser.error("--shapes selected no shapes")
    for name in ("max_candidates", "shapes_per_class", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.budget_seconds <= 0:
        parser.error(f"--budget-seconds must be > 0, got {args.budget_seconds}")
    return args


def write_results(path: str, device: tuning.DeviceTable, results: Sequence[UnitResult]) -> None:
    """Writes every unit's measurements, winner and note as JSON."""
    units = [
        {
            "class": dataclasses.asdict(r.unit.key),
            "dtype": r.unit.dtype,
            "winner": None if r.winner is None else dataclasses.asdict(r.winner),
            "score": r.score,
            "note": r.note,
            "seconds": r.seconds,
            "baseline": [m.to_json() for m in r.baseline.values()],
            "measurements": [m.to_json() for m in r.measurements],
        }
        for r in results
    ]
    data = {"device_kind": device.device_kind, "jax_version": device.jax_version, "date": device.date}
    with open(path, "w") as file:
        json.dump({**data, "units": units}, file, indent=1)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    """Entry point; returns the exit status (2 on a non-GPU backend)."""
    args = parse_args(argv)
    units = plan_units(
        args.implementations,
        args.problems,
        args.dtype,
        args.roles,
        shapes_per_class=args.shapes_per_class,
        max_candidates=args.max_candidates,
    )
    if args.dry_run:
        for unit in units:  # every candidate must make a valid BlockSizes
            for config in unit.candidates:
                block_sizes_for(unit.key.implementation, unit.key.role, config, unit.problems[0])
        print(format_plan(units))
        return 0

    backend = jax.default_backend()
    if backend != GPU_BACKEND:
        _log(
            f"autotune needs a GPU, but JAX's default backend is {backend!r}: timings of interpreted "
            "kernels mean nothing. Run it on a CUDA machine, or use --dry-run to list the plan."
        )
        return EXIT_NOT_GPU

    table_path = args.write
    table = tuning.TuningTable()
    if table_path:
        try:
            table = tuning.read_table(table_path)
        except ValueError as error:
            _log(f"cannot update {table_path}: {error}. Fix or delete it first.")
            return 1
    device = tuning.new_device_table()
    _log(f"device: {device.device_kind}, jax {device.jax_version}, budget {args.budget_seconds:.0f} s")

    available = []
    for implementation in args.implementations:
        try:
            if implementation == "jax_triton":
                importlib.import_module("ddf_jax.kernels.jax_triton").check_available(backend)
            available.append(implementation)
        except ImplementationUnavailable as error:
            _log(f"skipping {implementation}: {error}")
    units = [unit for unit in units if unit.key.implementation in available]
    if not units:
        _log("nothing to tune")
        return 1
    _log(format_plan(units))

    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    tuner = Tuner(args.repeats, args.min_gain, log=_log)
    results: list[UnitResult] = []
    replace = args.replace
    for index, unit in enumerate(units):
        remaining = args.budget_seconds - clock()
        if remaining <= 0:
            results.append(UnitResult(unit, note="not tuned: budget spent"))
            continue
        share = remaining / (len(units) - index)
        _log(f"--- unit {index + 1}/{len(units)}: {unit.key.describe()} {unit.dtype}, {share:.0f} s")
        result = tuner.run_unit(unit, share, clock)
        results.append(result)
        if table_path and result.winner is not None:
            table = table.merged(device_table_update([result], device), replace=replace)
            replace = False  # drop old entries once, before the first new one
            tuning.write_table(table, table_path)
            _log(f"  wrote {result.unit.key.describe()} -> {result.winner.describe()} to {table_path}")
        if args.results:  # after every unit, so that an interrupted run keeps what it measured
            write_results(args.results, device, results)

    title = (
        f"DDF kernel autotuning: {device.device_kind}, jax {device.jax_version}, {device.date}, "
        f"budget {args.budget_seconds:.0f} s, used {clock():.0f} s"
    )
    print(format_summary(results, title))
    print(f"\n`python -m experiments.autotune {' '.join(argv if argv is not None else sys.argv[1:])}`")
    if table_path:
        written = sum(r.winner is not None for r in results)
        print(f"\ntable: {table_path} ({written} entries written this run)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
