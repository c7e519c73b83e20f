"""The benchmarks measure what they claim to: baselines aligned with the DDF op, the device-side
timing method, the derived columns, and the PyTorch peer's train step."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

import ddf_jax
from ddf_jax import models
from ddf_jax.kernels import DDFConfig
from experiments import benchmark_model, benchmark_op, device_timing
from experiments.benchmark_op import depthwise_conv, min_bytes, unfold_ddf
from tests.utils import random_ddf_inputs


@pytest.mark.parametrize("k,stride,dilation", [(3, 1, 1), (3, 2, 1), (5, 2, 2), (3, 3, 1)])
def test_unfold_port_equals_ddf(k, stride, dilation):
    x, cf, sf, _ = random_ddf_inputs(0, 2, 11, 8, 6, k, stride)
    expected = ddf_jax.ddf(x, cf, sf, kernel_size=k, stride=stride, dilation=dilation)
    chex.assert_trees_all_close(unfold_ddf(x, cf, sf, k, stride, dilation), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,stride,dilation", [(3, 1, 1), (3, 2, 1), (5, 2, 2)])
def test_depthwise_baseline_is_ddf_with_a_static_filter(k, stride, dilation):
    x, cf, sf, _ = random_ddf_inputs(1, 2, 11, 8, 6, k, stride)
    kernel = cf[0].T.reshape(k, k, 1, 6)  # one static (k, k) filter per channel
    static_cf = jnp.broadcast_to(cf[:1], cf.shape)
    expected = ddf_jax.ddf(x, static_cf, jnp.ones_like(sf), kernel_size=k, stride=stride, dilation=dilation)
    chex.assert_trees_all_close(depthwise_conv(x, kernel, stride, dilation), expected, rtol=1e-5, atol=1e-5)


def test_min_bytes_counts_each_tensor_once():
    # x 1*4*4*2=32, sf 1*2*2*9=36, cf 1*2*9=18, out 1*2*2*2=8 elements, float32.
    assert min_bytes(1, 4, 4, 2, 3, 2, 4, "fwd") == (32 + 36 + 18 + 8) * 4
    # + backward: read g, x, sf, cf and write dx, dsf, dcf.
    assert min_bytes(1, 4, 4, 2, 3, 2, 4, "fwd+bwd") == (32 + 36 + 18 + 8 + 8 + 32 + 36 + 18 + 32 + 36 + 18) * 4


# --- the timing method -------------------------------------------------------------------------


# "cuda": the looped program (the GPU method), run here on the CPU.
@pytest.mark.parametrize("backend", ["cpu", "cuda"], ids=["one_dispatch_per_call", "looped_program"])
def test_time_calls_returns_each_sets_outputs(backend):
    rng = np.random.default_rng(0)
    sets = [(jnp.asarray(rng.normal(size=(5, 7)), jnp.float32), jnp.asarray(rng.normal(size=(7,)), jnp.float32))
            for _ in range(3)]

    def fn(a, b):
        return {"sum": a + b, "prod": a * b}

    timing = device_timing.time_calls(fn, sets, iterations=4, max_runs=2, backend=backend)
    assert timing.single_call == (backend == "cpu")
    assert timing.sets == 3 and timing.calls_per_run == 12 and 1 <= timing.runs <= 2
    assert timing.seconds > 0 and timing.spread >= 0
    assert len(timing.outputs) == 3
    for (a, b), out in zip(sets, timing.outputs):
        chex.assert_trees_all_close(out, fn(a, b), rtol=0, atol=0)


def test_time_interleaved_times_each_function_in_alternating_runs(monkeypatch):
    rng = np.random.default_rng(1)
    small = [(jnp.asarray(rng.normal(size=(4,)), jnp.float32),) for _ in range(2)]
    large = [(jnp.asarray(rng.normal(size=(64, 64)), jnp.float32),) for _ in range(3)]
    order = []
    make_runner = device_timing._runner

    def recording_runner(fn, arg_sets, iterations, single_call):
        run, compiled = make_runner(fn, arg_sets, iterations, single_call)
        name = "small" if arg_sets[0][0].ndim == 1 else "large"
        return (lambda: order.append(name) or run()), compiled

    monkeypatch.setattr(device_timing, "_runner", recording_runner)
    timings = device_timing.time_interleaved(
        [(lambda a: a + 1.0, small, 1), (lambda a: a @ a, large, 2)], max_runs=3, backend="cpu")
    # One warm-up of each, then rounds in which every function runs once, in order.
    runs = timings[0].runs
    assert order == ["small", "large"] * (1 + runs) and timings[1].runs == runs
    assert [t.calls_per_run for t in timings] == [2, 6] and [t.sets for t in timings] == [2, 3]
    for (a,), out in zip(small, timings[0].outputs):
        chex.assert_trees_all_close(out, a + 1.0, rtol=0, atol=0)
    for (a,), out in zip(large, timings[1].outputs):
        chex.assert_trees_all_close(out, a @ a, rtol=0, atol=0)


def test_loop_program_chains_every_call_through_a_barrier_inside_one_loop():
    sets = tuple((jnp.full((4,), float(i)),) for i in range(3))
    text = jax.jit(device_timing.loop_program(lambda a: a * 2.0, 5)).lower(sets).as_text()
    assert text.count("stablehlo.while") == 1
    # One barrier per call: each call's arguments wait for the previous call's outputs.
    assert text.count("stablehlo.optimization_barrier") == 3
    assert text.count("stablehlo.multiply") == 3


def test_time_calls_rejects_no_argument_sets():
    with pytest.raises(ValueError, match="arg_sets must hold at least one"):
        device_timing.time_calls(lambda a: a, [])


def test_num_sets_exceeds_the_cache_three_times_within_bounds():
    mb = 1 << 20
    assert device_timing.num_sets(100 * mb, 60 * mb) == 2  # 200 MB >= 180 MB
    assert device_timing.num_sets(10 * mb, 60 * mb) == 8  # capped
    assert device_timing.num_sets(1 << 30, 60 * mb) == 1
    assert device_timing.num_sets(10, 0) == 1


def test_iterations_size_a_run_on_a_gpu_and_stay_one_on_the_cpu():
    assert device_timing.iterations_for(10**6, 2, 0.02, backend="cpu") == 1
    # 1 MB per call at the assumed 2e12 B/s is 0.5 us: 0.02 s / (0.5 us * 2 sets) = 20000, capped at 1000.
    assert device_timing.iterations_for(10**6, 2, 0.02, backend="gpu") == 1000
    assert device_timing.iterations_for(10**9, 1, 0.02, backend="gpu") == 40


def test_relative_errors():
    expected = jnp.array([1.0, -2.0, 4.0])
    errors = device_timing.relative_errors(expected + jnp.array([0.0, 0.0, 0.4]), expected)
    assert errors["rel_max"] == pytest.approx(0.1)
    assert errors["rel_l2"] == pytest.approx(0.4 / np.sqrt(21))
    assert np.isnan(device_timing.relative_errors(expected.at[0].set(jnp.nan), expected)["rel_max"])
    with pytest.raises(ValueError, match=r"actual must have the expected's shape \(3,\), got \(2,\)"):
        device_timing.relative_errors(expected[:2], expected)


def test_benchmark_op_rows_and_derived_columns(tmp_path, capsys):
    rows_path = tmp_path / "rows.jsonl"
    argv = ["--set", "dry", "--dtype", "float32", "--implementations", "xla", "--cache-mb", "0", "--copy-mb", "1",
            "--target-seconds", "0.001", "--temp", "--json", str(rows_path), "--markdown", str(tmp_path / "t.md")]
    assert benchmark_op.main(argv) == 0
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    methods = ["depthwise", "xla", "unfold"]
    expected = [(tuple(s[:4]), s[4], m, mode) for s in benchmark_op.DRY_SHAPES for m in methods for mode in benchmark_op.MODES]
    assert [(tuple(r["shape"]), r["kernel_size"], r["method"], r["mode"]) for r in rows] == expected
    by_key = {(tuple(r["shape"]), r["kernel_size"], r["method"], r["mode"]): r for r in rows}
    for r in rows:
        n, h, w, c = r["shape"]
        assert r["min_bytes"] == min_bytes(n, h, w, c, r["kernel_size"], r["stride"], 4, r["mode"])
        assert r["gbps"] == pytest.approx(r["min_bytes"] / r["seconds"] / 1e9)
        assert r["copy_fraction"] == pytest.approx(r["min_bytes"] / r["seconds"] / r["copy_bandwidth"])
        base = by_key[(tuple(r["shape"]), r["kernel_size"], "depthwise", r["mode"])]
        assert r["vs_depthwise"] == pytest.approx(r["seconds"] / base["seconds"])
        if r["mode"] == "fwd+bwd":
            fwd = by_key[(tuple(r["shape"]), r["kernel_size"], r["method"], "fwd")]
            assert r["bwd_over_fwd"] == pytest.approx(r["seconds"] / fwd["seconds"])
        assert (r["error_vs_xla"] == 0.0) if r["method"] == "xla" else r["error_vs_xla"] is None
        assert r["temp_over_x"] is not None and r["temp_over_x"] >= 0
    table = capsys.readouterr().out
    assert table.count("| (2,9,7,12) |") == len(rows) and "copy bandwidth" in table


def test_benchmark_op_stops_at_its_time_budget(tmp_path, capsys):
    rows_path = tmp_path / "rows.jsonl"
    argv = ["--set", "dry", "--implementations", "xla", "--no-baselines", "--cache-mb", "0", "--copy-mb", "1",
            "--budget-seconds", "1e-9", "--json", str(rows_path)]
    assert benchmark_op.main(argv) == 0
    assert not rows_path.exists()
    assert "stop: the time budget" in capsys.readouterr().err


def test_benchmark_op_rejects_unknown_implementations():
    with pytest.raises(SystemExit):
        benchmark_op.main(["--implementations", "xla,cuda"])


def test_model_step_timing_dispatches_every_step_and_blocks_per_run():
    calls = []

    def step():
        calls.append(1)
        return jnp.ones(())

    assert benchmark_model.median_step_seconds(step, steps=5, runs=3) > 0
    assert len(calls) == 2 + 5 * 3  # two warm-up steps, then runs x steps


def test_model_table_gives_ratios_to_the_baseline():
    rows = [
        {"model": "resnet50", "implementation": None, "params": 10, "status": "ok", "train_s": 0.2, "train_img_s": 100.0,
         "infer_s": None, "infer_img_s": None},
        {"model": "ddf_mul_resnet50", "implementation": "xla", "params": 5, "status": "ok", "train_s": 0.1,
         "train_img_s": 200.0, "infer_s": None, "infer_img_s": None},
        {"model": "ddf_mul_resnet50", "implementation": "jax_triton", "status": "unavailable", "error": "no GPU"},
    ]
    lines = benchmark_model.table(rows, "resnet50").splitlines()
    assert "vs resnet50" in lines[0]
    assert "| resnet50 | - | 10 | 200.0 | 100 | 1.00x |" in lines[2]
    assert "| ddf_mul_resnet50 | xla | 5 | 100.0 | 200 | 2.00x |" in lines[3]
    assert "unavailable: no GPU" in lines[4]


def test_model_benchmark_rejects_unknown_names():
    with pytest.raises(SystemExit):
        benchmark_model.main(["--models", "resnet5"])
    with pytest.raises(SystemExit):
        benchmark_model.main(["--implementation", "cuda"])


@pytest.mark.parametrize("text, message", [
    ("[1]", "must be a JSON object, got '[1]'"),
    ("{layers: 1}", "not JSON"),
])
def test_model_benchmark_rejects_overrides_that_are_not_a_json_object(text, message, capsys):
    with pytest.raises(SystemExit):
        benchmark_model.main(["--model-overrides", text])
    assert f"argument --model-overrides: {message}" in capsys.readouterr().err


def test_model_overrides_reach_the_model():
    small = {"layers": (1,), "widths": (4,), "stem_width": 4}
    row = benchmark_model.measure("resnet20_cifar", 2, 8, jnp.float32, steps=1, runs=1, modes=("infer",),
                                  model_overrides=small)
    expected = ddf_jax.count_params(models.create_model("resnet20_cifar", rngs=nnx.Rngs(0), **small))
    assert row["params"] == expected and row["infer_s"] > 0


def test_torch_peer_train_step_runs_and_updates_the_model():
    torch = pytest.importorskip("torch")
    from experiments import benchmark_timm

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10),
    )
    before = [p.detach().clone() for p in model.parameters()]
    seconds = benchmark_timm.measure_train(model, batch=2, size=8, steps=2, runs=2, device="cpu", num_classes=10)
    assert seconds > 0
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


def test_a_gpu_row_faster_than_the_copy_is_flagged():
    shape = (1, 4, 4, 2, 3, 1)
    fast = benchmark_op.Row(shape, "xla", "fwd", 1e-6, 10**6, 1, 0.0, copy_bandwidth=5e11, backend="gpu")
    assert fast.as_dict()["copy_fraction"] == pytest.approx(2.0) and fast.as_dict()["suspect"]
    slow = benchmark_op.Row(shape, "xla", "fwd", 1e-5, 10**6, 1, 0.0, copy_bandwidth=5e11, backend="gpu")
    assert not slow.as_dict()["suspect"]
    # On the CPU the copy reference is one XLA loop, not a bound.
    assert not benchmark_op.Row(shape, "xla", "fwd", 1e-6, 10**6, 1, 0.0, 5e11, backend="cpu").as_dict()["suspect"]


def test_layer_benchmark_rows_and_ratios_to_the_conv():
    from experiments import benchmark_layer

    rows = benchmark_layer.measure((2, 9, 7, 8), 3, 2, jnp.float32, cache_bytes=1)
    assert [(r["layer"], r["mode"]) for r in rows] == [
        (layer, mode) for layer in benchmark_layer.LAYERS for mode in ("fwd", "fwd+bwd")]
    for row in rows:
        conv = next(r for r in rows if r["layer"] == "conv" and r["mode"] == row["mode"])
        assert row["ms"] > 0 and row["vs_conv"] == pytest.approx(row["ms"] / conv["ms"])
    assert "| (2,9,7,8) | 3 | 2 | ddf, op free | fwd+bwd |" in benchmark_layer.table(rows)


def test_layer_benchmark_stand_in_op_reads_both_filters():
    from experiments import benchmark_layer

    x, cf, sf, _ = random_ddf_inputs(0, 2, 5, 4, 8, 3, heads=1)
    config = DDFConfig(3, 2)
    assert benchmark_layer.free_op(x, cf, sf, config).shape == (2, 3, 2, 8)
    grads = jax.grad(lambda *a: benchmark_layer.free_op(*a, config).sum(), (1, 2))(x, cf, sf)
    assert all(bool(jnp.all(g != 0)) for g in grads)


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "2,9,7"], "must be N,H,W,C"),
    (["--kernel-size", "4"], "--kernel-size must be odd"),
    (["--implementation", "cuda"], "--implementation must be one of"),
])
def test_layer_benchmark_rejects_bad_arguments(argv, message, capsys):
    from experiments import benchmark_layer

    with pytest.raises(SystemExit):
        benchmark_layer.main(argv)
    assert message in capsys.readouterr().err
