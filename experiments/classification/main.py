"""Command line for the classification experiment.

    python -m experiments.classification --workdir DIR [--config FILE] [--config.FIELD=VALUE ...]
        [--overwrite]

`--config` defaults to `configs/default.py` (digits on CPU). Any config field can be
overridden, e.g. `--config.num_epochs=3 --config.batch_size=32`. `--overwrite`
retrains runs that already finished in DIR (by default they are reported, not
retrained).
"""

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, results.json and plots.")
flags.DEFINE_bool("overwrite", False, "Delete and retrain runs that already finished in --workdir.")
# Multi-host start-up (with --config.distributed=True). Left unset, JAX detects
# SLURM / Open MPI / Kubernetes / Cloud TPU; JAX_COORDINATOR_ADDRESS is also read.
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Config file (a .py with get_config()).", lock_config=True
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    if FLAGS.overwrite:
        with config.unlocked():
            config.overwrite = True
    if config.distributed:
        # Before anything else touches JAX: joins the cluster (SLURM / Open MPI /
        # coordinator environment variables; see README.md).
        from experiments.common import sharding

        sharding.initialize_distributed(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    logging.getLogger().setLevel(logging.INFO)
    # Library INFO logs (orbax writes several lines per checkpoint) go through the
    # "absl" logger; keep them to warnings so the progress bar and results stay readable.
    logging.getLogger("absl").setLevel(logging.WARNING)
    from experiments.classification import train
    from experiments.common.checkpoint import ConfigMismatchError, RunFinishedError

    try:
        train.train_and_evaluate(config, FLAGS.workdir)
    except (RunFinishedError, ConfigMismatchError) as err:
        sys.exit(f"error: {err}")


def run() -> None:
    """Entry point for `python -m experiments.classification`."""
    app.run(main)


if __name__ == "__main__":
    run()
