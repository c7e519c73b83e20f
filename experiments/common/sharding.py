"""Data-parallel helpers: a 1-D device mesh, batch sharding and multi-host start-up.

The training step is one `jax.jit` over the global batch. The batch is sharded along
the mesh axis `DATA_AXIS`; parameters and optimizer state are replicated. Because the
step is written for the global batch, reductions inside the model (BatchNorm batch
statistics, the loss mean) are global across devices and hosts; XLA inserts the
all-reduces.

Multi-host: call `initialize_distributed()` first thing in every process (it wraps
`jax.distributed.initialize()`, which reads the coordinator address, process count and
process id from the cluster environment -- SLURM, Open MPI, Cloud TPU -- or from its
arguments). Each process then loads `global_batch // jax.process_count()` examples and
`shard_batch` assembles the global array with
`jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

_distributed_initialized = False


def initialize_distributed(**kwargs: Any) -> None:
    """Starts the multi-host runtime with `jax.distributed.initialize(**kwargs)`; idempotent.

    Must run before any other JAX call in the process. With no arguments JAX
    auto-detects the cluster (SLURM, Open MPI, TPU pods); otherwise pass
    `coordinator_address="host:port"`, `num_processes=...`, `process_id=...`.

    Args:
        **kwargs: Forwarded to `jax.distributed.initialize`.
    """
    global _distributed_initialized
    if _distributed_initialized:
        return
    jax.distributed.initialize(**kwargs)
    _distributed_initialized = True
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def create_mesh(num_devices: Optional[int] = None, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A 1-D mesh with axis `DATA_AXIS` over the first `num_devices` devices.

    Args:
        num_devices: How many devices to use; `None` or 0 means all of `jax.devices()`.
            With several processes only `None`/0 or the full device count is allowed.
        devices: Explicit device list; overrides `num_devices`.

    Returns:
        A `jax.sharding.Mesh` of shape `(num_devices,)` named `(DATA_AXIS,)`.

    Raises:
        ValueError: If `num_devices` is out of range.
    """
    if devices is None:
        all_devices = jax.devices()
        if not num_devices:
            devices = all_devices
        else:
            if not 1 <= num_devices <= len(all_devices):
                raise ValueError(
                    f"num_devices must be in [1, {len(all_devices)}] (the available devices), "
                    f"got {num_devices}"
                )
            if jax.process_count() > 1 and num_devices != len(all_devices):
                raise ValueError(
                    "num_devices must use every device when running on several hosts, "
                    f"got {num_devices} of {len(all_devices)}"
                )
            devices = all_devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy of an array on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits an array's leading (batch) axis across `DATA_AXIS`."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, name: str = "batch_size") -> int:
    """Checks that the global batch splits evenly over devices and hosts.

    Args:
        global_batch_size: Examples per step over all devices.
        mesh: The data-parallel mesh.
        name: Argument name used in the error message.

    Returns:
        The per-process batch size, `global_batch_size // jax.process_count()`.

    Raises:
        ValueError: If the batch does not divide by the device count.
    """
    n = mesh.devices.size
    if global_batch_size < 1 or global_batch_size % n:
        raise ValueError(
            f"{name} must be a positive multiple of the number of devices ({n}), "
            f"got {global_batch_size}"
        )
    return global_batch_size // jax.process_count()


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every array of `tree` fully on every device of `mesh`."""
    return jax.device_put(tree, replicated_sharding(mesh))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Turns this process's slice of a batch into global arrays sharded on `DATA_AXIS`.

    Args:
        batch: A pytree of host (numpy) arrays with leading dimension
            `global_batch // jax.process_count()`, e.g. `{'image': (B, H, W, C) uint8,
            'label': (B,) int32}`.
        mesh: The data-parallel mesh.

    Returns:
        The same pytree of `jax.Array`s with leading dimension `global_batch`,
        sharded along `DATA_AXIS`.
    """
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )
