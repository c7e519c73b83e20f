"""Image classification training and evaluation (DDF-ResNets and their conv twins).

`train_and_evaluate(config, workdir)` trains every model in `config.models` for
every seed in `config.seeds` (and, with `config.sweep_learning_rates`, at every
learning rate of the sweep), each run in its own directory
`workdir/<model>/seed_<s>/` (in a sweep `workdir/<model>/lr_<lr>/seed_<s>/`) with
checkpoints, `metrics.jsonl`, TensorBoard events, `config.json`, and `result.json`
once finished. Then:

1. selection, on the validation split only: per model, the learning rate with the
   best mean validation top-1 over the seeds (`report.select_learning_rates`);
2. the test split, evaluated once per chosen run, from its final checkpoint
   (`evaluate_test`); the runs that were not chosen are never evaluated on it;
3. `workdir/results.json` (the split, the selection, per-seed rows and mean +- std
   per model), `workdir/curves.png` (a band over the seeds per model) and a printed
   table (`report.py`).

Per run: data-parallel SGD over every device (or `config.num_devices`), one jitted
step (see `experiments.common.Trainer`), evaluation on the validation split every
`eval_every_epochs` epochs (top-1, top-5, loss), checkpoints that resume exactly, and
finished-run protection (`experiments.common.run_dir.prepare_run_dir`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

import ddf_jax
from ddf_jax import models as model_zoo
from experiments.classification import datasets, input_pipeline, report
from experiments.classification.configs import DTYPES, check_config
from experiments.classification.transforms import normalize
from experiments.common import checkpoint as checkpoint_lib
from experiments.common import loop as loop_lib
from experiments.common import optim, sharding
from experiments.common import run_dir as run_dir_lib
from experiments.common.errors import CheckpointDamagedError, ConfigError
from experiments.common.metrics import MetricsWriter
from experiments.common.train_state import Trainer

# Config keys that may change between a run and its resumption: they change neither
# the hyperparameters nor the sequence of training examples. (num_devices changes
# only the order of floating-point reductions. worker_count is not one: grain
# batches within each worker, so the worker count changes which examples share a
# batch.)
RUN_CONTROL_KEYS = (
    "overwrite",
    "num_devices",
    "worker_buffer_size",
    "read_threads",
    "log_every_steps",
    "progress_bar",
    "stop_after_steps",
    "keep_checkpoints",
    "async_checkpoints",
    "distributed",
    "checkpoint_every_steps",
    "eval_every_epochs",
    "allow_data_change",
    "check_images",
)
# Fields of the command's config that one run does not have: a run has one model,
# one seed and one learning rate.
COMMAND_KEYS = ("models", "seeds", "sweep_learning_rates")


def create_model(config: ml_collections.ConfigDict, name: str, info: datasets.DatasetInfo,
                 rngs: nnx.Rngs) -> nnx.Module:
    """Builds `name` from the `ddf_jax.models` zoo for the dataset's classes and channels.

    `config.model_overrides` (a dict) is passed to the constructor; `config.dtype`
    other than float32 becomes the computation dtype (parameters stay float32).
    """
    overrides = dict(config.get("model_overrides") or {})
    overrides.setdefault("in_chans", info.in_chans)
    if config.dtype not in DTYPES:
        raise ValueError(f"config.dtype must be one of {DTYPES}, got {config.dtype!r}")
    if config.dtype != "float32":
        overrides["dtype"] = jnp.dtype(config.dtype)
    return model_zoo.create_model(name, num_classes=info.num_classes, rngs=rngs, **overrides)


def make_loss_fn(info: datasets.DatasetInfo, label_smoothing: float, dtype: str):
    """Cross-entropy with label smoothing; aux metric: batch top-1 accuracy.

    Returns:
        `loss_fn(model, batch, rng) -> (loss, {"top1": ...})` for `Trainer`; the batch
        is `{"image": uint8 (B, H, W, C), "label": int32 (B,)}`.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    compute_dtype = jnp.dtype(dtype)

    def loss_fn(model, batch, rng):
        del rng  # No stochastic layers in these models; the key is there for those that have.
        images = normalize(batch["image"], info, compute_dtype)
        logits = model(images).astype(jnp.float32)
        targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], info.num_classes), label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        top1 = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, {"top1": top1}

    return loss_fn


def make_eval_fn(info: datasets.DatasetInfo, dtype: str):
    """Sums of loss, top-1 and top-5 hits over the real (mask == 1) examples of a batch."""
    compute_dtype = jnp.dtype(dtype)
    k = min(5, info.num_classes)

    def eval_fn(model, batch):
        images = normalize(batch["image"], info, compute_dtype)
        logits = model(images).astype(jnp.float32)
        labels, mask = batch["label"], batch["mask"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        top1 = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        _, topk = jax.lax.top_k(logits, k)
        top5 = jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)
        return {
            "loss_sum": jnp.sum(loss * mask),
            "top1_sum": jnp.sum(top1 * mask),
            "top5_sum": jnp.sum(top5 * mask),
            "count": jnp.sum(mask),
        }

    return eval_fn


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: a model at one learning rate and one seed, in its own directory."""

    model: str
    learning_rate: float
    seed: int
    directory: str


def plan_runs(config: ml_collections.ConfigDict, workdir: str) -> list[Run]:
    """Every run of the command: models x learning rates x seeds, in that order.

    Without a sweep the learning rate is `config.learning_rate` and a run lives in
    `workdir/<model>/seed_<s>`; with `config.sweep_learning_rates` in
    `workdir/<model>/lr_<lr>/seed_<s>`.
    """
    sweep = tuple(float(lr) for lr in config.sweep_learning_rates)
    runs = []
    for model in config.models:
        for lr in sweep or (float(config.learning_rate),):
            for seed in config.seeds:
                parts = [workdir, model] + ([f"lr_{lr!r}"] if sweep else []) + [f"seed_{seed}"]
                runs.append(Run(model, lr, int(seed), os.path.join(*parts)))
    return runs


def run_config(config: ml_collections.ConfigDict, run: Run) -> dict[str, Any]:
    """The config of one run, as stored in its `config.json`."""
    stored = config.to_dict()
    for key in COMMAND_KEYS:
        stored.pop(key, None)
    stored.update(model=run.model, seed=run.seed, learning_rate=run.learning_rate)
    return stored


def _schedule_steps(config: ml_collections.ConfigDict, info: datasets.DatasetInfo) -> tuple[int, int, int]:
    """(steps per epoch, total steps, warm-up steps) of a run."""
    steps_per_epoch = info.num_train // config.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"config.batch_size ({config.batch_size}) exceeds the {info.num_train} training examples"
        )
    num_steps = config.num_train_steps if config.num_train_steps > 0 else int(
        math.ceil(config.num_epochs * steps_per_epoch)
    )
    warmup_steps = min(int(round(config.warmup_epochs * steps_per_epoch)), num_steps)
    return steps_per_epoch, num_steps, warmup_steps


def build_trainer(config: ml_collections.ConfigDict, run: Run, info: datasets.DatasetInfo,
                  mesh) -> tuple[Trainer, nnx.Module]:
    """The run's freshly initialised `Trainer` and its model (for counting)."""
    _, num_steps, warmup_steps = _schedule_steps(config, info)
    model = create_model(config, run.model, info, nnx.Rngs(run.seed))
    schedule = optim.build_schedule(run.learning_rate, total_steps=num_steps, warmup_steps=warmup_steps)
    tx = optim.build_optimizer(
        schedule, momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay,
    )
    trainer = Trainer(
        model,
        tx,
        loss_fn=make_loss_fn(info, config.label_smoothing, config.dtype),
        eval_fn=make_eval_fn(info, config.dtype),
        mesh=mesh,
        seed=run.seed,
        learning_rate_fn=schedule,
    )
    return trainer, model


def evaluate(config: ml_collections.ConfigDict, trainer: Trainer, dataset: datasets.Dataset,
             split: str) -> dict[str, Any]:
    """Mean loss, top-1 and top-5 of the trainer's model over `split` ("validation" / "test")."""
    batches = input_pipeline.eval_batches(
        dataset, split, batch_size=config.eval_batch_size, worker_count=config.worker_count,
        read_threads=config.read_threads,
    )
    totals = loop_lib.sum_eval_metrics(trainer, batches, lambda b: sharding.shard_batch(b, trainer.mesh))
    count = max(totals["count"], 1.0)
    return {
        "loss": totals["loss_sum"] / count,
        "top1": totals["top1_sum"] / count,
        "top5": totals["top5_sum"] / count,
        "count": int(totals["count"]),
    }


def train_model(config: ml_collections.ConfigDict, run: Run, dataset: datasets.Dataset,
                mesh) -> dict[str, Any]:
    """Trains one run, evaluating on the validation split; returns its result row.

    If the run directory holds a finished run with the same config, its stored row is
    returned without training (see `experiments.common.run_dir.prepare_run_dir`).

    Returns:
        `{"model", "learning_rate", "seed", "params", "macs", "validation",
        "train_seconds", "steps", "finished"}`; `validation` is the last evaluation
        (`{"loss", "top1", "top5", "count"}`, fractions), at the final step once
        `finished`; `finished` is False when the run stopped early
        (`config.stop_after_steps`). The test split is not read here.
    """
    stored = run_dir_lib.prepare_run_dir(
        run.directory, run_config(config, run), overwrite=config.overwrite,
        run_control_keys=RUN_CONTROL_KEYS,
    )
    if stored is not None:
        logging.info("%s already finished in %s; reporting the stored result", run.model, run.directory)
        if jax.process_index() == 0:
            print(f"{run.model} (seed {run.seed}, lr {run.learning_rate:g}): finished run found in "
                  f"{run.directory}; stored result reported (pass --overwrite to train again)", flush=True)
        return stored

    info = dataset.info
    steps_per_epoch, num_steps, _ = _schedule_steps(config, info)
    trainer, model = build_trainer(config, run, info, mesh)
    params = int(ddf_jax.count_params(model))
    macs = int(ddf_jax.count_macs(model, (1, info.image_size, info.image_size, info.in_chans)))
    del model  # The trainer owns the state now.
    train_iter = iter(input_pipeline.train_loader(
        dataset, batch_size=config.batch_size, seed=run.seed, worker_count=config.worker_count,
        worker_buffer_size=config.worker_buffer_size, read_threads=config.read_threads,
    ))
    checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(run.directory, checkpoint_lib.CHECKPOINT_DIR),
        max_to_keep=config.keep_checkpoints, async_save=config.async_checkpoints,
    )
    start_step, meta = loop_lib.restore_or_initialize(
        trainer, checkpointer, train_iter, allow_data_change=config.allow_data_change
    )
    logging.info(
        "%s (seed %d, lr %g): %d params, %d MACs, %d steps (%d per epoch), global batch %d on %d "
        "device(s), start step %d", run.model, run.seed, run.learning_rate, params, macs, num_steps,
        steps_per_epoch, config.batch_size, mesh.devices.size, start_step,
    )
    with MetricsWriter(run.directory, resume_step=start_step) as writer:
        result = loop_lib.train_loop(
            trainer,
            train_iter,
            num_steps=num_steps,
            shard_fn=lambda batch: sharding.shard_batch(batch, mesh),
            start_step=start_step,
            resume_meta=meta,
            checkpointer=checkpointer,
            writer=writer,
            evaluate=lambda step: evaluate(config, trainer, dataset, "validation"),
            eval_every_steps=steps_per_epoch * config.eval_every_epochs,
            checkpoint_every_steps=config.checkpoint_every_steps or steps_per_epoch,
            log_every_steps=config.log_every_steps,
            stop_after_steps=config.stop_after_steps,
            examples_per_step=config.batch_size,
            steps_per_epoch=steps_per_epoch,
            progress=config.progress_bar,
            description=f"{run.model} seed {run.seed}",
        )
    checkpointer.close()

    if result.finished and result.last_eval is None:
        # Resumed at the final step (e.g. killed after the last checkpoint): evaluate it.
        result.last_eval = evaluate(config, trainer, dataset, "validation")
    row = {
        "model": run.model,
        "learning_rate": run.learning_rate,
        "seed": run.seed,
        "params": params,
        "macs": macs,
        "validation": result.last_eval,
        "train_seconds": round(result.train_seconds, 2),
        "steps": result.step,
        "finished": result.finished,
    }
    if result.finished:
        run_dir_lib.mark_finished(run.directory, row)
    return row


def evaluate_test(config: ml_collections.ConfigDict, run: Run, dataset: datasets.Dataset, mesh,
                  steps: int) -> dict[str, Any]:
    """The test-split metrics of a finished run, from its final checkpoint (step `steps`).

    Called once per chosen run, after the selection on the validation split.

    Raises:
        CheckpointDamagedError: The final checkpoint is missing or fails its integrity
            check (the message names it).
    """
    trainer, _ = build_trainer(config, run, dataset.info, mesh)
    with checkpoint_lib.Checkpointer(os.path.join(run.directory, checkpoint_lib.CHECKPOINT_DIR),
                                     max_to_keep=config.keep_checkpoints) as checkpointer:
        reason = None if steps in checkpointer.all_steps() else "it does not exist"
        reason = reason or checkpointer.verify(steps)
        if not sharding.all_processes_agree(reason is None):
            reason = reason or "it failed verification on another process"
        if reason is not None:
            raise CheckpointDamagedError(
                f"the final checkpoint {checkpointer.step_dir(steps)} of the finished run in "
                f"{run.directory} cannot be read ({reason}), so the test split cannot be "
                "evaluated; pass --overwrite to train the run again"
            )
        tree, _ = checkpointer.restore(trainer.abstract_checkpoint_tree(), step=steps)
    trainer.load_checkpoint_tree(tree)
    return evaluate(config, trainer, dataset, "test")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains every run, selects on the validation split, then evaluates the test split once.

    Args:
        config: The experiment config (see `configs/default.py`).
        workdir: Output directory; created.

    Returns:
        The results (also written to `workdir/results.json`): the dataset and its
        split, the selection, one row per run (`"test"` only in the chosen runs) and
        one summary per model (mean and standard deviation over the seeds); see
        `report.build_results`. The curves go to `workdir/curves.png`, and a table is
        printed.
    """
    mesh = check_config(config)
    os.makedirs(workdir, exist_ok=True)
    dataset = datasets.get_dataset(config)
    info = dataset.info
    logging.info("dataset %s: %d train / %d validation / %d test examples, %d classes, %dx%dx%d",
                 info.name, info.num_train, info.num_validation, info.num_test, info.num_classes,
                 info.image_size, info.image_size, info.in_chans)
    runs = plan_runs(config, workdir)
    rows = [train_model(config, run, dataset, mesh) for run in runs]

    # Selection sees the validation metrics only; the test split is read afterwards.
    chosen = report.select_learning_rates(rows)
    tested = []
    for run, row in zip(runs, rows):
        if chosen.get(run.model) == run.learning_rate:
            tested.append({**row, "test": evaluate_test(config, run, dataset, mesh, row["steps"])})
        else:
            tested.append({**row, "test": None})

    results = report.build_results(config, info, dataset.split, tested, chosen)
    if jax.process_index() == 0:
        report.write_results(results, workdir, runs)
    return results
