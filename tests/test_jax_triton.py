"""Tests of the jax-triton DDF implementation (`implementation="jax_triton"`).

Three layers, so that most of it runs without a GPU:

- On a CPU, `TestJaxTritonInterpreter` runs the property suite of
  `tests/op_properties.py` with the Triton kernels in Triton's interpreter
  (`TRITON_INTERPRET=1`, torch CPU tensors). `jax_triton.get_op` is given a
  launcher with the signature of `jax_triton.triton_call` that runs the kernel
  through `jax.pure_callback` (`tests/triton_interpreter.py`), so the module's own launch code, custom_vmap
  and custom_vjp are exercised end to end (jit, vmap, grad) against the
  float64 loop reference. Outputs start as NaN, so an element that no program
  writes fails the comparison. Needs `triton` and `torch`; skipped cleanly
  without them. Beside it, without Triton: errors, laziness, launch specs.
- Also on a CPU, `tests/test_static_sm90.py` compiles every kernel with the
  real Triton compiler for sm_90 (through ptxas), which catches what the
  lenient interpreter accepts.
- `TestJaxTritonGpu` (`gpu` marker) runs the suite with
  `ddf_jax.ddf(..., implementation="jax_triton")` on a CUDA GPU (jax-triton
  installed), and one more GPU test a tensor with more than 2**31 elements.

The interpreter must be chosen before `triton` is first imported: importing
`tests.triton_interpreter` first sets `TRITON_INTERPRET=1` on machines without
a GPU (where the compiled kernels could not run anyway).
"""

import functools
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

# First: it chooses Triton's interpreter before anything imports triton.
from tests.triton_interpreter import HAS_GPU, interpreter_launch, interpreter_state  # isort: skip

import ddf_jax
from ddf_jax.kernels import DDFConfig, ImplementationUnavailable
from ddf_jax.kernels import jax_triton as jt
from ddf_jax.kernels.common import LaunchConfig
from tests.op_properties import Case, OpProperties
from tests.utils import random_ddf_inputs

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


def interpreted_op(block_sizes=None):
    """The jax_triton op whose kernels run in Triton's interpreter (skips the test when it cannot)."""
    state = interpreter_state()
    if isinstance(state, str):
        pytest.skip(state)
    return jt.get_op("cpu", block_sizes, launch=interpreter_launch)


SMALL_BLOCKS = blocks_of((16, 4), (16, 4))  # many pixel and channel tiles
ODD_BLOCKS = blocks_of((32, 8), (32, 2))


class TestJaxTritonInterpreter(OpProperties):
    """The kernels in Triton's interpreter, launched through the module's own wiring."""

    IMPLEMENTATION = "jax_triton"
    TILES = {"small": SMALL_BLOCKS, "odd": ODD_BLOCKS}
    # The interpreter rounds float32 -> bfloat16 towards zero (a GPU rounds to
    # nearest): up to one unit in the last place, 2 units of roundoff.
    ROUNDING_ULPS = {jnp.dtype(jnp.bfloat16): 2}
    # The vmap rule folds the mapped axis into N, and images are independent.
    VMAP_IS_BITWISE = True
    GRADIENT_CASES = [
        Case(2, 11, 9, 20, 1, 1, 1, 1, "mul"),
        Case(2, 11, 9, 20, 1, 2, 1, 2, "add"),
        Case(2, 11, 9, 20, 3, 1, 1, 1, "mul"),
        Case(2, 11, 9, 20, 3, 1, 2, 2, "add"),
        Case(2, 11, 9, 20, 3, 2, 1, 1, "add"),
        Case(2, 11, 9, 20, 3, 2, 2, 2, "mul"),
        Case(1, 7, 13, 20, 3, 2, 1, 4, "mul"),  # 5 channels per head: gathered heads
        Case(1, 11, 9, 12, 5, 1, 1, 1, "add"),
        Case(2, 11, 9, 12, 5, 2, 2, 2, "mul"),
        Case(1, 9, 11, 6, 5, 1, 2, 1, "mul"),
        Case(1, 9, 7, 16, 3, 1, 1, 2, "mul", "small"),  # one head per channel tile
        Case(1, 9, 7, 20, 3, 2, 1, 2, "add", "odd"),  # tiles straddle heads
        Case(1, 7, 6, 10, 5, 2, 1, 5, "mul", "small"),
        Case(1, 6, 7, 6, 5, 1, 1, 3, "add"),
        Case(1, 11, 9, 12, 7, 2, 3, 2, "mul"),
        Case(1, 9, 7, 12, 7, 3, 1, None, "add", "small"),
    ]
    FORWARD_CASES = [Case(2, 9, 10, 8, 3, 2, 1, 2, "mul"), Case(2, 9, 10, 8, 5, 1, 2, 1, "add")]
    LOW_PRECISION_CASES = [
        (dtypes, Case(1, 9, 7, 16, 3, 2, 1, 2, "mul")) for dtypes in ("bfloat16", "float16", "bfloat16_x_float32_filters")
    ] + [("bfloat16", Case(1, 9, 7, 12, 7, 1, 2, 4, "add"))]
    FLOAT64_CASES = [Case(1, 7, 6, 4, 3, 2, 1, 2, "mul"), Case(1, 6, 5, 4, 3, 1, 2, 1, "add")]
    VMAP_CASES = [Case(2, 7, 5, 4, 3, 2, 1, 2, "mul")]
    PMAP_CASES = [Case(1, 7, 6, 12, 3, 1, 2, 2, "add")]
    DETERMINISM_CASES = [Case(1, 6, 7, 6, 5, 1, 1, 3, "add")]
    IDENTITY_CASES = [Case(2, 11, 9, 20, 3, 1, 1, 1, "mul")]
    EMPTY_CASES = [((0, 5, 4, 4), 2, jnp.float32), ((1, 0, 4, 4), 2, jnp.float32), ((1, 5, 4, 0), 2, jnp.float32),
                   ((0, 5, 3, 4), 2, jnp.bfloat16)]
    HYPOTHESIS_EXAMPLES = 5

    def get_op(self, tiles=None):
        return interpreted_op(self.TILES[tiles] if tiles else None)


@pytest.mark.gpu
class TestJaxTritonGpu(OpProperties):
    """The compiled kernels through jax_triton.triton_call on a CUDA GPU."""

    IMPLEMENTATION = "jax_triton"
    GRADIENT_CASES = [
        Case(2, 19, 13, 24, k, stride, dilation, heads, combine)
        for k in (1, 3, 5, 7)
        for stride, dilation, heads, combine in (
            (1, 1, 1, "mul"),
            (2, 1, 2, "add"),
            (1, 2, 4, "mul"),
            (2, 2, 1, "add"),
            (2, 2, 3, "mul"),  # 8 channels per head: channel tiles straddle heads
        )
        if not (k == 1 and dilation == 2)
    ] + [Case(*shape, 3, 2, 1, 1, "mul") for shape in [(1, 1, 1, 1), (3, 33, 17, 100), (2, 56, 56, 256)]]
    LOW_PRECISION_CASES = [
        (dtypes, Case(2, 21, 14, 32, k, stride, 1, heads, combine))
        for dtypes in ("bfloat16", "float16", "bfloat16_x_float32_filters")
        for k, stride, heads, combine in [(3, 1, 1, "mul"), (5, 2, 2, "add"), (7, 1, 1, "mul")]
    ]
    FLOAT64_CASES = [Case(1, 9, 8, 6, 3, 2, 1, 2, "mul")]
    VMAP_CASES = [Case(2, 15, 12, 16, 3, 2, 2, 2, "mul")]
    DETERMINISM_CASES = [Case(2, 19, 13, 24, 3, 2, 2, 3, "mul")]

    def get_op(self, tiles=None):
        assert tiles is None
        return jt.get_op("gpu")


# --------------------------------------------------------------------------------------
# GPU: a tensor beyond the int32 range.
# --------------------------------------------------------------------------------------


def ddf_fn(implementation, k, stride, dilation, combine):
    return functools.partial(ddf_jax.ddf, kernel_size=k, stride=stride, dilation=dilation, combine=combine,
                             implementation=implementation)


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
    f = ddf_fn("jax_triton", k, 1, 1, "mul")

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
