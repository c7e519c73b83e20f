"""Tests of the public op `ddf_jax.ddf` and its XLA implementation.

The XLA implementation is checked against the loop reference in
`tests/reference.py`, which shares no code with the library, and its
hand-written backward is checked numerically in float64 with
`jax.test_util.check_grads`. Other implementations are tested against "xla"
in their own files.
"""

import functools
import itertools

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import ddf_jax
from tests.reference import ddf_reference
from tests.utils import random_ddf_inputs


def random_inputs(seed, n, h, w, c, k, stride=1, heads=None, dtype=np.float32):
    """Random x, channel_filter, spatial_filter (4-D when heads is None)."""
    return random_ddf_inputs(seed, n, h, w, c, k, stride, heads, dtype)[:3]


# Every k with every (stride, dilation); heads and combine cycle through their
# values so that each appears with every k. H, W, C are odd or not powers of two.
FORWARD_GRID = [
    (k, s, d, heads, combine)
    for (k, (s, d)), (heads, combine) in zip(
        itertools.product((1, 3, 5, 7), itertools.product((1, 2, 3), (1, 2, 3))),
        itertools.cycle([(None, "mul"), (2, "add"), (4, "mul"), (1, "add"), (2, "mul"), (None, "add")]),
    )
]


@pytest.mark.parametrize("k,stride,dilation,heads,combine", FORWARD_GRID)
def test_forward_matches_loop_reference(k, stride, dilation, heads, combine):
    n, h, w, c = 2, 11, 9, 12
    x, cf, sf = random_inputs(k * 100 + stride * 10 + dilation, n, h, w, c, k, stride, heads)
    out = ddf_jax.ddf(x, cf, sf, kernel_size=k, stride=stride, dilation=dilation, combine=combine)
    expected = ddf_reference(x, cf, sf, k, stride, dilation, combine)
    assert out.shape == (n, -(-h // stride), -(-w // stride), c)
    assert out.dtype == jnp.float32
    chex.assert_trees_all_close(out, expected.astype(np.float32), rtol=1e-5, atol=1e-5)


GRAD_GRID = [
    (1, 1, 1, None, "mul"),
    (3, 1, 1, None, "mul"),
    (3, 2, 1, 2, "add"),
    (3, 3, 2, 4, "mul"),
    (5, 2, 2, 1, "mul"),
    (5, 1, 3, 2, "add"),
    (7, 2, 1, None, "add"),
    (7, 3, 2, 2, "mul"),
]


@pytest.mark.parametrize("k,stride,dilation,heads,combine", GRAD_GRID)
def test_gradients_float64(k, stride, dilation, heads, combine):
    with jax.enable_x64(True):
        x, cf, sf = random_inputs(7 + k + stride, 2, 7, 6, 4, k, stride, heads, np.float64)

        def f(x, cf, sf):
            return ddf_jax.ddf(x, cf, sf, kernel_size=k, stride=stride, dilation=dilation, combine=combine)

        out = f(x, cf, sf)
        assert out.dtype == jnp.float64
        chex.assert_trees_all_close(out, ddf_reference(x, cf, sf, k, stride, dilation, combine), rtol=1e-12)
        check_grads(f, (x, cf, sf), order=1, modes=["rev"], eps=1e-4, atol=1e-6, rtol=1e-6)


def test_vjp_matches_autodiff_of_reference_formula():
    """The hand-written backward equals autodiff of a plain jnp formula of the op."""
    k, s, d, heads = 3, 2, 2, 2
    x, cf, sf = random_inputs(3, 2, 9, 7, 6, k, s, heads)

    def plain(x, cf, sf):
        # Straightforward jnp version: pad, gather each tap, sum. Independent of kernels/xla.py.
        r = (k - 1) // 2
        ho, wo = sf.shape[1], sf.shape[2]
        xp = jnp.pad(x, ((0, 0), (r * d, r * d + s), (r * d, r * d + s), (0, 0)))
        sf_c = jnp.repeat(sf, x.shape[-1] // heads, axis=3)  # (N, Ho, Wo, C, K)
        out = 0.0
        for ky in range(k):
            for kx in range(k):
                t = ky * k + kx
                win = xp[:, ky * d : ky * d + ho * s : s, kx * d : kx * d + wo * s : s, :]
                out = out + win * sf_c[..., t] * cf[:, None, None, :, t]
        return out

    g = jax.random.normal(jax.random.key(1), (2, 5, 4, 6))
    _, vjp = jax.vjp(lambda *a: ddf_jax.ddf(*a, kernel_size=k, stride=s, dilation=d), x, cf, sf)
    _, vjp_plain = jax.vjp(plain, x, cf, sf)
    chex.assert_trees_all_close(vjp(g), vjp_plain(g), rtol=1e-4, atol=1e-4)


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_forward_and_grad(self):
        x, cf, sf = random_inputs(11, 2, 10, 7, 6, 3, 2, 3)

        @self.variant
        def loss_and_grads(x, cf, sf):
            def loss(x, cf, sf):
                return jnp.sum(ddf_jax.ddf(x, cf, sf, kernel_size=3, stride=2) ** 2)

            return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, cf, sf)

        value, grads = loss_and_grads(x, cf, sf)
        expected = ddf_reference(x, cf, sf, 3, 2)
        np.testing.assert_allclose(value, np.sum(expected**2), rtol=1e-5)
        chex.assert_trees_all_equal_shapes(grads, (x, cf, sf))
        chex.assert_tree_all_finite(grads)


def test_vmap_equals_loop():
    x, cf, sf = random_inputs(5, 6, 8, 9, 4, 3, 1)  # batch of 6, vmapped as 3 x 2
    batched = [a.reshape(3, 2, *a.shape[1:]) for a in (x, cf, sf)]

    def f(x, cf, sf):
        return ddf_jax.ddf(x, cf, sf, kernel_size=3, dilation=2)

    out = jax.vmap(f)(*batched)
    looped = jnp.stack([f(*(b[i] for b in batched)) for i in range(3)])
    chex.assert_trees_all_close(out, looped, rtol=1e-6, atol=1e-6)
    grads = jax.vmap(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)))(*batched)
    looped_grads = [jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))(*(b[i] for b in batched)) for i in range(3)]
    for j in range(3):
        chex.assert_trees_all_close(grads[j], jnp.stack([lg[j] for lg in looped_grads]), rtol=1e-5, atol=1e-5)


def test_pmap_matches_single_device():
    devices = jax.local_devices()
    assert len(devices) >= 2, "conftest forces 4 CPU devices"
    nd = 2
    x, cf, sf = random_inputs(9, 2 * nd, 7, 5, 4, 3)

    def f(x, cf, sf):
        return ddf_jax.ddf(x, cf, sf, kernel_size=3)

    split = [a.reshape(nd, 2, *a.shape[1:]) for a in (x, cf, sf)]
    out = jax.pmap(f, devices=devices[:nd])(*split).reshape(2 * nd, 7, 5, 4)
    chex.assert_trees_all_close(out, f(x, cf, sf), rtol=1e-6, atol=1e-6)
    grads = jax.pmap(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)), devices=devices[:nd])(*split)
    single = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))(x, cf, sf)
    for got, want in zip(grads, single):
        chex.assert_trees_all_close(got.reshape(want.shape), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 3e-2), (jnp.float16, 3e-3)])
def test_low_precision(dtype, tol):
    x, cf, sf = random_inputs(13, 2, 9, 7, 8, 3, 2, 2)
    low = [a.astype(dtype) for a in (x, cf, sf)]
    out = ddf_jax.ddf(*low, kernel_size=3, stride=2)
    assert out.dtype == dtype
    # Reference from the same rounded inputs: only accumulation/output rounding differs.
    expected = ddf_reference(*(np.asarray(a.astype(jnp.float32)) for a in low), 3, 2)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), expected, atol=tol * scale)
    grads = jax.grad(lambda *a: ddf_jax.ddf(*a, kernel_size=3, stride=2).astype(jnp.float32).sum(), (0, 1, 2))(*low)
    grads32 = jax.grad(lambda *a: ddf_jax.ddf(*a, kernel_size=3, stride=2).sum(), (0, 1, 2))(
        *(a.astype(jnp.float32) for a in low)
    )
    for got, want, inp in zip(grads, grads32, low):
        assert got.dtype == dtype
        np.testing.assert_allclose(
            np.asarray(got.astype(jnp.float32)), np.asarray(want), atol=tol * float(jnp.abs(want).max())
        )


def test_deterministic():
    x, cf, sf = random_inputs(17, 2, 9, 7, 8, 5, 2)
    f = jax.jit(jax.grad(lambda *a: ddf_jax.ddf(*a, kernel_size=5, stride=2).sum(), (0, 1, 2)))
    chex.assert_trees_all_equal(f(x, cf, sf), f(x, cf, sf))


def test_identity_filters_copy_the_input():
    x, _, _ = random_inputs(19, 2, 6, 5, 3, 3)
    centre = jnp.zeros(9).at[4].set(1.0)
    cf = jnp.broadcast_to(centre, (2, 3, 9))
    sf = jnp.ones((2, 6, 5, 9))
    chex.assert_trees_all_close(ddf_jax.ddf(x, cf, sf, kernel_size=3), x)


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(
    k=st.sampled_from([1, 3, 5]),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 3),
    heads=st.sampled_from([1, 2, 3]),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    group=st.integers(1, 3),
    combine=st.sampled_from(["mul", "add"]),
    seed=st.integers(0, 2**16),
)
def test_property_random_configurations(k, stride, dilation, heads, h, w, group, combine, seed):
    c = heads * group
    x, cf, sf = random_inputs(seed, 1, h, w, c, k, stride, heads)
    out = ddf_jax.ddf(x, cf, sf, kernel_size=k, stride=stride, dilation=dilation, combine=combine)
    expected = ddf_reference(x, cf, sf, k, stride, dilation, combine)
    chex.assert_trees_all_close(out, expected.astype(np.float32), rtol=1e-5, atol=1e-5)


# --- bad input -------------------------------------------------------------


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


def test_xla_gradient_memory_stays_small():
    """The jitted gradient never holds k*k shifted copies of x."""
    x, cf, sf = random_inputs(0, 2, 28, 28, 32, 5)
    grad = jax.jit(jax.grad(lambda *a: ddf_jax.ddf(*a, kernel_size=5, implementation="xla").sum(), (0, 1, 2)))
    analysis = grad.lower(x, cf, sf).compile().memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    assert analysis.temp_size_in_bytes <= 4 * x.nbytes, analysis.temp_size_in_bytes / x.nbytes


# --- empty inputs, every implementation that runs here -------------------------


def _runnable_implementations():
    """The implementations whose op `ddf_jax.ddf` can run on this backend."""
    from ddf_jax.kernels import ImplementationUnavailable, get_op

    runnable = []
    for name in ddf_jax.IMPLEMENTATIONS:
        try:
            get_op(name, jax.default_backend())
        except ImplementationUnavailable:
            continue
        runnable.append(name)
    return runnable


@pytest.mark.parametrize(
    "shape,stride,dtype",
    [((0, 4, 4, 2), 1, jnp.float32), ((1, 0, 4, 2), 2, jnp.float32), ((0, 5, 3, 4), 2, jnp.bfloat16)],
)
def test_empty_inputs_give_zeros_for_every_implementation(shape, stride, dtype):
    """N = 0 or H = 0: zeros of the right shape and dtype, and zero gradients, without a kernel launch."""
    implementations = _runnable_implementations()
    assert "xla" in implementations and "pallas_triton" in implementations
    n, h, w, c = shape
    x, cf, sf = random_inputs(0, n, h, w, c, 3, stride, 2, dtype)
    out_shape = (n, -(-h // stride), -(-w // stride), c)
    for implementation in implementations:

        def f(x, cf, sf):
            return ddf_jax.ddf(x, cf, sf, kernel_size=3, stride=stride, implementation=implementation)

        out = f(x, cf, sf)
        chex.assert_trees_all_equal_shapes_and_dtypes(out, jnp.zeros(out_shape, dtype))
        grads = jax.jit(jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2)))(x, cf, sf)
        chex.assert_trees_all_equal_shapes_and_dtypes(grads, (x, cf, sf))
        # cf has elements when H = 0: its gradient is an empty sum, exactly zero.
        chex.assert_trees_all_equal(grads, tuple(jnp.zeros_like(a) for a in (x, cf, sf)))


# --- the XLA backward's ways of summing the filter gradients -------------------


def _autodiff_reference(x, cf, sf, *, k, stride, dilation, combine):
    """The op as plain jnp (pad, one strided window per tap, sum), for jax.vjp. Independent of kernels/."""
    if sf.ndim == 4:
        sf = sf[:, :, :, None, :]
    n, h, w, c = x.shape
    _, ho, wo, heads, _ = sf.shape
    r = (k - 1) // 2
    pad = r * dilation
    xp = jnp.pad(x, ((0, 0), (pad, pad + stride), (pad, pad + stride), (0, 0)))
    sf_c = jnp.repeat(sf, c // heads, axis=3)  # (N, Ho, Wo, C, K)
    out = 0.0
    for ky in range(k):
        for kx in range(k):
            t = ky * k + kx
            y0, x0 = ky * dilation, kx * dilation
            window = xp[:, y0 : y0 + ho * stride : stride, x0 : x0 + wo * stride : stride, :]
            spatial, channel = sf_c[..., t], cf[:, None, None, :, t]
            out = out + window * (spatial * channel if combine == "mul" else spatial + channel)
    return out


def _value_and_vjp(f, x, cf, sf, g):
    """f(x, cf, sf) and its VJP with cotangent g."""
    out, vjp = jax.vjp(f, x, cf, sf)
    return out, vjp(g)


# (N, H, W, C, k, stride, dilation, heads, combine) and the methods
# (`spatial_filter_method`, `channel_filter_method`) the XLA backward picks for it.
XLA_SUMMATION_GRID = [
    ((2, 9, 7, 64, 3, 1, 1, None, "mul"), ("eights", "eights")),
    ((2, 9, 7, 128, 3, 1, 2, 2, "add"), ("eights", "eights")),  # 64 channels per head
    ((1, 6, 5, 128, 3, 1, 1, 1, "mul"), ("eights", "eights")),  # 16 chunks: two steps
    ((2, 11, 9, 32, 3, 2, 1, None, "add"), ("eights", "eights")),
    ((2, 10, 9, 40, 3, 3, 1, 5, "mul"), ("eights", "eights")),  # one chunk per head
    ((1, 37, 5, 16, 5, 1, 2, 2, "add"), ("scalar", "blocks")),  # a short last block
    ((1, 9, 8, 8, 7, 1, 1, None, "mul"), ("scalar", "scalar")),
]


@pytest.mark.parametrize("shape,methods", XLA_SUMMATION_GRID)
def test_xla_backward_summations_float64(shape, methods):
    """Every way the XLA backward sums d_spatial_filter and d_channel_filter, checked element-wise
    against autodiff of a plain jnp formula and numerically, in float64."""
    from ddf_jax.kernels import xla

    n, h, w, c, k, s, d, heads, combine = shape
    with jax.enable_x64(True):
        x, cf, sf, g = random_ddf_inputs(n * h + c + k, n, h, w, c, k, s, heads, np.float64)
        picked = (
            xla.spatial_filter_method(g.shape, heads or 1, k * k, x.size),
            xla.channel_filter_method(g.shape, k * k, x.size),
        )
        assert picked == methods

        @jax.jit
        def f(x, cf, sf):
            return ddf_jax.ddf(x, cf, sf, kernel_size=k, stride=s, dilation=d, combine=combine, implementation="xla")

        out, grads = jax.jit(lambda *a: _value_and_vjp(f, *a))(x, cf, sf, g)
        chex.assert_trees_all_close(out, ddf_reference(x, cf, sf, k, s, d, combine), rtol=1e-12, atol=1e-12)
        reference = functools.partial(_autodiff_reference, k=k, stride=s, dilation=d, combine=combine)
        _, expected = jax.jit(lambda *a: _value_and_vjp(reference, *a))(x, cf, sf, g)
        for got, want in zip(grads, expected):
            assert got.dtype == jnp.float64
            chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-12 * float(jnp.abs(want).max()))
        check_grads(f, (x, cf, sf), order=1, modes=["rev"], eps=1e-4, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape,methods", [XLA_SUMMATION_GRID[0], XLA_SUMMATION_GRID[3], XLA_SUMMATION_GRID[5]])
def test_xla_backward_low_precision_within_one_rounding(dtype, shape, methods):
    """16-bit inputs: each gradient is the float64 gradient of the same (rounded) inputs, rounded once.

    Accumulation is float32, so the error is one rounding to the 16-bit type
    (at most one unit roundoff, relative) plus float32 rounding of the sums.
    """
    del methods  # the paths are asserted in the float64 test
    n, h, w, c, k, s, d, heads, combine = shape
    x, cf, sf, g = (a.astype(dtype) for a in random_ddf_inputs(c + k, n, h, w, c, k, s, heads))

    def f(x, cf, sf):
        return ddf_jax.ddf(x, cf, sf, kernel_size=k, stride=s, dilation=d, combine=combine, implementation="xla")

    _, grads = jax.jit(lambda *a: _value_and_vjp(f, *a))(x, cf, sf, g)
    with jax.enable_x64(True):
        wide = [jnp.asarray(np.asarray(a.astype(jnp.float32)), jnp.float64) for a in (x, cf, sf, g)]
        reference = functools.partial(_autodiff_reference, k=k, stride=s, dilation=d, combine=combine)
        _, expected = jax.jit(lambda *a: _value_and_vjp(reference, *a))(*wide)
        expected = [np.asarray(e) for e in expected]
    unit_roundoff = float(jnp.finfo(dtype).eps) / 2
    for got, want in zip(grads, expected):
        assert got.dtype == dtype
        got = np.asarray(got.astype(jnp.float32), np.float64)
        # One rounding of the result, plus float32 sums of up to k*k*H*W terms of size max|want|.
        bound = unit_roundoff * np.abs(want) + 1e-5 * np.abs(want).max()
        assert np.all(np.abs(got - want) <= bound), float(np.max(np.abs(got - want) / (bound + 1e-300)))


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
