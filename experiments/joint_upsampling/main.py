"""Command line for the joint (guided) depth up-sampling experiment.

    python -m experiments.joint_upsampling --workdir DIR [--config FILE] [--config.FIELD=VALUE ...]
        [--overwrite]

`--config` defaults to `configs/default.py` (synthetic training, Middlebury
test, CPU). Any config field can be overridden, e.g.
`--config.per_scale.x8.steps=600 --config.scales='(8,)'`. `--overwrite`
retrains runs that already finished in DIR (by default they are reloaded and
evaluated, not retrained); an interrupted run resumes from its last checkpoint.
"""

import logging
import os

from absl import app, flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, results.json/.md and panels.")
flags.DEFINE_bool("overwrite", False, "Delete and retrain runs that already finished in --workdir.")
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
    logging.getLogger().setLevel(logging.INFO)
    # Orbax logs several INFO lines per checkpoint through absl; keep the output readable.
    logging.getLogger("absl").setLevel(logging.WARNING)
    from experiments.joint_upsampling import train

    train.train_and_evaluate(config, FLAGS.workdir)


def run() -> None:
    """Entry point for `python -m experiments.joint_upsampling`."""
    app.run(main)


if __name__ == "__main__":
    run()
