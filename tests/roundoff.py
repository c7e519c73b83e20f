"""Element-wise error bounds of the DDF op from the dtypes' unit roundoff, and the checks that use them.

Every output element of the op and of its three gradients is a sum of m
products, formed and summed in the accumulation dtype (float32, or float64
for float64 inputs), then rounded once to the output's dtype:

    out[n, i, j, c]    m = k*k    terms x * comb(sf, cf)
    dx[n, y, x, c]     m <= k*k   terms g * comb(sf, cf)
    dcf[n, c, t]       m = Ho*Wo  terms g * x (* sf)
    dsf[n, i, j, h, t] m = C / G  terms g * x (* cf)

Each product is rounded at most twice (x * (sf * cf), x * (sf + cf), or
(g * x) * sf) and a sum of m terms in any order errs by at most (m - 1) u
times the sum of their absolute values (Higham, "Accuracy and Stability of
Numerical Algorithms", 2nd ed., section 4.2), so the accumulated value is
within (m + 1) u_acc * M of the exact one, M = the sum of the absolute values
of the terms. The final rounding to the output dtype adds at most
rho * (u_out * |exact| + eta_out), with eta_out half the dtype's smallest
subnormal (the absolute error of gradual underflow: float16 results below
6e-5 are subnormal) and rho = 1 when rounding to nearest, 2 when rounding
towards zero, as Triton's CPU interpreter does for bfloat16. The bound used is

    |computed - exact| <= rho * (u_out * |exact| + eta_out) + 2 (m + 1) u_acc * M

where the factor 2 on the accumulation term covers the float64 reference's
own rounding (the same (m + 1) u_64 M, which is what remains when the op too
accumulates in float64) and the second-order terms of the first. These hold
for any summation order, tile size or FMA use, so they cannot flake; a
forward or backward that accumulates in bfloat16 errs by about u_bf16 * M,
2**16 times the accumulation term, and fails them.

`bounds` computes M by running the float64 reference on the inputs'
absolute values: for "mul" that is exactly the sum of the terms' absolute
values, for "add" it is the larger sum of |x| (|sf| + |cf|), still a bound.
"""

from typing import NamedTuple

import chex
import jax.numpy as jnp
import numpy as np

from tests.reference import ddf_reference, ddf_reference_vjp

UNIT_ROUNDOFF = {
    jnp.dtype(jnp.bfloat16): 2.0**-8,
    jnp.dtype(jnp.float16): 2.0**-11,
    jnp.dtype(jnp.float32): 2.0**-24,
    jnp.dtype(jnp.float64): 2.0**-53,
}
NAMES = ("out", "dx", "d_channel_filter", "d_spatial_filter")


def unit_roundoff(dtype) -> float:
    """u = 2**-p for a p-bit significand: half the distance from 1 to the next number."""
    return UNIT_ROUNDOFF[jnp.dtype(dtype)]


def accumulation_dtype(*dtypes):
    """float32 for 16- and 32-bit inputs, float64 when any input is float64 (the op's contract)."""
    return jnp.dtype(jnp.float64) if any(jnp.dtype(d) == jnp.float64 for d in dtypes) else jnp.dtype(jnp.float32)


class Expected(NamedTuple):
    """The float64 reference value of each of out, dx, dcf, dsf, and its error bound (same shapes)."""

    values: tuple
    bounds: tuple


def _bound(exact, magnitude, terms, out_dtype, acc_dtype, rounding_ulps):
    underflow = float(jnp.finfo(out_dtype).smallest_subnormal) / 2
    rounding = rounding_ulps * (unit_roundoff(out_dtype) * np.abs(exact) + underflow)
    return rounding + 2 * (terms + 1) * unit_roundoff(acc_dtype) * magnitude


def expected_forward(x, cf, sf, k, stride, dilation, combine, rounding_ulps=1):
    """The reference out and its bound for inputs already in the dtypes under test."""
    acc = accumulation_dtype(x.dtype, cf.dtype, sf.dtype)
    exact = ddf_reference(x, cf, sf, k, stride, dilation, combine)
    magnitude = ddf_reference(*(np.abs(np.asarray(a, np.float64)) for a in (x, cf, sf)), k, stride, dilation,
                              combine)
    return exact, _bound(exact, magnitude, k * k, x.dtype, acc, rounding_ulps)


def expected_vjp(x, cf, sf, g, k, stride, dilation, combine, rounding_ulps=1) -> Expected:
    """The reference (out, dx, dcf, dsf) and their bounds; each result rounds to its input's dtype."""
    out, out_bound = expected_forward(x, cf, sf, k, stride, dilation, combine, rounding_ulps)
    acc = accumulation_dtype(x.dtype, cf.dtype, sf.dtype, g.dtype)
    exact = ddf_reference_vjp(x, cf, sf, g, k, stride, dilation, combine)
    absolute = (np.abs(np.asarray(a, np.float64)) for a in (x, cf, sf, g))
    magnitude = ddf_reference_vjp(*absolute, k, stride, dilation, combine)
    heads = sf.shape[3] if sf.ndim == 5 else 1
    terms = (k * k, g.shape[1] * g.shape[2], x.shape[3] // heads)
    bounds = tuple(
        _bound(e, m, t, a.dtype, acc, rounding_ulps) for e, m, t, a in zip(exact, magnitude, terms, (x, cf, sf))
    )
    return Expected((out,) + exact, (out_bound,) + bounds)


def assert_within(actual, expected, bound, name="value"):
    """Asserts |actual - expected| <= bound element-wise (NaN fails), saying where and by how much if not."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    bound = np.broadcast_to(np.asarray(bound, np.float64), expected.shape)

    def within(a, e):
        return a.shape == e.shape and bool(np.all(np.abs(a - e) <= bound))

    def message(a, e):
        if a.shape != e.shape:
            return f"{name}: shape {a.shape} != {e.shape}"
        excess = np.where(np.isnan(a), np.inf, np.abs(a - e) / np.maximum(bound, np.finfo(np.float64).tiny))
        worst = np.unravel_index(np.argmax(excess), excess.shape)
        failing = int(np.sum(~(np.abs(a - e) <= bound)))
        return (
            f"{name}: {failing} of {a.size} elements outside the roundoff bound; worst at {worst}: "
            f"got {a[worst]:.6g}, expected {e[worst]:.6g}, error {abs(a[worst] - e[worst]):.3g} "
            f"> bound {bound[worst]:.3g} ({excess[worst]:.3g}x); largest error {np.nanmax(np.abs(a - e)):.3g}"
        )

    chex.assert_trees_all_equal_comparator(within, message, actual, expected)


def assert_results_within(results, expected: Expected, names=NAMES):
    """`assert_within` for each of (out, dx, dcf, dsf) (or a prefix of them)."""
    for result, value, bound, name in zip(results, expected.values, expected.bounds, names):
        assert_within(result, value, bound, name)
