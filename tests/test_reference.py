"""The float64 loop reference that every implementation is tested against, tested itself.

The loop reference of `tests/reference.py` is compared with its second,
independent formulation `plain_ddf` (pad, take each tap's strided window, sum)
and that formula's autodiff gradients, in float64. The roundoff bounds of
`tests/roundoff.py` are checked to hold for a float32 evaluation of the same
formula and to fail a bfloat16 accumulation.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import roundoff
from tests.reference import ddf_reference, ddf_reference_vjp, plain_ddf
from tests.utils import random_ddf_inputs


CASES = [
    # (n, h, w, c, k, stride, dilation, heads, combine)
    (2, 9, 7, 6, 3, 2, 2, 2, "mul"),
    (1, 8, 9, 4, 5, 1, 1, 1, "add"),
    (1, 11, 9, 12, 7, 3, 2, 4, "mul"),
    (2, 5, 6, 3, 1, 2, 1, 3, "add"),
]


@pytest.mark.parametrize("n,h,w,c,k,s,d,heads,combine", CASES)
def test_reference_and_its_vjp_equal_autodiff_of_a_plain_formula(n, h, w, c, k, s, d, heads, combine):
    with jax.enable_x64(True):
        x, cf, sf, g = random_ddf_inputs(k + s, n, h, w, c, k, s, heads, np.float64)

        @jax.jit  # one compile instead of one per eager primitive of the k*k taps
        def value_and_vjp(x, cf, sf, g):
            out, vjp = jax.vjp(lambda *a: plain_ddf(*a, k, s, d, combine), x, cf, sf)
            return out, vjp(g)

        out, grads = value_and_vjp(x, cf, sf, g)
        chex.assert_trees_all_close(ddf_reference(x, cf, sf, k, s, d, combine), out, rtol=1e-12, atol=1e-12)
        chex.assert_trees_all_close(ddf_reference_vjp(x, cf, sf, g, k, s, d, combine), grads, rtol=1e-12,
                                    atol=1e-12)


def test_reference_accepts_a_4d_spatial_filter():
    x, cf, sf, g = (np.asarray(a, np.float64) for a in random_ddf_inputs(3, 1, 6, 5, 4, 3, 2, None))
    sf5 = sf[:, :, :, None, :]
    np.testing.assert_array_equal(ddf_reference(x, cf, sf, 3, 2), ddf_reference(x, cf, sf5, 3, 2))
    dx, dcf, dsf = ddf_reference_vjp(x, cf, sf, g, 3, 2)
    assert dsf.shape == sf.shape
    chex.assert_trees_all_equal((dx, dcf, dsf[:, :, :, None, :]), ddf_reference_vjp(x, cf, sf5, g, 3, 2))


@pytest.mark.parametrize("k", [3, 7])
def test_bounds_hold_for_float32_and_fail_bfloat16_accumulation(k):
    """The plain formula in bfloat16 with float32 accumulation passes the bounds; accumulating in bfloat16 fails."""
    x, cf, sf, _ = (a.astype(jnp.bfloat16) for a in random_ddf_inputs(k, 2, 9, 7, 8, k, 1, 2))
    exact, bound = roundoff.expected_forward(x, cf, sf, k, 1, 1, "mul")
    good = plain_ddf(*(a.astype(jnp.float32) for a in (x, cf, sf)), k, 1, 1, "mul").astype(jnp.bfloat16)
    roundoff.assert_within(good, exact, bound, "out")
    bad = plain_ddf(x, cf, sf, k, 1, 1, "mul", accumulate=jnp.bfloat16)
    with pytest.raises(AssertionError, match="outside the roundoff bound"):
        roundoff.assert_within(bad, exact, bound, "out")
