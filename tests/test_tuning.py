"""How the GPU kernels get their tiles: the shared heuristic, the tuning table, and the autotuner's CPU side.

Covers the launch-configuration checks, the heuristic both implementations
share, the read-only table lookup (this device's entry, another device, an
empty table that never asks for the device, a broken file), that a table
entry reaches both implementations' launches, and the parts of
`experiments/autotune.py` that run without a GPU: its command line, its
candidates, its search (on interpreted kernels) and its table writer.
"""

import argparse
import json
import pathlib
import tomllib

import jax
import jax.numpy as jnp
import pytest

from ddf_jax.kernels import DDFConfig, jax_triton, pallas_triton, tuning
from ddf_jax.kernels.common import LaunchConfig
from experiments import autotune

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMPLEMENTATIONS = {"pallas_triton": pallas_triton, "jax_triton": jax_triton}


def specs(n=2, h=56, w=56, c=256, k=3, stride=1, heads=1, dtype=jnp.bfloat16):
    """ShapeDtypeStructs of (x, channel_filter, spatial_filter (5-D))."""
    ho, wo = -(-h // stride), -(-w // stride)
    shapes = ((n, h, w, c), (n, c, k * k), (n, ho, wo, heads, k * k))
    return [jax.ShapeDtypeStruct(shape, dtype) for shape in shapes]


def defaults(implementation="pallas_triton", k=3, stride=1, **shape):
    return IMPLEMENTATIONS[implementation].BlockSizes.get_default(
        *specs(k=k, stride=stride, **shape), DDFConfig(k, stride)
    )


@pytest.fixture
def table(monkeypatch, tmp_path):
    """Writes {device kind: [entries]} as the active table; yields the writer."""
    path = tmp_path / "tuning_table.json"

    def write(devices):
        tables = {kind: dict(jax_version="0.11.2", date="2026-12-02", entries=entries)
                  for kind, entries in devices.items()}
        data = {"format_version": 1, "devices": tables}
        path.write_text(json.dumps(data))
        tuning.read_table.cache_clear()
        return path

    monkeypatch.setattr(tuning, "TABLE_PATH", path)
    yield write
    tuning.read_table.cache_clear()


def entry(implementation, forward, backward, dtype_bits=16, channels=256, group=256, taps=9):
    key = dict(implementation=implementation, dtype_bits=dtype_bits, channels=channels, group=group)
    return dict(key, taps=taps, forward=forward, backward=backward)


# --------------------------------------------------------------------------
# Launch configurations and the heuristic.
# --------------------------------------------------------------------------


def test_launch_config_and_block_sizes_validation():
    assert LaunchConfig(64, 16, 8, 1).describe() == "64x16 w8 s1"
    with pytest.raises(ValueError, match="block_pixels must be a positive power of two, got 24"):
        LaunchConfig(24, 16)
    with pytest.raises(ValueError, match="num_warps must be a positive power of two, got 3"):
        LaunchConfig(16, 16, 3)
    with pytest.raises(ValueError, match="num_stages must be a positive int, got 0"):
        LaunchConfig(16, 16, 4, 0)
    with pytest.raises(TypeError, match="BlockSizes.backward must be a LaunchConfig"):
        pallas_triton.BlockSizes(LaunchConfig(16, 16), (16, 16))
    blocks = defaults()
    assert hash(blocks) == hash(defaults()) and blocks == defaults()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_heuristic(implementation):
    # The one heuristic serves both implementations.
    assert dataclass_values(defaults(implementation)) == dataclass_values(defaults("pallas_triton"))
    bf16, f32 = defaults(implementation), defaults(implementation, dtype=jnp.float32)
    # Forward: 128-byte channel rows, 4 KB tiles of x per tap; backward: 32-byte rows.
    assert (bf16.forward.block_pixels, bf16.forward.block_channels) == (32, 64)
    assert (f32.forward.block_pixels, f32.forward.block_channels) == (32, 32)
    assert (bf16.backward.block_channels, f32.backward.block_channels) == (16, 8)
    # 8 tile elements per thread in the backward kernel.
    for blocks in (bf16, f32):
        backward = blocks.backward
        assert backward.block_pixels * backward.block_channels == 256 * backward.num_warps
    # The backward pixel tile shrinks as K grows (its d_spatial_filter accumulator is (BP, kp, kp)),
    # and so does the forward tile.
    backward_pixels = [defaults(implementation, k=k).backward.block_pixels for k in (1, 3, 5, 7, 9)]
    assert backward_pixels == [128, 128, 64, 64, 64]
    assert [defaults(implementation, k=k).forward.block_pixels for k in (3, 5)] == [32, 16]
    # Channel tiles stay within a head; tiny images get small pixel tiles.
    heads = defaults(implementation, c=12, heads=4)
    assert heads.forward.block_channels == 16 and heads.backward.block_channels == 4
    small = defaults(implementation, h=2, w=3, c=3, heads=3, dtype=jnp.float32)
    assert (small.forward.block_pixels, small.forward.block_channels) == (16, 4)
    assert (small.backward.block_pixels, small.backward.block_channels) == (16, 1)
    assert defaults(implementation, c=1000).forward.block_channels == 64


def dataclass_values(blocks):
    return blocks.forward, blocks.backward


# --------------------------------------------------------------------------
# The table.
# --------------------------------------------------------------------------


def test_shape_class():
    assert tuning.shape_class("jax_triton", jnp.bfloat16, 200, 4, 9) == ("jax_triton", 16, 256, 64, 9)
    assert tuning.shape_class("pallas_triton", "float32", 5000, 1, 49) == ("pallas_triton", 32, 512, 512, 49)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_table_entry_of_this_device_reaches_the_launches(table, implementation):
    kind = jax.devices()[0].device_kind
    table({kind: [entry(implementation, [16, 32, 8, 2], [32, 8, 4, 1])],
           "Another GPU": [entry(implementation, [256, 64, 4, 1], [256, 16, 4, 1], dtype_bits=32)]})
    tuned = defaults(implementation)
    block_sizes = IMPLEMENTATIONS[implementation].BlockSizes
    assert tuned == block_sizes(LaunchConfig(16, 32, 8, 2), LaunchConfig(32, 8, 4, 1))
    # Another class (float32), tuned only on another device kind: the heuristic.
    x32, _, sf32 = specs(dtype=jnp.float32)
    heuristic = IMPLEMENTATIONS[implementation].BlockSizes.heuristic(x32, sf32, DDFConfig(3))
    assert defaults(implementation, dtype=jnp.float32) == heuristic
    # The tiles reach the kernel launch: 56*56 / 16 pixel tiles x 256 / 32 channel tiles x N = 2.
    x, cf, sf = specs()
    if implementation == "jax_triton":
        assert jax_triton.launch_spec("forward", x, cf, sf, DDFConfig(3)).grid == (2 * 196, 8)
    else:
        jaxpr = jax.make_jaxpr(lambda *a: pallas_triton.forward(*a, DDFConfig(3), interpret=True))(x, cf, sf)
        (call,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "pallas_call"]
        assert tuple(call.params["grid_mapping"].grid) == (196, 8, 2)


def test_empty_table_never_asks_for_the_device(table, monkeypatch):
    table({})

    def no_device():
        raise AssertionError("an empty table must not query the device")

    monkeypatch.setattr(jax, "devices", no_device)
    assert tuning.lookup(("pallas_triton", 16, 256, 256, 9)) is None


def test_missing_table_is_empty(tmp_path):
    assert tuning.lookup(("pallas_triton", 16, 256, 256, 9), tmp_path / "absent.json") is None


def test_broken_table_is_an_error_that_names_the_file(table):
    path = table({})
    path.write_text('{"format_version": 1, "devices": {"x": {"entries": [{"implementation": 3}]}}}')
    tuning.read_table.cache_clear()
    with pytest.raises(ValueError, match=rf"{path}: not a DDF tuning table \(KeyError"):
        tuning.lookup(("pallas_triton", 16, 256, 256, 9))


@pytest.mark.parametrize("forward", [[64, 48, 4, 1], [64, 32, 4], [64, 32, 4, 0]])
def test_invalid_launch_entry_is_named_when_the_table_is_read(table, forward):
    path = table({"NVIDIA H200": [entry("pallas_triton", forward, [128, 16, 4, 1])]})
    with pytest.raises(ValueError, match=rf"{path}: .*devices\['NVIDIA H200'\]\.entries\[0\]\.forward must be"):
        tuning.read_table(path)


def test_shipped_table_is_valid_and_packaged():
    assert tuning.read_table(tuning.TABLE_PATH) == {}  # no GPU run has tuned anything yet
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "*.json" in package_data["ddf_jax.kernels"]


# --------------------------------------------------------------------------
# experiments/autotune.py without a GPU.
# --------------------------------------------------------------------------


def test_autotune_command_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        autotune.main(["--help"])
    assert exit_info.value.code == 0 and "--write" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        autotune.main(["--shapes", "32x56x56:3", "--dry-run"])
    assert "--shapes items must look like 32x56x56x256:3" in capsys.readouterr().err
    # Without a GPU it refuses, unless it only prints the plan.
    assert autotune.main(["--shapes", "2x15x13x64:5"]) == autotune.EXIT_NOT_GPU
    shapes = "32x56x56x256:3,32x28x28x256:3"
    assert autotune.main(["--shapes", shapes, "--dry-run", "--max-candidates", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # One class per implementation, dtype and K (the second shape shares the first's): 2 x 2 x 2 kernels.
    assert len(lines) == 8 and all(line.count(" s1") == 3 for line in lines)


@pytest.mark.parametrize("role", tuning.ROLES)
def test_autotune_candidates(role):
    problem = autotune.Problem(32, 56, 56, 256, 3, "bfloat16")
    found = autotune.candidates("jax_triton", problem, role, limit=50)
    heuristic = jax_triton.BlockSizes.heuristic(*problem.specs()[0:3:2], problem.config)
    assert found[0] == heuristic and len(set(found)) == len(found) > 10
    other = "backward" if role == "forward" else "forward"
    assert all(getattr(blocks, other) == getattr(heuristic, other) for blocks in found)


def test_autotune_writes_a_table_the_lookup_reads(table):
    path = table({"Another GPU": [entry("pallas_triton", [64, 64, 4, 1], [64, 16, 4, 1])]})
    key = tuning.shape_class("jax_triton", jnp.bfloat16, 256, 1, 9)
    autotune.write_table(path, {key: {"forward": (16, 32, 8, 1), "backward": (64, 8, 4, 1)}})
    autotune.write_table(path, {key: {"forward": (16, 64, 4, 1), "backward": (64, 8, 4, 1)}})  # replaces it
    assert tuning.lookup(key) == {"forward": [16, 64, 4, 1], "backward": [64, 8, 4, 1]}
    devices = tuning.read_table(path)
    assert set(devices) == {"Another GPU", jax.devices()[0].device_kind} and len(devices["Another GPU"]) == 1
    assert not list(path.parent.glob("*.tmp"))


def test_autotune_search_on_interpreted_kernels(monkeypatch, table):
    """The search itself, on the CPU: Pallas kernels in interpret mode stand in for compiled ones.

    Timings of interpreted kernels mean nothing, so only the mechanics are
    checked: every candidate is compiled, compared with "xla" and timed, and
    an entry holds the launches of candidates or the heuristic.
    """
    def interpreted_kernel(implementation, role, problem, blocks):
        options = dict(block_sizes=blocks, interpret=True)
        if role == "forward":
            return jax.jit(lambda x, cf, sf, g: pallas_triton.forward(x, cf, sf, problem.config, **options))
        return jax.jit(lambda x, cf, sf, g: pallas_triton.backward(x, cf, sf, g, problem.config, **options))

    monkeypatch.setattr(autotune, "kernel_function", interpreted_kernel)
    problem = autotune.Problem(1, 9, 7, 16, 3, "float32")
    args = argparse.Namespace(max_candidates=2, calls=2, repeats=1, min_gain=-1.0)
    logged = []
    entry = autotune.tune("pallas_triton", problem, args, deadline=float("inf"), log=logged.append)
    assert sum(" ms" in line for line in logged) == 4, logged  # 2 kernels x 2 candidates timed
    assert not any("wrong" in line or "failed" in line for line in logged), logged
    for role in tuning.ROLES:
        tried = {getattr(b, role) for b in autotune.candidates("pallas_triton", problem, role, 2)}
        assert LaunchConfig(*entry[role]) in tried
    path = table({})
    key = tuning.shape_class("pallas_triton", problem.dtype, problem.c, 1, 9)
    autotune.write_table(path, {key: entry})
    assert tuning.lookup(key) == {role: list(entry[role]) for role in tuning.ROLES}
