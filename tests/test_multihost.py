"""Multi-host training, proven with two processes on this machine.

Each test starts real `python -m experiments.<name>` processes: `jax.distributed`
on 127.0.0.1 with a free port, gloo CPU collectives, one CPU device per process, a
tiny config. The reference is one process with two virtual CPU devices and the same
config. Every launch is bounded in time, and every process group is killed in a
`finally`, also when one side fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.common import checkpoint as checkpoint_lib
from experiments.common import integrity
from experiments.common import run_dir as run_dir_lib
from experiments.common.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_TIMEOUT = 150  # Seconds for one launch of all its processes.
# Fields of a metrics record that measure time, not the run.
TIMING_FIELDS = ("time", "steps_per_second", "examples_per_second")

CLASSIFICATION_CONFIG = """
from experiments.classification.configs import default
def get_config():
    c = default.get_config()
    c.models = ("resnet20_cifar",)
    c.model_overrides = {"layers": (1,), "widths": (8,), "stem_width": 8}
    c.image_size, c.batch_size, c.eval_batch_size = 8, 8, 120
    c.num_train_steps, c.checkpoint_every_steps, c.log_every_steps = 6, 2, 2
    c.progress_bar = False
    return c
"""
CLASSIFICATION_RUN = os.path.join("resnet20_cifar", "seed_0")  # The run directory in the workdir.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        # Set before jax is imported in the child: its number of CPU devices (and, as in
        # conftest.py, no LLVM optimisation: every launch compiles more than it computes).
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def launch(commands, *, devices=1, log_dir, timeout=LAUNCH_TIMEOUT, until=None):
    """Runs the commands as concurrent processes (each in its own process group).

    Args:
        commands: One argv list per process.
        devices: CPU devices per process.
        log_dir: Where each process's combined output goes (`proc<i>.log`).
        timeout: Seconds before every process is killed and the test fails.
        until: Optional predicate, polled; when it becomes true every process is
            killed with SIGKILL (a simulated crash) and the launch returns.

    Returns:
        A list of `(returncode, output)`; returncode is None for a process killed by
        `until`.
    """
    os.makedirs(log_dir, exist_ok=True)
    processes, logs = [], []
    try:
        for i, command in enumerate(commands):
            log = open(os.path.join(log_dir, f"proc{i}.log"), "w")
            logs.append(log)
            processes.append(subprocess.Popen(
                command, cwd=REPO, env=_env(devices), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            ))
        deadline = time.monotonic() + timeout
        killed = False
        while any(p.poll() is None for p in processes):
            if until is not None and until():
                for p in processes:
                    _kill(p)
                killed = True
                break
            failed = [p for p in processes if p.poll() not in (None, 0)]
            if failed:
                # One side failed: give the others a moment to fail too, then stop them.
                deadline = min(deadline, time.monotonic() + 20)
            if time.monotonic() > deadline:
                for p in processes:
                    _kill(p)
                outputs = [open(log.name).read()[-3000:] for log in logs]
                pytest.fail(f"processes did not finish within {timeout} s:\n" + "\n----\n".join(outputs))
            time.sleep(0.02 if until is not None else 0.2)
    finally:
        for p in processes:
            _kill(p)
        for log in logs:
            log.close()
    results = []
    for p, log in zip(processes, logs):
        with open(log.name) as f:
            results.append((None if killed else p.returncode, f.read()))
    return results


def experiment_command(name, workdir, config_file, *extra):
    return [sys.executable, "-m", f"experiments.{name}", f"--workdir={workdir}",
            f"--config={config_file}", *extra]


def two_process_commands(name, workdir, config_file, *extra, port=None, per_process=None):
    port = port or free_port()
    commands = []
    for i in range(2):
        own = per_process[i] if per_process else ()
        commands.append(experiment_command(
            name, workdir, config_file, "--config.distributed=True",
            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
            "--initialization_timeout=60", *extra, *own,
        ))
    return commands


def assert_succeeded(results):
    for i, (code, output) in enumerate(results):
        assert code == 0, f"process {i} exited with {code}:\n{output[-4000:]}"


def stored_state(run_dir):
    """The newest checkpoint's array tree of a run, as numpy, with its step."""
    directory = os.path.join(run_dir, checkpoint_lib.CHECKPOINT_DIR)
    step = max(int(name) for name in os.listdir(directory) if name.isdigit())
    metadata = ocp.StandardCheckpointer().metadata(os.path.join(directory, str(step), "state"))
    tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(os.path.join(directory, str(step), "state"), abstract)
    return step, jax.tree.map(np.asarray, restored)


def records(run_dir):
    """metrics.jsonl without the timing fields."""
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_metrics(run_dir)]


def without_seconds(rows):
    return [{k: v for k, v in row.items() if k != "train_seconds"} for row in rows]


# ----------------------------------------------------------------------------- classification


@pytest.mark.slow
def test_classification_two_processes_killed_and_restarted_equal_one_uninterrupted_process(tmp_path):
    """Two processes (one device each), both killed after checkpoint 2 and restarted, give
    exactly what one uninterrupted process on two devices gives.

    (The joint upsampling test below compares two processes with one without a kill.)
    """
    config_file = tmp_path / "tiny.py"
    config_file.write_text(CLASSIFICATION_CONFIG)
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    run_dir = os.path.join(two, CLASSIFICATION_RUN)
    checkpoints = os.path.join(run_dir, checkpoint_lib.CHECKPOINT_DIR)

    def committed_step_2():
        return os.path.exists(os.path.join(checkpoints, "2", integrity.MANIFEST_FILE))

    # Both processes killed (SIGKILL) once checkpoint 2 is sealed, then restarted.
    launch(two_process_commands("classification", two, config_file),
           log_dir=str(tmp_path / "logs_killed"), until=committed_step_2)
    assert run_dir_lib.read_result(run_dir) is None, "the run finished before it was killed"
    steps = sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())
    assert steps and steps[-1] < 6
    assert_succeeded(launch(two_process_commands("classification", two, config_file),
                            log_dir=str(tmp_path / "logs_restarted")))
    assert_succeeded(launch([experiment_command("classification", one, config_file)], devices=2,
                            log_dir=str(tmp_path / "logs_one")))

    rows_two, rows_one = (json.loads(open(os.path.join(d, "results.json")).read())["runs"]
                          for d in (two, one))
    assert rows_two[0]["steps"] == 6 and rows_two[0]["finished"]
    assert rows_two[0]["test"]["count"] == 360  # The test split, once, after the selection.
    assert without_seconds(rows_two) == without_seconds(rows_one)  # top-1, top-5: identical
    step_two, state_two = stored_state(run_dir)
    step_one, state_one = stored_state(os.path.join(one, CLASSIFICATION_RUN))
    assert step_two == step_one == 6
    # Parameters, BatchNorm statistics, momentum, step, key: bit for bit.
    chex.assert_trees_all_equal(state_two, state_one)
    # Every logged record, also those logged after the restart.
    assert records(run_dir) == records(os.path.join(one, CLASSIFICATION_RUN))
    # Process 0 alone wrote the outputs: one set of files, no duplicates.
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))


# ----------------------------------------------------------------------------- joint upsampling

JOINT_CONFIG = """
from experiments.joint_upsampling.configs import default
def get_config():
    c = default.get_config()
    c.models, c.scales = ("plain_net",), (2,)
    c.per_scale = {"x2": {"steps": 3, "crop_size": 16, "batch_size": 4}}
    c.model.update(base_features=4, max_features=4, guide_base_features=4, guide_max_features=4,
                   encoder_layers=1)
    c.synthetic.pool_size, c.validation_examples = 8, 4
    c.guided_filter.update(tune_examples=1, radii=(1,), epsilons=(1e-2,))
    c.log_every_steps, c.checkpoint_every_steps = 1, 2
    c.progress_bar, c.panels = False, False
    return c
"""


@pytest.mark.slow
def test_joint_upsampling_two_processes_equal_one_process(tmp_path):
    config_file = tmp_path / "tiny.py"
    config_file.write_text(JOINT_CONFIG)
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    assert_succeeded(launch(two_process_commands("joint_upsampling", two, config_file),
                            log_dir=str(tmp_path / "logs_two")))
    assert_succeeded(launch([experiment_command("joint_upsampling", one, config_file)], devices=2,
                            log_dir=str(tmp_path / "logs_one")))
    with open(os.path.join(two, "results.json")) as f:
        results_two = json.load(f)
    with open(os.path.join(one, "results.json")) as f:
        results_one = json.load(f)
    assert results_two == results_one and np.isfinite(results_two["middlebury_left"]["plain_net"]["x2"])
    chex.assert_trees_all_equal(stored_state(os.path.join(two, "plain_net_x2"))[1],
                                stored_state(os.path.join(one, "plain_net_x2"))[1])
    assert records(os.path.join(two, "plain_net_x2")) == records(os.path.join(one, "plain_net_x2"))


# ----------------------------------------------------------------------------- bad input


def _errors(results):
    """Each process's exit code and its last "error:" line."""
    out = []
    for code, output in results:
        lines = [line for line in output.splitlines() if line.startswith("error: ")]
        out.append((code, lines[-1] if lines else output[-2000:]))
    return out


def _config_file(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(CLASSIFICATION_CONFIG)
    return path


def test_batch_that_does_not_divide_is_an_error(tmp_path):
    config_file = _config_file(tmp_path)
    results = launch(
        two_process_commands("classification", str(tmp_path / "w"), config_file, "--config.batch_size=7"),
        log_dir=str(tmp_path / "logs"),
    )
    for code, line in _errors(results):
        assert code == 1, line
        assert line == ("error: config.batch_size must be a positive multiple of the number of "
                        "devices (2) and of processes (2), got 7")


def test_unreachable_coordinator_is_an_error_within_the_timeout(tmp_path):
    config_file = _config_file(tmp_path)
    command = experiment_command(
        "classification", str(tmp_path / "w"), config_file, "--config.distributed=True",
        f"--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=2", "--process_id=1",
        "--initialization_timeout=2",
    )
    started = time.perf_counter()
    [(code, line)] = _errors(launch([command], log_dir=str(tmp_path / "logs"), timeout=60))
    assert code == 1 and line.startswith("error: no coordinator answered at --coordinator_address=127.0.0.1:")
    assert "within 2 s" in line
    assert time.perf_counter() - started < 40  # 2 s of waiting plus the start-up of Python and JAX.


def test_processes_with_different_configs_stop_at_start_up(tmp_path):
    config_file = _config_file(tmp_path)
    results = launch(
        two_process_commands("classification", str(tmp_path / "w"), config_file,
                             per_process=[(), ("--config.learning_rate=0.05",)]),
        log_dir=str(tmp_path / "logs"),
    )
    for code, line in _errors(results):
        assert code == 1, line
        assert line.startswith("error: processes [1] of 2 were started with another config")
    assert not os.path.exists(tmp_path / "w" / "resnet20_cifar")  # Stopped before any work.
