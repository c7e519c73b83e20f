"""Checkpointing with orbax: atomic, verified, with a fallback past damaged steps.

`Checkpointer` wraps an `orbax.checkpoint.CheckpointManager`. One checkpoint step is a
directory `<dir>/<step>/` holding

    state/          the array pytree (e.g. `Trainer.checkpoint_tree()`), via StandardSave
    data/           the grain iterator position (one JSON file per process)
    meta/           a small JSON dict (accumulated training time, running metrics, ...)
    integrity.json  size and SHA-256 of every other file, written last (`integrity.py`)

Orbax writes each step to a temporary directory and renames it when complete, so a
crash never leaves a half-written step that a resume would pick up; the manifest then
seals it, and `restore_latest_intact` restores only a step whose files still match
their manifest, falling back (with a warning naming the step and why) to the newest
intact one. Only the newest `max_to_keep` steps are kept (two by default).

The run-directory protocol (config.json, result.json, finished-run protection) is in
`run_dir.py`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp

from experiments.common import integrity, sharding
from experiments.common.errors import (
    CheckpointDamagedError,
    ConfigError,
    ConfigMismatchError,
    DataChangedError,
)

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged"  # Inside CHECKPOINT_DIR: steps that failed verification or restore.


class Checkpointer:
    """Saves and restores training state, data-iterator position and metadata, verified.

    Every committed step is sealed with an integrity manifest (`integrity.py`: the
    size and SHA-256 of each of its files, written last). `restore_latest_intact`
    verifies a step against its manifest before restoring it; a step that fails
    verification or restore is reported with a warning that names its path and
    why, moved to `<directory>/damaged/`, and the next older step is tried.

    Args:
        directory: Checkpoint directory (created); usually `<run_dir>/checkpoints`.
        max_to_keep: Keep only this many newest checkpoints; the default 2 leaves a
            damaged newest one an intact predecessor.
        async_save: Write array checkpoints in a background thread. The data-iterator
            state is always captured synchronously at `save` time; a step is sealed
            once its write has finished (at the next `save`, `wait` or `close`).

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> ckpt = Checkpointer(tempfile.mkdtemp())
        >>> ckpt.save(3, {"w": jnp.ones(2)}, meta={"seconds": 1.5})
        >>> step, tree, meta = ckpt.restore_latest_intact({"w": jnp.zeros(2)})
        >>> step, meta
        (3, {'seconds': 1.5})
    """

    def __init__(self, directory: str, *, max_to_keep: int = 2, async_save: bool = False):
        if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ConfigError(f"max_to_keep (keep_checkpoints) must be an int >= 1, got {max_to_keep!r}")
        self.directory = os.path.abspath(directory)
        self._unsealed: list[int] = []
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                enable_async_checkpointing=async_save,
            ),
        )
        self._async = async_save

    def latest_step(self) -> Optional[int]:
        """The newest committed checkpoint step (verified or not), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All committed checkpoint steps, oldest first."""
        return sorted(self._manager.all_steps())

    def step_dir(self, step: int) -> str:
        """The directory of checkpoint `step`."""
        return os.path.join(self.directory, str(step))

    def save(
        self,
        step: int,
        tree: Any,
        *,
        data_iterator: Any = None,
        meta: Optional[Mapping[str, Any]] = None,
    ) -> None:
        """Writes checkpoint `step` (from every process) and seals it.

        Args:
            step: The training step the state belongs to (after `step` updates).
            tree: Pytree of global arrays (e.g. `Trainer.checkpoint_tree()`).
            data_iterator: Optional grain `DataLoaderIterator` / `DatasetIterator`
                positioned after the last batch consumed by `step`.
            meta: Optional JSON-serialisable dict.
        """
        self._seal_pending()
        items = {"state": ocp.args.StandardSave(tree)}
        if data_iterator is not None:
            import grain.python as grain

            items["data"] = grain.PyGrainCheckpointSave(data_iterator)
        if meta is not None:
            items["meta"] = ocp.args.JsonSave(dict(meta))
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._unsealed.append(step)
        if not self._async:
            self._seal_pending()

    def _seal_pending(self) -> None:
        """Writes the manifests of committed steps that have none yet (process 0)."""
        if not self._unsealed:
            return
        self._manager.wait_until_finished()
        committed = set(self._manager.all_steps())
        if jax.process_index() == 0:
            for step in self._unsealed:
                if step in committed:
                    integrity.write_manifest(self.step_dir(step))
        self._unsealed = []

    def verify(self, step: int) -> Optional[str]:
        """None if checkpoint `step` matches its integrity manifest, else the reason."""
        return integrity.verify_manifest(self.step_dir(step))

    def restore(
        self,
        abstract_tree: Any = None,
        *,
        step: Optional[int] = None,
        data_iterator: Any = None,
        allow_data_change: bool = False,
    ) -> tuple[Any, dict[str, Any]]:
        """Reads checkpoint `step` (default: the newest), without verifying it.

        Args:
            abstract_tree: Pytree of arrays or `jax.ShapeDtypeStruct`s (with shardings)
                describing the stored tree; the result has its structure and placement.
                None restores the tree as stored (for inspection).
            step: Which step; None for the newest.
            data_iterator: If given, its position is set to the stored one in place.
            allow_data_change: Accept a stored data position whose sampler or data
                source differs from `data_iterator`'s (see `DataChangedError`).

        Returns:
            `(tree, meta)`; `meta` is {} when the checkpoint has none.

        Raises:
            FileNotFoundError: If there is no checkpoint (or not that step).
            DataChangedError: The data changed and `allow_data_change` is False.
            ConfigMismatchError: The data positions were saved by another number of
                processes.
        """
        if step is None:
            step = self.latest_step()
        if step is None or step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint{'' if step is None else f' for step {step}'} in {self.directory}"
            )
        stored = set(os.listdir(self.step_dir(step)))
        items = {"state": ocp.args.StandardRestore(abstract_tree)}
        if "meta" in stored:
            items["meta"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if data_iterator is not None:
            self._restore_data(step, data_iterator, allow_data_change)
        meta = dict(restored["meta"]) if "meta" in items else {}
        return restored["state"], meta

    def _restore_data(self, step: int, data_iterator: Any, allow_data_change: bool) -> None:
        """Sets `data_iterator` to the position stored in checkpoint `step` for this process."""
        data_dir = os.path.join(self.step_dir(step), "data")
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            found = sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else []
            if found:
                raise ConfigMismatchError(
                    f"checkpoint {step} in {self.directory} holds the data positions {found}, "
                    f"not {name}: resume with the number of processes the run started with"
                )
            raise FileNotFoundError(f"{data_dir} holds no data-iterator state ({name})")
        with open(path) as f:
            stored = json.load(f)
        current = data_iterator.get_state()
        current = json.loads(current) if isinstance(current, (bytes, str)) else dict(current)
        changed = [k for k in ("sampler", "data_source") if stored.get(k) != current.get(k)]
        if changed:
            then, now = _num_records(stored), _num_records(current)
            sizes = (f"{then} examples then, {now} now" if then != now
                     else f"{now} examples, but not the same ones")
            if not allow_data_change:
                raise DataChangedError(
                    f"the training data changed since checkpoint {step} in {self.directory} "
                    f"({sizes}). Restore the data to resume exactly; or pass "
                    "--config.allow_data_change=True to continue from that step with a new "
                    "sampler (no longer bit-exact); or --overwrite to start afresh."
                )
            logging.warning(
                "the training data changed since checkpoint %d (%s); continuing from step %d "
                "with a new sampler at the same position, as allowed by allow_data_change. "
                "The run is no longer bit-exact with an uninterrupted one.", step, sizes, step,
            )
            stored.update({k: current[k] for k in changed})
        state = json.dumps(stored)
        if hasattr(data_iterator, "start_prefetch"):  # A grain DataLoaderIterator.
            data_iterator.set_state(state.encode())
            data_iterator.start_prefetch()
        else:
            data_iterator.set_state(stored)

    def restore_latest_intact(
        self,
        abstract_tree: Any = None,
        *,
        data_iterator: Any = None,
        allow_data_change: bool = False,
    ) -> Optional[tuple[int, Any, dict[str, Any]]]:
        """Restores the newest checkpoint that verifies and restores; falls back past others.

        A step that fails its integrity check or its restore is reported with a
        warning naming its directory and the reason, and the next older step is tried.
        Once one succeeds, the damaged newer steps are moved to `<directory>/damaged/`,
        so that training can write those steps again. Every process takes the same
        decision.

        Args:
            abstract_tree, data_iterator, allow_data_change: As for `restore`.

        Returns:
            `(step, tree, meta)`, or None when there is no checkpoint at all.

        Raises:
            CheckpointDamagedError: Checkpoints exist but none is intact.
            DataChangedError, ConfigMismatchError: As for `restore` (no fallback: an
                older step would have the same problem).
        """
        self._seal_pending()
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            return None
        damaged: list[tuple[int, str]] = []
        for step in steps:
            reason = self.verify(step)
            if not sharding.all_processes_agree(reason is None):
                reason = reason or "it failed verification on another process"
            result = None
            if reason is None:
                try:
                    result = self.restore(abstract_tree, step=step, data_iterator=data_iterator,
                                          allow_data_change=allow_data_change)
                except (DataChangedError, ConfigMismatchError):
                    raise
                except Exception as err:  # noqa: BLE001 -- any failure to read it is damage.
                    reason = f"it fails to restore ({type(err).__name__}: {_first_line(err)})"
                if not sharding.all_processes_agree(reason is None):
                    reason = reason or "it failed to restore on another process"
            if reason is None:
                self._move_aside([s for s, _ in damaged])
                return step, result[0], result[1]
            logging.warning("checkpoint %s is damaged: %s; trying the previous one",
                            self.step_dir(step), reason)
            damaged.append((step, reason))
        listed = "; ".join(f"step {s}: {r}" for s, r in damaged[:3])
        more = f" (and {len(damaged) - 3} more)" if len(damaged) > 3 else ""
        raise CheckpointDamagedError(
            f"no intact checkpoint in {self.directory}: {listed}{more}. Delete the damaged "
            "step directories to restart from the newest one left (or from scratch), or "
            "pass --overwrite to start the run afresh."
        )

    def _move_aside(self, steps: list[int]) -> None:
        """Moves damaged steps to `<directory>/damaged/<step>` (process 0), then reloads."""
        if not steps:
            return
        if jax.process_index() == 0:
            target_root = os.path.join(self.directory, DAMAGED_DIR)
            os.makedirs(target_root, exist_ok=True)
            for step in steps:
                target, n = os.path.join(target_root, str(step)), 1
                while os.path.exists(target):
                    n += 1
                    target = os.path.join(target_root, f"{step}-{n}")
                os.rename(self.step_dir(step), target)
                logging.warning("moved damaged checkpoint %s to %s", self.step_dir(step), target)
        sharding.barrier("checkpoint: moved damaged steps")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are complete, and seals them."""
        self._manager.wait_until_finished()
        self._seal_pending()

    def close(self) -> None:
        """Waits for pending saves, seals them and releases resources."""
        self.wait()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _num_records(state: Mapping[str, Any]) -> Optional[int]:
    """The dataset size recorded in a grain iterator state's sampler repr, if any."""
    match = re.search(r"num_records=(\d+)", str(state.get("sampler", "")))
    return int(match.group(1)) if match else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""
