"""Tests for experiments/common and experiments/classification (tiny models, tiny data)."""

from __future__ import annotations

import json
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddf_jax import models as ddf_models

from experiments.classification import report, train
from experiments.classification.configs import default as default_config
from experiments.common import checkpoint as checkpoint_lib
from experiments.common import run_dir as run_dir_lib
from experiments.common import loop as loop_lib
from experiments.common import errors, optim, sharding
from experiments.common.metrics import MetricsWriter, read_metrics
from experiments.common.train_state import Trainer

TINY_CONV = {"layers": (1,), "widths": (8,), "stem_width": 8}


def tiny_config(**overrides):
    """The default config shrunk to a one-stage model on 8x8 digits."""
    config = default_config.get_config()
    config.models = ("resnet20_cifar",)
    config.model_overrides = dict(TINY_CONV)
    config.image_size = 8
    config.batch_size = 8
    config.eval_batch_size = 200
    config.num_train_steps = 1
    config.log_every_steps = 1
    config.progress_bar = False
    for key, value in overrides.items():
        config[key] = value
    return config


def run_dir_of(workdir, model="resnet20_cifar", seed=0):
    """The run directory of `model` and `seed` in a command's workdir (no sweep)."""
    return os.path.join(workdir, model, f"seed_{seed}")


def final_state(run_dir):
    """The newest checkpoint's array tree of a run, as numpy."""
    ckpt = checkpoint_lib.Checkpointer(os.path.join(run_dir, checkpoint_lib.CHECKPOINT_DIR))
    step = ckpt.latest_step()
    tree, _ = ckpt.restore(step=step)  # As stored.
    ckpt.close()
    return step, jax.tree.map(np.asarray, tree)


def train_losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, split="train")}


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def finished_workdir(tmp_path_factory):
    """One real `train_and_evaluate` step for a DDF-ResNet and its conv twin (tiny)."""
    workdir = str(tmp_path_factory.mktemp("cls"))
    config = tiny_config(
        models=("ddf_mul_resnet20_cifar", "resnet20_cifar"),
        model_overrides={"layers": (1,), "widths": (8,), "stem_width": 8},
    )
    results = train.train_and_evaluate(config, workdir)
    return workdir, config, results


def test_train_and_evaluate_one_step(finished_workdir):
    workdir, config, results = finished_workdir
    rows = results["runs"]
    assert [r["model"] for r in rows] == list(config.models)
    with open(os.path.join(workdir, report.RESULTS_FILE)) as f:
        stored = json.load(f)
    assert stored == json.loads(json.dumps(results))
    for row in rows:
        assert {"model", "seed", "learning_rate", "params", "macs", "validation", "test",
                "train_seconds"} <= set(row)
        assert row["params"] > 0 and row["macs"] > 0 and row["train_seconds"] > 0
        assert (row["seed"], row["learning_rate"]) == (0, config.learning_rate)
        assert row["steps"] == 1 and row["finished"]
        assert row["validation"]["count"] == 288 and row["test"]["count"] == 360  # Whole splits.
        assert 0.0 <= row["validation"]["top1"] <= 1.0 and 0.0 <= row["test"]["top1"] <= 1.0
        run_dir = run_dir_of(workdir, row["model"])
        evals = read_metrics(run_dir, split="eval")  # Evaluation during training: validation.
        assert len(evals) == 1 and evals[0]["count"] == 288
        assert evals[0]["top1"] == row["validation"]["top1"]
        assert np.isfinite(read_metrics(run_dir, split="train")[0]["loss"])
        assert os.path.exists(os.path.join(run_dir, run_dir_lib.RESULT_FILE))
        assert os.listdir(os.path.join(run_dir, "tensorboard"))
    ddf, conv = rows
    assert ddf["params"] != conv["params"]  # Really two different models.
    assert [m["model"] for m in results["models"]] == list(config.models)
    assert results["selection"]["chosen"] == {m: config.learning_rate for m in config.models}
    assert os.path.getsize(os.path.join(workdir, report.CURVES_FILE)) > 1000


def test_finished_run_is_reported_not_retrained(finished_workdir, monkeypatch):
    workdir, config, results = finished_workdir

    def fail(*args, **kwargs):
        raise AssertionError("a finished run must not be trained again")

    monkeypatch.setattr(loop_lib, "train_loop", fail)
    # Run-control keys may differ; the stored result comes back (the test split of the
    # final checkpoint, evaluated again, gives the same numbers).
    again = train.train_and_evaluate(tiny_config(**{**config, "log_every_steps": 5}), workdir)
    assert again["runs"] == json.loads(json.dumps(results["runs"]))
    # A different config for a finished run is refused.
    with pytest.raises(errors.RunFinishedError, match="num_train_steps"):
        train.train_and_evaluate(tiny_config(**{**config, "num_train_steps": 2}), workdir)


def test_prepare_run_dir_overwrite_and_mismatch(tmp_path):
    run_dir = str(tmp_path)

    def prepare(config, **kwargs):
        return run_dir_lib.prepare_run_dir(run_dir, config, run_control_keys=("w",), **kwargs)

    assert prepare({"a": 1, "b": [1, 2], "w": 0}) is None
    os.makedirs(os.path.join(run_dir, checkpoint_lib.CHECKPOINT_DIR, "3"))
    # Unfinished run with checkpoints: changing a result-relevant key is refused...
    with pytest.raises(errors.ConfigMismatchError, match="a: 1 -> 2"):
        prepare({"a": 2, "b": [1, 2], "w": 0})
    # ...a run-control key is not; tuples and lists compare equal.
    assert prepare({"a": 1, "b": (1, 2), "w": 3}) is None
    run_dir_lib.mark_finished(run_dir, {"top1": 0.5})
    assert prepare({"a": 1, "b": [1, 2], "w": 4}) == {"top1": 0.5}
    with pytest.raises(errors.RunFinishedError, match="overwrite"):
        prepare({"a": 3, "b": [1, 2], "w": 4})
    open(os.path.join(run_dir, "notes.txt"), "w").close()  # Not ours: must survive.
    assert prepare({"a": 3}, overwrite=True) is None
    assert sorted(os.listdir(run_dir)) == [run_dir_lib.CONFIG_FILE, "notes.txt"]


def test_resume_is_exact(tmp_path):
    """4 steps in one go == 2 steps, a restart from the checkpoint, then 2 more."""
    config = tiny_config(num_train_steps=4, checkpoint_every_steps=2)
    straight = str(tmp_path / "straight")
    train.train_and_evaluate(config, straight)

    resumed = str(tmp_path / "resumed")
    rows = train.train_and_evaluate(tiny_config(**{**config, "stop_after_steps": 2}), resumed)["runs"]
    assert rows[0]["steps"] == 2 and not rows[0]["finished"]
    assert rows[0]["test"] is None  # Unfinished: nothing chosen, the test split not read.
    run_dir = run_dir_of(resumed)
    assert run_dir_lib.read_result(run_dir) is None  # Not finished yet.
    rows = train.train_and_evaluate(config, resumed)["runs"]
    assert rows[0]["steps"] == 4 and rows[0]["finished"]

    step_a, state_a = final_state(run_dir_of(straight))
    step_b, state_b = final_state(run_dir)
    assert step_a == step_b == 4
    # Parameters, BatchNorm statistics, momentum, step and RNG: bit-identical.
    chex.assert_trees_all_equal(state_a, state_b)
    losses_a = train_losses(run_dir_of(straight))
    losses_b = train_losses(run_dir)
    assert sorted(losses_b) == [1, 2, 3, 4]  # No duplicated or lost log records.
    np.testing.assert_array_equal([losses_a[s] for s in range(1, 5)], [losses_b[s] for s in range(1, 5)])


def test_data_parallel_matches_single_device(tmp_path):
    assert jax.device_count() >= 4, "tests/conftest.py forces 4 CPU devices"
    runs = {}
    for n in (1, 4):
        config = tiny_config(num_train_steps=3, num_devices=n)
        train.train_and_evaluate(config, str(tmp_path / f"dev{n}"))
        run_dir = run_dir_of(str(tmp_path / f"dev{n}"))
        runs[n] = (train_losses(run_dir), read_metrics(run_dir, split="eval")[-1], final_state(run_dir)[1])
    (loss1, eval1, state1), (loss4, eval4, state4) = runs[1], runs[4]
    assert sorted(loss1) == sorted(loss4) == [1, 2, 3]
    np.testing.assert_allclose([loss4[s] for s in (1, 2, 3)], [loss1[s] for s in (1, 2, 3)], rtol=1e-5)
    np.testing.assert_allclose(eval4["loss"], eval1["loss"], rtol=1e-4)
    # Global BatchNorm statistics and gradients: the states agree too.
    chex.assert_trees_all_close(state4, state1, rtol=1e-4, atol=1e-5)


def test_batch_must_divide_devices(tmp_path):
    with pytest.raises(ValueError, match="config.batch_size must be a positive multiple of the number of devices"):
        train.train_and_evaluate(tiny_config(batch_size=6, num_devices=4), str(tmp_path))


def test_unknown_model_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown models"):
        train.train_and_evaluate(tiny_config(models=("resnet_nonexistent",)), str(tmp_path))


# ----------------------------------------------------------------------------- trainer


class _DropoutNet(nnx.Module):
    """A model that keeps typed PRNG keys in its state (dropout), to test their checkpointing."""

    def __init__(self, *, rngs):
        self.dense = nnx.Linear(3, 2, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.dense(self.dropout(x))


def _dropout_trainer():
    def loss_fn(model, batch, rng):
        noise = jax.random.normal(rng, batch["x"].shape)  # Uses the per-step key too.
        return jnp.mean((model(batch["x"] + 0.1 * noise) - batch["y"]) ** 2), {}

    return Trainer(
        _DropoutNet(rngs=nnx.Rngs(0, dropout=1)),
        optim.build_optimizer(0.1, momentum=0.9),
        loss_fn=loss_fn,
        mesh=sharding.create_mesh(2),
        seed=5,
    )


def test_trainer_checkpoint_restores_rng_state(tmp_path):
    rng = np.random.default_rng(0)
    batches = [
        {"x": rng.normal(size=(4, 3)).astype(np.float32), "y": rng.normal(size=(4, 2)).astype(np.float32)}
        for _ in range(4)
    ]
    straight = _dropout_trainer()
    losses = [float(straight.train_step(sharding.shard_batch(b, straight.mesh))["loss"]) for b in batches]

    first = _dropout_trainer()
    for b in batches[:2]:
        first.train_step(sharding.shard_batch(b, first.mesh))
    with checkpoint_lib.Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(first.step, first.checkpoint_tree())
    second = _dropout_trainer()
    with checkpoint_lib.Checkpointer(str(tmp_path)) as ckpt:
        assert loop_lib.restore_or_initialize(second, ckpt) == (2, {})
    resumed = [float(second.train_step(sharding.shard_batch(b, second.mesh))["loss"]) for b in batches[2:]]
    assert resumed == losses[2:]
    chex.assert_trees_all_equal(nnx.to_pure_dict(second.state)["model"]["dense"],
                                nnx.to_pure_dict(straight.state)["model"]["dense"])
    # Dropout masks differ from step to step, so the restored key counter mattered.
    assert len(set(losses)) == 4


# ----------------------------------------------------------------------------- optimizer


def test_schedule_warmup_then_cosine():
    schedule = optim.build_schedule(0.4, total_steps=100, warmup_steps=10)
    np.testing.assert_allclose(
        [float(schedule(s)) for s in (0, 5, 10, 55, 100)],
        [0.0, 0.2, 0.4, 0.2, 0.0],
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.build_schedule(0.1, total_steps=5, warmup_steps=6)


def test_weight_decay_skips_1d_params():
    model = nnx.Sequential(
        nnx.Conv(2, 3, (3, 3), rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(1))
    )
    model.layers[0].bias[...] = jax.random.normal(jax.random.key(2), (3,))
    model.layers[1].scale[...] = jax.random.normal(jax.random.key(3), (3,))
    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, optim.build_optimizer(0.1, momentum=0.9, weight_decay=0.5), wrt=nnx.Param)
    zero_grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    optimizer.update(model, zero_grads)
    after = nnx.state(model, nnx.Param)
    kernel = before["layers"][0]["kernel"][...]
    np.testing.assert_allclose(after["layers"][0]["kernel"][...], kernel * (1 - 0.1 * 0.5), rtol=1e-6)
    for path in (("layers", 0, "bias"), ("layers", 1, "scale"), ("layers", 1, "bias")):
        a, b = after, before
        for key in path:
            a, b = a[key], b[key]
        np.testing.assert_array_equal(a[...], b[...])


# ----------------------------------------------------------------------------- metrics


def test_metrics_writer_drops_records_after_resume_step(tmp_path):
    with MetricsWriter(str(tmp_path), tensorboard=False) as writer:
        for step in (1, 2, 3, 4):
            writer.write(step, {"loss": jnp.float32(step)})
    with MetricsWriter(str(tmp_path), resume_step=2, tensorboard=False) as writer:
        writer.write(3, {"loss": 30.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path))] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    with pytest.raises(ValueError, match="scalars"):
        MetricsWriter(str(tmp_path), tensorboard=False).write(1, {"x": np.ones(2)})


# ----------------------------------------------------------------------------- command line and configs


def test_command_line(tmp_path, capsys, monkeypatch):
    from experiments.classification import main

    config_file = tmp_path / "tiny.py"
    config_file.write_text(
        "from experiments.classification.configs import default\n"
        "def get_config():\n"
        "    c = default.get_config()\n"
        "    c.models = ('resnet20_cifar',)\n"
        f"    c.model_overrides = {TINY_CONV!r}\n"
        "    c.image_size, c.batch_size, c.progress_bar = 8, 8, False\n"
        "    return c\n"
    )
    workdir = str(tmp_path / "run")
    argv = ["main", f"--workdir={workdir}", f"--config={config_file}", "--config.num_train_steps=1"]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags defines override flags from sys.argv.
    try:
        main.FLAGS(argv)
        assert main.FLAGS.config.num_train_steps == 1
        main.main(["main"])
        first = capsys.readouterr().out
        with open(os.path.join(workdir, report.RESULTS_FILE)) as f:
            rows = json.load(f)["runs"]
        assert rows[0]["model"] == "resnet20_cifar" and rows[0]["steps"] == 1
        assert "resnet20_cifar" in first and "top-1" in first
        main.main(["main"])  # Finished: reported, not retrained.
        assert "finished run found" in capsys.readouterr().out
    finally:
        main.FLAGS.unparse_flags()


@pytest.mark.parametrize("name", ["default", "mnist", "cifar10", "imagenet_ddf_mul_resnet50"])
def test_configs_document_how_to_run(name):
    import importlib

    module = importlib.import_module(f"experiments.classification.configs.{name}")
    config = module.get_config()
    doc = module.__doc__
    assert "python -m experiments.classification" in doc
    assert "Expected wall time" in doc and "Expected result" in doc
    for model in config.models:
        assert ddf_models.is_model(model)
    if name == "imagenet_ddf_mul_resnet50":
        assert (config.batch_size, config.learning_rate, config.warmup_epochs, config.num_epochs) == (1024, 0.4, 5.0, 120)
        assert (config.weight_decay, config.label_smoothing, config.momentum) == (1e-4, 0.1, 0.9)
        assert config.dtype == "bfloat16" and config.crop_pct == 0.875
        assert "RandAugment" in doc and "Not implemented" in doc
