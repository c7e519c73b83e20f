"""Checks of config fields by name, run before any expensive work.

Each check reads one field of an `ml_collections.ConfigDict` (dotted names reach into
nested dicts) and raises `ConfigError` naming it, with the allowed range and the value
found:

    >>> import ml_collections
    >>> c = ml_collections.ConfigDict({"num_epochs": 0, "opt": {"lr": 0.1}})
    >>> positive_number(c, "opt.lr")
    0.1
    >>> positive_number(c, "num_epochs")
    Traceback (most recent call last):
    ...
    experiments.common.errors.ConfigError: config.num_epochs must be a number > 0, got 0
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence

from experiments.common.errors import ConfigError


def _get(config: Any, name: str) -> Any:
    value = config
    for part in name.split("."):
        try:
            value = value[part]
        except (KeyError, TypeError):
            raise ConfigError(f"config.{name} is missing") from None
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(config: Any, name: str, minimum: int = 0, maximum: Optional[int] = None) -> int:
    """`config.<name>`, an int in [minimum, maximum] (maximum None: no upper bound)."""
    value = _get(config, name)
    upper = "" if maximum is None else f" and <= {maximum}"
    if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
        raise ConfigError(f"config.{name} must be an int >= {minimum}{upper}, got {value!r}")
    return int(value)


def positive_number(config: Any, name: str) -> float:
    """`config.<name>`, a real number > 0."""
    value = _get(config, name)
    if not _is_number(value) or not value > 0:
        raise ConfigError(f"config.{name} must be a number > 0, got {value!r}")
    return float(value)


def number_in(config: Any, name: str, low: float, high: float, *, high_open: bool = False) -> float:
    """`config.<name>`, a real number in [low, high] (or [low, high) if `high_open`)."""
    value = _get(config, name)
    ok = _is_number(value) and low <= value and (value < high if high_open else value <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise ConfigError(f"config.{name} must be a number in [{low}, {high}{bracket}, got {value!r}")
    return float(value)


def one_of(config: Any, name: str, choices: Sequence[Any]) -> Any:
    """`config.<name>`, one of `choices`."""
    value = _get(config, name)
    if value not in tuple(choices):
        raise ConfigError(f"config.{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def boolean(config: Any, name: str) -> bool:
    """`config.<name>`, a bool."""
    value = _get(config, name)
    if not isinstance(value, bool):
        raise ConfigError(f"config.{name} must be True or False, got {value!r}")
    return value
