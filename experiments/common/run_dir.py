"""The run directory: its config, its result, and protection of finished runs.

A run directory holds `config.json` (written at start by `prepare_run_dir`), the
run's `checkpoints/`, `metrics.jsonl` and `tensorboard/`, and, once training has
completed, `result.json` (`mark_finished`). Starting again in a directory that has
`result.json` returns the stored result instead of training (same config) or raises
`RunFinishedError` (different config); `overwrite=True` deletes the run's files
first. Resuming an unfinished run with a different config raises
`ConfigMismatchError`, except for run-control keys (worker counts, logging
intervals, ...), which may change between restarts. Process 0 writes; every process
reads, with barriers between.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Iterable, Mapping, Optional

import jax

from experiments.common import sharding
from experiments.common.checkpoint import CHECKPOINT_DIR
from experiments.common.errors import ConfigMismatchError, RunDirDamagedError, RunFinishedError

CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"
# Files and directories a run creates; `overwrite=True` deletes exactly these.
RUN_ARTIFACTS = (CONFIG_FILE, RESULT_FILE, CHECKPOINT_DIR, "metrics.jsonl", "tensorboard")


def _normalise(config: Mapping[str, Any]) -> dict[str, Any]:
    """JSON round trip, so tuples/lists and numeric types compare as stored."""
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_differences(
    stored: Mapping[str, Any], current: Mapping[str, Any], ignore: Iterable[str] = ()
) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (stored value, current value) for every differing config entry.

    Keys in `ignore` (dotted names; a prefix "a" also ignores "a.b") are skipped.
    """
    ignore = tuple(ignore)
    a, b = _flatten(_normalise(stored)), _flatten(_normalise(current))
    missing = object()
    diffs = {}
    for key in sorted(set(a) | set(b)):
        if any(key == i or key.startswith(i + ".") for i in ignore):
            continue
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            diffs[key] = (
                "<absent>" if va is missing else va,
                "<absent>" if vb is missing else vb,
            )
    return diffs


def read_result(run_dir: str) -> Optional[dict[str, Any]]:
    """The stored `result.json` of a finished run, or None if the run has not finished."""
    path = os.path.join(run_dir, RESULT_FILE)
    if not os.path.exists(path):
        return None
    return _read_json_object(path)


def _read_json_object(path: str) -> dict[str, Any]:
    """The JSON object stored in `path`; RunDirDamagedError naming the file otherwise."""
    try:
        with open(path) as f:
            payload = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunDirDamagedError(
            f"{path}: expected a JSON object written by a previous run, but it cannot be read ({error}); "
            "move the run directory aside or pass --overwrite to start the run afresh"
        ) from error
    if not isinstance(payload, dict):
        raise RunDirDamagedError(f"{path}: expected a JSON object, got {type(payload).__name__}")
    return payload


def _write_json_atomic(path: str, payload: Any) -> None:
    """Writes `path` whole or not at all: a flushed, synced temporary file renamed into place."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare_run_dir(
    run_dir: str,
    config: Mapping[str, Any],
    *,
    overwrite: bool = False,
    run_control_keys: Iterable[str] = (),
) -> Optional[dict[str, Any]]:
    """Checks a run directory before training and records the config.

    Args:
        run_dir: The run's directory (created if missing).
        config: The run's config as a (nested) JSON-serialisable mapping.
        overwrite: Delete an existing run's files (`RUN_ARTIFACTS`) and start afresh.
        run_control_keys: Dotted config keys allowed to differ from the stored config
            (they do not change the result: worker counts, logging, overwrite, ...).

    Returns:
        The stored result if the directory holds a finished run with the same config
        (the caller should report it and not train); otherwise None, after writing
        `config.json`.

    Raises:
        RunFinishedError: The run finished with a different config and `overwrite`
            is False.
        ConfigMismatchError: An unfinished run (with checkpoints) exists with a
            different config and `overwrite` is False.
    """
    os.makedirs(run_dir, exist_ok=True)
    is_main = jax.process_index() == 0
    if overwrite:
        if is_main:
            for name in RUN_ARTIFACTS:
                path = os.path.join(run_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        logging.info("overwrite: removed previous run files in %s", run_dir)
        sharding.barrier("prepare_run_dir: overwrite")  # Nobody reads what is being deleted.
    config_path = os.path.join(run_dir, CONFIG_FILE)
    stored_config = None
    if os.path.exists(config_path):
        stored_config = _read_json_object(config_path)
    result = read_result(run_dir)
    if stored_config is not None:
        diffs = config_differences(stored_config, config, run_control_keys)
        if diffs:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diffs.items())
            if result is not None:
                raise RunFinishedError(
                    f"{run_dir} holds a finished run with a different config ({listed}). "
                    "Use another workdir, or pass --overwrite / config.overwrite=True to "
                    "delete it and train again."
                )
            if _has_checkpoints(run_dir):
                raise ConfigMismatchError(
                    f"{run_dir} holds an unfinished run with a different config ({listed}); "
                    "resuming would mix two configs. Use another workdir, restore the old "
                    "config to resume, or pass --overwrite / config.overwrite=True."
                )
    elif result is not None:
        raise RunFinishedError(
            f"{run_dir} has {RESULT_FILE} but no {CONFIG_FILE}; refusing to touch it. "
            "Pass --overwrite / config.overwrite=True to delete it."
        )
    if result is not None:
        return result
    sharding.barrier("prepare_run_dir: read")  # Everyone has read before process 0 writes.
    if is_main:
        _write_json_atomic(config_path, _normalise(config))
    return None


def _has_checkpoints(run_dir: str) -> bool:
    path = os.path.join(run_dir, CHECKPOINT_DIR)
    return os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path))


def mark_finished(run_dir: str, result: Mapping[str, Any]) -> None:
    """Writes `result.json`, which marks the run in `run_dir` as finished (process 0)."""
    if jax.process_index() == 0:
        _write_json_atomic(os.path.join(run_dir, RESULT_FILE), dict(result))
    sharding.barrier("mark_finished")
