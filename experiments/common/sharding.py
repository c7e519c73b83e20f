"""Data-parallel helpers: a 1-D device mesh, batch sharding and multi-host start-up.

The training step is one `jax.jit` over the global batch. The batch is sharded along
the mesh axis `DATA_AXIS`; parameters and optimizer state are replicated. Because the
step is written for the global batch, reductions inside the model (BatchNorm batch
statistics, the loss mean) are global across devices and hosts; XLA inserts the
all-reduces.

Multi-host: call `initialize_distributed()` first thing in every process (it wraps
`jax.distributed.initialize()`, which reads the coordinator address, process count and
process id from the cluster environment -- SLURM, Open MPI, Cloud TPU -- or from its
arguments). Each process then loads its own `global_batch // jax.process_count()`
rows of every global batch (`process_slice` says which), and `shard_batch` assembles
the global array with `jax.make_array_from_process_local_data`.

Every array the trainer keeps (parameters, optimizer state, PRNG key) must be a global
`jax.Array` over the whole mesh: `replicate` builds them from host values that are
identical on every process. (`jax.device_put` of a host array onto a sharding that
spans other processes' devices gives, on jax 0.10, an array whose shards orbax cannot
save.) `differing_processes`, `broadcast_from_main` and `barrier` are the small
collective helpers the experiments need; with one process they cost nothing.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments.common.errors import ConfigError, DistributedStartupError

DATA_AXIS = "data"

_distributed_initialized = False


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedStartupError(
            f"--coordinator_address must be host:port (e.g. 10.0.0.1:1234), got {address!r}"
        )
    return host, int(port)


def _wait_for_coordinator(address: str, timeout_seconds: float) -> None:
    """Polls the coordinator's TCP port until it accepts a connection or time is up."""
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise DistributedStartupError(
                    f"no coordinator answered at --coordinator_address={address} within "
                    f"{timeout_seconds:g} s ({err.strerror or err}). Start process 0 there "
                    "first, or fix the address; --initialization_timeout sets the wait."
                ) from None
        time.sleep(0.25)


def initialize_distributed(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    *,
    timeout_seconds: int = 300,
) -> None:
    """Starts the multi-host runtime (`jax.distributed.initialize`); idempotent.

    Must run before any other JAX call in the process. With no arguments JAX
    auto-detects the cluster (SLURM, Open MPI, TPU pods) and reads the
    `JAX_COORDINATOR_ADDRESS` environment variable; otherwise pass all three.

    A process other than 0 first waits up to `timeout_seconds` for the coordinator's
    port to answer and raises `DistributedStartupError` naming the address if it does
    not; JAX itself would abort the process without a Python error. Process 0 hosts the
    coordinator and waits up to `timeout_seconds` for the others to join (then JAX
    aborts it with "DEADLINE_EXCEEDED").

    Args:
        coordinator_address: "host:port" of process 0.
        num_processes: Number of processes (>= 1).
        process_id: This process's index, in [0, num_processes).
        timeout_seconds: How long to wait for the coordinator and the other processes.

    Raises:
        DistributedStartupError: Bad arguments, or an unreachable coordinator.
    """
    global _distributed_initialized
    if _distributed_initialized:
        return
    if timeout_seconds < 1:
        raise DistributedStartupError(
            f"--initialization_timeout must be >= 1 second, got {timeout_seconds}"
        )
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise DistributedStartupError(
            "pass all of --coordinator_address, --num_processes and --process_id, or none "
            f"(to let JAX detect the cluster); got coordinator_address={coordinator_address!r}, "
            f"num_processes={num_processes!r}, process_id={process_id!r}"
        )
    if coordinator_address is not None:
        _split_address(coordinator_address)
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedStartupError(
                f"--process_id must be in [0, --num_processes={num_processes}), got {process_id}"
            )
        if process_id > 0:
            _wait_for_coordinator(coordinator_address, timeout_seconds)
    logging.info(
        "jax.distributed: joining %s as process %s of %s (waiting up to %d s)",
        coordinator_address or "the detected cluster", process_id, num_processes, timeout_seconds,
    )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_seconds,
    )
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
        ConfigError: If `num_devices` is out of range.
    """
    if devices is None:
        all_devices = jax.devices()
        if not num_devices:
            devices = all_devices
        else:
            if not 1 <= num_devices <= len(all_devices):
                raise ConfigError(
                    f"num_devices must be in [1, {len(all_devices)}] (the available devices), "
                    f"got {num_devices}"
                )
            if jax.process_count() > 1 and num_devices != len(all_devices):
                raise ConfigError(
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
    """Checks that the global batch splits evenly over devices and processes.

    Args:
        global_batch_size: Examples per step over all devices.
        mesh: The data-parallel mesh.
        name: Argument name used in the error message.

    Returns:
        The per-process batch size, `global_batch_size // jax.process_count()`.

    Raises:
        ConfigError: If the batch does not divide by the device or process count.
    """
    devices, processes = mesh.devices.size, jax.process_count()
    if (
        isinstance(global_batch_size, bool)
        or not isinstance(global_batch_size, (int, np.integer))
        or global_batch_size < 1
        or global_batch_size % devices
        or global_batch_size % processes
    ):
        raise ConfigError(
            f"{name} must be a positive multiple of the number of devices ({devices}) "
            f"and of processes ({processes}), got {global_batch_size!r}"
        )
    return global_batch_size // processes


def process_slice(global_batch_size: int) -> slice:
    """The rows of every global batch that this process loads: one contiguous block.

    Process `p` of `P` takes rows `[p * B / P, (p + 1) * B / P)`. The global batch that
    `shard_batch` assembles is then the same array, row for row, whatever the number
    of processes, and device `d` of the mesh holds the same rows.

    Raises:
        ConfigError: If `global_batch_size` does not divide by the process count.
    """
    processes, index = jax.process_count(), jax.process_index()
    if global_batch_size % processes:
        raise ConfigError(
            f"the global batch ({global_batch_size}) must divide by the number of "
            f"processes ({processes})"
        )
    local = global_batch_size // processes
    return slice(index * local, (index + 1) * local)


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _replicate_leaf(x: Any, sharding: NamedSharding) -> Any:
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if _is_key(x):
        data = _replicate_leaf(jax.random.key_data(x), sharding)
        impl = jax.random.key_impl(x)
        return jax.jit(lambda d: jax.random.wrap_key_data(d, impl=impl), out_shardings=sharding)(data)
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every array of `tree` fully on every device of `mesh`, as global arrays.

    With several processes the values must be identical on every process (same seed,
    config and code); each process supplies the copies for its own devices. Typed
    PRNG keys stay typed keys; arrays already replicated on `mesh` are kept as they are.
    """
    sharding = replicated_sharding(mesh)
    return jax.tree.map(lambda x: _replicate_leaf(x, sharding), tree)


def differing_processes(value: bytes) -> list[int]:
    """Compares a byte string across processes (collective: every process must call it).

    Returns:
        The indices of the processes whose value differs from process 0's: [] when all
        agree, and always with one process.
    """
    if jax.process_count() == 1:
        return []
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(value).digest(), np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(digest))
    return [i for i in range(len(gathered)) if not np.array_equal(gathered[i], gathered[0])]


def broadcast_from_main(value: Any) -> Any:
    """Process 0's value of a small numeric scalar or array, on every process (collective)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier `name` (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


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


def all_processes_agree(flag: bool) -> bool:
    """True if `flag` is true on every process (collective: every process must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray(bool(flag), np.int32))
    return bool(np.all(np.asarray(gathered)))
