"""Image classification training and evaluation (DDF-ResNets and their conv twins).

`train_and_evaluate(config, workdir)` trains every model in `config.models` in turn,
each in its own run directory `workdir/<model>/` (checkpoints, `metrics.jsonl`,
TensorBoard events, `config.json`, and `result.json` once finished), then writes
`workdir/results.json` (one row per model), `workdir/curves.png` and prints a table.

Per model: data-parallel SGD over every device (or `config.num_devices`), one jitted
step (see `experiments.common.Trainer`), evaluation every `eval_every_epochs`
epochs (top-1, top-5, loss), checkpoints that resume exactly, and finished-run
protection (`experiments.common.checkpoint.prepare_run_dir`).
"""

from __future__ import annotations

import json
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
from experiments.classification import datasets, input_pipeline
from experiments.classification.transforms import normalize
from experiments.common import checkpoint as checkpoint_lib
from experiments.common import run_dir as run_dir_lib
from experiments.common import loop as loop_lib
from experiments.common import config_checks as checks
from experiments.common import optim, plotting, sharding
from experiments.common.errors import ConfigError
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
RESULTS_FILE = "results.json"
CURVES_FILE = "curves.png"
DTYPES = ("float32", "bfloat16", "float16")


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


def _run_config(config: ml_collections.ConfigDict, model_name: str) -> dict[str, Any]:
    """The config of one model's run, as stored in its `config.json`."""
    run = config.to_dict()
    run.pop("models", None)
    run["model"] = model_name
    return run


def train_model(config: ml_collections.ConfigDict, model_name: str, run_dir: str,
                dataset: datasets.Dataset, mesh) -> dict[str, Any]:
    """Trains and evaluates one model in `run_dir`; returns its result row.

    If `run_dir` holds a finished run with the same config, its stored result is
    returned without training (see `experiments.common.checkpoint.prepare_run_dir`).

    Returns:
        `{"model", "params", "macs", "top1", "top5", "train_seconds", "steps",
        "finished"}`; top-1/top-5 are fractions; `finished` is False when the run
        stopped early (`config.stop_after_steps`).
    """
    stored = run_dir_lib.prepare_run_dir(
        run_dir,
        _run_config(config, model_name),
        overwrite=config.overwrite,
        run_control_keys=RUN_CONTROL_KEYS,
    )
    if stored is not None:
        logging.info("%s already finished in %s; reporting the stored result", model_name, run_dir)
        if jax.process_index() == 0:
            print(f"{model_name}: finished run found in {run_dir}; stored result reported "
                  "(pass --overwrite to train again)", flush=True)
        return stored

    info = dataset.info
    num_devices = mesh.devices.size
    steps_per_epoch = info.num_train // config.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"config.batch_size ({config.batch_size}) exceeds the {info.num_train} training examples"
        )
    num_steps = config.num_train_steps if config.num_train_steps > 0 else int(
        math.ceil(config.num_epochs * steps_per_epoch)
    )
    warmup_steps = min(int(round(config.warmup_epochs * steps_per_epoch)), num_steps)

    model = create_model(config, model_name, info, nnx.Rngs(config.seed))
    params = ddf_jax.count_params(model)
    macs = ddf_jax.count_macs(model, (1, info.image_size, info.image_size, info.in_chans))
    schedule = optim.build_schedule(config.learning_rate, total_steps=num_steps, warmup_steps=warmup_steps)
    tx = optim.build_optimizer(
        schedule,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    trainer = Trainer(
        model,
        tx,
        loss_fn=make_loss_fn(info, config.label_smoothing, config.dtype),
        eval_fn=make_eval_fn(info, config.dtype),
        mesh=mesh,
        seed=config.seed,
        learning_rate_fn=schedule,
    )
    del model  # The trainer owns the state now.

    loader = input_pipeline.train_loader(
        dataset,
        batch_size=config.batch_size,
        seed=config.seed,
        worker_count=config.worker_count,
        worker_buffer_size=config.worker_buffer_size,
        read_threads=config.read_threads,
    )
    train_iter = iter(loader)
    checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(run_dir, checkpoint_lib.CHECKPOINT_DIR),
        max_to_keep=config.keep_checkpoints,
        async_save=config.async_checkpoints,
    )
    start_step, meta = loop_lib.restore_or_initialize(
        trainer, checkpointer, train_iter, allow_data_change=config.allow_data_change
    )

    def shard(batch):
        return sharding.shard_batch(batch, mesh)

    def evaluate(step: int) -> dict[str, float]:
        batches = input_pipeline.eval_batches(
            dataset, batch_size=config.eval_batch_size, worker_count=config.worker_count,
            read_threads=config.read_threads,
        )
        totals = loop_lib.sum_eval_metrics(trainer, batches, shard)
        count = max(totals["count"], 1.0)
        return {
            "loss": totals["loss_sum"] / count,
            "top1": totals["top1_sum"] / count,
            "top5": totals["top5_sum"] / count,
            "count": int(totals["count"]),
        }

    logging.info(
        "%s: %d params, %d MACs, %d steps (%d per epoch), global batch %d on %d device(s), "
        "start step %d", model_name, params, macs, num_steps, steps_per_epoch,
        config.batch_size, num_devices, start_step,
    )
    with MetricsWriter(run_dir, resume_step=start_step) as writer:
        result = loop_lib.train_loop(
            trainer,
            train_iter,
            num_steps=num_steps,
            shard_fn=shard,
            start_step=start_step,
            resume_meta=meta,
            checkpointer=checkpointer,
            writer=writer,
            evaluate=evaluate,
            eval_every_steps=steps_per_epoch * config.eval_every_epochs,
            checkpoint_every_steps=config.checkpoint_every_steps or steps_per_epoch,
            log_every_steps=config.log_every_steps,
            stop_after_steps=config.stop_after_steps,
            examples_per_step=config.batch_size,
            steps_per_epoch=steps_per_epoch,
            progress=config.progress_bar,
            description=model_name,
        )
    checkpointer.close()

    if result.finished and result.last_eval is None:
        # Resumed at the final step (e.g. killed after the last checkpoint): evaluate it.
        result.last_eval = evaluate(result.step)
    last_eval = result.last_eval or {}
    row = {
        "model": model_name,
        "params": int(params),
        "macs": int(macs),
        "top1": last_eval.get("top1"),
        "top5": last_eval.get("top5"),
        "train_seconds": round(result.train_seconds, 2),
        "steps": result.step,
        "finished": result.finished,
    }
    if result.finished:
        run_dir_lib.mark_finished(run_dir, row)
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results as a fixed-width text table."""
    header = f"{'model':<26} {'params':>10} {'MACs':>13} {'top-1':>7} {'top-5':>7} {'train s':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        top1 = "-" if r.get("top1") is None else f"{100 * r['top1']:.2f}"
        top5 = "-" if r.get("top5") is None else f"{100 * r['top5']:.2f}"
        lines.append(
            f"{r['model']:<26} {r['params']:>10,} {r['macs']:>13,} {top1:>7} {top5:>7} "
            f"{r['train_seconds']:>8.1f}" + ("" if r.get("finished", True) else "  (unfinished)")
        )
    return "\n".join(lines)


def check_config(config: ml_collections.ConfigDict):
    """Checks every config field by name before any data or model is built.

    Returns:
        The data-parallel mesh (the batch sizes are checked against it).

    Raises:
        ConfigError: A field is out of range (the message names it).
    """
    models = tuple(config.models)
    if not models:
        raise ConfigError("config.models must name at least one model, got ()")
    unknown = [m for m in models if not model_zoo.is_model(m)]
    if unknown:
        raise ConfigError(
            f"config.models has unknown models {unknown}; see ddf_jax.models.list_models()"
        )
    if len(set(models)) != len(models):
        raise ConfigError(f"config.models has duplicates: {models}")
    checks.one_of(config, "dtype", DTYPES)
    checks.one_of(config, "dataset", datasets.DATASETS)
    for name in ("image_size", "worker_buffer_size", "read_threads", "log_every_steps",
                 "keep_checkpoints"):
        checks.integer(config, name, minimum=1)
    for name in ("digits_max_shift", "crop_padding", "worker_count", "num_devices",
                 "eval_every_epochs", "checkpoint_every_steps", "stop_after_steps"):
        checks.integer(config, name, minimum=0)
    checks.integer(config, "seed", minimum=0, maximum=2**32 - 1)
    if checks.integer(config, "num_train_steps", minimum=-1) <= 0:
        checks.positive_number(config, "num_epochs")  # The run length comes from it.
    checks.positive_number(config, "learning_rate")
    checks.number_in(config, "warmup_epochs", 0.0, float("inf"))
    checks.number_in(config, "momentum", 0.0, 1.0, high_open=True)
    checks.number_in(config, "weight_decay", 0.0, float("inf"))
    checks.number_in(config, "label_smoothing", 0.0, 1.0, high_open=True)
    checks.number_in(config, "crop_pct", 1e-6, 1.0)
    checks.number_in(config, "min_scale", 1e-6, 1.0)
    for name in ("nesterov", "distributed", "async_checkpoints", "progress_bar", "overwrite",
                 "check_images", "allow_data_change"):
        checks.boolean(config, name)
    mesh = sharding.create_mesh(config.num_devices)
    sharding.check_batch_size(config.batch_size, mesh, "config.batch_size")
    sharding.check_batch_size(config.eval_batch_size, mesh, "config.eval_batch_size")
    return mesh


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """Trains and evaluates every model in `config.models`, each in `workdir/<model>/`.

    Args:
        config: The experiment config (see `configs/default.py`).
        workdir: Output directory; created.

    Returns:
        One row per model: `{"model", "params", "macs", "top1", "top5",
        "train_seconds", "steps", "finished"}` (top-1/top-5 as fractions). The rows
        are also written to `workdir/results.json`, the curves to
        `workdir/curves.png`, and a table is printed.
    """
    mesh = check_config(config)
    models = tuple(config.models)
    os.makedirs(workdir, exist_ok=True)
    dataset = datasets.get_dataset(config)
    logging.info("dataset %s: %d train / %d eval examples, %d classes, %dx%dx%d",
                 dataset.info.name, dataset.info.num_train, dataset.info.num_eval,
                 dataset.info.num_classes, dataset.info.image_size, dataset.info.image_size,
                 dataset.info.in_chans)

    rows = [train_model(config, name, os.path.join(workdir, name), dataset, mesh) for name in models]

    if jax.process_index() == 0:
        with open(os.path.join(workdir, RESULTS_FILE), "w") as f:
            json.dump(rows, f, indent=2)
            f.write("\n")
        plotting.plot_training_curves(
            {name: os.path.join(workdir, name) for name in models},
            os.path.join(workdir, CURVES_FILE),
            panels=(
                ("train", "loss", "train loss"),
                ("train", "top1", "train top-1 (batch)"),
                ("eval", "loss", "eval loss"),
                ("eval", "top1", "eval top-1"),
            ),
            title=f"{dataset.info.name} {dataset.info.image_size}px",
        )
        print(format_table(rows), flush=True)
        print(f"results: {os.path.join(workdir, RESULTS_FILE)}; curves: "
              f"{os.path.join(workdir, CURVES_FILE)}", flush=True)
    return rows
