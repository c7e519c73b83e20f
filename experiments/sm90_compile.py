"""Compiling Triton kernels for sm_90 on a CPU, and reading what the compiler made.

Two entry points into triton's own CUDA backend (with the ptxas and cuobjdump
shipped in the triton wheel), used by `experiments/kernel_report.py`:

- `export_for_cuda` and `triton_calls`: `jax.export` of a jitted function for
  `platforms=["cuda"]` runs the Pallas-to-Triton lowering; each
  `__gpu$xla.gpu.triton` custom call carries its Triton module (MLIR bytecode in
  `mhlo.backend_config`), which `compile_triton_ir` takes to PTX and a cubin.
- `compile_triton_kernel`: a `@triton.jit` kernel compiled as jax-triton 0.3.1
  compiles it.

`cubin_resources` and `ptx_loads` read registers, stack and load widths back.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import re
import subprocess
import tempfile
import types

import jax
import jax.numpy as jnp

TRITON_TARGET = "__gpu$xla.gpu.triton"
CAPABILITY = 90


# --------------------------------------------------------------------------
# Reading the compiler's output.
# --------------------------------------------------------------------------

_LOAD = re.compile(r"\bld\.global((?:\.[a-z0-9]+)*)\s")


def ptx_loads(ptx: str) -> tuple[int, int, int]:
    """(16-byte, single-element, other) counts of the `ld.global` instructions in PTX."""
    vector = scalar = other = 0
    for match in _LOAD.finditer(ptx):
        parts = match.group(1).split(".")[1:]
        lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next(int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bfsu]\d+", p))
        if lanes * bits == 128:
            vector += 1
        elif lanes == 1:
            scalar += 1
        else:
            other += 1
    return vector, scalar, other


def _nvidia_tool(name: str) -> str:
    import triton

    return str(pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def cubin_resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the kernel in a cubin, from `cuobjdump -res-usage`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run(
            [_nvidia_tool("cuobjdump"), "-res-usage", file.name], capture_output=True, text=True, check=True
        ).stdout
    registers, stack = re.search(r"REG:(\d+)", text), re.search(r"STACK:(\d+)", text)
    if not (registers and stack):
        raise RuntimeError(f"cuobjdump -res-usage printed no REG / STACK:\n{text}")
    return int(registers.group(1)), int(stack.group(1))


@functools.lru_cache(maxsize=None)
def _backend():
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    return CUDABackend(GPUTarget("cuda", CAPABILITY, 32))


def _compile_ttir(module, options, metadata) -> tuple[str, bytes]:
    """PTX and cubin of a Triton module (TTIR), with triton's sm_90 pipeline."""
    backend = _backend()
    module = backend.make_ttir(module, metadata, options, CAPABILITY)
    module = backend.make_ttgir(module, metadata, options, CAPABILITY)
    llir = backend.make_llir(module, metadata, options, CAPABILITY)
    ptx = backend.make_ptx(llir, metadata, options, CAPABILITY)
    return ptx, backend.make_cubin(ptx, metadata, options, CAPABILITY)


def _abstract_gpu():
    """On jax >= 0.11 the Triton lowering reads the GPU kind from an abstract mesh."""
    sharding = jax.sharding
    if not (hasattr(sharding, "AbstractDevice") and hasattr(sharding, "use_abstract_mesh")):
        return contextlib.nullcontext()
    device = sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu")
    return sharding.use_abstract_mesh(sharding.AbstractMesh((), (), abstract_device=device))


def export_for_cuda(f, *args):
    """`jax.export` of jit(f) for CUDA, allowing the Triton custom call."""
    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON_TARGET)]
    with _abstract_gpu():
        return jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)(*args)


def cuda_export_error() -> str | None:
    """Why this jax cannot export a Pallas-Triton kernel for CUDA here, or None when it can."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    def add_one_kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1

    def probe(x):
        return pl.pallas_call(
            add_one_kernel,
            out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
            compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        )(x)

    try:
        export_for_cuda(probe, jax.ShapeDtypeStruct((16,), jnp.float32))
    except Exception as error:  # noqa: BLE001 - any failure of the probe means "cannot here"
        return f"jax {jax.__version__} cannot export a Triton kernel for CUDA here: {error!r}"
    return None


def triton_calls(exported) -> list[dict]:
    """The Triton custom calls of an exported module, in order.

    Each is a dict of name, num_warps, num_stages, grid and ir (the Triton
    module printed in generic MLIR form).
    """
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir
    from jaxlib.triton import dialect

    context = jax_mlir.make_ir_context()
    dialect.register_dialect(context)
    calls = []
    with context:
        module = ir.Module.parse(exported.mlir_module())

        def visit(operation):
            for region in operation.regions:
                for block in region.blocks:
                    for child in block.operations:
                        child = child.operation
                        if child.name == "stablehlo.custom_call" and (
                            ir.StringAttr(child.attributes["call_target_name"]).value == TRITON_TARGET
                        ):
                            config = ir.DictAttr(child.attributes["mhlo.backend_config"])
                            kernel = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
                            calls.append(
                                dict(
                                    name=ir.StringAttr(config["name"]).value,
                                    num_warps=ir.IntegerAttr(config["num_warps"]).value,
                                    num_stages=ir.IntegerAttr(config["num_stages"]).value,
                                    grid=tuple(ir.IntegerAttr(config[f"grid_{a}"]).value for a in "xyz"),
                                    ir=kernel.operation.get_asm(print_generic_op_form=True),
                                )
                            )
                        visit(child)

        visit(module.operation)
    return calls


def compile_triton_ir(text: str, num_warps: int, num_stages: int) -> tuple[str, bytes, dict]:
    """(PTX, cubin, metadata) of a Triton module given as generic-form MLIR text (from `triton_calls`)."""
    from triton._C.libtriton import ir as triton_ir

    context = triton_ir.context()
    triton_ir.load_dialects(context)
    _backend().load_dialects(context)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.mlir")
        pathlib.Path(path).write_text(text)
        module = triton_ir.parse_mlir_module(path, context)
    module.context = context
    options = _backend().parse_options({"num_warps": num_warps, "num_stages": num_stages, "num_ctas": 1})
    metadata = {}
    ptx, cubin = _compile_ttir(module, options, metadata)
    return ptx, cubin, metadata


_POINTER = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "float64": "*fp64"}


def compile_triton_kernel(kernel, arg_dtypes, constexprs, num_warps, num_stages):
    """(PTX, cubin, metadata) of a `@triton.jit` kernel compiled as jax-triton 0.3.1 compiles it.

    Every array argument is a pointer specialised as 16-byte aligned (jax-triton
    assumes aligned buffers); every keyword is a constexpr; options are
    jax-triton's (num_ctas 1, optimize_epilogue off, fp fusion on).
    """
    from triton._C import libtriton
    from triton.compiler import ASTSource
    from triton.compiler.code_generator import ast_to_ttir

    backend = _backend()
    signature = {kernel.arg_names[i]: _POINTER[str(jnp.dtype(d))] for i, d in enumerate(arg_dtypes)}
    attrs = {}
    for i, pointer in enumerate(signature.values()):
        aligned = types.SimpleNamespace(data_ptr=lambda: 16, dtype=pointer.removeprefix("*"))
        _, attribute = libtriton.native_specialize_impl(backend, aligned, False, True, True)
        attrs[(i,)] = backend.parse_attr(attribute)
    signature.update({name: "constexpr" for name in constexprs})
    options = backend.parse_options(
        {
            "num_warps": num_warps,
            "num_stages": num_stages,
            "num_ctas": 1,
            "optimize_epilogue": False,
            "debug": False,
            "enable_fp_fusion": True,
        }
    )
    context = libtriton.ir.context()
    libtriton.ir.load_dialects(context)
    backend.load_dialects(context)
    source = ASTSource(kernel, constexprs=dict(constexprs), signature=signature, attrs=attrs)
    module = ast_to_ttir(
        kernel,
        source,
        context=context,
        options=options,
        codegen_fns=backend.get_codegen_implementation(options),
        module_map=backend.get_module_map(),
    )
    metadata = {}
    ptx, cubin = _compile_ttir(module, options, metadata)
    return ptx, cubin, metadata
