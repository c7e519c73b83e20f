"""Command line for the joint (guided) depth up-sampling experiment.

    python -m experiments.joint_upsampling --workdir DIR [--config FILE] [--config.FIELD=VALUE ...]
        [--overwrite]

`--config` defaults to `configs/default.py` (synthetic training, Middlebury
test, CPU). Any config field can be overridden, e.g.
`--config.per_scale.x8.steps=600 --config.scales='(8,)'`. `--overwrite`
retrains runs that already finished in DIR (by default they are reloaded and
evaluated, not retrained); an interrupted run resumes from its last checkpoint.
Several hosts: `--config.distributed=True` and the flags in
`experiments.common.cli` (see the README).
"""

import os

from experiments.common import cli

cli.define_config_flag(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py"))
FLAGS = cli.FLAGS


def main(argv):
    from experiments.joint_upsampling import train

    cli.main(argv, train.train_and_evaluate)


def run() -> None:
    """Entry point for `python -m experiments.joint_upsampling`."""
    cli.run(main)


if __name__ == "__main__":
    run()
