"""The generic training loop: resume, step, log, evaluate, checkpoint, stop.

`restore_or_initialize` puts a `Trainer` (and the training data iterator) at the
newest checkpoint, if any; `train_loop` then runs steps until `num_steps`, writing
train metrics every `log_every_steps`, calling `evaluate(step)` every
`eval_every_steps`, and checkpointing every `checkpoint_every_steps` and at the end.
Both are independent of the model, the data and the task.

Exact resume: the checkpoint holds the trainer state (parameters, optimizer state,
mutable model state, step, base PRNG key), the grain iterator position, the
accumulated wall time and the train metrics gathered since the last log record.
Per-step randomness is `fold_in(base_key, step)`, and the data order depends only on
the sampler seed and position, so an interrupted and resumed run takes the same steps,
and logs the same records, as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import sharding
from experiments.common.checkpoint import Checkpointer
from experiments.common.metrics import MetricsWriter
from experiments.common.progress import StepProgress
from experiments.common.train_state import Trainer


@dataclasses.dataclass
class LoopResult:
    """What `train_loop` did.

    Attributes:
        step: Step reached.
        finished: True if `step == num_steps` (False if stopped early by
            `stop_after_steps`).
        train_seconds: Wall time of the whole run so far, earlier (resumed) runs
            included: steps, compilation, evaluation and checkpointing.
        last_eval: The metrics of the last `evaluate` call, or None.
    """

    step: int
    finished: bool
    train_seconds: float
    last_eval: Optional[dict[str, Any]]


def restore_or_initialize(
    trainer: Trainer,
    checkpointer: Checkpointer,
    data_iterator: Any = None,
    *,
    allow_data_change: bool = False,
) -> tuple[int, dict[str, Any]]:
    """Restores the newest intact checkpoint into `trainer` and `data_iterator`, if any.

    Damaged checkpoints are skipped with a warning (`Checkpointer.restore_latest_intact`).

    Args:
        trainer: A freshly built `Trainer`; its state is replaced on restore.
        checkpointer: Where to look.
        data_iterator: Training grain iterator; its position is restored in place.
        allow_data_change: Continue with the current data even if it differs from the
            checkpoint's (a new sampler at the same position; not bit-exact).

    Returns:
        `(step, meta)`: the restored step (0 when starting fresh) and the checkpoint's
        metadata dict ({} when starting fresh); pass `meta` to `train_loop`.

    Raises:
        CheckpointDamagedError: Checkpoints exist but none is intact.
        DataChangedError: The training data changed (and it is not allowed).
    """
    restored = checkpointer.restore_latest_intact(
        trainer.abstract_checkpoint_tree(),
        data_iterator=data_iterator,
        allow_data_change=allow_data_change,
    )
    if restored is None:
        return 0, {}
    step, tree, meta = restored
    trainer.load_checkpoint_tree(tree)
    if trainer.step != step:
        raise RuntimeError(
            f"checkpoint {step} in {checkpointer.directory} holds optimizer step {trainer.step}"
        )
    logging.info("resumed from checkpoint step %d in %s", step, checkpointer.directory)
    return step, meta


def sum_eval_metrics(
    trainer: Trainer, batches: Iterable[Any], shard_fn: Callable[[Any], Any]
) -> dict[str, float]:
    """Runs `trainer.eval_step` over host batches and sums each returned metric.

    `eval_fn` should return per-batch sums (e.g. `{"loss_sum", "correct", "count"}`
    with padding masked out); divide the totals afterwards.

    Args:
        trainer: The `Trainer` (built with `eval_fn`).
        batches: Host batches of this process (e.g. padded evaluation batches).
        shard_fn: Host batch -> global sharded batch.

    Returns:
        Metric name -> total over all batches (host floats).
    """
    totals: dict[str, float] = {}
    for batch in batches:
        sums = jax.device_get(trainer.eval_step(shard_fn(batch)))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def _mean_metrics(window: list[Mapping[str, Any]]) -> dict[str, float]:
    host = jax.device_get(window)
    return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def _window_to_meta(window: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The running train metrics since the last log record, exactly, as JSON."""
    host = jax.device_get(window)
    if not host:
        return {}
    return {k: {"dtype": str(np.asarray(host[0][k]).dtype),
                "values": [np.asarray(m[k]).item() for m in host]} for k in host[0]}


def _window_from_meta(stored: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
    if not stored:
        return []
    columns = {k: np.asarray(v["values"], dtype=jnp.dtype(v["dtype"])) for k, v in stored.items()}
    length = len(next(iter(columns.values())))
    return [{k: column[i] for k, column in columns.items()} for i in range(length)]


def train_loop(
    trainer: Trainer,
    train_iterator: Iterator[Any],
    *,
    num_steps: int,
    shard_fn: Callable[[Any], Any],
    start_step: int = 0,
    resume_meta: Optional[Mapping[str, Any]] = None,
    checkpointer: Optional[Checkpointer] = None,
    writer: Optional[MetricsWriter] = None,
    evaluate: Optional[Callable[[int], Mapping[str, Any]]] = None,
    eval_every_steps: int = 0,
    checkpoint_every_steps: int = 0,
    log_every_steps: int = 50,
    stop_after_steps: int = 0,
    examples_per_step: int = 0,
    steps_per_epoch: int = 0,
    progress: bool = True,
    description: str = "train",
) -> LoopResult:
    """Runs training steps from `start_step` up to `num_steps`.

    Args:
        trainer: The `Trainer` (already restored, see `restore_or_initialize`).
        train_iterator: Yields this process's host batches; if it has `get_state`
            (a grain iterator) its position is saved in every checkpoint.
        num_steps: Total steps of the run.
        shard_fn: Host batch -> global sharded batch (`sharding.shard_batch` bound to
            the mesh).
        start_step: Step the trainer is at.
        resume_meta: The checkpoint metadata from `restore_or_initialize`: the wall
            time of earlier runs and the train metrics accumulated since the last
            log record, so that a resumed run logs the same records as an
            uninterrupted one.
        checkpointer: Saves every `checkpoint_every_steps` steps and at the end,
            before evaluating (an evaluation that fails does not lose the steps).
        writer: Receives train metrics (split "train") and evaluation results
            (split "eval").
        evaluate: `evaluate(step) -> dict of scalars`, run every `eval_every_steps`
            and at the end. An evaluation due at `start_step` that the log lacks
            (the run stopped during it) is run first.
        eval_every_steps: 0 evaluates only at the end.
        checkpoint_every_steps: 0 checkpoints only at the end (or when stopped).
        log_every_steps: Train metrics are averaged over this many steps.
        stop_after_steps: If > 0, stop (after checkpointing) once this process has
            run that many steps, as a pre-empted job would; the run is not finished.
        examples_per_step: Global batch size, for images/s.
        steps_per_epoch: If > 0, records get an "epoch" field (step / steps_per_epoch).
        progress: Show a tqdm bar.
        description: Label of the bar.

    Returns:
        A `LoopResult`.

    Raises:
        ValueError: If a step count is out of range.
        FloatingPointError: If the training loss becomes NaN or infinite.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if log_every_steps < 1:
        raise ValueError(f"log_every_steps must be >= 1, got {log_every_steps}")
    for name, value in (("eval_every_steps", eval_every_steps), ("checkpoint_every_steps", checkpoint_every_steps)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (0: only at the end), got {value}")
    resume_meta = dict(resume_meta or {})
    previous_seconds = float(resume_meta.get("train_seconds", 0.0))
    start_time = time.perf_counter()

    def elapsed() -> float:
        return previous_seconds + time.perf_counter() - start_time

    def epoch_fields(step: int) -> dict[str, float]:
        return {"epoch": step / steps_per_epoch} if steps_per_epoch else {}

    def save(step: int) -> None:
        if checkpointer is None:
            return
        data_iterator = train_iterator if hasattr(train_iterator, "get_state") else None
        checkpointer.save(
            step,
            trainer.checkpoint_tree(),
            data_iterator=data_iterator,
            meta={"train_seconds": elapsed(), "step": step, "metric_window": _window_to_meta(window)},
        )

    def eval_due(step: int) -> bool:
        return evaluate is not None and (
            step == num_steps or bool(eval_every_steps and step % eval_every_steps == 0)
        )

    def run_evaluation(step: int) -> dict[str, Any]:
        result = dict(evaluate(step))
        if writer is not None:
            writer.write(step, {**result, **epoch_fields(step)}, split="eval")
        return result

    step = start_step
    last_eval = None
    # Train metrics since the last log record (restored on resume); `window_steps`
    # counts only the steps of this process, for the steps/s figures.
    window: list[Mapping[str, Any]] = _window_from_meta(resume_meta.get("metric_window", {}))
    window_steps = 0
    window_start = time.perf_counter()
    if start_step and eval_due(start_step) and writer is not None:
        # The run stopped after checkpointing this step but before its evaluation
        # reached the log: evaluate now (process 0 holds the log; all decide alike).
        missed = not writer.has_record(start_step, "eval")
        if bool(sharding.broadcast_from_main(missed)):
            last_eval = run_evaluation(start_step)
    pending = None  # metrics of the step in flight; one step stays queued on device
    bar = StepProgress(
        num_steps,
        initial_step=start_step,
        examples_per_step=examples_per_step,
        description=description,
        enabled=None if progress else False,
    )
    with bar:
        while step < num_steps:
            if stop_after_steps and step - start_step >= stop_after_steps:
                break
            batch = shard_fn(next(train_iterator))
            metrics = trainer.train_step(batch)
            step += 1
            window.append(metrics)
            window_steps += 1
            if pending is not None:
                jax.block_until_ready(pending)
                bar.update(1, loss=float(pending["loss"]))
            pending = metrics

            if step % log_every_steps == 0 or step == num_steps:
                means = _mean_metrics(window)
                seconds = time.perf_counter() - window_start
                means["steps_per_second"] = window_steps / seconds
                if examples_per_step:
                    means["examples_per_second"] = window_steps * examples_per_step / seconds
                if not math.isfinite(means["loss"]):
                    raise FloatingPointError(f"training loss is {means['loss']} at step {step}")
                if writer is not None:
                    writer.write(step, {**means, **epoch_fields(step)}, split="train")
                window = []
                window_steps = 0
                window_start = time.perf_counter()

            evaluating = eval_due(step)
            ckpt_due = step == num_steps or bool(
                checkpoint_every_steps and step % checkpoint_every_steps == 0
            )
            if evaluating or ckpt_due:
                jax.block_until_ready(pending)
                bar.update(1, loss=float(pending["loss"]))
                pending = None
                pause_start = time.perf_counter()
            if ckpt_due:
                save(step)  # Before evaluating: a failing evaluation keeps the steps.
            if evaluating:
                last_eval = run_evaluation(step)
                bar.write(
                    f"step {step}: "
                    + ", ".join(f"{k}={v:.4g}" for k, v in last_eval.items()
                                if isinstance(v, float))
                )
            if evaluating or ckpt_due:
                # Keep evaluation and checkpointing out of the step-time figures.
                bar.reset_timer()
                window_start += time.perf_counter() - pause_start
        if pending is not None:
            jax.block_until_ready(pending)
            bar.update(1, loss=float(pending["loss"]))
    finished = step >= num_steps
    if not finished and checkpointer is not None and checkpointer.latest_step() != step:
        save(step)  # stopped early: keep the position reached
    if checkpointer is not None:
        checkpointer.wait()
    return LoopResult(step=step, finished=finished, train_seconds=elapsed(), last_eval=last_eval)
