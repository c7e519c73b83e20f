"""Tests of the Pallas-Triton DDF kernels.

On a CPU machine the kernels run in Pallas interpret mode; on a GPU the same
tests compile them with Triton. Every case is compared with the "xla"
implementation (forward, and `jax.vjp` for the three gradients) and with the
independent float64 loop reference in `tests/reference.py`: the forward
directly, the gradients through identities that hold because the op is linear
in x and in each filter.

Interpret mode costs almost only XLA compile time of the unrolled taps, so the
grid is a chosen subset, test functions are compiled once with XLA's backend
optimisation turned down (`FAST_COMPILE`), and the larger-k gradient cases
are marked `slow`.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import ddf_jax
from ddf_jax.kernels import DDFConfig, ImplementationUnavailable, pallas_triton
from ddf_jax.kernels.common import LaunchConfig
from experiments.sm90_compile import TRITON_TARGET, cuda_export_error, export_for_cuda
from tests.reference import ddf_reference
from tests.utils import random_ddf_inputs as random_inputs

IMPL = "pallas_triton"

# XLA CPU options for compiling interpret-mode kernels: about halves the
# compile time; the interpreted code runs for milliseconds either way.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# Small tiles, so that every kernel runs several pixel tiles and several
# channel tiles (the backward kernel loops over >= 2 channel tiles per head),
# with partial tiles at the edges, even on these tiny shapes.
SMALL_BLOCKS = pallas_triton.BlockSizes(forward=LaunchConfig(32, 8), backward=LaunchConfig(16, 4))

# (n, h, w, c, k, stride, dilation, heads, combine). H, W, C are odd or not
# powers of two, so no tile divides evenly; heads None means a 4-D filter.
CASES = [
    (2, 11, 9, 12, 1, 2, 1, 4, "add"),
    (2, 11, 9, 12, 3, 1, 1, None, "mul"),
    (1, 11, 9, 12, 3, 2, 2, 2, "add"),
    (1, 9, 11, 20, 3, 3, 3, 4, "mul"),
    (1, 11, 9, 20, 5, 2, 1, 2, "mul"),
    (1, 9, 7, 16, 3, 1, 1, 2, "mul"),  # 8 channels per head: one head per forward channel tile
]
# Larger k compiles slowly in interpret mode: forward only in the fast set.
FORWARD_ONLY_CASES = [
    (1, 11, 9, 12, 5, 1, 2, None, "add"),
    (1, 11, 9, 20, 7, 2, 3, 2, "mul"),
]
SLOW_CASES = [
    (1, 11, 9, 12, 5, 1, 2, None, "add"),
    (1, 11, 9, 20, 7, 3, 1, 4, "mul"),
    (1, 11, 9, 12, 7, 1, 2, None, "add"),
    (1, 13, 10, 20, 9, 2, 1, 2, "mul"),
]


def case_id(case):
    return "n{}_{}x{}x{}_k{}_s{}_d{}_g{}_{}".format(*case)


def interpreting() -> bool:
    """Whether `ddf(..., implementation="pallas_triton")` interprets here."""
    return jax.default_backend() not in pallas_triton.GPU_PLATFORMS


def compile_for_test(f, *args):
    """`jax.jit(f)` compiled for args, with `FAST_COMPILE` when interpreting."""
    lowered = jax.jit(f).lower(*args)
    return lowered.compile(FAST_COMPILE if interpreting() else None)


def pallas_op(k, stride, dilation, combine, block_sizes=None):
    """op(x, cf, sf) with 4- or 5-D sf: `ddf_jax.ddf`, or the op with fixed tiles."""
    if block_sizes is None:
        return functools.partial(
            ddf_jax.ddf,
            kernel_size=k,
            stride=stride,
            dilation=dilation,
            combine=combine,
            implementation=IMPL,
        )
    op = pallas_triton.get_op(jax.default_backend(), block_sizes)
    config = DDFConfig(k, stride, dilation, combine)

    def fixed_tiles_op(x, cf, sf):
        n, ho, wo = sf.shape[:3]
        return op(x, cf, sf.reshape(n, ho, wo, -1, k * k), config)

    return fixed_tiles_op


def vjp_function(op):
    """f(x, cf, sf, g) -> (op(x, cf, sf), (dx, dcf, dsf)) through `jax.vjp`."""

    def f(x, cf, sf, g):
        out, vjp = jax.vjp(op, x, cf, sf)
        return out, vjp(g)

    return f


def compiled_pallas_vjp(case, dtype=np.float32, block_sizes=SMALL_BLOCKS):
    """The compiled `vjp_function` of the Pallas op for a case's shapes (cached)."""
    return _compiled_pallas_vjp(case, np.dtype(dtype), block_sizes)


@functools.lru_cache(maxsize=None)
def _compiled_pallas_vjp(case, dtype, block_sizes):
    n, h, w, c, k, s, d, heads, combine = case
    args = random_inputs(0, n, h, w, c, k, s, heads, dtype)
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    return compile_for_test(vjp_function(pallas_op(k, s, d, combine, block_sizes)), *specs)


@functools.lru_cache(maxsize=None)
def xla_vjp(k, stride, dilation, combine):
    op = functools.partial(
        ddf_jax.ddf, kernel_size=k, stride=stride, dilation=dilation, combine=combine, implementation="xla"
    )
    return jax.jit(vjp_function(op))


def assert_grads_match_reference(x, cf, sf, g, grads, k, stride, dilation, combine, rtol):
    """Checks the gradients against the loop reference through linearity.

    <g, ddf(x)> = <dx, x> always. For "mul", the op is linear in each filter, so
    <g, out> = <dcf, cf> = <dsf, sf>. For "add", out = A(x, sf) + B(x, cf) with
    A = ddf(x, cf=0, sf) and B = ddf(x, cf, sf=0), so <dsf, sf> = <g, A> and
    <dcf, cf> = <g, B>.
    """
    x64, cf64, sf64, g64 = (np.asarray(a, np.float64) for a in (x, cf, sf, g))
    dx, dcf, dsf = (np.asarray(a, np.float64) for a in grads)

    def inner(out):
        return float(np.sum(out * g64))

    def ref(cf_, sf_):
        return ddf_reference(x64, cf_, sf_, k, stride, dilation, combine)

    full = inner(ref(cf64, sf64))
    if combine == "mul":
        expected = {"dx": full, "dcf": full, "dsf": full}
    else:
        expected = {
            "dx": full,
            "dsf": inner(ref(np.zeros_like(cf64), sf64)),
            "dcf": inner(ref(cf64, np.zeros_like(sf64))),
        }
    actual = {
        "dx": float(np.sum(dx * x64)),
        "dcf": float(np.sum(dcf * cf64)),
        "dsf": float(np.sum(dsf * sf64)),
    }
    # The sum of the absolute terms bounds the rounding error of each side.
    scale = float(np.sum(np.abs(g64))) * max(1.0, float(np.max(np.abs(x64)))) * k * k
    for name in actual:
        np.testing.assert_allclose(actual[name], expected[name], rtol=0, atol=rtol * scale, err_msg=name)


def check_against_xla_and_reference(case, seed, block_sizes):
    n, h, w, c, k, s, d, heads, combine = case
    x, cf, sf, g = random_inputs(seed, n, h, w, c, k, s, heads)
    out, grads = compiled_pallas_vjp(case, block_sizes=block_sizes)(x, cf, sf, g)
    out_xla, grads_xla = xla_vjp(k, s, d, combine)(x, cf, sf, g)

    assert out.shape == (n, -(-h // s), -(-w // s), c) and out.dtype == jnp.float32
    chex.assert_trees_all_close(out, out_xla, rtol=1e-5, atol=1e-5)
    expected = ddf_reference(x, cf, sf, k, s, d, combine).astype(np.float32)
    chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)

    chex.assert_trees_all_equal_shapes_and_dtypes(grads, (x, cf, sf))
    chex.assert_trees_all_close(grads, grads_xla, rtol=1e-5, atol=1e-4)
    assert_grads_match_reference(x, cf, sf, g, grads, k, s, d, combine, rtol=1e-6)


# --------------------------------------------------------------------------
# Interpret mode on CPU (compiled kernels when run on a GPU).
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_gradients_match_xla_and_reference(case):
    check_against_xla_and_reference(case, seed=1 + CASES.index(case), block_sizes=SMALL_BLOCKS)


@pytest.mark.parametrize("case", FORWARD_ONLY_CASES, ids=case_id)
def test_large_kernel_forward_matches_xla_and_reference(case):
    n, h, w, c, k, s, d, heads, combine = case
    x, cf, sf, _ = random_inputs(10 + FORWARD_ONLY_CASES.index(case), n, h, w, c, k, s, heads)
    out = compile_for_test(pallas_op(k, s, d, combine, SMALL_BLOCKS), x, cf, sf)(x, cf, sf)
    out_xla = ddf_jax.ddf(
        x, cf, sf, kernel_size=k, stride=s, dilation=d, combine=combine, implementation="xla"
    )
    chex.assert_trees_all_close(out, out_xla, rtol=1e-5, atol=1e-5)
    expected = ddf_reference(x, cf, sf, k, s, d, combine).astype(np.float32)
    chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=case_id)
def test_large_kernel_forward_and_gradients(case):
    # Default (K-dependent) tiles, through ddf_jax.ddf.
    check_against_xla_and_reference(case, seed=20 + SLOW_CASES.index(case), block_sizes=None)


@pytest.mark.parametrize(
    "dtype,k,stride,dilation,heads,combine",
    [(jnp.bfloat16, 3, 2, 1, 2, "mul"), (jnp.float16, 3, 1, 2, None, "add")],
)
def test_low_precision_matches_xla(dtype, k, stride, dilation, heads, combine):
    # Default tiles, through ddf_jax.ddf.
    case = (2, 11, 9, 20, k, stride, dilation, heads, combine)
    x, cf, sf, g = random_inputs(3, *case[:4], k, stride, heads, dtype)
    out, grads = compiled_pallas_vjp(case, dtype, block_sizes=None)(x, cf, sf, g)
    assert out.dtype == dtype
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, (x, cf, sf))
    # xla on the same rounded inputs also accumulates in float32: the two may
    # differ by the final rounding to 8 (bf16) or 11 (f16) significant bits.
    out_xla, grads_xla = xla_vjp(k, stride, dilation, combine)(x, cf, sf, g)
    tol = 1e-2 if dtype == jnp.bfloat16 else 2e-3
    for actual, expected in zip((out, *grads), (out_xla, *grads_xla)):
        expected = np.asarray(expected, np.float32)
        atol = tol * float(np.max(np.abs(expected)))
        chex.assert_trees_all_close(np.asarray(actual, np.float32), expected, rtol=tol, atol=atol)
    # And the forward against the float64 reference on the same inputs.
    expected = ddf_reference(x, cf, sf, k, stride, dilation, combine)
    atol = 2 * tol * float(np.max(np.abs(expected)))
    chex.assert_trees_all_close(np.asarray(out, np.float64), expected, rtol=2 * tol, atol=atol)


def test_vmap_forward_and_grad():
    # x and the spatial filter batched, the channel filter shared.
    batch, n, h, w, c, k, s, heads = 3, 1, 9, 7, 12, 3, 2, 2
    xs, sfs = [], []
    for i in range(batch):
        x, cf, sf, _ = random_inputs(30 + i, n, h, w, c, k, s, heads)
        xs.append(x)
        sfs.append(sf)
    x, sf = jnp.stack(xs), jnp.stack(sfs)

    def loss(implementation, x, sf):
        op = functools.partial(ddf_jax.ddf, kernel_size=k, stride=s, implementation=implementation)
        out = jax.vmap(op, in_axes=(0, None, 0))(x, cf, sf)
        return jnp.sum(jnp.sin(out)), out

    value_and_grad = functools.partial(jax.value_and_grad, argnums=(0, 1), has_aux=True)
    pallas_loss = value_and_grad(functools.partial(loss, IMPL))
    (_, out), grads = compile_for_test(pallas_loss, x, sf)(x, sf)
    (_, out_xla), grads_xla = jax.jit(value_and_grad(functools.partial(loss, "xla")))(x, sf)
    chex.assert_trees_all_close(out, out_xla, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(grads, grads_xla, rtol=1e-5, atol=1e-4)


def test_pmap_matches_xla():
    devices = jax.local_device_count()
    n, h, w, c, k = 1, 7, 6, 12, 3
    inputs = [random_inputs(40 + i, n, h, w, c, k, 1, 2) for i in range(devices)]
    x, cf, sf = (jnp.stack([inp[j] for inp in inputs]) for j in range(3))
    op = functools.partial(ddf_jax.ddf, kernel_size=k, dilation=2, combine="add")
    out = jax.pmap(functools.partial(op, implementation=IMPL))(x, cf, sf)
    out_xla = jax.vmap(functools.partial(op, implementation="xla"))(x, cf, sf)
    chex.assert_trees_all_close(out, out_xla, rtol=1e-5, atol=1e-5)


def test_deterministic():
    # The same compiled function as the grid case, run twice on new inputs.
    case = CASES[2]
    n, h, w, c, k, s, d, heads, combine = case
    x, cf, sf, g = random_inputs(50, n, h, w, c, k, s, heads)
    f = compiled_pallas_vjp(case)
    first = jax.tree.map(np.asarray, f(x, cf, sf, g))
    second = jax.tree.map(np.asarray, f(x, cf, sf, g))
    chex.assert_trees_all_equal(first, second)


def test_float64_check_grads():
    with jax.enable_x64(True):
        x, cf, sf, _ = random_inputs(60, 1, 5, 4, 4, 3, 2, 2, np.float64)
        # Eager: the op's own jitted forward and backward compile once each.
        op = functools.partial(ddf_jax.ddf, kernel_size=3, stride=2, combine="mul", implementation=IMPL)
        out = op(x, cf, sf)
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(out, ddf_reference(x, cf, sf, 3, 2), rtol=1e-12, atol=1e-12)
        check_grads(op, (x, cf, sf), order=1, modes=["rev"])


def test_get_op_platforms_and_caching():
    interpreted = pallas_triton.get_op("cpu")
    compiled = pallas_triton.get_op("gpu")
    assert compiled is pallas_triton.get_op("cuda")
    assert interpreted is not compiled
    assert interpreted.__name__ == "ddf_pallas_triton_interpret"
    assert compiled.__name__ == "ddf_pallas_triton"
    fixed = pallas_triton.get_op("cpu", SMALL_BLOCKS)
    assert fixed is pallas_triton.get_op("cpu", block_sizes=SMALL_BLOCKS)
    assert fixed is not interpreted


@pytest.mark.parametrize("platform", ["rocm", "tpu", "METAL"])
def test_unsupported_platform_raises_instead_of_interpreting(platform):
    with pytest.raises(ImplementationUnavailable, match=rf"cannot run on platform '{platform}'") as info:
        pallas_triton.get_op(platform)
    message = str(info.value)
    assert "CUDA" in message and "('gpu', 'cuda')" in message and 'implementation="xla"' in message


# --------------------------------------------------------------------------
# Lowering for CUDA without a GPU.
# --------------------------------------------------------------------------


def _skip_unless_cuda_export_works():
    """Skips the caller when this jax cannot lower a trivial Triton kernel for CUDA here."""
    reason = cuda_export_error()
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize(
    "k,stride,dilation,heads,combine,dtype",
    [
        (3, 1, 1, None, "mul", jnp.float32),
        (7, 2, 2, 4, "add", jnp.bfloat16),
        (5, 3, 1, 2, "mul", jnp.float16),
    ],
)
def test_kernels_lower_for_cuda(k, stride, dilation, heads, combine, dtype):
    # Runs the Pallas-to-Triton lowering (power-of-two checks included), not PTX.
    _skip_unless_cuda_export_works()
    n, h, w, c = 2, 11, 9, 20
    ho, wo = -(-h // stride), -(-w // stride)
    sf_shape = (n, ho, wo, heads or 1, k * k)
    shapes = ((n, h, w, c), (n, c, k * k), sf_shape, (n, ho, wo, c))
    specs = [jax.ShapeDtypeStruct(shape, dtype) for shape in shapes]
    op = functools.partial(pallas_triton.get_op("cuda"), config=DDFConfig(k, stride, dilation, combine))

    exported = export_for_cuda(op, *specs[:3])
    assert exported.mlir_module().count(TRITON_TARGET) == 1
    assert exported.out_avals[0].shape == (n, ho, wo, c)
    exported = export_for_cuda(vjp_function(op), *specs)
    # The forward and the fused backward.
    assert exported.mlir_module().count(TRITON_TARGET) == 2


# --------------------------------------------------------------------------
# Compiled kernels on a real GPU.
# --------------------------------------------------------------------------


def _compiled_gpu_op():
    op = pallas_triton.get_op("gpu")
    assert op.__name__ == "ddf_pallas_triton"  # not the interpreted op
    return op


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "n,h,w,c,k,stride,dilation,heads,combine",
    [
        (2, 37, 45, 80, 3, 2, 1, 2, "mul"),
        (1, 30, 17, 48, 5, 1, 2, 1, "add"),
        (2, 21, 19, 100, 7, 1, 1, 4, "mul"),
    ],
)
def test_gpu_compiled_matches_xla(dtype, n, h, w, c, k, stride, dilation, heads, combine):
    op = _compiled_gpu_op()
    config = DDFConfig(k, stride, dilation, combine)
    device = jax.devices("gpu")[0]
    x, cf, sf, g = jax.device_put(random_inputs(4, n, h, w, c, k, stride, heads, dtype), device)
    from ddf_jax.kernels import xla

    out, grads = jax.jit(vjp_function(functools.partial(op, config=config)))(x, cf, sf, g)
    xla_op = functools.partial(xla.get_op("gpu"), config=config)
    out_xla, grads_xla = jax.jit(vjp_function(xla_op))(x, cf, sf, g)
    assert out.dtype == dtype
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, (x, cf, sf))
    # float32: summation order only; bfloat16: plus one rounding of the result.
    tol = 2e-5 if dtype == jnp.float32 else 1e-2
    for actual, expected in zip((out, *grads), (out_xla, *grads_xla)):
        actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
        atol = tol * max(1.0, float(np.max(np.abs(expected))))
        chex.assert_trees_all_close(actual, expected, rtol=tol, atol=atol)


@pytest.mark.gpu
def test_gpu_compiled_deterministic_and_reference():
    op = _compiled_gpu_op()
    n, h, w, c, k, s, d, heads, combine = 2, 33, 29, 72, 3, 2, 2, 4, "mul"
    config = DDFConfig(k, s, d, combine)
    x, cf, sf, g = jax.device_put(random_inputs(6, n, h, w, c, k, s, heads), jax.devices("gpu")[0])
    run = jax.jit(vjp_function(functools.partial(op, config=config)))
    first = jax.tree.map(np.asarray, run(x, cf, sf, g))
    second = jax.tree.map(np.asarray, run(x, cf, sf, g))
    chex.assert_trees_all_equal(first, second)
    expected = ddf_reference(x, cf, sf, k, s, d, combine)
    np.testing.assert_allclose(first[0], expected, rtol=1e-5, atol=1e-4)
    assert_grads_match_reference(x, cf, sf, g, first[1], k, s, d, combine, rtol=1e-6)
