"""Guided depth up-sampling: training, and the command's whole run.

`train_and_evaluate(config, workdir)`:

1. Checks the config by field, and opens (and checks) the data files.
2. Trains every network in `config.models` at every scale in `config.scales`
   (one model per scale), each in its own run directory
   `workdir/<model>_x<scale>/` with checkpoints that resume exactly,
   `metrics.jsonl`, TensorBoard events, `config.json` and, once finished,
   `result.json` (a finished run is reported, not retrained; see
   `experiments.common.run_dir.prepare_run_dir`).
3. Evaluates bilinear, bicubic, the guided filter (tuned on held-out data of
   the test set's kind) and the networks on the test sets: the two halves of
   Middlebury "motorcycle", or the NYU test split when training on NYU (see
   `evaluate`).
4. Writes `workdir/results.json` ({set: {method: {"x4": rmse, ...}}}),
   `workdir/results.md` (also printed), `workdir/details.json` (parameter
   counts, MACs, training time, tuned guided-filter values, protocol, wall
   time), `workdir/guided_filter.json` and `workdir/panels_<set>_x<scale>.png`.

Training reuses `experiments.common`: `Trainer` (one jitted data-parallel step),
`train_loop`, `Checkpointer`, `MetricsWriter` and `build_schedule`. The data
iterator is a plain Python generator whose batch k depends only on k, so a run
resumed at step S simply restarts it at S.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

import ddf_jax
from experiments.common import checkpoint as checkpoint_lib
from experiments.common import run_dir as run_dir_lib
from experiments.common import loop as loop_lib
from experiments.common import optim, sharding
from experiments.common.metrics import MetricsWriter
from experiments.common.train_state import Trainer
from experiments.joint_upsampling import evaluate, input_pipeline, models
from experiments.joint_upsampling.config_validation import (
    DTYPES,
    LOSSES,
    check_config,
    scale_config,
    scale_key,
)

# Config keys that may change between a run and its resumption without
# changing the trained model.
RUN_CONTROL_KEYS = (
    "overwrite",
    "log_every_steps",
    "eval_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "progress_bar",
    "stop_after_steps",
    "distributed",
)
# Config keys that do not concern a (model, scale) training run at all.
_NOT_RUN_KEYS = (
    "models",
    "scales",
    "per_scale",
    "guided_filter",
    "nyu_eval_frames",
    "eval_border",
    "panels",
)


def create_model(config: ml_collections.ConfigDict, name: str, scale: int, rngs: nnx.Rngs):
    """Builds `name` ('ddf_up_net' or 'plain_net') for `scale` from `config.model`."""
    if config.dtype not in DTYPES:
        raise ValueError(f"config.dtype must be one of {DTYPES}, got {config.dtype!r}")
    overrides = dict(config.model.to_dict())
    if config.dtype != "float32":
        overrides["dtype"] = jnp.dtype(config.dtype)
    return models.create_model(name, scale, rngs=rngs, **overrides)


def init_rngs(seed: int) -> nnx.Rngs:
    """Parameter-init streams with the 'rbg' key implementation.

    Eager initialisation compiles one small program per parameter shape, and
    'rbg' keys make those programs much cheaper to compile than the default
    threefry keys. Deterministic for a given backend.
    """
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def count_macs_per_pixel(model: nnx.Module, scale: int) -> float:
    """Multiply-accumulates of one forward pass per full-resolution output pixel.

    Counted (convs, dense layers, DDF ops) with `ddf_jax.count_macs` on a
    (1, 16*scale, 16*scale, 3) guide.
    """
    size = 16 * scale
    low_res = jnp.zeros((1, 16, 16, 1), jnp.float32)
    return ddf_jax.count_macs(lambda guide: model(guide, low_res), (1, size, size, 3)) / size**2


def _masked_errors(prediction, batch):
    valid = batch["valid"].astype(jnp.float32)
    error = (prediction.astype(jnp.float32) - batch["target"]) * valid
    return error, valid


def make_loss_fn(loss: str, scale: int):
    """The training loss over valid pixels, in disparity units.

    Returns:
      `loss_fn(model, batch, rng) -> (loss, {"rmse", "bilinear_rmse"})` for
      `Trainer`; batch as from `input_pipeline.synthetic_batches`. The aux
      RMSEs pool the batch's valid pixels.
    """
    if loss not in LOSSES:
        raise ValueError(f"config.loss must be one of {LOSSES}, got {loss!r}")

    def loss_fn(model, batch, rng):
        del rng  # No stochastic layers.
        prediction = model(batch["guide"], batch["low_res"])
        error, valid = _masked_errors(prediction, batch)
        count = jnp.maximum(jnp.sum(valid), 1.0)
        squared = jnp.sum(error * error) / count
        value = jnp.sum(jnp.abs(error)) / count if loss == "l1" else squared
        base_error, _ = _masked_errors(models.upsample_bilinear(batch["low_res"], scale), batch)
        bilinear_squared = jnp.sum(base_error * base_error) / count
        return value, {"rmse": jnp.sqrt(squared), "bilinear_rmse": jnp.sqrt(bilinear_squared)}

    return loss_fn


def eval_fn(model, batch):
    """Per-batch sums for the synthetic validation RMSE (network and bilinear)."""
    prediction = model(batch["guide"], batch["low_res"])
    error, valid = _masked_errors(prediction, batch)
    scale = batch["guide"].shape[1] // batch["low_res"].shape[1]
    base_error, _ = _masked_errors(models.upsample_bilinear(batch["low_res"], scale), batch)
    return {
        "squared_error": jnp.sum(error * error),
        "bilinear_squared_error": jnp.sum(base_error * base_error),
        "count": jnp.sum(valid),
    }


def _run_config(config: ml_collections.ConfigDict, model_name: str, scale: int) -> dict[str, Any]:
    """The config of one (model, scale) run, as stored in its `config.json`."""
    run = config.to_dict()
    for key in _NOT_RUN_KEYS:
        run.pop(key, None)
    if config.train_data != "nyu":
        run.pop("nyu_mat_path", None)
        run.pop("nyu_split_path", None)
    run.update(model_name=model_name, scale=scale, **scale_config(config, scale).to_dict())
    return run


@dataclasses.dataclass
class RunOutput:
    """One trained network.

    Attributes:
      row: {"model", "scale", "params", "macs_per_pixel", "steps",
        "train_seconds", "finished", "validation_rmse",
        "validation_bilinear_rmse"} (also the run's result.json).
      model: the trained module (eval mode).
      reloaded: True if the run had finished before and was only reloaded.
    """

    row: dict[str, Any]
    model: nnx.Module
    reloaded: bool = False


def train_model(
    config: ml_collections.ConfigDict,
    model_name: str,
    scale: int,
    run_dir: str,
    data: TrainData,
    mesh,
) -> RunOutput:
    """Trains (or resumes, or reloads) one network at one scale in `run_dir`.

    A finished run with the same config is not retrained: its final checkpoint
    is loaded and its stored row returned. If that checkpoint is damaged, the
    steps after the newest intact one are trained again.

    Args:
      config: the experiment config.
      model_name: 'ddf_up_net' or 'plain_net'.
      scale: 4, 8, 16, ...
      run_dir: the run directory.
      data: the shared `input_pipeline.TrainData`.
      mesh: the data-parallel mesh.

    Returns:
      A `RunOutput`.
    """
    entry = scale_config(config, scale)
    stored = run_dir_lib.prepare_run_dir(
        run_dir,
        _run_config(config, model_name, scale),
        overwrite=config.overwrite,
        run_control_keys=RUN_CONTROL_KEYS,
    )
    sharding.check_batch_size(entry.batch_size, mesh, f"config.per_scale.{scale_key(scale)}.batch_size")
    num_steps = entry.steps
    model = create_model(config, model_name, scale, init_rngs(config.seed))
    params = ddf_jax.count_params(model)
    macs_per_pixel = count_macs_per_pixel(model, scale)
    schedule = optim.build_schedule(
        config.learning_rate,
        total_steps=num_steps,
        warmup_steps=min(config.warmup_steps, num_steps),
    )
    tx = optax.adamw(schedule, weight_decay=config.weight_decay, mask=optim.weight_decay_mask)
    if config.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    trainer = Trainer(
        model,
        tx,
        loss_fn=make_loss_fn(config.loss, scale),
        eval_fn=eval_fn,
        mesh=mesh,
        seed=config.seed,
        learning_rate_fn=schedule,
    )
    del model  # The trainer owns the state now.
    checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(run_dir, checkpoint_lib.CHECKPOINT_DIR),
        max_to_keep=config.keep_checkpoints,
    )
    start_step, meta = loop_lib.restore_or_initialize(trainer, checkpointer)
    if stored is not None and start_step == stored.get("steps"):
        checkpointer.close()
        if jax.process_index() == 0:
            print(
                f"{model_name} x{scale}: finished run found in {run_dir}; reloaded "
                "(pass --overwrite to train again)",
                flush=True,
            )
        return RunOutput(stored, trainer.model(), reloaded=True)
    if stored is not None:
        # The final checkpoint was damaged and set aside: train the missing steps again
        # from the newest intact one (the result is the same, bit for bit).
        logging.warning(
            "%s: result.json reports %s steps but the newest intact checkpoint is step %d; "
            "training the remaining steps again", run_dir, stored.get("steps"), start_step,
        )

    rows = sharding.process_slice(entry.batch_size)  # This process's rows of each global batch.
    validation = input_pipeline.validation_batches(config, scale, entry.crop_size, entry.batch_size, rows)

    def validate(step: int) -> dict[str, float]:
        totals: dict[str, float] = {}
        for batch in validation:
            sums = jax.device_get(trainer.eval_step(sharding.shard_batch(batch, mesh)))
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + float(value)
        count = max(totals["count"], 1.0)
        return {
            "rmse": math.sqrt(totals["squared_error"] / count),
            "bilinear_rmse": math.sqrt(totals["bilinear_squared_error"] / count),
        }

    logging.info(
        "%s x%d: %d params, %.0f MACs/pixel, %d steps of %d crops of %d px, start step %d",
        model_name, scale, params, macs_per_pixel, num_steps, entry.batch_size,
        entry.crop_size, start_step,
    )
    with MetricsWriter(run_dir, resume_step=start_step) as writer:
        result = loop_lib.train_loop(
            trainer,
            data.batches(scale, entry.crop_size, entry.batch_size, start_step, rows),
            num_steps=num_steps,
            shard_fn=lambda batch: sharding.shard_batch(batch, mesh),
            start_step=start_step,
            resume_meta=meta,
            checkpointer=checkpointer,
            writer=writer,
            evaluate=validate if validation else None,
            eval_every_steps=config.eval_every_steps,
            checkpoint_every_steps=config.checkpoint_every_steps,
            log_every_steps=config.log_every_steps,
            stop_after_steps=config.stop_after_steps,
            examples_per_step=entry.batch_size,
            progress=config.progress_bar,
            description=f"{model_name} x{scale}",
        )
    checkpointer.close()
    if result.finished and result.last_eval is None and validation:
        result.last_eval = validate(result.step)  # Resumed at the final step.
    last_eval = result.last_eval or {}
    row = {
        "model": model_name,
        "scale": scale,
        "params": int(params),
        "macs_per_pixel": round(macs_per_pixel, 1),
        "steps": result.step,
        "train_seconds": round(result.train_seconds, 2),
        "finished": result.finished,
        "validation_rmse": last_eval.get("rmse"),
        "validation_bilinear_rmse": last_eval.get("bilinear_rmse"),
    }
    if result.finished:
        run_dir_lib.mark_finished(run_dir, row)
    return RunOutput(row, trainer.model())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs the whole experiment; see the module docstring.

    Args:
      config: the experiment config (see `configs/default.py`).
      workdir: output directory; created.

    Returns:
      {set: {method: {"x4": rmse, ...}}} as written to `workdir/results.json`;
      methods are the baselines followed by `config.models`.
    """
    wall_start = time.perf_counter()
    mesh = check_config(config)
    scales = tuple(int(s) for s in config.scales)
    names = tuple(config.models)
    # The data files are opened (and checked) before any training or tuning.
    data = input_pipeline.TrainData(config)
    sets = evaluate.test_sets(config)
    evaluate.check_test_sets(config, sets)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0

    timings: dict[str, float] = {}
    runs: dict[tuple[str, int], RunOutput] = {}
    for scale in scales:
        for name in names:
            start = time.perf_counter()
            runs[name, scale] = train_model(
                config, name, scale, os.path.join(workdir, f"{name}_{scale_key(scale)}"), data, mesh
            )
            timings[f"{name}_{scale_key(scale)}"] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    networks = {key: run.model for key, run in runs.items()}
    results, guided = evaluate.evaluate(config, sets, networks, workdir, panels=config.panels and is_main)
    timings["evaluation"] = round(time.perf_counter() - start, 2)
    timings["total_wall"] = round(time.perf_counter() - wall_start, 2)
    wall_seconds = timings["total_wall"]
    reloaded = [f"{name}_{scale_key(scale)}" for (name, scale), run in runs.items() if run.reloaded]
    timings = evaluate.kept_training_timings(workdir, timings, reloaded, len(runs))

    table = evaluate.format_report(results, guided, sets, scales)
    details = {
        "test_sets": {s.name: {"title": s.title, "frames": len(s.frames), "unit": s.unit,
                               "guided_filter_tuned_on": s.tuned_on} for s in sets},
        "protocol": {"downsampling": config.downsampling, "eval_border": config.eval_border},
        "train_data": config.train_data,
        "networks": {f"{n}_{scale_key(s)}": runs[n, s].row for (n, s) in runs},
        "guided_filter": {name: {k: {"radius": v["radius"], "eps": v["eps"], "tuning_rmse": v["rmse"]}
                                 for k, v in per_scale.items()} for name, per_scale in guided.items()},
        "seconds": timings,
        "devices": [str(d) for d in mesh.devices.ravel()],
    }
    if is_main:
        evaluate.write_outputs(workdir, results, table, details, guided)
        params = ", ".join(
            f"{n}: {runs[n, s].row['params']:,}" for (n, s) in runs if s == scales[-1]
        )
        print(table, flush=True)
        print(f"\nparameters at x{scales[-1]}: {params}; wall time {wall_seconds:.0f} s; "
              f"outputs in {workdir}", flush=True)
    return results
