"""Static sm_90 report of the GPU kernels, compiled on the CPU: no GPU needed.

Usage:
    python -m experiments.kernel_report                    # the whole grid, markdown to stdout
    python -m experiments.kernel_report --cases goal-bf16-k3,goal-f32-k3 --implementations jax_triton

Every kernel of both GPU implementations is compiled to sm_90 machine code
with triton's own CUDA backend and the ptxas shipped in the triton wheel:

- "pallas_triton": `jax.export` of the op's forward and VJP for
  `platforms=["cuda"]` runs the Pallas-to-Triton lowering; the Triton module
  of each `__gpu$xla.gpu.triton` custom call (its `mhlo.backend_config` holds
  the module as MLIR bytecode, the kernel name and the launch options) is
  printed in generic form, parsed by triton, and compiled
  TTIR -> TTGIR -> LLVM IR -> PTX -> cubin.
- "jax_triton": `triton.compile` of the `triton_kernels` kernels with the
  signature, constexprs, options and pointer attributes (16-byte
  divisibility) that jax-triton 0.3.1 passes, for the launches the op makes.

For every kernel it reads registers and stack (spills) from the cubin
(`cuobjdump -res-usage`), the shared memory triton allocates, and the global
loads in the PTX by width: `ld.global.v4.b32` (16 bytes) against scalar loads.
On a GPU, XLA compiles the Pallas kernels with its own Triton, so register
counts there may differ a little; contiguity and load widths are properties
of the IR and carry over.

The compiling and the reading of the compiler's output are in
`experiments/sm90_compile.py`; this file holds the grid of cases, the op's
launches at each case and the tables.

It also prints the bytes each kernel moves at each case against the minimum
(`bytes_moved`), so the design's fwd+bwd total can be read beside the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

from ddf_jax.kernels import DDFConfig, pallas_triton
from experiments.sm90_compile import (
    compile_triton_ir,
    compile_triton_kernel,
    cubin_resources,
    export_for_cuda,
    ptx_loads,
    triton_calls,
)

GPU_IMPLEMENTATIONS = ("pallas_triton", "jax_triton")


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration of the op: x (N, H, W, C) in `dtype`, and the DDF options."""

    name: str
    shape: tuple[int, int, int, int]
    dtype: str
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    heads: int = 1
    combine: str = "mul"

    @property
    def config(self) -> DDFConfig:
        return DDFConfig(self.kernel_size, self.stride, self.dilation, self.combine)

    def specs(self):
        """ShapeDtypeStructs of (x, channel_filter, spatial_filter (5-D), grad_out)."""
        n, h, w, c = self.shape
        taps = self.kernel_size**2
        out_h, out_w = -(-h // self.stride), -(-w // self.stride)
        shapes = ((n, h, w, c), (n, c, taps), (n, out_h, out_w, self.heads, taps), (n, out_h, out_w, c))
        return tuple(jax.ShapeDtypeStruct(shape, jnp.dtype(self.dtype)) for shape in shapes)


GOAL_SHAPE = (32, 56, 56, 256)
GRID = (
    *(
        Case(f"goal-{short}-k{k}", GOAL_SHAPE, dtype, k)
        for short, dtype in (("bf16", "bfloat16"), ("f32", "float32"))
        for k in (3, 5, 7)
    ),
    Case("stride2-bf16-k3", GOAL_SHAPE, "bfloat16", 3, stride=2),
    Case("heads4-bf16-k3", GOAL_SHAPE, "bfloat16", 3, heads=4),
    Case("add-bf16-k3", GOAL_SHAPE, "bfloat16", 3, combine="add"),
    Case("goal-f16-k3", GOAL_SHAPE, "float16", 3),
    Case("f16-k5-s2-h4", GOAL_SHAPE, "float16", 5, stride=2, heads=4),
    Case("odd-f32-k7", (2, 11, 9, 20), "float32", 7, stride=2, dilation=2, heads=2, combine="add"),
    Case("odd-f64-k3", (2, 11, 9, 20), "float64", 3),
    # One channel per head.
    Case("c3-h3-f32-k3", (1, 5, 5, 3), "float32", 3, stride=2, heads=3, combine="add"),
    Case("int64-bf16-k3", (2, 6144, 6144, 64), "bfloat16", 3),  # 4.8e9 elements: 64-bit offsets
)
CASES = {case.name: case for case in GRID}


@dataclasses.dataclass(frozen=True)
class KernelStats:
    """What the compiler made of one kernel.

    Attributes:
        implementation: "pallas_triton" or "jax_triton".
        case: the case's name.
        kernel: the kernel's name.
        block_pixels: the tile's pixels.
        block_channels: the tile's channels.
        num_warps: warps per program.
        num_stages: Triton's pipelining stages.
        registers: registers per thread (cuobjdump REG).
        stack: bytes of stack per thread (cuobjdump STACK: spills).
        shared: bytes of shared memory triton allocates per program.
        vector_loads: 16-byte global loads (`ld.global.v4.b32`) in the PTX.
        scalar_loads: global loads of one element (no `.v2` / `.v4`).
        other_loads: the remaining global loads (2- to 8-element vectors under 16 bytes).
        seconds: compile time, TTIR to cubin.
    """

    implementation: str
    case: str
    kernel: str
    block_pixels: int
    block_channels: int
    num_warps: int
    num_stages: int
    registers: int
    stack: int
    shared: int
    vector_loads: int
    scalar_loads: int
    other_loads: int
    seconds: float

    @property
    def launch(self) -> str:
        """The tile and launch options, e.g. "32x64 w4 s1"."""
        return f"{self.block_pixels}x{self.block_channels} w{self.num_warps} s{self.num_stages}"


def _stats(implementation, case, kernel, launch, ptx, cubin, metadata, seconds) -> KernelStats:
    registers, stack = cubin_resources(cubin)
    shared = int(metadata["shared"])
    loads = ptx_loads(ptx)
    return KernelStats(implementation, case.name, kernel, *launch, registers, stack, shared, *loads, seconds)


# --------------------------------------------------------------------------
# Pallas-Triton: the Triton module of each custom call of the exported op.
# --------------------------------------------------------------------------


def pallas_tiles(case: Case, blocks=None) -> dict:
    """{kernel name: (block_pixels, block_channels)} of the Pallas kernels' tiles at a case."""
    blocks = blocks or pallas_triton.BlockSizes.get_default(*case.specs()[:3], case.config)
    return {
        "ddf_fwd_kernel": (blocks.forward.block_pixels, blocks.forward.block_channels),
        "ddf_bwd_kernel": (blocks.backward.block_pixels, blocks.backward.block_channels),
    }


def pallas_kernels(case: Case, block_sizes=None) -> list[KernelStats]:
    """Compiles the forward and backward Pallas kernels of a case for sm_90 (default tiles if None)."""
    op = functools.partial(pallas_triton.get_op("cuda", block_sizes), config=case.config)

    def forward_and_vjp(x, channel_filter, spatial_filter, grad_out):
        out, vjp = jax.vjp(op, x, channel_filter, spatial_filter)
        return out, vjp(grad_out)

    tiles = pallas_tiles(case, block_sizes)
    results = []
    for call in triton_calls(export_for_cuda(forward_and_vjp, *case.specs())):
        start = time.perf_counter()
        ptx, cubin, metadata = compile_triton_ir(call["ir"], call["num_warps"], call["num_stages"])
        launch = (*tiles[call["name"]], call["num_warps"], call["num_stages"])
        seconds = time.perf_counter() - start
        results.append(_stats("pallas_triton", case, call["name"], launch, ptx, cubin, metadata, seconds))
    return results


# --------------------------------------------------------------------------
# jax-triton: triton.compile of the kernels as jax-triton 0.3.1 calls it.
# --------------------------------------------------------------------------

def jax_triton_kernels(case: Case, block_sizes=None) -> list[KernelStats]:
    """Compiles the forward and backward Triton kernels of a case for sm_90 (default tiles if None)."""
    from ddf_jax.kernels import triton_kernels

    results = []
    for spec, inputs in _jax_triton().launch_specs(*case.specs(), case.config, block_sizes):
        start = time.perf_counter()
        dtypes = [a.dtype for a in inputs] + [o.dtype for o in spec.out_shapes]
        kernel = getattr(triton_kernels, spec.kernel_name)
        ptx, cubin, metadata = compile_triton_kernel(
            kernel, dtypes, spec.constexprs, spec.num_warps, spec.num_stages
        )
        launch = (spec.constexprs["BLOCK_P"], spec.constexprs["BLOCK_C"], spec.num_warps, spec.num_stages)
        seconds = time.perf_counter() - start
        results.append(_stats("jax_triton", case, spec.kernel_name, launch, ptx, cubin, metadata, seconds))
    return results


def compile_case(implementation: str, case: Case, block_sizes=None) -> list[KernelStats]:
    """Every kernel of one implementation at one case, compiled for sm_90 (default tiles if None)."""
    compile_kernels = {"pallas_triton": pallas_kernels, "jax_triton": jax_triton_kernels}.get(implementation)
    if compile_kernels is None:
        raise ValueError(f"implementation must be one of {GPU_IMPLEMENTATIONS}, got {implementation!r}")
    with jax.enable_x64(case.dtype == "float64"):
        return compile_kernels(case, block_sizes)


# --------------------------------------------------------------------------
# Bytes moved.
# --------------------------------------------------------------------------


def bytes_moved(case: Case, implementation: str = "pallas_triton", block_sizes=None) -> dict:
    """Bytes each step of the op moves at a case, as the kernels' docstrings account them.

    Each input is read once and each output written once per kernel (tap
    halos and the filters that neighbouring tiles share come from cache).
    Returns {"forward", "backward", "partial sum", "total", "minimum"}, with
    the minimum 3X + 2O + 3SF + 3CF: x read by both passes and dx written, out
    written and grad_out read, both filters read twice and their gradients
    written once.
    """
    module = pallas_triton if implementation == "pallas_triton" else _jax_triton()
    with jax.enable_x64(case.dtype == "float64"):
        x, channel_filter, spatial_filter, grad_out = case.specs()
        blocks = block_sizes or module.BlockSizes.get_default(x, channel_filter, spatial_filter, case.config)
        acc_bytes = jnp.dtype(jnp.result_type(jnp.float32, x.dtype)).itemsize
    x_bytes, out_bytes, sf_bytes, cf_bytes = (
        a.size * a.dtype.itemsize for a in (x, grad_out, spatial_filter, channel_filter)
    )
    n, out_h, out_w, _, taps = spatial_filter.shape
    pixel_tiles = -(-(out_h * out_w) // blocks.backward.block_pixels)
    partials = n * pixel_tiles * taps * x.shape[-1] * acc_bytes
    steps = {
        "forward": x_bytes + sf_bytes + cf_bytes + out_bytes,
        "backward": x_bytes + out_bytes + sf_bytes + cf_bytes + x_bytes + sf_bytes + partials,
        "partial sum": partials + cf_bytes,
    }
    minimum = 3 * x_bytes + 2 * out_bytes + 3 * sf_bytes + 3 * cf_bytes
    return {**steps, "total": sum(steps.values()), "minimum": minimum}


def _jax_triton():
    from ddf_jax.kernels import jax_triton

    return jax_triton


# --------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------


def kernel_table(stats: list[KernelStats]) -> str:
    """Markdown table of the compiled kernels."""
    lines = [
        "| case | implementation | kernel | tile | registers | stack B | shared B "
        "| 16-byte loads | scalar loads | other loads |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in stats:
        lines.append(
            f"| {s.case} | {s.implementation} | {s.kernel} | {s.launch} | {s.registers} | {s.stack} "
            f"| {s.shared} | {s.vector_loads} | {s.scalar_loads} | {s.other_loads} |"
        )
    return "\n".join(lines)


def bytes_table(cases, implementations) -> str:
    """Markdown table of `bytes_moved` per case and implementation, in MB (1e6 bytes)."""
    lines = [
        "| case | implementation | forward MB | backward MB | partial sum MB | fwd+bwd MB | minimum MB "
        "| minimum / fwd+bwd |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        for implementation in implementations:
            b = {key: value / 1e6 for key, value in bytes_moved(case, implementation).items()}
            lines.append(
                f"| {case.name} | {implementation} | {b['forward']:.1f} | {b['backward']:.1f} "
                f"| {b['partial sum']:.1f} | {b['total']:.1f} | {b['minimum']:.1f} "
                f"| {b['minimum'] / b['total']:.0%} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.kernel_report",
        description="Compiles the GPU kernels for sm_90 on the CPU and prints registers, stack, shared "
        "memory and load widths per kernel, and the bytes the op moves.",
    )
    parser.add_argument("--cases", default="all", help=f"comma-separated, or all: {', '.join(CASES)}")
    parser.add_argument("--implementations", default=",".join(GPU_IMPLEMENTATIONS), help="comma-separated")
    parser.add_argument("--json", default=None, help="also write the kernel rows to this JSON file")
    args = parser.parse_args(argv)
    names = list(CASES) if args.cases == "all" else [name.strip() for name in args.cases.split(",")]
    implementations = [name.strip() for name in args.implementations.split(",")]
    unknown = [name for name in names if name not in CASES]
    unknown += [name for name in implementations if name not in GPU_IMPLEMENTATIONS]
    if unknown:
        parser.error(f"unknown {unknown}; cases: {list(CASES)}, implementations: {list(GPU_IMPLEMENTATIONS)}")
    stats, failures = [], []
    start = time.perf_counter()
    for name in names:
        for implementation in implementations:
            try:
                stats += compile_case(implementation, CASES[name])
            except Exception as error:  # noqa: BLE001 - reported, then the exit status says so
                failures.append(f"{name} / {implementation}: {type(error).__name__}: {error}")
            elapsed = time.perf_counter() - start
            print(f"[{elapsed:5.1f} s] {name} / {implementation}", file=sys.stderr, flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(
            json.dumps({"kernels": [dataclasses.asdict(s) for s in stats], "failures": failures}, indent=1)
        )
    print(kernel_table(stats))
    print()
    print(bytes_table([CASES[name] for name in names], implementations))
    for failure in failures:
        print(f"\nFAILED {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
