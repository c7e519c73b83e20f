"""Tests of the Pallas-Triton DDF kernels (`implementation="pallas_triton"`).

`TestPallasInterpret` runs the property suite of `tests/op_properties.py` on
the kernels in Pallas interpret mode (the CPU); `TestPallasGpu` runs it on the
compiled kernels on a CUDA GPU (`gpu` marker). Beside them: the platforms and
caching of `get_op`, and the lowering for CUDA without a GPU.

Interpret mode costs almost only XLA compile time of the unrolled taps, so the
suite compiles each test function once per case with faster XLA options
(`tests.utils.fast_compile_options`), and the cases with the largest backward
kernels (k = 7 with stride 3, k = 9) are marked `slow`.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from ddf_jax.kernels import DDFConfig, ImplementationUnavailable, pallas_triton
from ddf_jax.kernels.common import LaunchConfig
from experiments.sm90_compile import TRITON_TARGET, cuda_export_error, export_for_cuda
from tests.op_properties import Case, OpProperties, vjp_function

# Small tiles, so that every kernel runs several pixel tiles and several
# channel tiles (the backward kernel loops over >= 2 channel tiles per head),
# with partial tiles at the edges, even on these tiny shapes.
SMALL_BLOCKS = pallas_triton.BlockSizes(forward=LaunchConfig(32, 8), backward=LaunchConfig(16, 4))


def slow(case):
    return pytest.param(case, marks=pytest.mark.slow, id=case.id)


class TestPallasInterpret(OpProperties):
    """The kernels in Pallas interpret mode (any platform but a GPU: here, the CPU)."""

    IMPLEMENTATION = "pallas_triton"
    TILES = {"small": SMALL_BLOCKS}
    # H, W, C are odd or not powers of two, so no tile divides evenly; "small"
    # tiles split even these shapes into several pixel and channel tiles.
    GRADIENT_CASES = [
        Case(2, 11, 9, 12, 1, 2, 1, 4, "add", "small"),
        Case(2, 11, 9, 12, 3, 1, 1, None, "mul", "small"),
        Case(1, 11, 9, 12, 3, 2, 2, 2, "add", "small"),
        Case(1, 9, 11, 20, 3, 3, 3, 4, "mul", "small"),
        Case(1, 11, 9, 20, 5, 2, 1, 2, "mul", "small"),
        Case(1, 9, 7, 16, 3, 1, 1, 2, "mul", "small"),  # 8 channels per head: one head per forward channel tile
        Case(1, 11, 9, 12, 5, 1, 2, None, "add"),  # default tiles from here on
        Case(1, 11, 9, 12, 7, 1, 2, None, "add"),
        slow(Case(1, 11, 9, 20, 7, 3, 1, 4, "mul")),
        slow(Case(1, 13, 10, 20, 9, 2, 1, 2, "mul")),
    ]
    FORWARD_CASES = [
        Case(1, 11, 9, 12, 5, 1, 2, None, "add", "small"),
        Case(1, 11, 9, 20, 7, 2, 3, 2, "mul", "small"),
    ]
    LOW_PRECISION_CASES = [
        ("bfloat16", Case(2, 11, 9, 20, 3, 2, 1, 2, "mul")),
        ("float16", Case(2, 11, 9, 20, 3, 1, 2, None, "add")),
        ("bfloat16", Case(1, 9, 7, 12, 7, 1, 2, 4, "add")),
        ("bfloat16_x_float32_filters", Case(1, 9, 7, 16, 5, 2, 1, 2, "mul", "small")),
    ]
    FLOAT64_CASES = [Case(1, 5, 4, 4, 3, 2, 1, 2, "mul")]
    VMAP_CASES = [Case(1, 9, 7, 12, 3, 2, 1, 2, "mul")]  # default tiles
    PMAP_CASES = [Case(1, 7, 6, 12, 3, 1, 2, 2, "add")]
    DETERMINISM_CASES = [Case(1, 11, 9, 12, 3, 2, 2, 2, "add", "small")]
    IDENTITY_CASES = [Case(2, 11, 9, 12, 3, 1, 1, None, "mul", "small")]
    EMPTY_CASES = [((0, 4, 4, 2), 1, jnp.float32), ((1, 0, 4, 2), 2, jnp.float32), ((0, 5, 3, 4), 2, jnp.bfloat16),
                   ((1, 5, 4, 0), 2, jnp.float32)]

    def get_op(self, tiles=None):
        op = pallas_triton.get_op("cpu", self.TILES[tiles] if tiles else None)
        assert op.__name__ == "ddf_pallas_triton_interpret"
        return op


@pytest.mark.gpu
class TestPallasGpu(OpProperties):
    """The compiled kernels on a CUDA GPU."""

    IMPLEMENTATION = "pallas_triton"
    GRADIENT_CASES = [
        Case(2, 37, 45, 80, 3, 2, 1, 2, "mul"),
        Case(1, 30, 17, 48, 5, 1, 2, 1, "add"),
        Case(2, 21, 19, 100, 7, 1, 1, 4, "mul"),
        Case(2, 33, 29, 72, 3, 2, 2, 4, "mul"),
    ]
    LOW_PRECISION_CASES = [("bfloat16", case) for case in GRADIENT_CASES[:3]]
    DETERMINISM_CASES = GRADIENT_CASES[3:]

    def get_op(self, tiles=None):
        assert tiles is None
        op = pallas_triton.get_op("gpu")
        assert op.__name__ == "ddf_pallas_triton"  # not the interpreted op
        return op


# --------------------------------------------------------------------------
# get_op: platforms and caching.
# --------------------------------------------------------------------------


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
