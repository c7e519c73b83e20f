"""Configs for `python -m experiments.classification --config=<file>`; each has `get_config()`.

`check_config` checks any of them, field by field, before data or models are built.
"""

from __future__ import annotations

import ml_collections

DTYPES = ("float32", "bfloat16", "float16")


def _check_tuple(config: ml_collections.ConfigDict, name: str, kind: str, *, allow_empty: bool) -> tuple:
    from experiments.common.errors import ConfigError

    values = config[name]
    numbers = (int,) if kind == "int" else (int, float)
    ok = isinstance(values, (tuple, list)) and (allow_empty or len(values) > 0) and all(
        isinstance(v, numbers) and not isinstance(v, bool) and (v >= 0 if kind == "int" else v > 0)
        for v in values
    ) and len(set(values)) == len(values)
    if not ok:
        what = "ints >= 0" if kind == "int" else "numbers > 0"
        raise ConfigError(
            f"config.{name} must be a tuple of distinct {what}"
            f"{'' if allow_empty else ' (at least one)'}, got {values!r}"
        )
    return tuple(values)


def check_config(config: ml_collections.ConfigDict):
    """Checks every config field by name before any data or model is built.

    Returns:
        The data-parallel mesh (the batch sizes are checked against it).

    Raises:
        ConfigError: A field is out of range (the message names it).
    """
    from ddf_jax import models as model_zoo
    from experiments.classification import datasets
    from experiments.common import config_checks as checks
    from experiments.common import sharding
    from experiments.common.errors import ConfigError

    models = tuple(config.models)
    if not models:
        raise ConfigError("config.models must name at least one model, got ()")
    unknown = [m for m in models if not model_zoo.is_model(m)]
    if unknown:
        raise ConfigError(
            f"config.models has unknown models {unknown}; see ddf_jax.models.list_models()"
        )
    if len(set(models)) != len(models):
        raise ConfigError(f"config.models has duplicates: {models}")
    checks.one_of(config, "dtype", DTYPES)
    checks.one_of(config, "dataset", datasets.DATASETS)
    for name in ("image_size", "worker_buffer_size", "read_threads", "log_every_steps",
                 "keep_checkpoints"):
        checks.integer(config, name, minimum=1)
    for name in ("crop_padding", "worker_count", "num_devices", "eval_every_epochs",
                 "checkpoint_every_steps", "stop_after_steps"):
        checks.integer(config, name, minimum=0)
    if any(seed > 2**32 - 1 for seed in _check_tuple(config, "seeds", "int", allow_empty=False)):
        raise ConfigError(f"config.seeds must be < 2**32, got {tuple(config.seeds)}")
    _check_tuple(config, "sweep_learning_rates", "number", allow_empty=True)
    if checks.integer(config, "num_train_steps", minimum=-1) <= 0:
        checks.positive_number(config, "num_epochs")  # The run length comes from it.
    checks.positive_number(config, "learning_rate")
    if not 0 < checks.number_in(config, "validation_fraction", 0.0, 1.0, high_open=True):
        raise ConfigError(f"config.validation_fraction must be a number in (0.0, 1.0), got "
                          f"{config.validation_fraction!r}")
    checks.number_in(config, "warmup_epochs", 0.0, float("inf"))
    checks.number_in(config, "momentum", 0.0, 1.0, high_open=True)
    checks.number_in(config, "weight_decay", 0.0, float("inf"))
    checks.number_in(config, "label_smoothing", 0.0, 1.0, high_open=True)
    checks.number_in(config, "crop_pct", 1e-6, 1.0)
    checks.number_in(config, "min_scale", 1e-6, 1.0)
    for name in ("nesterov", "distributed", "async_checkpoints", "progress_bar", "overwrite",
                 "check_images", "allow_data_change"):
        checks.boolean(config, name)
    mesh = sharding.create_mesh(config.num_devices)
    sharding.check_batch_size(config.batch_size, mesh, "config.batch_size")
    sharding.check_batch_size(config.eval_batch_size, mesh, "config.eval_batch_size")
    return mesh
