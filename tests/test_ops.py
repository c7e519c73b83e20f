"""Tests of the public op `ddf_jax.ddf` and of its XLA implementation.

`TestXla` runs the property suite of `tests/op_properties.py` (every result
against the float64 loop reference of `tests/reference.py`, within the
roundoff bound of `tests/roundoff.py`) for "xla" on the current backend. The
other implementations run the same suite in their own files. Below it: the
argument checks of the public op (the same for every implementation: they run
before one is chosen), and the tests of XLA alone.
"""

import functools
import itertools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import ddf_jax
from ddf_jax import kernels
from tests.op_properties import Case, OpProperties
from tests.reference import ddf_reference, plain_ddf
from tests.utils import random_ddf_inputs


def random_inputs(seed, n, h, w, c, k, stride=1, heads=None, dtype=np.float32):
    """Random x, channel_filter, spatial_filter (4-D when heads is None)."""
    return random_ddf_inputs(seed, n, h, w, c, k, stride, heads, dtype)[:3]


# Every k with every (stride, dilation); heads and combine cycle through their
# values so that each appears with every k. H, W, C are odd or not powers of two.
XLA_GRID = [
    Case(2, 11, 9, 12, k, s, d, heads, combine)
    for (k, (s, d)), (heads, combine) in zip(
        itertools.product((1, 3, 5, 7), itertools.product((1, 2, 3), (1, 2, 3))),
        itertools.cycle([(None, "mul"), (2, "add"), (4, "mul"), (1, "add"), (2, "mul"), (None, "add")]),
    )
]


# Cases and the methods (`spatial_filter_method`, `channel_filter_method`) the
# XLA backward picks for each. TestXla runs three of them in bfloat16 and float16.
XLA_SUMMATION_CASES = [
    (Case(2, 9, 7, 64, 3, 1, 1, None, "mul"), ("eights", "eights")),
    (Case(2, 9, 7, 128, 3, 1, 2, 2, "add"), ("eights", "eights")),  # 64 channels per head
    (Case(1, 6, 5, 128, 3, 1, 1, 1, "mul"), ("eights", "eights")),  # 16 chunks: two steps
    (Case(2, 11, 9, 32, 3, 2, 1, None, "add"), ("eights", "eights")),
    (Case(2, 10, 9, 40, 3, 3, 1, 5, "mul"), ("eights", "eights")),  # one chunk per head
    (Case(1, 37, 5, 16, 5, 1, 2, 2, "add"), ("scalar", "blocks")),  # a short last block
    (Case(1, 9, 8, 8, 7, 1, 1, None, "mul"), ("scalar", "scalar")),
]


class TestXla(OpProperties):
    IMPLEMENTATION = "xla"
    # Every fifth case of the grid: between them every k, stride, dilation, heads and combine.
    GRADIENT_CASES = XLA_GRID[::5] + [Case(2, 9, 7, 6, 3, 2, 2, 2), Case(2, 9, 7, 8, 5, 2)]
    FORWARD_CASES = [case for i, case in enumerate(XLA_GRID) if i % 5]
    LOW_PRECISION_CASES = [
        (dtypes, Case(2, 9, 7, 8, 3, 2, 1, 2)) for dtypes in ("bfloat16", "float16", "bfloat16_x_float32_filters")
    ] + [("bfloat16", Case(1, 9, 7, 12, 7, 1, 2, 4, "add"))] + [
        # The XLA backward's summation paths (below): "eights", and "scalar" with "blocks".
        (dtypes, XLA_SUMMATION_CASES[i][0]) for i in (0, 3, 5) for dtypes in ("bfloat16", "float16")
    ]
    FLOAT64_CASES = [
        Case(2, 7, 6, 4, k, s, d, heads, combine)
        for k, s, d, heads, combine in [
            (1, 1, 1, None, "mul"),
            (3, 1, 1, None, "mul"),
            (3, 2, 1, 2, "add"),
            (3, 3, 2, 4, "mul"),
            (5, 2, 2, 1, "mul"),
            (5, 1, 3, 2, "add"),
            (7, 2, 1, None, "add"),
            (7, 3, 2, 2, "mul"),
        ]
    ]
    VMAP_CASES = [Case(2, 8, 9, 4, 3, 1, 2)]
    PMAP_CASES = [Case(2, 7, 5, 4, 3)]
    DETERMINISM_CASES = [Case(2, 9, 7, 8, 5, 2)]
    EAGER_CASES = [Case(2, 10, 7, 6, 3, 2, 1, 3)]
    IDENTITY_CASES = [Case(2, 6, 5, 3, 3), Case(1, 7, 6, 4, 5, 2, 1, 2, "add")]
    EMPTY_CASES = [((0, 4, 4, 2), 1, jnp.float32), ((1, 0, 4, 2), 2, jnp.float32), ((0, 5, 3, 4), 2, jnp.bfloat16),
                   ((1, 5, 4, 0), 2, jnp.float32)]
    HYPOTHESIS_EXAMPLES = 15

    def get_op(self, tiles=None):
        assert tiles is None, "xla has no tiles"
        return kernels.get_op("xla", jax.default_backend())


# --- the public op: argument checks and dispatch ------------------------------------


def _good():
    return random_inputs(0, 2, 6, 6, 4, 3)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(kernel_size=4), ValueError, "kernel_size must be odd, got 4"),
        (dict(kernel_size=0), ValueError, "kernel_size must be >= 1, got 0"),
        (dict(kernel_size=-3), ValueError, "kernel_size must be >= 1, got -3"),
        (dict(kernel_size=3.0), TypeError, "kernel_size must be an int, got 3.0"),
        (dict(kernel_size=True), TypeError, "kernel_size must be an int"),
        (dict(kernel_size=3, stride=0), ValueError, "stride must be >= 1, got 0"),
        (dict(kernel_size=3, dilation=0), ValueError, "dilation must be >= 1, got 0"),
        (dict(kernel_size=3, combine="sum"), ValueError, r"combine must be one of \('mul', 'add'\), got 'sum'"),
        (
            dict(kernel_size=3, implementation="cuda"),
            ValueError,
            r"implementation must be one of \('xla', 'pallas_triton', 'jax_triton'\), None or an op, got 'cuda'",
        ),
        (dict(kernel_size=3, implementation=3), TypeError, "implementation must be one of .* got 3 of type int"),
    ],
)
def test_bad_static_arguments(kwargs, exc, match):
    x, cf, sf = _good()
    with pytest.raises(exc, match=match):
        ddf_jax.ddf(x, cf, sf, **kwargs)


def test_bad_shapes():
    x, cf, sf = _good()
    with pytest.raises(ValueError, match=r"x must be 4-D \(N, H, W, C\), got shape \(6, 6, 4\)"):
        ddf_jax.ddf(x[0], cf, sf, kernel_size=3)
    with pytest.raises(ValueError, match=r"channel_filter must have shape .* = \(2, 4, 9\), got \(2, 4, 8\)"):
        ddf_jax.ddf(x, cf[..., :8], sf, kernel_size=3)
    with pytest.raises(ValueError, match=r"spatial_filter must have shape .* = \(2, 3, 3, 9\), got \(2, 6, 6, 9\)"):
        ddf_jax.ddf(x, cf, sf, kernel_size=3, stride=2)
    with pytest.raises(ValueError, match=r"spatial_filter must be 4-D .* or 5-D .*, got shape \(2, 6, 6\)"):
        ddf_jax.ddf(x, cf, sf[..., 0], kernel_size=3)
    with pytest.raises(ValueError, match=r"heads \(spatial_filter.shape\[3\]\) must divide C=4, got 3"):
        ddf_jax.ddf(x, cf, jnp.ones((2, 6, 6, 3, 9)), kernel_size=3)


def test_integer_dtypes_rejected():
    x, cf, sf = _good()
    with pytest.raises(TypeError, match="x must have a floating dtype .* got int32"):
        ddf_jax.ddf(x.astype(jnp.int32), cf, sf, kernel_size=3)
    with pytest.raises(TypeError, match="channel_filter must have a floating dtype .* got int32"):
        ddf_jax.ddf(x, cf.astype(jnp.int32), sf, kernel_size=3)
    with pytest.raises(TypeError, match="spatial_filter must have a floating dtype .* got bool"):
        ddf_jax.ddf(x, cf, sf > 0, kernel_size=3)


def test_implementation_names_are_the_kernels_names():
    from ddf_jax import kernels

    assert ddf_jax.IMPLEMENTATIONS == kernels.IMPLEMENTATIONS == ("xla", "pallas_triton", "jax_triton")
    for name in ddf_jax.IMPLEMENTATIONS + (None,):
        assert ddf_jax.ops.check_implementation(name) == name


def test_an_op_as_implementation_gets_the_checked_canonical_arguments():
    """A callable `implementation` is called as op(x, channel_filter, spatial_filter 5-D, config)."""
    from ddf_jax.kernels import DDFConfig, get_op

    calls = []

    def xla_spy(x, channel_filter, spatial_filter, config):
        calls.append((x.shape, channel_filter.shape, spatial_filter.shape, config))
        return get_op("xla", "cpu")(x, channel_filter, spatial_filter, config)

    x, cf, sf = random_inputs(0, 2, 7, 5, 4, 3, stride=2)
    kwargs = dict(kernel_size=3, stride=2, dilation=2, combine="add")
    expected = ddf_jax.ddf(x, cf, sf, implementation="xla", **kwargs)
    chex.assert_trees_all_equal(ddf_jax.ddf(x, cf, sf, implementation=xla_spy, **kwargs), expected)
    jitted = jax.jit(lambda *a: ddf_jax.ddf(*a, implementation=xla_spy, **kwargs))
    chex.assert_trees_all_equal(jitted(x, cf, sf), expected)
    assert calls == [((2, 7, 5, 4), (2, 4, 9), (2, 4, 3, 1, 9), DDFConfig(3, 2, 2, "add"))] * 2


def test_default_implementation_is_xla_until_gpu_kernels_are_verified():
    assert ddf_jax.default_implementation("cpu") == "xla"
    # No GPU kernel has passed its tests on a real GPU yet (see BENCHMARKS.md).
    assert ddf_jax.default_implementation("gpu") == "xla"


# --- XLA only ---------------------------------------------------------------------


def _vjp_temporaries(n, h, w, c, k, stride=1, heads=None):
    """Temporary bytes of the jitted XLA vjp (output and gradients, a random cotangent), and x and sf.

    This is what the op benchmark's "temp / x" column measures. A cotangent of
    ones (the gradient of `.sum()`) is a constant, which XLA:CPU materialises
    padded in two forms and sliced once more, so it would measure constant folding, not the op.
    """
    x, cf, sf, g = random_ddf_inputs(0, n, h, w, c, k, stride, heads, np.float32)

    def vjp(x, cf, sf, g):
        return _value_and_vjp(lambda *a: ddf_jax.ddf(*a, kernel_size=k, stride=stride, implementation="xla"),
                              x, cf, sf, g)

    analysis = jax.jit(vjp).lower(x, cf, sf, g).compile().memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    return analysis.temp_size_in_bytes, x, sf


@pytest.mark.parametrize("shape", [(8, 56, 56, 64, 3, 1), (8, 56, 56, 64, 5, 1), (8, 28, 28, 128, 3, 2),
                                   (4, 15, 13, 48, 3, 2)])
def test_xla_vjp_temporaries_meet_the_goal(shape):
    """At the op benchmark's CPU shapes, the jitted vjp's temporaries are at most 4x the bytes of x."""
    temporaries, x, _ = _vjp_temporaries(*shape)
    assert temporaries <= 4 * x.nbytes, temporaries / x.nbytes


@pytest.mark.parametrize("c, k, heads", [
    # On both sides of where the op stores the filters (G*K against C) and keeps them as residuals.
    (32, 5, None), (64, 5, None), (50, 5, None), (49, 7, None), (9, 3, None), (12, 3, None), (32, 3, 2),
])
def test_xla_gradient_memory_stays_small(c, k, heads):
    """The jitted vjp never holds k*k shifted copies of x: its temporaries are at most 4x the bytes
    of x (the padded x and cotangent and the first partial sums) plus twice those of sf (the stored
    sf, and d_spatial_filter's taps before they are stacked), which at small C are as large as x."""
    temporaries, x, sf = _vjp_temporaries(2, 28, 28, c, k, heads=heads)
    assert temporaries <= 4 * x.nbytes + 2 * sf.nbytes, (temporaries / x.nbytes, sf.nbytes / x.nbytes)


@pytest.mark.parametrize("k", [3, 5])
def test_xla_reads_the_channel_filter_row_major(k):
    """On XLA:CPU, every (N, K, C) array of the compiled forward + vjp, the channel filter the passes
    over the taps read, is laid out row-major, so that cf[n, t] is contiguous and next to cf[n, t + 1]."""
    n, c = 2, 12

    def forward_and_vjp(x, cf, sf, g):
        return _value_and_vjp(lambda *a: ddf_jax.ddf(*a, kernel_size=k, implementation="xla"), x, cf, sf, g)

    with jax.default_device(jax.devices("cpu")[0]):
        x, cf, sf, g = random_ddf_inputs(2, n, 9, 11, c, k, 1)
        text = jax.jit(forward_and_vjp).lower(x, cf, sf, g).compile().as_text()
    layouts = re.findall(rf"f32\[{n},{k * k},{c}\]\{{([0-9,]+)\}}", text)
    assert layouts, "no (N, K, C) array in the compiled program"
    assert set(layouts) == {"2,1,0"}, layouts


# --- the XLA backward's ways of summing the filter gradients -------------------


def _value_and_vjp(f, x, cf, sf, g):
    """f(x, cf, sf) and its VJP with cotangent g."""
    out, vjp = jax.vjp(f, x, cf, sf)
    return out, vjp(g)


@pytest.mark.parametrize("case,methods", XLA_SUMMATION_CASES, ids=[case.id for case, _ in XLA_SUMMATION_CASES])
def test_xla_backward_summations_float64(case, methods):
    """Every way the XLA backward sums d_spatial_filter and d_channel_filter, checked element-wise
    against autodiff of a plain jnp formula and numerically, in float64."""
    from ddf_jax.kernels import xla

    k, s, d, combine = case.k, case.stride, case.dilation, case.combine
    with jax.enable_x64(True):
        x, cf, sf, g = random_ddf_inputs(case.n * case.h + case.c + k, case.n, case.h, case.w, case.c, k, s,
                                         case.heads, np.float64)
        picked = (
            xla.spatial_filter_method(g.shape, case.heads or 1, k * k, x.size),
            xla.channel_filter_method(g.shape, k * k, x.size),
        )
        assert picked == methods

        @jax.jit
        def f(x, cf, sf):
            return ddf_jax.ddf(x, cf, sf, kernel_size=k, stride=s, dilation=d, combine=combine, implementation="xla")

        out, grads = jax.jit(lambda *a: _value_and_vjp(f, *a))(x, cf, sf, g)
        chex.assert_trees_all_close(out, ddf_reference(x, cf, sf, k, s, d, combine), rtol=1e-12, atol=1e-12)
        reference = functools.partial(plain_ddf, k=k, s=s, d=d, combine=combine)
        _, expected = jax.jit(lambda *a: _value_and_vjp(reference, *a))(x, cf, sf, g)
        for got, want in zip(grads, expected):
            assert got.dtype == jnp.float64
            chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-12 * float(jnp.abs(want).max()))
        check_grads(f, (x, cf, sf), order=1, modes=["rev"], eps=1e-4, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("k,stride,c", [(3, 1, 64), (3, 2, 64), (5, 1, 64), (3, 1, 32)])
def test_xla_vjp_memory_stays_small(k, stride, c):
    """The jitted forward + VJP (random cotangent) keeps temporaries under 4x the bytes of x on every path."""
    x, cf, sf, g = random_ddf_inputs(1, 2, 28, 28, c, k, stride)

    def forward_and_vjp(x, cf, sf, g):
        def f(*a):
            return ddf_jax.ddf(*a, kernel_size=k, stride=stride, implementation="xla")

        return _value_and_vjp(f, x, cf, sf, g)

    analysis = jax.jit(forward_and_vjp).lower(x, cf, sf, g).compile().memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    assert analysis.temp_size_in_bytes <= 4 * x.nbytes, analysis.temp_size_in_bytes / x.nbytes
