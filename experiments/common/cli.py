"""The command line shared by the experiments: flags, multi-host start-up, errors.

Each experiment's `main.py` is

    cli.define_config_flag(DEFAULT_CONFIG_FILE)

    def main(argv):
        cli.main(argv, train.train_and_evaluate)

and `python -m experiments.<name> --workdir DIR [--config FILE] [--config.FIELD=V]
[--overwrite]` then behaves the same for every experiment:

* `--overwrite` sets `config.overwrite` (retrain a finished run);
* with `--config.distributed=True` the process joins the multi-host run first
  (`--coordinator_address`, `--num_processes`, `--process_id`, or JAX's cluster
  detection under SLURM / Open MPI), and the processes check at start-up that they
  were given the same config and workdir;
* the errors a user can fix (`experiments.common.errors`) are printed as one
  "error: ..." message and exit with status 1, without a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Callable

from absl import app, flags
from ml_collections import config_flags

from experiments.common.errors import DistributedStartupError, ExperimentError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, results and plots.")
flags.DEFINE_bool("overwrite", False, "Delete and retrain runs that already finished in --workdir.")
# Multi-host start-up (with --config.distributed=True). Left unset, JAX detects
# SLURM / Open MPI / Kubernetes / Cloud TPU; JAX_COORDINATOR_ADDRESS is also read.
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.DEFINE_integer(
    "initialization_timeout", 300,
    "Seconds to wait for the coordinator and the other processes (multi-host).",
)
flags.mark_flags_as_required(["workdir"])


def define_config_flag(default_config_file: str) -> None:
    """Defines `--config` (a config .py file with `get_config()`) and its overrides.

    Each experiment's `main.py` calls this once with its default config. The flag may
    be defined again by another experiment in the same process (tests import both);
    the later definition wins.
    """
    config_flags.DEFINE_config_file(
        "config",
        default_config_file,
        "Config file (a .py with get_config()).",
        lock_config=True,
        allow_override=True,
    )


def _start_distributed(config: Any, workdir: str) -> None:
    """Joins the multi-host run and checks that every process got the same config."""
    from experiments.common import sharding

    sharding.initialize_distributed(
        FLAGS.coordinator_address,
        FLAGS.num_processes,
        FLAGS.process_id,
        timeout_seconds=FLAGS.initialization_timeout,
    )
    import jax

    started = json.dumps({"config": config.to_dict(), "workdir": workdir}, sort_keys=True, default=str)
    differing = sharding.differing_processes(started.encode())
    if differing:
        raise DistributedStartupError(
            f"processes {differing} of {jax.process_count()} were started with another config "
            "or --workdir than process 0; start every process with the same command line "
            "(only --process_id differs)"
        )


def main(argv: list[str], train_and_evaluate: Callable[[Any, str], Any]) -> None:
    """Runs `train_and_evaluate(config, workdir)` from the parsed flags.

    Args:
        argv: What `absl.app.run` passes (the program name and no other arguments).
        train_and_evaluate: The experiment's entry point.
    """
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    if FLAGS.overwrite:
        with config.unlocked():
            config.overwrite = True
    logging.getLogger().setLevel(logging.INFO)
    # Library INFO logs (orbax writes several lines per checkpoint) go through the
    # "absl" logger; keep them to warnings so the progress bar and results stay readable.
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        if config.get("distributed", False):
            # Before anything else touches JAX.
            _start_distributed(config, FLAGS.workdir)
        train_and_evaluate(config, FLAGS.workdir)
    except ExperimentError as err:
        sys.exit(f"error: {err}")


def run(main_fn: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main_fn)`: parses the flags, then calls `main_fn(argv)`."""
    app.run(main_fn)
