"""Device-side timing shared by the benchmarks: no host synchronisation per call on a GPU.

`time_calls(fn, arg_sets)` times `fn` per call, rotating among distinct
argument sets, as many as it takes for their bytes to exceed the cache
(`num_sets`), so that a call does not find its inputs still in the L2 from
their previous use. The per-call time is the median over runs divided by the
calls in a run.

On a GPU one run is one compiled program that calls `fn` on every set in
turn, `iterations` times, inside a `lax.fori_loop`, timed with the host clock
around one dispatch and one block (so launch and synchronisation costs are
spread over all the calls in it). Three things keep the compiler from doing
less work than the calls ask for:

- every call's arguments pass through `lax.optimization_barrier` together with
  the previous call's outputs, so no call can be hoisted out of the loop,
  merged with another (CSE) or run concurrently with its neighbour (XLA's GPU
  compiler removes these barriers only after scheduling);
- the loop carries every call's outputs, so none is dead code;
- the sets are distinct arrays.

On the CPU, where XLA removes optimization barriers before its loop
optimisations and a call takes milliseconds against microseconds of dispatch,
each call is one dispatch of the compiled call, blocked on before the next.

The outputs of the last run are returned, so callers can check that what they
timed computes the right answer. `time_interleaved` times several functions
in alternating runs, for ratios between them.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

# Bytes per second assumed before anything was measured, to size a run.
ASSUMED_BANDWIDTH = {"gpu": 2e12, "cuda": 2e12, "cpu": 5e9}
# The H200's L2 is 60 MB; rotating past 64 MiB covers it and typical CPU L3 caches.
DEFAULT_CACHE_BYTES = 64 << 20


@dataclasses.dataclass
class Timing:
    """The result of `time_calls`.

    Attributes:
        seconds: median seconds per call.
        spread: (slowest run - fastest run) / median run, over the timed runs.
        runs: timed runs.
        calls_per_run: calls of `fn` in one run (sets * iterations).
        sets: distinct argument sets rotated through.
        outputs: `fn`'s outputs for each argument set, from the last run.
        compiled: the compiled program: `fn` itself when `single_call`, else the loop.
        single_call: whether each call was its own dispatch (the CPU method).
    """

    seconds: float
    spread: float
    runs: int
    calls_per_run: int
    sets: int
    outputs: tuple
    compiled: Any
    single_call: bool


def num_sets(bytes_per_call: int, cache_bytes: int, max_sets: int = 8) -> int:
    """How many argument sets to rotate through so that their bytes exceed the cache 3 times over."""
    if cache_bytes <= 0:
        return 1
    return max(1, min(max_sets, math.ceil(3 * cache_bytes / max(bytes_per_call, 1))))


def iterations_for(bytes_per_call: int, sets: int, target_seconds: float, backend: Optional[str] = None) -> int:
    """Passes over the sets that make one run last about `target_seconds` at the assumed bandwidth.

    On the CPU, where each call is its own dispatch, one pass is enough.
    """
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return 1
    per_call = bytes_per_call / ASSUMED_BANDWIDTH.get(backend, 1e12)
    return max(1, min(1000, math.ceil(target_seconds / (per_call * sets))))


def loop_program(fn: Callable, iterations: int) -> Callable:
    """program(arg_sets) -> each set's outputs after `iterations` passes of `fn` over the sets (the GPU method)."""

    def program(arg_sets):
        init = tuple(
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *args)) for args in arg_sets
        )

        def body(_, outputs):
            previous = outputs[-1]
            new = []
            for args in arg_sets:
                args, _ = lax.optimization_barrier((args, previous))
                previous = fn(*args)
                new.append(previous)
            return tuple(new)

        return lax.fori_loop(0, iterations, body, init)

    return program


def time_calls(
    fn: Callable,
    arg_sets: Sequence[tuple],
    *,
    iterations: int = 1,
    max_runs: int = 5,
    max_seconds: float = 2.0,
    backend: Optional[str] = None,
) -> Timing:
    """Times `fn(*args)` per call, rotating through `arg_sets`, on the device.

    Args:
        fn: a traceable function of one argument set; returns an array or a pytree.
        arg_sets: distinct argument tuples of identical shapes and dtypes.
        iterations: passes over the sets per run.
        max_runs: timed runs at most (after one warm-up run); fewer when a
            run is slow, so that timing takes about `max_seconds`.
        max_seconds: rough wall-time budget for the timed runs.
        backend: "cpu" for one dispatch per call; anything else for the
            looped program (default: JAX's default backend).

    Returns:
        A `Timing`.
    """
    return time_interleaved([(fn, arg_sets, iterations)], max_runs=max_runs, max_seconds=max_seconds,
                            backend=backend)[0]


def time_interleaved(
    calls: Sequence[tuple[Callable, Sequence[tuple], int]],
    *,
    max_runs: int = 5,
    max_seconds: float = 2.0,
    backend: Optional[str] = None,
) -> list[Timing]:
    """Times several functions as `time_calls` does, their runs taking turns.

    Each round runs every function once, in order, so a change in the
    machine's speed during the measurement (other load, clock changes) falls
    on all of them alike, and ratios between them are steadier than between
    separate `time_calls`.

    Args:
        calls: (fn, arg_sets, iterations) per function, as for `time_calls`.
        max_runs, max_seconds, backend: as for `time_calls`; `max_seconds`
            bounds the timed rounds of all the functions together.

    Returns:
        One `Timing` per function, in the order of `calls`.
    """
    single_call = (backend or jax.default_backend()) == "cpu"
    runners = []
    for fn, arg_sets, iterations in calls:
        if not arg_sets:
            raise ValueError("arg_sets must hold at least one argument tuple, got none")
        runners.append(_runner(fn, tuple(tuple(args) for args in arg_sets), iterations, single_call))
    outputs = []
    first = 0.0
    for run, _ in runners:  # warm-up
        start = time.perf_counter()
        outputs.append(run())
        first += time.perf_counter() - start
    runs = max(1, min(max_runs, int(max_seconds / max(first, 1e-9))))
    times = [[] for _ in runners]
    for _ in range(runs):
        for i, (run, _) in enumerate(runners):
            outputs[i] = None  # free the previous outputs before the next run allocates its own
            start = time.perf_counter()
            outputs[i] = run()
            times[i].append(time.perf_counter() - start)
    timings = []
    for (fn, arg_sets, iterations), (_, compiled), fn_times, fn_outputs in zip(calls, runners, times, outputs):
        median = statistics.median(fn_times)
        calls_per_run = iterations * len(arg_sets)
        timings.append(Timing(
            seconds=median / calls_per_run,
            spread=(max(fn_times) - min(fn_times)) / median,
            runs=runs,
            calls_per_run=calls_per_run,
            sets=len(arg_sets),
            outputs=fn_outputs,
            compiled=compiled,
            single_call=single_call,
        ))
    return timings


def _runner(fn: Callable, arg_sets: tuple, iterations: int, single_call: bool):
    """(run, compiled): `run()` makes one timed run of `fn` over `arg_sets` and returns its outputs."""
    if single_call:
        compiled = jax.jit(fn).lower(*arg_sets[0]).compile()

        def run():
            outputs = None
            for _ in range(iterations):
                outputs = tuple(jax.block_until_ready(compiled(*args)) for args in arg_sets)
            return outputs

    else:
        compiled = jax.jit(loop_program(fn, iterations)).lower(arg_sets).compile()

        def run():
            return jax.block_until_ready(compiled(arg_sets))

    return run, compiled


def time_dispatched(fn: Callable, arg_sets: Sequence[tuple], *, calls: int, runs: int = 3) -> float:
    """Median seconds per call of `fn` dispatched `calls` times back to back, blocked on once per run.

    A second method, with no loop and no barriers, to check `time_calls`
    against: on a GPU the two agree when the calls are long enough to hide
    each dispatch's host cost.
    """
    arg_sets = tuple(tuple(args) for args in arg_sets)
    compiled = jax.jit(fn).lower(*arg_sets[0]).compile()
    jax.block_until_ready(compiled(*arg_sets[0]))
    times = []
    for _ in range(runs):
        out = None
        start = time.perf_counter()
        for i in range(calls):
            out = compiled(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, *, target_seconds: float = 0.02) -> float:
    """Measured device copy bandwidth in bytes/s (bytes read + bytes written), with `time_calls`.

    Args:
        nbytes: size of the buffer copied (use well past the cache: 1 GiB on a GPU).
        target_seconds: about how long one timed run should take.
    """
    a = jax.random.normal(jax.random.key(0), (max(nbytes // 4, 1),), jnp.float32)
    iterations = iterations_for(2 * a.nbytes, 1, target_seconds)
    timing = time_calls(lambda v: v * 1.5, [(a,)], iterations=iterations)
    return 2 * a.nbytes / timing.seconds


def relative_errors(actual, expected) -> dict:
    """Norm-wise and max-normalised relative errors of `actual` against `expected`, in float32.

    Returns:
        {"rel_l2": ||a - e||_2 / ||e||_2, "rel_max": max|a - e| / max|e|};
        NaN when either has a NaN (or `expected` is all zeros).
    """
    a = jnp.asarray(actual, jnp.float32)
    e = jnp.asarray(expected, jnp.float32)
    if a.shape != e.shape:
        raise ValueError(f"actual must have the expected's shape {e.shape}, got {a.shape}")
    diff = a - e
    l2 = jnp.linalg.norm(diff.ravel()) / jnp.linalg.norm(e.ravel())
    mx = jnp.max(jnp.abs(diff)) / jnp.max(jnp.abs(e))
    return {"rel_l2": float(l2), "rel_max": float(mx)}
