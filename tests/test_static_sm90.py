"""Every GPU kernel compiled for sm_90 on the CPU, no GPU needed (`experiments/kernel_report.py`).

For each implementation one subprocess compiles both kernels at every case of
`kernel_report.GRID` (the goal shape (32,56,56,256) in bfloat16 and float32 at
k = 3, 5, 7; stride 2; 4 heads; "add"; float16; odd, float64, one-channel-per-
head and beyond-int32 shapes) with triton's CUDA backend and ptxas, and reports
registers, stack, shared memory and load widths. It runs in a subprocess
because `test_jax_triton.py` switches Triton's interpreter on for its own
process, and interpreted kernels cannot be compiled.

Asserted here: every kernel of the grid compiles; no kernel spills (0 bytes of
stack) at the goal shape at any k; at k = 3 both kernels use at most 128
registers; and at the goal shape every tap's tile of x (forward) or of
grad_out and x (backward) arrives in 16-byte loads.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import pytest

from experiments import kernel_report, sm90_compile

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOAL_CASES = [case for case in kernel_report.GRID if case.name in {f"goal-{d}-k{k}" for d in ("bf16", "f32")
                                                                    for k in (3, 5, 7)}]


def report(implementation: str, tmp_path: pathlib.Path) -> dict:
    """The kernel rows (by (case, kernel)) and failures of one implementation over the whole grid."""
    path = tmp_path / f"{implementation}.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.kernel_report", "--implementations", implementation]
        + ["--json", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert path.exists(), result.stdout + result.stderr
    data = json.loads(path.read_text())
    return {(row["case"], row["kernel"]): row for row in data["kernels"]}, data["failures"], result.stdout


def violations(rows: dict) -> list[str]:
    """What breaks the goals at the goal shape (bfloat16 and float32, k = 3, 5, 7), one line each."""
    found = []
    for case in GOAL_CASES:
        itemsize = jnp.dtype(case.dtype).itemsize
        k = case.kernel_size
        # Tap rows are a loop whose body holds k taps: the forward loads k tiles of x
        # per body; the backward k tiles of grad_out (dx), grad_out at its own pixels
        # once and k tiles of x (the filter gradients).
        for kernel, tiles_per_body in (("ddf_fwd_kernel", k), ("ddf_bwd_kernel", 2 * k + 1)):
            row = rows[(case.name, kernel)]
            where = f"{case.name} {kernel} {row['block_pixels']}x{row['block_channels']} w{row['num_warps']}"
            if row["stack"]:
                found.append(f"{where}: {row['stack']} bytes of stack (spills)")
            if k == 3 and row["registers"] > 128:
                found.append(f"{where}: {row['registers']} registers > 128")
            tile_bytes = row["block_pixels"] * row["block_channels"] * itemsize
            bytes_per_thread = tile_bytes // (32 * row["num_warps"])
            needed = tiles_per_body * bytes_per_thread // 16
            if bytes_per_thread % 16 or row["vector_loads"] < needed:
                found.append(f"{where}: {row['vector_loads']} 16-byte loads, the tiles need {needed}")
    return found


@pytest.mark.slow
@pytest.mark.parametrize("implementation", kernel_report.GPU_IMPLEMENTATIONS)
def test_kernels_compile_for_sm90_without_spills_and_with_vector_loads(implementation, tmp_path):
    pytest.importorskip("triton", reason="the static check compiles with triton's CUDA backend")
    if implementation == "pallas_triton" and (reason := sm90_compile.cuda_export_error()):
        pytest.skip(reason)
    rows, failures, output = report(implementation, tmp_path)
    assert not failures, "\n".join(failures)
    kernels = ("ddf_fwd_kernel", "ddf_bwd_kernel")
    expected = {(case.name, kernel) for case in kernel_report.GRID for kernel in kernels}
    assert set(rows) == expected, output
    for row in rows.values():
        assert 0 < row["registers"] <= 255 and row["shared"] >= 0, row
    assert not violations(rows), "\n".join(violations(rows)) + "\n\n" + output


def test_design_moves_at_most_1_25x_the_minimum_bytes_at_the_goal_shape():
    for implementation in kernel_report.GPU_IMPLEMENTATIONS:
        for name in ("goal-bf16-k3", "goal-f32-k3"):
            moved = kernel_report.bytes_moved(kernel_report.CASES[name], implementation)
            assert moved["total"] <= 1.25 * moved["minimum"], (name, implementation, moved)
