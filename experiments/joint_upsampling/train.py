"""Guided depth up-sampling: training, evaluation, results table and panels.

`train_and_evaluate(config, workdir)`:

1. Tunes the guided filter's radius and eps per scale on synthetic scenes
   (`workdir/guided_filter.json`).
2. Trains every network in `config.models` at every scale in `config.scales`
   (one model per scale), each in its own run directory
   `workdir/<model>_x<scale>/` with checkpoints that resume exactly,
   `metrics.jsonl`, TensorBoard events, `config.json` and, once finished,
   `result.json` (a finished run is reported, not retrained; see
   `experiments.common.checkpoint.prepare_run_dir`).
3. Evaluates bilinear, bicubic, the guided filter and the networks on the
   test set (Middlebury "motorcycle", or the NYU test split when training on
   NYU): RMSE over valid ground-truth pixels at full resolution.
4. Writes `workdir/results.json` ({method: {"x4": rmse, ...}}),
   `workdir/results.md` (also printed), `workdir/details.json` (parameter
   counts, MACs, training time, tuned guided-filter values, wall time) and
   `workdir/panels_x<scale>.png`.

Training reuses `experiments.common`: `Trainer` (one jitted data-parallel step),
`train_loop`, `Checkpointer`, `MetricsWriter` and `build_schedule`. The data
iterator is a plain Python generator whose batch k depends only on k, so a run
resumed at step S simply restarts it at S.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

import ddf_jax
from experiments.common import checkpoint as checkpoint_lib
from experiments.common import run_dir as run_dir_lib
from experiments.common import loop as loop_lib
from experiments.common import config_checks as checks
from experiments.common import optim, sharding
from experiments.common.errors import ConfigError
from experiments.common.metrics import MetricsWriter
from experiments.common.train_state import Trainer
from experiments.joint_upsampling import baselines, input_pipeline, models

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
    "panels",
)
RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
DETAILS_FILE = "details.json"
GUIDED_FILTER_FILE = "guided_filter.json"
BASELINES = ("bilinear", "bicubic", "guided_filter")
LOSSES = ("l1", "l2")
DTYPES = ("float32", "bfloat16")


def scale_key(scale: int) -> str:
    """'x8' for 8: the key used in configs and results."""
    return f"x{scale}"


def scale_config(config: ml_collections.ConfigDict, scale: int) -> ml_collections.ConfigDict:
    """The `config.per_scale` entry for `scale` (steps, crop_size, batch_size)."""
    key = scale_key(scale)
    if key not in config.per_scale:
        raise ConfigError(
            f"config.per_scale has no entry {key!r} for scale {scale}; "
            f"it has {sorted(config.per_scale.keys())}"
        )
    entry = config.per_scale[key]
    for name in ("steps", "crop_size", "batch_size"):
        value = entry[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"config.per_scale.{key}.{name} must be a positive int, got {value!r}")
    if entry.crop_size % scale:
        raise ConfigError(
            f"config.per_scale.{key}.crop_size must be a multiple of {scale}, got {entry.crop_size}"
        )
    return entry


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

    Eager initialisation compiles one small program per parameter shape; with
    the default threefry keys that costs about 10 s of CPU per network on a
    2-core machine, with 'rbg' about a quarter of it. Deterministic for a given
    backend.
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


def synthetic_source(config: ml_collections.ConfigDict, size: int, seed_offset: int = 0):
    """`SyntheticRGBD` of side `size` from `config.synthetic` (seed + seed_offset)."""
    s = config.synthetic
    return input_pipeline.SyntheticRGBD(
        seed=s.seed + seed_offset,
        height=size,
        width=size,
        min_disparity=s.min_disparity,
        max_disparity=s.max_disparity,
        min_shapes=s.min_shapes,
        max_shapes=s.max_shapes,
        trap_probability=s.trap_probability,
        texture_probability=s.texture_probability,
        camouflage_probability=s.camouflage_probability,
        noise_std=s.noise_std,
    )


# Offset of the synthetic validation scenes' seed from the training seed.
VALIDATION_SEED_OFFSET = 1_000_003


class TrainData:
    """Training-batch factory shared by the runs of one `train_and_evaluate` call.

    `batches(scale, start_step)` returns the deterministic batch iterator of a
    run from `start_step` on (this process's rows of every global batch; see
    `sharding.process_slice`); synthetic crops are generated once per crop size
    and shared by all runs (`input_pipeline.CachedSource`).
    """

    def __init__(self, config: ml_collections.ConfigDict):
        if config.train_data not in ("synthetic", "nyu"):
            raise ValueError(f"config.train_data must be 'synthetic' or 'nyu', got {config.train_data!r}")
        self.config = config
        self._sources: dict[int, Any] = {}
        self._nyu = None
        if config.train_data == "nyu":
            self._nyu = input_pipeline.NYUDepthV2(config.nyu_mat_path, config.nyu_split_path, "train")

    def source(self, crop_size: int):
        if crop_size not in self._sources:
            source = synthetic_source(self.config, crop_size)
            if self.config.synthetic.pool_size:
                source = input_pipeline.CachedSource(source)
            self._sources[crop_size] = source
        return self._sources[crop_size]

    def batches(self, scale: int, start_step: int):
        entry = scale_config(self.config, scale)
        if self._nyu is not None:
            return input_pipeline.random_crops(
                self._nyu,
                entry.crop_size,
                scale,
                entry.batch_size,
                seed=self.config.seed,
                start_step=start_step,
                rows=sharding.process_slice(entry.batch_size),
            )
        return input_pipeline.synthetic_batches(
            self.source(entry.crop_size),
            scale,
            entry.batch_size,
            start_step=start_step,
            pool_size=self.config.synthetic.pool_size,
            rows=sharding.process_slice(entry.batch_size),
        )


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
      data: the shared `TrainData`.
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

    validation = _validation_batches(config, scale, entry)

    def evaluate(step: int) -> dict[str, float]:
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
            data.batches(scale, start_step),
            num_steps=num_steps,
            shard_fn=lambda batch: sharding.shard_batch(batch, mesh),
            start_step=start_step,
            resume_meta=meta,
            checkpointer=checkpointer,
            writer=writer,
            evaluate=evaluate if validation else None,
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
        result.last_eval = evaluate(result.step)  # Resumed at the final step.
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


def _validation_batches(config, scale: int, entry) -> list[dict[str, np.ndarray]]:
    """This process's rows of the fixed synthetic validation set (another seed), in batches.

    The global batches have the run's batch size.

    `check_config` has checked that `config.validation_examples` is 0 or at least the
    batch size; the last incomplete batch is dropped.
    """
    count, size = config.validation_examples, entry.batch_size
    if count == 0:
        return []
    source = synthetic_source(config, entry.crop_size, VALIDATION_SEED_OFFSET)
    rows = sharding.process_slice(size)  # This process's rows of each global batch.
    batches = []
    for start in range(0, count - count % size, size):
        examples = [input_pipeline.make_example(**source[start + i], scale=scale)
                    for i in range(rows.start, rows.stop)]
        batches.append(input_pipeline.stack_examples(examples))
    return batches


# --------------------------------------------------------------------------
# Test sets, baselines and prediction
# --------------------------------------------------------------------------


def test_frames(config: ml_collections.ConfigDict) -> tuple[str, list[dict[str, np.ndarray]]]:
    """(name, frames) of the test set: Middlebury, or NYU test when training on NYU.

    Frames are {'image' (H, W, 3) uint8, 'disparity' (H, W) float32} with H, W
    multiples of 16 (centre crop).
    """
    if config.train_data == "nyu":
        nyu = input_pipeline.NYUDepthV2(config.nyu_mat_path, config.nyu_split_path, "test")
        count = len(nyu) if not config.nyu_eval_frames else min(config.nyu_eval_frames, len(nyu))
        frames = []
        for i in range(count):
            frame = nyu[i]
            frames.append({k: input_pipeline.crop_to_multiple(v, 16) for k, v in frame.items()})
        return "NYU Depth v2 test", frames
    return "Middlebury 2014 motorcycle", [input_pipeline.load_middlebury(16)]


def tune_guided_filter(config: ml_collections.ConfigDict, scales: Sequence[int]) -> dict[str, dict]:
    """Grid-searches the guided filter per scale on synthetic validation scenes.

    Returns:
      {"x4": {"radius", "eps", "rmse", "grid"}, ...}.
    """
    gf = config.guided_filter
    source = synthetic_source(config, gf.tune_size, gf.tune_seed)
    frames = [source[i] for i in range(gf.tune_examples)]
    tuned = {}
    for scale in scales:
        examples = [input_pipeline.make_example(f["image"], f["disparity"], scale) for f in frames]
        tuned[scale_key(scale)] = baselines.tune_guided_filter(examples, scale, gf.radii, gf.epsilons)
    return tuned


def predict(model: nnx.Module, example: dict[str, np.ndarray]) -> np.ndarray:
    """The network's (H, W) prediction for one `make_example` dict.

    Runs on this process's default device, with a host copy of the (replicated)
    parameters, so every process can evaluate on its own.
    """
    graphdef, state = nnx.split(model)
    state = jax.device_get(state)

    @jax.jit
    def forward(state, guide, low_res):
        return nnx.merge(graphdef, state)(guide, low_res)

    out = forward(state, jnp.asarray(example["guide"])[None], jnp.asarray(example["low_res"])[None])
    return np.asarray(out[0, ..., 0], np.float32)


def baseline_predictions(example: dict[str, np.ndarray], scale: int, tuned: dict) -> dict[str, np.ndarray]:
    """(H, W) predictions of bilinear, bicubic and the tuned guided filter."""
    low_res = example["low_res"][..., 0]
    params = tuned[scale_key(scale)]
    return {
        "bilinear": baselines.bilinear(low_res, scale),
        "bicubic": baselines.bicubic(low_res, scale),
        "guided_filter": baselines.guided_filter_upsample(
            example["guide"], low_res, scale, params["radius"], params["eps"]
        ),
    }


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def format_table(
    results: dict[str, dict[str, float]], scales: Sequence[int], title: str, unit: str = "disparity pixels"
) -> str:
    """The results as a markdown table (RMSE, lower is better; best per scale in bold)."""
    keys = [scale_key(s) for s in scales]
    best = {
        key: min((r[key] for r in results.values() if r.get(key) is not None), default=None) for key in keys
    }
    lines = [
        f"RMSE in {unit} at full resolution, {title} (lower is better).",
        "",
        "| method | " + " | ".join(keys) + " |",
        "| --- | " + " | ".join("---:" for _ in keys) + " |",
    ]
    for method, row in results.items():
        cells = []
        for key in keys:
            value = row.get(key)
            if value is None:
                cells.append("-")
            else:
                cell = f"{value:.3f}"
                cells.append(f"**{cell}**" if value == best[key] else cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_panel(path: str, example: dict[str, np.ndarray], predictions: dict[str, np.ndarray], scale: int,
               rmses: dict[str, float]) -> str:
    """PNG: guide, low-res input, ground truth; each prediction; each error map."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    target = example["target"][..., 0]
    valid = example["valid"][..., 0]
    shown = np.where(valid, target, np.nan)
    lo, hi = np.nanpercentile(shown, 1), np.nanpercentile(shown, 99)
    columns = max(3, len(predictions))
    fig, axes = plt.subplots(3, columns, figsize=(3.2 * columns, 7.2), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    low_res = np.repeat(np.repeat(example["low_res"][..., 0], scale, 0), scale, 1)
    axes[0, 0].imshow(example["guide"])
    axes[0, 0].set_title("guide (RGB)")
    axes[0, 1].imshow(low_res, vmin=lo, vmax=hi, cmap="viridis", interpolation="nearest")
    axes[0, 1].set_title(f"low-res input (x{scale})")
    axes[0, 2].imshow(shown, vmin=lo, vmax=hi, cmap="viridis")
    axes[0, 2].set_title("ground truth")
    error_max = 0.1 * (hi - lo)
    for column, (name, prediction) in enumerate(predictions.items()):
        axes[1, column].imshow(prediction, vmin=lo, vmax=hi, cmap="viridis")
        axes[1, column].set_title(f"{name}\nRMSE {rmses[name]:.3f}", fontsize=9)
        error = np.where(valid, np.abs(prediction - target), np.nan)
        axes[2, column].imshow(error, vmin=0, vmax=error_max, cmap="magma")
        axes[2, column].set_title(f"|error| {name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def check_config(config: ml_collections.ConfigDict):
    """Checks every config field by name before any data, tuning or model work.

    Returns:
      The data-parallel mesh (each scale's batch size is checked against it).

    Raises:
      ConfigError: a field is out of range (the message names it).
    """
    scales = tuple(config.scales)
    if not scales:
        raise ConfigError("config.scales must name at least one scale, got ()")
    for scale in scales:
        if isinstance(scale, bool) or not isinstance(scale, int):
            raise ConfigError(f"config.scales must hold ints, got {scale!r}")
        try:
            models._num_stages(scale)
        except ValueError as err:
            raise ConfigError(f"config.scales: {err}") from None
        scale_config(config, scale)
    names = tuple(config.models)
    unknown = [n for n in names if n not in models.MODELS]
    if unknown or not names:
        raise ConfigError(f"config.models has unknown models {unknown or '()'}; known: {tuple(models.MODELS)}")
    checks.one_of(config, "dtype", DTYPES)
    checks.one_of(config, "loss", LOSSES)
    checks.one_of(config, "train_data", ("synthetic", "nyu"))
    checks.positive_number(config, "learning_rate")
    for name in ("weight_decay", "grad_clip_norm"):
        checks.number_in(config, name, 0.0, float("inf"))
    for name in ("log_every_steps", "keep_checkpoints", "guided_filter.tune_examples",
                 "guided_filter.tune_size"):
        checks.integer(config, name, minimum=1)
    for name in ("warmup_steps", "validation_examples", "nyu_eval_frames", "num_devices",
                 "eval_every_steps", "checkpoint_every_steps", "stop_after_steps",
                 "synthetic.pool_size"):
        checks.integer(config, name, minimum=0)
    checks.integer(config, "seed", minimum=0, maximum=2**32 - 1)
    for name in ("panels", "progress_bar", "overwrite", "distributed"):
        checks.boolean(config, name)
    mesh = sharding.create_mesh(config.num_devices)
    for scale in scales:
        entry = scale_config(config, scale)
        sharding.check_batch_size(entry.batch_size, mesh, f"config.per_scale.{scale_key(scale)}.batch_size")
        if config.validation_examples and config.validation_examples < entry.batch_size:
            raise ConfigError(
                f"config.validation_examples must be 0 or >= the batch size {entry.batch_size} "
                f"of scale {scale}, got {config.validation_examples}"
            )
    return mesh


def _keep_training_timings(workdir: str, timings: dict[str, float],
                           runs: dict[tuple[str, int], RunOutput]) -> dict[str, float]:
    """The timings for details.json: those of the invocations that trained the networks.

    A rerun that only reloads finished runs keeps the stored timings (it has not trained
    anything); a rerun that trains some keeps the stored seconds of the others.
    """
    try:
        with open(os.path.join(workdir, DETAILS_FILE)) as f:
            stored = json.load(f)["seconds"]
        if not isinstance(stored, dict):
            return timings
    except (OSError, ValueError, KeyError, TypeError):
        return timings
    reloaded = [f"{name}_{scale_key(scale)}" for (name, scale), run in runs.items() if run.reloaded]
    if len(reloaded) == len(runs):
        return {**timings, **stored}
    return {**timings, **{key: stored[key] for key in reloaded if key in stored}}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, float]]:
    """Runs the whole experiment; see the module docstring.

    Args:
      config: the experiment config (see `configs/default.py`).
      workdir: output directory; created.

    Returns:
      {method: {"x4": rmse, ...}} as written to `workdir/results.json`;
      methods are the baselines followed by `config.models`.
    """
    wall_start = time.perf_counter()
    mesh = check_config(config)
    scales = tuple(int(s) for s in config.scales)
    names = tuple(config.models)
    # The data files are opened (and checked) before any tuning or training.
    data = TrainData(config)
    if config.train_data == "nyu":
        input_pipeline.NYUDepthV2(config.nyu_mat_path, config.nyu_split_path, "test")
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0

    timings: dict[str, float] = {}
    start = time.perf_counter()
    tuned = tune_guided_filter(config, scales)
    timings["guided_filter_tuning"] = round(time.perf_counter() - start, 2)
    if is_main:
        with open(os.path.join(workdir, GUIDED_FILTER_FILE), "w") as f:
            json.dump(tuned, f, indent=2)

    runs: dict[tuple[str, int], RunOutput] = {}
    for scale in scales:
        for name in names:
            start = time.perf_counter()
            runs[name, scale] = train_model(
                config, name, scale, os.path.join(workdir, f"{name}_{scale_key(scale)}"), data, mesh
            )
            timings[f"{name}_{scale_key(scale)}"] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    test_name, frames = test_frames(config)
    results: dict[str, dict[str, float]] = {method: {} for method in (*BASELINES, *names)}
    for scale in scales:
        errors: dict[str, list[float]] = {method: [] for method in results}
        for index, frame in enumerate(frames):
            example = input_pipeline.make_example(frame["image"], frame["disparity"], scale)
            predictions = baseline_predictions(example, scale, tuned)
            for name in names:
                predictions[name] = predict(runs[name, scale].model, example)
            frame_rmse = {
                method: baselines.rmse(prediction, example["target"][..., 0], example["valid"][..., 0])
                for method, prediction in predictions.items()
            }
            for method, value in frame_rmse.items():
                errors[method].append(value)
            if config.panels and index == 0 and is_main:
                path = os.path.join(workdir, f"panels_{scale_key(scale)}.png")
                save_panel(path, example, predictions, scale, frame_rmse)
        for method, values in errors.items():
            results[method][scale_key(scale)] = float(np.mean(values))
    timings["evaluation"] = round(time.perf_counter() - start, 2)
    timings["total_wall"] = round(time.perf_counter() - wall_start, 2)
    wall_seconds = timings["total_wall"]
    timings = _keep_training_timings(workdir, timings, runs)

    unit = "metres of depth" if config.train_data == "nyu" else "disparity pixels"
    table = format_table(results, scales, test_name, unit)
    details = {
        "test_set": test_name,
        "test_frames": len(frames),
        "train_data": config.train_data,
        "networks": {f"{n}_{scale_key(s)}": runs[n, s].row for (n, s) in runs},
        "guided_filter": {k: {"radius": v["radius"], "eps": v["eps"], "synthetic_rmse": v["rmse"]}
                          for k, v in tuned.items()},
        "seconds": timings,
        "devices": [str(d) for d in mesh.devices.ravel()],
    }
    if is_main:
        with open(os.path.join(workdir, RESULTS_FILE), "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
        with open(os.path.join(workdir, TABLE_FILE), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(workdir, DETAILS_FILE), "w") as f:
            json.dump(details, f, indent=2)
            f.write("\n")
        params = ", ".join(
            f"{n}: {runs[n, s].row['params']:,}" for (n, s) in runs if s == scales[-1]
        )
        print(table, flush=True)
        print(f"\nparameters at x{scales[-1]}: {params}; wall time {wall_seconds:.0f} s; "
              f"outputs in {workdir}", flush=True)
    return results
