"""The joint-upsampling config, checked field by field before any data, tuning or model work.

`check_config(config)` raises `ConfigError` naming the first bad field, with its
allowed range and the value found, and returns the data-parallel mesh.
`scale_config(config, scale)` is the checked `config.per_scale` entry of one scale.
"""

from __future__ import annotations

import ml_collections

from experiments.common import config_checks as checks
from experiments.common import sharding
from experiments.common.errors import ConfigError
from experiments.joint_upsampling import downsampling, models

LOSSES = ("l1", "l2")
DTYPES = ("float32", "bfloat16")
TRAIN_DATA = ("synthetic", "nyu")


def scale_key(scale: int) -> str:
    """'x8' for 8: the key used in configs and results."""
    return f"x{scale}"


def scale_config(config: ml_collections.ConfigDict, scale: int) -> ml_collections.ConfigDict:
    """The `config.per_scale` entry for `scale` (steps, crop_size, batch_size)."""
    key = scale_key(scale)
    if key not in config.per_scale:
        raise ConfigError(
            f"config.per_scale has no entry {key!r} for scale {scale}; "
            f"it has {sorted(config.per_scale.keys())}"
        )
    entry = config.per_scale[key]
    for name in ("steps", "crop_size", "batch_size"):
        value = entry[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"config.per_scale.{key}.{name} must be a positive int, got {value!r}")
    if entry.crop_size % scale:
        raise ConfigError(
            f"config.per_scale.{key}.crop_size must be a multiple of {scale}, got {entry.crop_size}"
        )
    return entry


def _check_guided_filter_grid(config: ml_collections.ConfigDict) -> None:
    """config.guided_filter.radii: ints >= 0; .epsilons: numbers > 0; neither empty."""
    radii, epsilons = tuple(config.guided_filter.radii), tuple(config.guided_filter.epsilons)
    if not radii or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in radii):
        raise ConfigError(f"config.guided_filter.radii must be a non-empty tuple of ints >= 0, got {radii!r}")
    if not epsilons or any(isinstance(e, bool) or not isinstance(e, (int, float)) or not e > 0
                           for e in epsilons):
        raise ConfigError(
            f"config.guided_filter.epsilons must be a non-empty tuple of numbers > 0, got {epsilons!r}"
        )


def check_config(config: ml_collections.ConfigDict):
    """Checks every config field by name before any data, tuning or model work.

    Returns:
      The data-parallel mesh (each scale's batch size is checked against it).

    Raises:
      ConfigError: a field is out of range (the message names it).
    """
    scales = tuple(config.scales)
    if not scales:
        raise ConfigError("config.scales must name at least one scale, got ()")
    for scale in scales:
        if isinstance(scale, bool) or not isinstance(scale, int):
            raise ConfigError(f"config.scales must hold ints, got {scale!r}")
        try:
            models.num_stages(scale)
        except ValueError as err:
            raise ConfigError(f"config.scales: {err}") from None
        scale_config(config, scale)
    names = tuple(config.models)
    unknown = [n for n in names if n not in models.MODELS]
    if unknown or not names:
        raise ConfigError(
            f"config.models has unknown models {unknown or '()'}; known: {tuple(models.MODELS)}"
        )
    checks.one_of(config, "dtype", DTYPES)
    checks.one_of(config, "loss", LOSSES)
    checks.one_of(config, "train_data", TRAIN_DATA)
    checks.positive_number(config, "learning_rate")
    for name in ("weight_decay", "grad_clip_norm"):
        checks.number_in(config, name, 0.0, float("inf"))
    checks.one_of(config, "downsampling", downsampling.METHODS)
    for name in ("log_every_steps", "keep_checkpoints", "guided_filter.tune_examples"):
        checks.integer(config, name, minimum=1)
    for name in ("warmup_steps", "validation_examples", "nyu_eval_frames", "num_devices",
                 "eval_every_steps", "checkpoint_every_steps", "stop_after_steps",
                 "synthetic.pool_size", "eval_border"):
        checks.integer(config, name, minimum=0)
    _check_guided_filter_grid(config)
    if config.train_data == "nyu" and not config.nyu_mat_path:
        raise ConfigError("config.nyu_mat_path must be the local path of nyu_depth_v2_labeled.mat "
                          "when config.train_data='nyu', got ''")
    checks.integer(config, "seed", minimum=0, maximum=2**32 - 1)
    for name in ("panels", "progress_bar", "overwrite", "distributed"):
        checks.boolean(config, name)
    mesh = sharding.create_mesh(config.num_devices)
    for scale in scales:
        entry = scale_config(config, scale)
        sharding.check_batch_size(entry.batch_size, mesh, f"config.per_scale.{scale_key(scale)}.batch_size")
        if config.validation_examples and config.validation_examples < entry.batch_size:
            raise ConfigError(
                f"config.validation_examples must be 0 or >= the batch size {entry.batch_size} "
                f"of scale {scale}, got {config.validation_examples}"
            )
    return mesh
