"""The errors a user can cause and fix, each with a message that says what to do.

The command lines (`experiments.common.cli`) print these as one short "error: ..."
line and exit with status 1; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class ExperimentError(Exception):
    """Base class of the errors below."""


class ConfigError(ExperimentError, ValueError):
    """A config field (named in the message) has a value outside its allowed range."""


class RunFinishedError(ExperimentError, RuntimeError):
    """Raised when a finished run would be overwritten without `overwrite=True`."""


class ConfigMismatchError(ExperimentError, ValueError):
    """Raised when resuming a run with a config that differs from the stored one."""


class CheckpointDamagedError(ExperimentError, RuntimeError):
    """No checkpoint of a run is intact: every one failed verification or restore."""


class BadDataError(ExperimentError, ValueError):
    """Data files (named in the message) cannot be read."""


class DataChangedError(ExperimentError, ValueError):
    """The training data differ from those the checkpoint's data position refers to."""


class RunDirDamagedError(ExperimentError, ValueError):
    """A run directory's own record (config.json, result.json; named in the message) is unreadable."""


class DistributedStartupError(ExperimentError, RuntimeError):
    """The processes of a multi-host run could not start together (coordinator, configs)."""
