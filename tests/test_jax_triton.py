"""Tests of the jax-triton DDF implementation (`implementation="jax_triton"`).

Three layers, so that most of it runs without a GPU:

- On a CPU, the Triton kernels run in Triton's interpreter (`TRITON_INTERPRET=1`,
  torch CPU tensors). `jax_triton.get_op` is given a launcher with the
  signature of `jax_triton.triton_call` that runs the kernel through
  `jax.pure_callback`, so the module's own launch code, custom_vmap and
  custom_vjp are exercised end to end (jit, vmap, grad) against the "xla"
  implementation and the float64 loop reference. Outputs start as NaN, so an
  element that no program writes fails the comparison. Needs `triton` and
  `torch`; skipped cleanly without them.
- Also on a CPU, `tests/test_static_sm90.py` compiles every kernel with the
  real Triton compiler for sm_90 (through ptxas), which catches what the
  lenient interpreter accepts.
- `@pytest.mark.gpu` tests run `ddf_jax.ddf(..., implementation="jax_triton")`
  on a CUDA GPU (jax-triton installed) against "xla", including a tensor with
  more than 2**31 elements.

The interpreter must be chosen before `triton` is first imported, so this
module sets `TRITON_INTERPRET=1` at import time on machines without a GPU
(where the compiled kernels could not run anyway).
"""

import functools
import importlib
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from tests.utils import has_gpu, random_ddf_inputs


HAS_GPU = has_gpu()
if not HAS_GPU and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ddf_jax  # noqa: E402
from ddf_jax.kernels import DDFConfig, ImplementationUnavailable  # noqa: E402
from ddf_jax.kernels import jax_triton as jt  # noqa: E402
from ddf_jax.kernels import xla  # noqa: E402
from ddf_jax.kernels.common import LaunchConfig  # noqa: E402
from tests.reference import ddf_reference  # noqa: E402
from tests.test_pallas_triton import assert_grads_match_reference  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_inputs(seed, n, h, w, c, k, stride=1, heads=1, dtype=np.float32):
    """Random x, channel_filter, spatial_filter (always 5-D), grad_out."""
    return random_ddf_inputs(seed, n, h, w, c, k, stride, heads, dtype)


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def assert_relative_error(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    error = relative_error(actual, expected)
    assert error <= tol, f"{what}: relative error {error:.3e} > {tol:.1e}"


def forward_and_vjp(op, x, cf, sf, g, config):
    """(out, (dx, dcf, dsf)) of op at (x, cf, sf) for cotangent g, jitted."""

    @jax.jit
    def run(x, cf, sf, g):
        out, vjp = jax.vjp(lambda a, b, c: op(a, b, c, config), x, cf, sf)
        return out, vjp(g)

    return run(x, cf, sf, g)


# --------------------------------------------------------------------------------------
# No GPU needed: errors, laziness, launch specs, block sizes.
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_GPU, reason="checks the error on a machine without a GPU")
def test_cpu_platform_raises_clear_error():
    x, cf, sf, _ = random_inputs(0, 1, 5, 5, 4, 3)
    with pytest.raises(ImplementationUnavailable, match=r'pip install "ddf-jax\[triton\]"') as info:
        ddf_jax.ddf(x, cf, sf[..., 0, :], kernel_size=3, implementation="jax_triton")
    message = str(info.value)
    assert "GPU" in message and "'cpu'" in message and 'implementation="xla"' in message


@pytest.mark.parametrize("platform", ["rocm", "tpu"])
def test_non_cuda_platform_raises_clear_error(platform):
    # Checked before any import, so the same on every machine.
    with pytest.raises(ImplementationUnavailable, match=rf"cannot run on platform '{platform}'.*CUDA GPU"):
        jt.get_op(platform)


def test_missing_package_raises_clear_error(monkeypatch):
    # A None entry in sys.modules makes `import jax_triton` raise ImportError.
    monkeypatch.setitem(sys.modules, "jax_triton", None)
    with pytest.raises(ImplementationUnavailable, match=r"could not import jax_triton.*ddf-jax\[triton\]"):
        jt.get_op("gpu")


def test_import_is_lazy():
    """`import ddf_jax` and even the jax_triton module itself import neither triton nor jax_triton."""
    code = textwrap.dedent(
        """
        import sys
        import ddf_jax
        import jax
        from ddf_jax.kernels import DDFConfig, jax_triton
        specs = [jax.ShapeDtypeStruct(s, "float32") for s in ((1, 8, 8, 64), (1, 64, 9), (1, 8, 8, 1, 9))]
        jax_triton.launch_spec("backward", *specs, DDFConfig(3))
        leaked = sorted(m for m in ("triton", "jax_triton", "torch") if m in sys.modules)
        assert not leaked, leaked
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def blocks_of(forward, backward, num_warps=4, num_stages=2):
    """A `jt.BlockSizes` from (pixels, channels) tiles, one warps/stages setting for both kernels."""
    return jt.BlockSizes(*(LaunchConfig(*tile, num_warps, num_stages) for tile in (forward, backward)))


def test_launch_specs_for_a_tensor_above_int32_range():
    # 2 * 6144 * 6144 * 64 = 4.8e9 elements; only shapes are used here.
    config = DDFConfig(3, 1, 1, "mul")
    x = jax.ShapeDtypeStruct((2, 6144, 6144, 64), jnp.bfloat16)
    cf = jax.ShapeDtypeStruct((2, 64, 9), jnp.bfloat16)
    sf = jax.ShapeDtypeStruct((2, 6144, 6144, 1, 9), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((2, 6144, 6144, 64), jnp.bfloat16)
    blocks = jt.BlockSizes.get_default(x, cf, sf, config)
    (forward, forward_inputs), (backward, backward_inputs) = jt.launch_specs(x, cf, sf, g, config)
    assert forward_inputs == (x, cf, sf) and backward_inputs == (x, cf, sf, g)
    tile = blocks.forward
    assert forward.kernel_name == "ddf_fwd_kernel"
    assert forward.grid == (2 * 6144 * 6144 // tile.block_pixels, 64 // tile.block_channels)
    assert forward.out_shapes[0].shape == x.shape and forward.out_shapes[0].dtype == jnp.bfloat16
    assert forward.constexprs["FP64"] is False and forward.constexprs["MUL"] is True
    tiles = 6144 * 6144 // blocks.backward.block_pixels
    assert backward.kernel_name == "ddf_bwd_kernel" and backward.grid == (2 * tiles, 1)
    dx, d_spatial, partials = backward.out_shapes
    assert (dx.shape, dx.dtype) == (x.shape, jnp.bfloat16)
    assert (d_spatial.shape, d_spatial.dtype) == (sf.shape, jnp.bfloat16)
    assert partials.shape == (2, tiles, 9, 64) and partials.dtype == jnp.float32


def test_launch_spec_errors():
    config = DDFConfig(3)
    huge = jax.ShapeDtypeStruct((1, 65536, 32768, 1), jnp.float32)  # 2**31 pixels in one image
    cf = jax.ShapeDtypeStruct((1, 1, 9), jnp.float32)
    sf = jax.ShapeDtypeStruct((1, 65536, 32768, 1, 9), jnp.float32)
    with pytest.raises(ValueError, match=r"fewer than 2\*\*31 pixels"):
        jt.launch_spec("forward", huge, cf, sf, config)
    many_channels = jax.ShapeDtypeStruct((1, 4, 4, 65536 * 2), jnp.float32)
    blocks = blocks_of((16, 1), (16, 1))
    with pytest.raises(ValueError, match=r"exceeds the CUDA limits"):
        jt.launch_spec(
            "forward",
            many_channels,
            jax.ShapeDtypeStruct((1, 65536 * 2, 9), jnp.float32),
            jax.ShapeDtypeStruct((1, 4, 4, 1, 9), jnp.float32),
            config,
            blocks,
        )


class RecordingLaunch:
    """A `triton_call` stand-in that records each launch grid and returns NaN-filled outputs."""

    def __init__(self):
        self.grids = []

    def __call__(self, *arrays, kernel, out_shape, grid, **options):
        self.grids.append(grid)
        return tuple(jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shape)


@pytest.mark.parametrize("shape", [(0, 5, 4, 4), (1, 0, 4, 4), (1, 5, 4, 0)])
def test_empty_inputs_launch_nothing(shape):
    """N, H or C = 0: zeros and zero gradients from `make_ddf_op`, no launch (no Triton needed)."""
    launch = RecordingLaunch()
    config = DDFConfig(3, 2, 1, "mul")
    x, cf, sf, g = random_inputs(0, *shape, 3, 2)
    out, grads = forward_and_vjp(jt.get_op("cpu", launch=launch), x, cf, sf, g, config)
    chex.assert_trees_all_equal((out, grads), (jnp.zeros_like(g), tuple(map(jnp.zeros_like, (x, cf, sf)))))
    assert launch.grids == []


def test_vmap_over_an_empty_axis_launches_nothing():
    """vmap over a size-0 axis: `make_ddf_op` sees the non-empty per-example shapes, and the
    folded call (N = 0) must still launch nothing. Tracing at the per-example shapes
    records non-empty grids, which never run."""
    launch = RecordingLaunch()
    config = DDFConfig(3, 2, 1, "add")
    x, cf, sf, g = (a[None][:0] for a in random_inputs(1, 2, 5, 4, 4, 3, 2, 2))
    op = jt.get_op("cpu", launch=launch)
    out, grads = jax.vmap(lambda *a: forward_and_vjp(op, *a, config))(x, cf, sf, g)
    chex.assert_trees_all_equal((out, grads), (jnp.zeros_like(g), tuple(map(jnp.zeros_like, (x, cf, sf)))))
    assert launch.grids and all(min(grid) > 0 for grid in launch.grids), launch.grids


# --------------------------------------------------------------------------------------
# CPU: the kernels in Triton's interpreter, launched through the module's own wiring.
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _interpreter():
    """(torch, triton_kernels) when the Triton interpreter can run here, else a skip reason."""
    try:
        torch = importlib.import_module("torch")
        triton = importlib.import_module("triton")
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError as error:
        return f"needs triton and torch for Triton's CPU interpreter ({error})"
    from ddf_jax.kernels import triton_kernels

    if not (
        isinstance(triton_kernels.ddf_fwd_kernel, InterpretedFunction)
        and isinstance(triton.language.zeros, InterpretedFunction)
    ):
        return (
            "Triton's interpreter is off (a GPU is present, or triton was imported "
            "before TRITON_INTERPRET=1 could be set)"
        )
    return torch, triton_kernels


def _torch_dtype(torch, dtype):
    return {
        jnp.dtype(jnp.float16): torch.float16,
        jnp.dtype(jnp.bfloat16): torch.bfloat16,
        jnp.dtype(jnp.float32): torch.float32,
        jnp.dtype(jnp.float64): torch.float64,
    }[jnp.dtype(dtype)]


def _to_torch(torch, array):
    array = np.asarray(array)
    if array.dtype == jnp.bfloat16:  # numpy has no native bfloat16: move the bits.
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def _to_numpy(torch, tensor):
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(jnp.bfloat16)
    return tensor.numpy()


def interpreter_launch(*arrays, kernel, out_shape, grid, num_warps=None, num_stages=None, **constexprs):
    """`jax_triton.triton_call`'s contract, run by Triton's interpreter inside `jax.pure_callback`."""
    del num_warps, num_stages  # meaningless to the interpreter
    torch, _ = _interpreter()
    out_shape = tuple(out_shape)

    def host(*host_arrays):
        inputs = [_to_torch(torch, a) for a in host_arrays]
        # NaN-filled, so an element that no program writes is caught by the comparisons.
        outputs = [
            torch.full(s.shape, float("nan"), dtype=_torch_dtype(torch, s.dtype)) for s in out_shape
        ]
        kernel[grid](*inputs, *outputs, **constexprs)
        return tuple(_to_numpy(torch, t) for t in outputs)

    return jax.pure_callback(host, out_shape, *arrays)


@pytest.fixture(scope="module")
def interpreted():
    """A builder of interpreted ops: `interpreted(block_sizes=None) -> op`."""
    state = _interpreter()
    if isinstance(state, str):
        pytest.skip(state)

    def make(block_sizes=None):
        return jt.get_op("cpu", block_sizes, launch=interpreter_launch)

    return make


# (k, stride, dilation, heads, combine, (N, H, W, C), block sizes or None)
SMALL_BLOCKS = blocks_of((16, 4), (16, 4))  # many pixel and channel tiles
ODD_BLOCKS = blocks_of((32, 8), (32, 2))
INTERPRETER_GRID = [
    (1, 1, 1, 1, "mul", (2, 11, 9, 20), None),
    (1, 2, 1, 2, "add", (2, 11, 9, 20), None),
    (3, 1, 1, 1, "mul", (2, 11, 9, 20), None),
    (3, 1, 2, 2, "add", (2, 11, 9, 20), None),
    (3, 2, 1, 1, "add", (2, 11, 9, 20), None),
    (3, 2, 2, 2, "mul", (2, 11, 9, 20), None),
    (3, 2, 1, 4, "mul", (1, 7, 13, 20), None),  # 5 channels per head: gathered heads
    (5, 1, 1, 1, "add", (1, 11, 9, 12), None),
    (5, 2, 2, 2, "mul", (2, 11, 9, 12), None),
    (5, 1, 2, 1, "mul", (1, 9, 11, 6), None),
    (3, 1, 1, 2, "mul", (1, 9, 7, 16), SMALL_BLOCKS),  # one head per channel tile
    (3, 2, 1, 2, "add", (1, 9, 7, 20), ODD_BLOCKS),  # tiles straddle heads
    (5, 2, 1, 5, "mul", (1, 7, 6, 10), SMALL_BLOCKS),
]


@pytest.mark.parametrize("k,stride,dilation,heads,combine,shape,blocks", INTERPRETER_GRID)
def test_interpreted_kernels_match_xla(interpreted, k, stride, dilation, heads, combine, shape, blocks):
    config = DDFConfig(k, stride, dilation, combine)
    x, cf, sf, g = random_inputs(k * 100 + stride * 10 + heads, *shape, k, stride, heads)
    out, (dx, dcf, dsf) = forward_and_vjp(interpreted(blocks), x, cf, sf, g, config)
    ref_out, (ref_dx, ref_dcf, ref_dsf) = forward_and_vjp(xla.ddf_xla, x, cf, sf, g, config)
    assert_relative_error(out, ref_out, 1e-5, "out")
    assert_relative_error(dx, ref_dx, 1e-5, "dx")
    assert_relative_error(dcf, ref_dcf, 1e-5, "d_channel_filter")
    assert_relative_error(dsf, ref_dsf, 1e-5, "d_spatial_filter")
    # The fused backward kernel against the float64 loop reference, through linearity.
    assert_grads_match_reference(x, cf, sf, g, (dx, dcf, dsf), k, stride, dilation, combine, rtol=1e-6)


@pytest.mark.parametrize("k,stride,dilation,heads,combine", [(3, 2, 1, 2, "mul"), (5, 1, 2, 1, "add")])
def test_interpreted_forward_matches_loop_reference(interpreted, k, stride, dilation, heads, combine):
    config = DDFConfig(k, stride, dilation, combine)
    x, cf, sf, _ = random_inputs(7, 2, 9, 10, 8, k, stride, heads)
    out = jax.jit(lambda a, b, c: interpreted()(a, b, c, config))(x, cf, sf)
    expected = ddf_reference(x, cf, sf, k, stride, dilation, combine)
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "dtypes,tol",
    [
        ((jnp.bfloat16,) * 4, 2e-2),
        ((jnp.float16,) * 4, 2e-3),
        # bfloat16 activations with float32 filters: each array keeps its own dtype.
        ((jnp.bfloat16, jnp.float32, jnp.float32, jnp.bfloat16), 2e-2),
    ],
)
def test_interpreted_low_precision(interpreted, dtypes, tol):
    config = DDFConfig(3, 2, 1, "mul")
    arrays = random_inputs(3, 1, 9, 7, 16, 3, 2, 2)
    x, cf, sf, g = (a.astype(d) for a, d in zip(arrays, dtypes))
    out, grads = forward_and_vjp(interpreted(), x, cf, sf, g, config)
    ref_out, ref_grads = forward_and_vjp(xla.ddf_xla, x, cf, sf, g, config)
    # The interpreter rounds float32 -> bfloat16 towards zero (a GPU rounds to
    # nearest), so bfloat16 results may differ from XLA's by one unit in the last place.
    assert_relative_error(out, ref_out, tol, "out")
    for name, a, b in zip(("dx", "d_channel_filter", "d_spatial_filter"), grads, ref_grads):
        assert_relative_error(a, b, tol, name)


def test_interpreted_float64_gradients(interpreted):
    """float64 inputs take the FP64 kernel path; gradients agree with finite differences."""
    config = DDFConfig(3, 2, 1, "mul")
    op = interpreted()
    with jax.enable_x64(True):
        x, cf, sf, g = random_inputs(11, 1, 7, 6, 4, 3, 2, 2, dtype=np.float64)
        assert op(x, cf, sf, config).dtype == jnp.float64
        np.testing.assert_allclose(
            np.asarray(op(x, cf, sf, config)), ddf_reference(x, cf, sf, 3, 2), rtol=1e-12, atol=1e-12
        )
        check_grads(lambda a, b, c: op(a, b, c, config), (x, cf, sf), order=1, modes=("rev",))
        config_add = DDFConfig(3, 1, 2, "add")
        inputs = random_inputs(12, 1, 6, 5, 4, 3, 1, 1, np.float64)[:3]
        check_grads(lambda a, b, c: op(a, b, c, config_add), inputs, order=1, modes=("rev",))


def test_interpreted_vmap_equals_loop(interpreted):
    config = DDFConfig(3, 2, 1, "mul")
    op = interpreted()
    batches = [random_inputs(20 + b, 2, 7, 5, 4, 3, 2, 2) for b in range(2)]
    xs, cfs, sfs, gs = (jnp.stack(parts) for parts in zip(*batches))
    forward = jax.jit(lambda x, cf, sf: op(x, cf, sf, config))

    def loss(x, cf, sf, g):
        return jnp.sum(op(x, cf, sf, config) * g)

    vmapped = jax.jit(jax.vmap(forward))(xs, cfs, sfs)
    looped = jnp.stack([forward(xs[b], cfs[b], sfs[b]) for b in range(2)])
    chex.assert_trees_all_equal(vmapped, looped)  # images are independent: bitwise equal

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    vmapped_grads = jax.jit(jax.vmap(grad))(xs, cfs, sfs, gs)
    per_batch = [grad(xs[b], cfs[b], sfs[b], gs[b]) for b in range(2)]
    looped_grads = [jnp.stack(parts) for parts in zip(*per_batch)]
    chex.assert_trees_all_close(tuple(vmapped_grads), tuple(looped_grads), rtol=1e-6, atol=1e-6)

    # Unbatched filters are broadcast; nested vmap folds both axes.
    shared = jax.vmap(lambda x: forward(x, cfs[0], sfs[0]))(xs)
    chex.assert_trees_all_equal(shared, jnp.stack([forward(xs[b], cfs[0], sfs[0]) for b in range(2)]))
    nested = jax.vmap(jax.vmap(lambda x, cf, sf: op(x[None], cf[None], sf[None], config)[0]))(xs, cfs, sfs)
    chex.assert_trees_all_equal(nested, looped)
    empty = jax.vmap(forward)(xs[:0], cfs[:0], sfs[:0])
    chex.assert_trees_all_equal(empty, looped[:0])


def test_interpreted_grad_under_jit_matches_xla_and_is_deterministic(interpreted):
    config = DDFConfig(5, 1, 1, "add")
    x, cf, sf, g = random_inputs(5, 1, 6, 7, 6, 5, 1, 3)

    def loss(op):
        return lambda x, cf, sf: jnp.sum(jnp.sin(op(x, cf, sf, config)) * g)

    grad = jax.jit(jax.grad(loss(interpreted()), argnums=(0, 1, 2)))
    grads = grad(x, cf, sf)
    again = grad(x, cf, sf)  # the kernels run again (callbacks are not cached)
    chex.assert_trees_all_equal(grads, again)
    expected = jax.grad(loss(xla.ddf_xla), argnums=(0, 1, 2))(x, cf, sf)
    for name, a, b in zip(("dx", "d_channel_filter", "d_spatial_filter"), grads, expected):
        assert_relative_error(a, b, 1e-5, name)


# --------------------------------------------------------------------------------------
# GPU: the compiled kernels through jax_triton.triton_call.
# --------------------------------------------------------------------------------------

IMPL = "jax_triton"

GPU_GRID = [
    (k, stride, dilation, heads, combine)
    for k in (1, 3, 5, 7)
    for stride, dilation, heads, combine in (
        (1, 1, 1, "mul"),
        (2, 1, 2, "add"),
        (1, 2, 4, "mul"),
        (2, 2, 1, "add"),
        (2, 2, 3, "mul"),  # 8 channels per head: channel tiles straddle heads
    )
    if not (k == 1 and dilation == 2)
]


def ddf_fn(implementation, k, stride, dilation, combine):
    def f(x, cf, sf):
        return ddf_jax.ddf(
            x,
            cf,
            sf,
            kernel_size=k,
            stride=stride,
            dilation=dilation,
            combine=combine,
            implementation=implementation,
        )

    return f


def gpu_forward_and_vjp(implementation, x, cf, sf, g, k, stride, dilation, combine):
    f = ddf_fn(implementation, k, stride, dilation, combine)

    @jax.jit
    def run(x, cf, sf, g):
        out, vjp = jax.vjp(f, x, cf, sf)
        return out, vjp(g)

    return run(x, cf, sf, g)


@pytest.mark.gpu
@pytest.mark.parametrize("k,stride,dilation,heads,combine", GPU_GRID)
def test_gpu_float32_matches_xla(k, stride, dilation, heads, combine):
    x, cf, sf, g = random_inputs(k + 10 * stride + 100 * heads, 2, 19, 13, 24, k, stride, heads)
    out, grads = gpu_forward_and_vjp(IMPL, x, cf, sf, g, k, stride, dilation, combine)
    ref_out, ref_grads = gpu_forward_and_vjp("xla", x, cf, sf, g, k, stride, dilation, combine)
    assert_relative_error(out, ref_out, 1e-5, "out")
    for name, a, b in zip(("dx", "d_channel_filter", "d_spatial_filter"), grads, ref_grads):
        assert_relative_error(a, b, 1e-5, name)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 33, 17, 100), (2, 56, 56, 256)])
def test_gpu_shapes_match_xla(shape):
    k, stride = 3, 2
    x, cf, sf, g = random_inputs(1, *shape, k, stride, 1)
    out, grads = gpu_forward_and_vjp(IMPL, x, cf, sf, g, k, stride, 1, "mul")
    ref_out, ref_grads = gpu_forward_and_vjp("xla", x, cf, sf, g, k, stride, 1, "mul")
    assert_relative_error(out, ref_out, 1e-5, "out")
    for name, a, b in zip(("dx", "d_channel_filter", "d_spatial_filter"), grads, ref_grads):
        assert_relative_error(a, b, 1e-5, name)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtypes,tol",
    [
        ((jnp.bfloat16,) * 4, 1e-2),
        ((jnp.float16,) * 4, 2e-3),
        ((jnp.bfloat16, jnp.float32, jnp.float32, jnp.bfloat16), 1e-2),
    ],
)
@pytest.mark.parametrize("k,stride,heads,combine", [(3, 1, 1, "mul"), (5, 2, 2, "add"), (7, 1, 1, "mul")])
def test_gpu_low_precision_matches_xla(dtypes, tol, k, stride, heads, combine):
    arrays = random_inputs(2, 2, 21, 14, 32, k, stride, heads)
    x, cf, sf, g = (a.astype(d) for a, d in zip(arrays, dtypes))
    out, grads = gpu_forward_and_vjp(IMPL, x, cf, sf, g, k, stride, 1, combine)
    ref_out, ref_grads = gpu_forward_and_vjp("xla", x, cf, sf, g, k, stride, 1, combine)
    assert_relative_error(out, ref_out, tol, "out")
    for name, a, b in zip(("dx", "d_channel_filter", "d_spatial_filter"), grads, ref_grads):
        assert_relative_error(a, b, tol, name)


@pytest.mark.gpu
def test_gpu_float64_gradients_and_reference():
    with jax.enable_x64(True):
        x, cf, sf, _ = random_inputs(4, 1, 9, 8, 6, 3, 2, 2, dtype=np.float64)
        f = ddf_fn(IMPL, 3, 2, 1, "mul")
        expected = ddf_reference(x, cf, sf, 3, 2)
        np.testing.assert_allclose(np.asarray(f(x, cf, sf)), expected, rtol=1e-12, atol=1e-12)
        check_grads(f, (x, cf, sf), order=1, modes=("rev",))


@pytest.mark.gpu
def test_gpu_jit_vmap_grad():
    k, stride, dilation, combine = 3, 2, 2, "mul"
    batches = [random_inputs(30 + b, 2, 15, 12, 16, k, stride, 2) for b in range(3)]
    xs, cfs, sfs, gs = (jnp.stack(parts) for parts in zip(*batches))
    f = ddf_fn(IMPL, k, stride, dilation, combine)

    def loss(x, cf, sf, g):
        return jnp.sum(f(x, cf, sf) * g)

    vmapped = jax.jit(jax.vmap(f))(xs, cfs, sfs)
    looped = jnp.stack([f(xs[b], cfs[b], sfs[b]) for b in range(3)])
    chex.assert_trees_all_equal(vmapped, looped)
    grad = jax.grad(loss, argnums=(0, 1, 2))
    vmapped_grads = jax.jit(jax.vmap(grad))(xs, cfs, sfs, gs)
    looped_grads = [jnp.stack(p) for p in zip(*(grad(xs[b], cfs[b], sfs[b], gs[b]) for b in range(3)))]
    chex.assert_trees_all_close(tuple(vmapped_grads), tuple(looped_grads), rtol=1e-6, atol=1e-6)
    reference = ddf_fn("xla", k, stride, dilation, combine)
    xla_grad = jax.grad(lambda x, cf, sf, g: jnp.sum(reference(x, cf, sf) * g), argnums=(0, 1, 2))
    expected = jax.vmap(xla_grad)(xs, cfs, sfs, gs)
    for name, a, b in zip(("dx", "d_channel_filter", "d_spatial_filter"), vmapped_grads, expected):
        assert_relative_error(a, b, 1e-5, name)
    # Deterministic: the same call twice gives the same bits.
    chex.assert_trees_all_equal(jax.jit(jax.vmap(grad))(xs, cfs, sfs, gs), vmapped_grads)


def _hashed_bf16(shape, seed):
    """Pseudo-random bfloat16 in +-[0.5, 1) from a hash of each element's coordinates.

    Computed elementwise (one fused pass, no large temporaries), and never a
    function of the flat index, so a wrapped 32-bit offset reads a different value.
    """
    mix = jnp.uint32((0x9E3779B9 * (seed + 1)) & 0xFFFFFFFF)
    for axis, prime in zip(range(len(shape)), (0x27D4EB2F, 0x165667B1, 0x85EBCA77, 0xC2B2AE3D, 0x61C88647)):
        coordinate = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
        mix = (mix ^ (coordinate * jnp.uint32(prime))) * jnp.uint32(0x85EBCA6B)
        mix = mix ^ (mix >> 15)
    bits = (mix >> 16).astype(jnp.uint16)
    bits = (bits & jnp.uint16(0x807F)) | jnp.uint16(0x3F00)
    return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)


@pytest.mark.gpu
def test_gpu_tensor_above_int32_range():
    """x of 2 x 6144 x 6144 x 64 bf16 (4.8e9 elements, 9.7 GB): both the per-image base
    offset and offsets inside one image (2.4e9) exceed int32. Bands of rows at the ends
    of both images are checked against XLA run on the corresponding crop."""
    n, h, w, c, k = 2, 6144, 6144, 64, 3
    assert n * h * w * c > 2**32 and h * w * c > 2**31
    make = jax.jit(_hashed_bf16, static_argnums=(0, 1))
    x = make((n, h, w, c), 0)
    sf = make((n, h, w, 1, k * k), 1)
    cf = make((n, c, k * k), 2)
    g = make((n, h, w, c), 3)
    f = ddf_fn(IMPL, k, 1, 1, "mul")

    @jax.jit
    def run(x, cf, sf, g):
        out, vjp = jax.vjp(f, x, cf, sf)
        dx, _, dsf = vjp(g)
        band = slice(h - 8, h)  # the last rows: the largest offsets of each image
        return out[:, band], dx[:, band], dsf[:, band]

    out_band, dx_band, dsf_band = run(x, cf, sf, g)
    # The crop includes one more row above the band (the radius), so the band's
    # rows see exactly their true neighbourhood; the image ends below it anyway.
    crop = slice(h - 9, h)
    ref_f = ddf_fn("xla", k, 1, 1, "mul")
    ref_out, ref_vjp = jax.vjp(ref_f, x[:, crop], cf, sf[:, crop])
    ref_dx, _, ref_dsf = ref_vjp(g[:, crop])
    assert_relative_error(out_band, ref_out[:, 1:], 1e-2, "out")
    assert_relative_error(dx_band, ref_dx[:, 1:], 1e-2, "dx")
    assert_relative_error(dsf_band, ref_dsf[:, 1:], 1e-2, "d_spatial_filter")
