"""Shared training infrastructure for the ddf-jax experiments.

Model- and task-agnostic pieces that every experiment (classification, joint
upsampling, ...) builds on:

    optim         build_schedule (warm-up + cosine), build_optimizer (SGD momentum,
                  weight decay that skips 1-D parameters), weight_decay_mask.
    sharding      create_mesh (1-D 'data' mesh), shard_batch, process_slice, replicate
                  (global arrays), check_batch_size, initialize_distributed (multi-host)
                  and small collectives.
    train_state   Trainer: nnx.Optimizer + one jitted data-parallel train step over
                  nnx.split state; eval_step; checkpoint_tree / load_checkpoint_tree.
    checkpoint    Checkpointer (orbax CheckpointManager: atomic, sealed with an
                  integrity manifest, newest N kept, grain iterator state, fallback
                  past damaged steps).
    integrity     write_manifest / verify_manifest (SHA-256 of every file of a step).
    run_dir       prepare_run_dir / mark_finished (resume and finished-run protection).
    loop          restore_or_initialize, train_loop (log / checkpoint / evaluate /
                  stop), sum_eval_metrics, LoopResult.
    metrics       MetricsWriter (JSONL + TensorBoard), read_metrics.
    progress      StepProgress (tqdm with step time and images/s).
    plotting      plot_training_curves (PNG from metrics logs; mean and band over
                  several runs, e.g. seeds).
    config_checks Checks of config fields by name, before any expensive work.
    errors        The errors a user can fix (printed without a traceback by cli).
    cli           The command line shared by the experiments' main.py.

A typical experiment:

    mesh = sharding.create_mesh(config.num_devices)
    schedule = optim.build_schedule(lr, total_steps=n, warmup_steps=w)
    trainer = Trainer(model, optim.build_optimizer(schedule, weight_decay=wd),
                      loss_fn=loss_fn, eval_fn=eval_fn, mesh=mesh,
                      learning_rate_fn=schedule)
    stored = run_dir.prepare_run_dir(path, config.to_dict())
    ckpt = checkpoint.Checkpointer(os.path.join(path, checkpoint.CHECKPOINT_DIR))
    start, meta = loop.restore_or_initialize(trainer, ckpt, train_iterator)
    with metrics.MetricsWriter(path, resume_step=start) as writer:
        result = loop.train_loop(trainer, train_iterator, num_steps=n,
                                 shard_fn=lambda b: sharding.shard_batch(b, mesh),
                                 start_step=start, resume_meta=meta,
                                 checkpointer=ckpt, writer=writer, ...)
    if result.finished:
        run_dir.mark_finished(path, {...})
"""

from experiments.common import (
    checkpoint,
    config_checks,
    errors,
    integrity,
    loop,
    metrics,
    optim,
    plotting,
    progress,
    run_dir,
    sharding,
)
from experiments.common.checkpoint import Checkpointer
from experiments.common.errors import (
    CheckpointDamagedError,
    ConfigError,
    ConfigMismatchError,
    DataChangedError,
    DistributedStartupError,
    ExperimentError,
    RunFinishedError,
)
from experiments.common.loop import LoopResult, restore_or_initialize, sum_eval_metrics, train_loop
from experiments.common.metrics import MetricsWriter, read_metrics
from experiments.common.optim import build_optimizer, build_schedule, weight_decay_mask
from experiments.common.plotting import plot_training_curves
from experiments.common.progress import StepProgress
from experiments.common.run_dir import mark_finished, prepare_run_dir
from experiments.common.train_state import Trainer

__all__ = [
    "CheckpointDamagedError",
    "Checkpointer",
    "ConfigError",
    "ConfigMismatchError",
    "DataChangedError",
    "DistributedStartupError",
    "ExperimentError",
    "LoopResult",
    "MetricsWriter",
    "RunFinishedError",
    "StepProgress",
    "Trainer",
    "build_optimizer",
    "build_schedule",
    "checkpoint",
    "config_checks",
    "errors",
    "integrity",
    "loop",
    "mark_finished",
    "metrics",
    "optim",
    "plot_training_curves",
    "plotting",
    "prepare_run_dir",
    "progress",
    "read_metrics",
    "restore_or_initialize",
    "run_dir",
    "sharding",
    "sum_eval_metrics",
    "train_loop",
    "weight_decay_mask",
]
