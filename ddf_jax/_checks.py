"""Argument checks shared by the op, the layers and the models.

Each raises TypeError or ValueError naming the argument and giving the
expected and the actual value. The `implementation` argument has its one check
beside the op, in `ddf_jax.ops.check_implementation`.
"""

from __future__ import annotations

import numbers
import operator

from ddf_jax.kernels import COMBINES


def check_int(value, name: str, minimum: int = 1) -> int:
    """Returns `value` as an int >= `minimum`; bools and non-integers are TypeErrors."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    value = operator.index(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_odd(value, name: str, minimum: int = 1) -> int:
    """Returns `value` as an odd int >= `minimum`."""
    value = check_int(value, name, minimum)
    if value % 2 == 0:
        raise ValueError(f"{name} must be odd, got {value}")
    return value


def check_combine(combine) -> str:
    """Returns `combine` if it is one of `COMBINES` ("mul", "add")."""
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    return combine

