"""Command line for the classification experiment.

    python -m experiments.classification --workdir DIR [--config FILE] [--config.FIELD=VALUE ...]
        [--overwrite]

`--config` defaults to `configs/default.py` (digits on CPU). Any config field can be
overridden, e.g. `--config.num_epochs=3 --config.batch_size=32`; several seeds in one
command: `--config.seeds="(0,1,2)"`; a learning-rate sweep, selected on the
validation split: `--config.sweep_learning_rates="(0.1,0.2)"`. `--overwrite`
retrains runs that already finished in DIR (by default they are reported, not
retrained). Several hosts: `--config.distributed=True` and the flags in
`experiments.common.cli` (see the README).
"""

import os

from experiments.common import cli

cli.define_config_flag(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py"))
FLAGS = cli.FLAGS


def main(argv):
    from experiments.classification import train

    cli.main(argv, train.train_and_evaluate)


def run() -> None:
    """Entry point for `python -m experiments.classification`."""
    cli.run(main)


if __name__ == "__main__":
    run()
