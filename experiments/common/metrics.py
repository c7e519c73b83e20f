"""Metrics: a JSON-lines log plus TensorBoard event files, written by process 0 only.

Every call to `MetricsWriter.write` appends one JSON object per line to
`<logdir>/metrics.jsonl`:

    {"step": 120, "split": "train", "time": 1712345678.9, "loss": 0.41, "lr": 0.05, ...}

and the same scalars to TensorBoard as `<split>/<name>` (via tensorboardX). When a run
resumes from a checkpoint at step S, pass `resume_step=S`: records after S (written
before the interruption but not covered by the checkpoint) are dropped from the
JSONL file and purged from TensorBoard, so the logs match the resumed trajectory; a
cut-off last line is dropped with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Iterable, Mapping, Optional

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"


def _to_python(value: Any) -> Any:
    if isinstance(value, (str, bool)) or value is None:
        return value
    array = np.asarray(jax.device_get(value))
    if array.size != 1:
        raise ValueError(f"metric values must be scalars, got shape {array.shape}")
    scalar = array.item()
    if isinstance(scalar, float) and not math.isfinite(scalar):
        return str(scalar)  # JSON has no NaN/inf; keep them readable.
    return scalar


def read_metrics(path: str, split: Optional[str] = None) -> list[dict[str, Any]]:
    """Reads a `metrics.jsonl` file (or the directory holding it).

    A cut-off last line (the process stopped, or the power failed, while writing it)
    is dropped with a warning; any other line that is not a JSON object is an error.

    Args:
        path: The file, or a directory containing `metrics.jsonl`.
        split: If given, keep only records whose "split" equals it.

    Returns:
        The records in file order; an empty list when the file does not exist.

    Raises:
        ValueError: A line other than the last is not a JSON object (names the file
            and line).
    """
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a {type(record).__name__}, not an object")
        except ValueError as err:
            if number == last:
                logging.warning("%s: dropping its cut-off last line %d (%s)", path, number + 1, err)
                continue
            raise ValueError(f"{path}, line {number + 1}: not a JSON record ({err})") from None
        if split is None or record.get("split") == split:
            records.append(record)
    return records


class MetricsWriter:
    """Writes scalar metrics to JSONL and TensorBoard.

    Args:
        logdir: Directory for `metrics.jsonl` and the TensorBoard event files; created.
        resume_step: Step the run resumes from (0 for a fresh run). Records with a
            larger step are removed.
        tensorboard: Also write TensorBoard events.
        enabled: Write anything at all; defaults to `jax.process_index() == 0`.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> with MetricsWriter(d, tensorboard=False) as w:
        ...     _ = w.write(1, {"loss": 0.5}, split="train")
        >>> read_metrics(d)[0]["loss"]
        0.5
    """

    def __init__(
        self,
        logdir: str,
        *,
        resume_step: int = 0,
        tensorboard: bool = True,
        enabled: Optional[bool] = None,
    ):
        self.logdir = logdir
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._file = None
        self._tb = None
        self._kept: set[tuple[Any, Any]] = set()
        if not self.enabled:
            return
        os.makedirs(logdir, exist_ok=True)
        path = os.path.join(logdir, METRICS_FILE)
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
        self._kept = {(r.get("step"), r.get("split")) for r in kept}
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            for record in kept:
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, path)
        self._file = open(path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(
                os.path.join(logdir, "tensorboard"),
                purge_step=resume_step + 1 if resume_step else None,
            )

    def write(self, step: int, scalars: Mapping[str, Any], *, split: str = "train") -> dict:
        """Appends one record.

        Args:
            step: Global training step the values belong to.
            scalars: Name -> scalar (Python number, numpy or jax scalar).
            split: Record group, e.g. "train" or "eval".

        Returns:
            The record as written (Python scalars).
        """
        record = {"step": int(step), "split": split, "time": time.time()}
        record.update({k: _to_python(v) for k, v in scalars.items()})
        if not self.enabled:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in record.items():
                if name in ("step", "split", "time") or not isinstance(value, (int, float)):
                    continue
                self._tb.add_scalar(f"{split}/{name}", value, int(step))
            self._tb.flush()
        return record

    def has_record(self, step: int, split: str) -> bool:
        """Whether the log kept from before the resume has a record at `step` in `split`.

        Always False when this writer is disabled (processes other than 0).
        """
        return (int(step), split) in self._kept

    def write_many(self, records: Iterable[tuple[int, Mapping[str, Any], str]]) -> None:
        """Writes `(step, scalars, split)` tuples in order."""
        for step, scalars, split in records:
            self.write(step, scalars, split=split)

    def close(self) -> None:
        """Flushes and closes the files."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
