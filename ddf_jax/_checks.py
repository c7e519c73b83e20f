"""Argument checks shared by the op, the layers and the models.

Each raises TypeError or ValueError naming the argument and giving the
expected and the actual value. The `implementation` argument has its one check
beside the op, in `ddf_jax.ops.check_implementation`.
"""

from __future__ import annotations

import math
import numbers
import operator

import jax.numpy as jnp

from ddf_jax.kernels import COMBINES

# Gains of the nonlinearity that follows the filtering (torch.nn.init.calculate_gain).
GAINS = {"linear": 1.0, "relu": math.sqrt(2.0)}


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


def check_heads(heads, in_features: int) -> int:
    """Returns `heads` as an int that divides `in_features`."""
    heads = check_int(heads, "heads")
    if in_features % heads:
        raise ValueError(f"heads must divide in_features={in_features}, got heads={heads}")
    return heads


def nonlinearity_gain(nonlinearity) -> float:
    """The FilterNorm gain of the nonlinearity that follows the filtering (`GAINS`)."""
    if nonlinearity not in GAINS:
        raise ValueError(f"nonlinearity must be one of {tuple(GAINS)}, got {nonlinearity!r}")
    return GAINS[nonlinearity]


def channel_branch_width(in_features: int, se_ratio) -> int:
    """The channel branch's hidden width, int(se_ratio * in_features), checked to be >= 1."""
    if isinstance(se_ratio, bool) or not isinstance(se_ratio, numbers.Real):
        raise TypeError(f"se_ratio must be a number, got {se_ratio!r} of type {type(se_ratio).__name__}")
    if not se_ratio > 0:
        raise ValueError(f"se_ratio must be > 0, got {se_ratio}")
    mid = int(in_features * se_ratio)
    if mid < 1:
        raise ValueError(
            f"int(se_ratio * in_features) is the channel branch's hidden width and must be >= 1, "
            f"got int({se_ratio} * {in_features}) = {mid}"
        )
    return mid


def check_nhwc(x, name: str, features: int, argument: str = "in_features") -> None:
    """Checks that `x` is 4-D (N, H, W, C) with C = `features` (named `argument` in the message)."""
    if jnp.ndim(x) != 4:
        raise ValueError(f"{name} must be 4-D (N, H, W, C), got shape {jnp.shape(x)}")
    if jnp.shape(x)[-1] != features:
        raise ValueError(
            f"{name} must have {argument}={features} channels (last axis), got shape {jnp.shape(x)}"
        )
