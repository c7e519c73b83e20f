"""Tests of the tile-size tuning table (`ddf_jax.kernels.tuning`) and the autotuner's CPU-side logic.

Covers: the lookup rules (a table hit, another device kind, a missing or
broken file, the shape-class buckets), the mapping between per-role launch
configurations and the `BlockSizes` both kernels take, the autotuner's
candidates and plan, choosing winners and writing them, a table that
round-trips through its file, and, in Pallas interpret mode, that a table
entry forcing non-default tiles really reaches the kernels (their launch grids
change) while the op still matches "xla".
"""

import dataclasses
import functools
import json
import pathlib
import tomllib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddf_jax
from ddf_jax.kernels import DDFConfig, jax_triton, pallas_triton, tuning
from experiments import autotune

ROOT = pathlib.Path(__file__).resolve().parents[1]
LC = tuning.LaunchConfig
# XLA CPU options for compiling interpret-mode kernels faster (as in test_pallas_triton).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(autouse=True)
def fresh_table_cache(monkeypatch):
    """Every test starts and ends with no cached table (and the environment restored by monkeypatch)."""
    tuning.clear_cache()
    yield
    monkeypatch.undo()
    tuning.clear_cache()


def device_table(kind, entries, measured=None):
    return tuning.DeviceTable(kind, "gpu", "0.11.2", "2026-01-31", dict(entries), dict(measured or {}))


def pallas_defaults(channels, taps, heads=1, dtype=None):
    return tuning.BlockSizes.get_default(
        "pallas_triton", channels=channels, taps=taps, heads=heads, dtype=dtype
    )


def key(implementation="pallas_triton", role="forward", bits=32, channels=256, taps=9):
    return tuning.ShapeClass(implementation, role, bits, channels, taps)


def use_table(monkeypatch, tmp_path, table):
    """Writes `table` to a file and makes it the active table."""
    path = tmp_path / "table.json"
    tuning.write_table(table, path)
    monkeypatch.setenv(tuning.TABLE_ENV_VAR, str(path))
    tuning.clear_cache()
    return path


# --------------------------------------------------------------------------
# Shape classes and lookups.
# --------------------------------------------------------------------------


def test_shape_class_buckets():
    cls = functools.partial(tuning.shape_class, "pallas_triton", taps=9)
    assert cls("forward", channels=200, dtype=jnp.bfloat16) == key(bits=16, channels=256)
    assert cls("forward", channels=256, dtype=jnp.float16).dtype_bits == 16
    assert cls("dx", channels=256, dtype="float32") == key(role="dx", bits=32, channels=256)
    assert cls("forward", channels=5000, dtype=jnp.float64) == key(
        bits=64, channels=tuning.CHANNEL_BUCKET_CAP
    )
    # filters tiles one head's channels: bucketed by C // G.
    assert cls("filters", channels=256, dtype=jnp.float32, heads=4).channels == 64
    assert cls("forward", channels=256, dtype=jnp.float32, heads=4).channels == 256
    with pytest.raises(TypeError, match="dtype must be float16, bfloat16, float32 or float64, got int32"):
        cls("forward", channels=8, dtype=jnp.int32)
    with pytest.raises(ValueError, match=r"role must be one of \('forward', 'dx', 'filters'\), got 'fwd'"):
        key(role="fwd")
    with pytest.raises(ValueError, match="channels must be a power of two"):
        key(channels=96)


def test_lookup_rules():
    entry = LC(64, 32, 8, 2)
    table = tuning.TuningTable({"GPU-A": device_table("GPU-A", {key(bits=16): entry})})
    assert tuning.lookup(key(bits=16), table=table, device_kind="GPU-A") == entry
    # Another device kind, another dtype width, channel bucket, taps or role: no entry.
    assert tuning.lookup(key(bits=16), table=table, device_kind="GPU-B") is None
    assert tuning.lookup(key(bits=16), table=table, device_kind="cpu") is None
    for other in (key(bits=32), key(bits=16, channels=128), key(bits=16, taps=25), key(bits=16, role="dx")):
        assert tuning.lookup(other, table=table, device_kind="GPU-A") is None

    heuristic = {
        role: tuning.heuristic_config("pallas_triton", role, channels=200, taps=9) for role in tuning.ROLES
    }
    choose = functools.partial(tuning.choose_configs, "pallas_triton", channels=200, taps=9, table=table)
    # A hit replaces only that role; C=200 falls in the 256 bucket.
    assert choose(dtype=jnp.bfloat16, device_kind="GPU-A") == {**heuristic, "forward": entry}
    # The wrong device kind, another dtype width, or no dtype: the heuristic.
    assert choose(dtype=jnp.bfloat16, device_kind="GPU-B") == heuristic
    assert choose(dtype=jnp.float32, device_kind="GPU-A") == heuristic
    assert choose(dtype=None, device_kind="GPU-A") == heuristic
    # The same table is ignored by the other implementation.
    jt = tuning.choose_configs(
        "jax_triton", channels=200, taps=9, dtype=jnp.bfloat16, table=table, device_kind="GPU-A"
    )
    assert jt["forward"] == tuning.heuristic_config("jax_triton", "forward", channels=200, taps=9)


def test_missing_empty_disabled_and_broken_tables_give_the_heuristic(monkeypatch, tmp_path):
    expected = pallas_defaults(256, 9)  # no dtype: never the table
    cases = {"missing": tmp_path / "absent.json", "empty": tmp_path / "empty.json"}
    cases["empty"].write_text("  \n")
    for name, path in cases.items():
        monkeypatch.setenv(tuning.TABLE_ENV_VAR, str(path))
        tuning.clear_cache()
        assert tuning.active_table() == tuning.TuningTable(), name
        assert pallas_defaults(256, 9, dtype=jnp.float32) == expected, name

    monkeypatch.setenv(tuning.TABLE_ENV_VAR, "none")
    tuning.clear_cache()
    assert tuning.active_table_path() is None and tuning.active_table() == tuning.TuningTable()

    broken = tmp_path / "broken.json"
    broken.write_text('{"format_version": 1, "devices": [')
    monkeypatch.setenv(tuning.TABLE_ENV_VAR, str(broken))
    tuning.clear_cache()
    with pytest.warns(RuntimeWarning, match="ignoring the DDF tuning table.*not valid JSON"):
        assert tuning.active_table() == tuning.TuningTable()
    assert pallas_defaults(256, 9, dtype=jnp.float32) == expected


def test_active_table_on_this_device_reaches_both_block_sizes(monkeypatch, tmp_path):
    here = tuning.current_device_kind()
    pallas_dx = LC(16, 8, 2, 1)
    jt_filters = LC(32, 16, 8, 3)
    table = tuning.TuningTable(
        {
            here: device_table(
                here,
                {
                    key(role="dx", channels=16): pallas_dx,
                    key("jax_triton", "filters", channels=16): jt_filters,
                },
            ),
            "some other GPU": device_table(
                "some other GPU", {key(role="forward", channels=16): LC(16, 16, 4, 1)}
            ),
        }
    )
    use_table(monkeypatch, tmp_path, table)
    pallas = pallas_defaults(12, 9, dtype=jnp.float32)
    heuristic = pallas_defaults(12, 9)
    # Only dx has an entry here (the forward one is another device's).
    assert pallas == dataclasses.replace(heuristic, dx=pallas_dx)
    assert pallas_defaults(12, 9, dtype=jnp.bfloat16) == heuristic

    def jax_triton_defaults(**kwargs):
        return tuning.BlockSizes.get_default("jax_triton", channels=12, in_pixels=99, out_pixels=99, **kwargs)

    blocks = jax_triton_defaults(taps=9, dtype=jnp.float32)
    assert blocks.filters == jt_filters and blocks.for_role("filters") == LC(32, 16, 8, 3)
    assert jax_triton_defaults(taps=9) == jax_triton_defaults(taps=25, dtype=jnp.float32)
    assert blocks == dataclasses.replace(jax_triton_defaults(taps=9), filters=jt_filters)


def test_jax_triton_launches_use_the_table_per_role(monkeypatch, tmp_path):
    """The launch specs (pure Python, no Triton needed) take each role's tiles, warps and stages."""
    here = tuning.current_device_kind()
    entries = {
        key("jax_triton", "forward", channels=32): LC(16, 8, 2, 1),
        key("jax_triton", "dx", channels=32): LC(32, 16, 8, 3),
    }
    use_table(monkeypatch, tmp_path, tuning.TuningTable({here: device_table(here, entries)}))
    config = DDFConfig(3)
    x = jax.ShapeDtypeStruct((2, 11, 9, 20), jnp.float32)
    cf = jax.ShapeDtypeStruct((2, 20, 9), jnp.float32)
    sf = jax.ShapeDtypeStruct((2, 11, 9, 1, 9), jnp.float32)
    forward = jax_triton.forward_launch(x, cf, sf, config)
    assert forward.grid == (2 * 7, 3) and (forward.num_warps, forward.num_stages) == (2, 1)
    assert (forward.constexprs["BLOCK_P"], forward.constexprs["BLOCK_C"]) == (16, 8)
    dx = jax_triton.dx_launch(x, cf, sf, x, config)
    assert dx.grid == (2 * 4, 2) and (dx.num_warps, dx.num_stages) == (8, 3)
    filters = jax_triton.filter_launch(x, cf, sf, x, config)
    heuristic = tuning.heuristic_config("jax_triton", "filters", channels=20, taps=9, out_pixels=99)
    assert (filters.num_warps, filters.num_stages) == (heuristic.num_warps, heuristic.num_stages)
    assert filters.constexprs["BLOCK_P"] == heuristic.block_pixels == 128


# --------------------------------------------------------------------------
# BlockSizes: one per-role configuration set for both kernels.
# --------------------------------------------------------------------------


def test_block_sizes_roles_and_validation():
    configs = {"forward": LC(64, 64, 4, 2), "dx": LC(128, 32, 8, 3), "filters": LC(64, 16, 2, 1)}
    blocks = tuning.BlockSizes(**configs)
    assert {role: blocks.for_role(role) for role in tuning.ROLES} == configs
    assert blocks.describe() == "forward 64x64 w4 s2, dx 128x32 w8 s3, filters 64x16 w2 s1"
    assert hash(blocks) == hash(tuning.BlockSizes(**configs))  # usable as a cache key
    for implementation in tuning.IMPLEMENTATIONS:
        defaults = tuning.BlockSizes.get_default(implementation, channels=200, taps=9, heads=2)
        assert {role: defaults.for_role(role) for role in tuning.ROLES} == tuning.choose_configs(
            implementation, channels=200, taps=9, heads=2
        )

    with pytest.raises(ValueError, match="role must be one of"):
        blocks.for_role("backward")
    with pytest.raises(TypeError, match=r"BlockSizes.dx must be a LaunchConfig, got \(16, 16, 4, 1\)"):
        tuning.BlockSizes(LC(16, 16, 4, 1), (16, 16, 4, 1), LC(16, 16, 4, 1))
    with pytest.raises(ValueError, match="BlockSizes.filters.num_warps must be a power of two, got 3"):
        tuning.BlockSizes(LC(16, 16, 4, 1), LC(16, 16, 4, 1), LC(16, 16, 3, 1))
    with pytest.raises(ValueError, match="LaunchConfig.block_pixels must be a positive power of two, got 24"):
        LC(24, 16, 4, 1)
    with pytest.raises(ValueError, match="LaunchConfig.num_stages must be a positive int, got 0"):
        LC(16, 16, 4, 0)
    with pytest.raises(ValueError, match=r"block_channels must be a positive power of two, got 16.0"):
        LC(16, 16.0, 4, 1)


# --------------------------------------------------------------------------
# The table file.
# --------------------------------------------------------------------------


def test_table_round_trips_through_write_and_read(tmp_path):
    table = tuning.TuningTable(
        {
            "GPU-B": device_table("GPU-B", {key(bits=16): LC(64, 64, 8, 1)}),
            "GPU-A": device_table(
                "GPU-A",
                {
                    key("jax_triton", "filters", 32, 64, 49): LC(32, 32, 4, 3),
                    key(role="dx"): LC(128, 32, 8, 1),
                },
                {key(role="dx"): {"ms": [1.25, 0.5], "speedup": 1.3}},
            ),
        }
    )
    path = tmp_path / "table.json"
    tuning.write_table(table, path)
    assert tuning.read_table(path) == table
    data = json.loads(path.read_text())
    assert [d["device_kind"] for d in data["devices"]] == ["GPU-A", "GPU-B"]  # sorted, stable diffs
    (dx_entry,) = [e for e in data["devices"][0]["entries"] if e["role"] == "dx"]
    assert dx_entry["measured"] == {"ms": [1.25, 0.5], "speedup": 1.3}
    assert dx_entry["block_pixels"] == 128 and dx_entry["implementation"] == "pallas_triton"
    assert tuning.table_to_json(tuning.table_from_json(data)) == data
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)

    # merged(): same class replaced, other classes and devices kept; replace=True drops the old classes.
    update = device_table("GPU-A", {key(role="dx"): LC(16, 128, 4, 1), key(taps=25): LC(16, 64, 4, 1)})
    merged = table.merged(update)
    assert merged.devices["GPU-B"] == table.devices["GPU-B"]
    assert merged.devices["GPU-A"].entries == {
        key("jax_triton", "filters", 32, 64, 49): LC(32, 32, 4, 3),
        key(role="dx"): LC(16, 128, 4, 1),
        key(taps=25): LC(16, 64, 4, 1),
    }
    assert key(role="dx") not in merged.devices["GPU-A"].measured  # stale measurements dropped
    assert table.merged(update, replace=True).devices["GPU-A"].entries == update.entries


def test_shipped_table_is_valid_and_packaged():
    path = tuning.default_table_path()
    assert path.name == "tuning_table.json" and path.parent == pathlib.Path(pallas_triton.__file__).parent
    tuning.read_table(path)  # raises if the shipped file is not a valid table
    data = json.loads(path.read_text())
    assert data["format_version"] == tuning.TABLE_FORMAT_VERSION
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "*.json" in pyproject["tool"]["setuptools"]["package-data"]["ddf_jax.kernels"]


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.update(format_version=2), "format_version must be 1, got 2"),
        (lambda d: d["devices"][0]["entries"][0].update(block_pixels=24), r"entries\[0\].*block_pixels"),
        (
            lambda d: d["devices"][0]["entries"][0].update(num_warps=64),
            "num_warps must be a power of two <= 32",
        ),
        (lambda d: d["devices"][0]["entries"][0].update(role="backward"), "role must be one of"),
        (
            lambda d: d["devices"][0]["entries"][0].pop("taps"),
            r"devices\[0\].entries\[0\]: missing key 'taps'",
        ),
        (lambda d: d["devices"][0]["entries"].append(dict(d["devices"][0]["entries"][0])), "appears twice"),
        (lambda d: d["devices"].append(dict(d["devices"][0])), "device_kind 'GPU-A' appears twice"),
        (lambda d: d["devices"][0].update(device_kind=""), "device_kind must not be empty"),
    ],
)
def test_invalid_tables_are_rejected_with_the_place(tmp_path, mutate, message):
    data = tuning.table_to_json(
        tuning.TuningTable({"GPU-A": device_table("GPU-A", {key(): LC(16, 16, 4, 1)})})
    )
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        tuning.read_table(path)


# --------------------------------------------------------------------------
# The autotuner's candidates, plan, winners and command line (CPU side).
# --------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", tuning.IMPLEMENTATIONS)
@pytest.mark.parametrize("role", tuning.ROLES)
@pytest.mark.parametrize(
    "channels,taps,heads", [(256, 9, 1), (256, 49, 1), (20, 25, 4), (3, 1, 3), (1000, 81, 2)]
)
def test_candidates_are_valid_block_sizes(implementation, role, channels, taps, heads):
    candidates = autotune.candidate_configs(
        implementation, role, channels=channels, taps=taps, heads=heads, max_candidates=8
    )
    assert candidates[0] == tuning.heuristic_config(
        implementation, role, channels=channels, taps=taps, heads=heads
    )
    assert 1 <= len(candidates) <= 8 and len(set(candidates)) == len(candidates)
    span = channels // heads if role == "filters" else channels
    problem = autotune.Problem(2, 13, 11, channels, int(np.sqrt(taps)), heads=heads)
    for config in candidates:
        for value in (config.block_pixels, config.block_channels, config.num_warps):
            assert value >= 1 and value & (value - 1) == 0, config
        assert config.block_channels <= tuning.next_power_of_2(span), config
        assert 16 <= config.block_pixels <= 512 and config.num_stages in (1, 2, 3), config
        if implementation == "pallas_triton" and role == "filters" and config != candidates[0]:
            assert taps * config.block_pixels <= 4096, config  # K accumulators fit in registers
        if implementation == "pallas_triton" and role != "filters":
            assert config.num_stages == 1, config  # no loop to pipeline
        blocks = autotune.block_sizes_for(implementation, role, config, problem)
        assert isinstance(blocks, tuning.BlockSizes) and blocks.for_role(role) == config
    if channels == 256:
        assert len(candidates) == 8  # enough of a pool for the official shapes


def test_plan_groups_the_official_shapes_into_one_class():
    problems = autotune.parse_shapes("official,ksweep")
    assert len(problems) == 9  # (32,56,56,256) k=3 is in both sets
    assert autotune.parse_shapes("4x15x13x64:5") == [autotune.Problem(4, 15, 13, 64, 5)]
    with pytest.raises(ValueError, match="--shapes item must be one of"):
        autotune.parse_shapes("official,bogus")
    units = autotune.plan_units(["pallas_triton"], problems, ["float32"], ["forward"], max_candidates=4)
    assert [u.key.taps for u in units] == [9, 25, 49]
    k3 = units[0]
    assert len(k3.class_problems) == 7 and len(k3.candidates) == 4
    # Most pixels first, then the median: (32,224,224) and (32,56,56).
    assert [p.label() for p in k3.problems] == ["32x224x224x256 k3", "32x56x56x256 k3"]
    units = autotune.plan_units(["pallas_triton", "jax_triton"], problems[:1], ["bfloat16", "float32"])
    assert len(units) == 2 * 2 * 3 and len({(u.key, u.dtype) for u in units}) == len(units)


def test_ranking_and_table_update_from_measurements(tmp_path):
    small, large = autotune.Problem(2, 8, 8, 256, 3), autotune.Problem(4, 32, 32, 256, 3)
    default, fast, faster_on_one, broken = (
        LC(32, 64, 4, 1),
        LC(64, 64, 4, 1),
        LC(16, 128, 4, 1),
        LC(128, 64, 8, 1),
    )
    baseline = {small: 1.0, large: 10.0}
    timings = {
        default: {small: 1.0, large: 10.0},
        fast: {small: 0.9, large: 8.1},  # geometric mean 0.8538
        faster_on_one: {small: 0.5, large: 22.0},  # geometric mean 1.049
        broken: {small: 0.1},  # failed on `large`: not ranked
    }
    ranked = autotune.rank_candidates([large, small], baseline, timings)
    assert [config for _, config in ranked] == [fast, default, faster_on_one]
    assert ranked[0][0] == pytest.approx(np.sqrt(0.9 * 0.81))
    assert autotune.rank_candidates([large, small], {small: 1.0}, timings) == []

    unit = autotune.Unit(key(), "float32", (large, small), (large, small), (default, fast))
    result = autotune.UnitResult(unit, winner=fast, score=ranked[0][0])
    for problem in (large, small):
        result.baseline[problem] = autotune.Measurement(problem, default, "ok", baseline[problem])
        for config in (default, fast):
            result.measurements.append(autotune.Measurement(problem, config, "ok", timings[config][problem]))
    result.measurements.append(autotune.Measurement(large, broken, "failed", message="boom"))
    no_winner = autotune.UnitResult(dataclasses.replace(unit, key=key(role="dx")), note="budget spent")

    update = autotune.device_table_update([result, no_winner], device_table("GPU-A", {}))
    assert update.entries == {key(): fast}
    measured = update.measured[key()]
    assert measured["ms"] == [8100.0, 900.0] and measured["heuristic_ms"] == [10000.0, 1000.0]
    assert measured["speedup"] == pytest.approx(1 / ranked[0][0], abs=1e-3)
    assert (measured["candidates_timed"], measured["candidates_failed"]) == (3, 1)

    path = tmp_path / "table.json"
    tuning.write_table(tuning.TuningTable().merged(update), path)
    assert tuning.lookup(key(), table=tuning.read_table(path), device_kind="GPU-A") == fast

    summary = autotune.format_summary([result, no_winner], "title")
    assert "| pallas_triton | forward | float32 | 256 | 9 |" in summary and "64x64 w4 s1" in summary
    assert "1.17x" in summary and "budget spent" in summary


def test_command_line_dry_run_and_refusal_without_gpu(capsys):
    args = ["--implementations", "pallas_triton,jax_triton", "--shapes", "ksweep", "--dtype", "bfloat16"]
    assert autotune.main(args + ["--dry-run", "--max-candidates", "3"]) == 0
    plan = capsys.readouterr().out
    assert plan.count("\n- ") + plan.startswith("- ") == 2 * 3 * 3  # implementations x roles x k
    assert "jax_triton/filters 16-bit C256 K49" in plan and "3 candidates" in plan
    if jax.default_backend() != "gpu":
        assert autotune.main(args) == autotune.EXIT_NOT_GPU
        assert "autotune needs a GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        autotune.main(["--dtype", "int8"])
    assert info.value.code == 2


# --------------------------------------------------------------------------
# A table entry reaches the Pallas kernels (interpret mode off a GPU).
# --------------------------------------------------------------------------


def _pallas_calls(jaxpr):
    """{kernel name: (grid, num_warps or None)} of every pallas_call in a (nested) jaxpr."""
    found = {}

    def visit(value):
        if hasattr(value, "jaxpr") and hasattr(value, "consts"):  # ClosedJaxpr
            value = value.jaxpr
        if hasattr(value, "eqns"):
            for eqn in value.eqns:
                if eqn.primitive.name == "pallas_call":
                    params = eqn.params["compiler_params"]
                    if isinstance(params, dict):  # keyed by backend in some versions
                        params = next(iter(params.values()), None)
                    found[eqn.params["name"]] = (
                        tuple(eqn.params["grid_mapping"].grid),
                        getattr(params, "num_warps", None),
                    )
                for sub in eqn.params.values():
                    for item in sub if isinstance(sub, (tuple, list)) else (sub,):
                        visit(item)

    visit(jaxpr)
    return found


def test_table_entries_reach_the_pallas_kernels_and_results_match_xla(monkeypatch, tmp_path):
    if jax.default_backend() in pallas_triton.GPU_PLATFORMS:
        pytest.skip("the forced tiles are meant for interpret mode; the GPU table belongs to the GPU")
    n, h, w, c, k = 1, 7, 9, 6, 3  # odd sizes: partial pixel and channel tiles
    here = tuning.current_device_kind()
    forced = {
        "forward": LC(16, 4, 2, 1),
        "dx": LC(32, 2, 8, 1),
        "filters": LC(16, 2, 1, 2),
    }
    entries = {key(role=role, channels=8, taps=k * k): config for role, config in forced.items()}
    use_table(monkeypatch, tmp_path, tuning.TuningTable({here: device_table(here, entries)}))

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(n, h, w, c)), jnp.float32)
    cf = jnp.asarray(rng.normal(size=(n, c, k * k)), jnp.float32)
    sf = jnp.asarray(rng.normal(size=(n, h, w, k * k)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(n, h, w, c)), jnp.float32)

    def forward_and_grads(implementation):
        def f(x, cf, sf, g):
            out, vjp = jax.vjp(
                lambda *a: ddf_jax.ddf(*a, kernel_size=k, implementation=implementation), x, cf, sf
            )
            return out, vjp(g)

        return f

    calls = _pallas_calls(jax.make_jaxpr(forward_and_grads("pallas_triton"))(x, cf, sf, g))
    pixels = h * w
    assert calls == {
        "ddf_fwd": ((-(-pixels // 16), -(-c // 4), n), 2),
        "ddf_bwd_dx": ((-(-pixels // 32), -(-c // 2), n), 8),
        "ddf_bwd_filters": ((-(-pixels // 16), 1, n), 1),
    }
    default = pallas_defaults(c, k * k)
    # One tile each: the table changed them.
    assert (default.forward.block_pixels, default.filters.block_pixels) == (256, 128)

    compiled = jax.jit(forward_and_grads("pallas_triton")).lower(x, cf, sf, g).compile(FAST_COMPILE)
    out, grads = compiled(x, cf, sf, g)
    out_xla, grads_xla = jax.jit(forward_and_grads("xla"))(x, cf, sf, g)
    chex.assert_trees_all_close(out, out_xla, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(grads, grads_xla, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------
# The tuner's whole run on CPU: interpreted kernels, made-up timings.
# --------------------------------------------------------------------------


def test_autotune_run_picks_the_fastest_correct_candidate_and_writes_it(monkeypatch, tmp_path, capsys):
    """`main` end to end with the GPU pieces replaced: kernels interpreted, made-up times.

    The heuristic takes 1 ms; the fastest candidate raises (a compile
    failure), the next returns wrong numbers, and the third (0.5 ms) must be
    written to the table.
    """
    problem_spec = "1x9x7x64:3"
    (problem,) = autotune.parse_shapes(problem_spec)
    candidates = autotune.candidate_configs("pallas_triton", "forward", channels=64, taps=9, max_candidates=5)
    assert len(candidates) == 5
    failing, wrong, expected, slower = candidates[1:]
    milliseconds = {candidates[0]: 1.0, failing: 0.2, wrong: 0.3, expected: 0.5, slower: 0.8}

    def fake_role_function(implementation, role, problem, block_sizes):
        assert (implementation, role) == ("pallas_triton", "forward")
        config = block_sizes.for_role(role)
        jitted = jax.jit(
            lambda x, cf, sf, g: pallas_triton.forward(
                x, cf, sf, problem.config, interpret=True, block_sizes=block_sizes
            )
        )

        def run(*args):
            if config == failing:
                raise RuntimeError("Triton compilation failed (simulated)")
            out = jitted(*args)
            return out + 1.0 if config == wrong else out

        run.seconds = milliseconds[config] * 1e-3
        return run

    monkeypatch.setattr(autotune, "role_function", fake_role_function)
    monkeypatch.setattr(autotune, "time_function", lambda fn, args, repeats: (0.0, fn.seconds, fn(*args)))
    monkeypatch.setattr(autotune, "GPU_BACKEND", jax.default_backend())  # accept this backend
    table_path, results_path = tmp_path / "table.json", tmp_path / "results.json"
    status = autotune.main(
        [
            "--implementations",
            "pallas_triton",
            "--roles",
            "forward",
            "--shapes",
            problem_spec,
            "--dtype",
            "float32",
            "--max-candidates",
            "5",
            "--budget-seconds",
            "600",
            "--write",
            str(table_path),
            "--results",
            str(results_path),
        ]
    )
    assert status == 0
    summary = capsys.readouterr().out
    assert f"| {expected.describe()} |" in summary and "| 5 / 2 |" in summary

    here = tuning.current_device_kind()
    table = tuning.read_table(table_path)
    shape_key = tuning.shape_class("pallas_triton", "forward", channels=64, taps=9, dtype=jnp.float32)
    assert tuning.lookup(shape_key, table=table, device_kind=here) == expected
    measured = table.devices[here].measured[shape_key]
    assert measured["speedup"] == 2.0 and measured["ms"] == [0.5] and measured["heuristic_ms"] == [1.0]
    statuses = {
        (m["config"]["block_pixels"], m["config"]["block_channels"], m["config"]["num_warps"]): m["status"]
        for m in json.loads(results_path.read_text())["units"][0]["measurements"]
    }
    assert statuses[(failing.block_pixels, failing.block_channels, failing.num_warps)] == "failed"
    assert statuses[(wrong.block_pixels, wrong.block_channels, wrong.num_warps)] == "wrong"
