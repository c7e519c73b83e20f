"""Optimizer and learning-rate schedule construction (optax).

The recipe follows the usual ImageNet ResNet setup: SGD with momentum, a linear
warm-up followed by cosine decay, and L2 weight decay that skips 1-D parameters
(biases, normalisation scales and offsets, FilterNorm gains).

Example:
    >>> import optax
    >>> schedule = build_schedule(0.1, total_steps=100, warmup_steps=10)
    >>> [round(float(schedule(s)), 6) for s in (0, 5, 10, 100)]
    [0.0, 0.05, 0.1, 0.0]
    >>> tx = build_optimizer(schedule, momentum=0.9, weight_decay=1e-4)
    >>> isinstance(tx, optax.GradientTransformation)
    True
"""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import optax

Schedule = Callable[[Any], Any]


def build_schedule(
    learning_rate: float,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    end_learning_rate: float = 0.0,
    warmup_init_value: float = 0.0,
) -> optax.Schedule:
    """Linear warm-up from `warmup_init_value` to `learning_rate`, then cosine decay.

    Args:
        learning_rate: Peak learning rate, reached after `warmup_steps` steps.
        total_steps: Number of optimizer steps in the whole run (warm-up included);
            the cosine reaches `end_learning_rate` at this step.
        warmup_steps: Length of the linear warm-up, `0 <= warmup_steps <= total_steps`.
        end_learning_rate: Learning rate at `total_steps`.
        warmup_init_value: Learning rate at step 0 when `warmup_steps > 0`.

    Returns:
        An optax schedule: step (int scalar) -> learning rate (float scalar).

    Raises:
        ValueError: If the step counts or the learning rate are out of range.
    """
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}"
        )
    decay_steps = total_steps - warmup_steps
    cosine = optax.cosine_decay_schedule(
        init_value=learning_rate,
        decay_steps=max(decay_steps, 1),
        alpha=end_learning_rate / learning_rate,
    )
    if warmup_steps == 0:
        return cosine
    warmup = optax.linear_schedule(warmup_init_value, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, cosine], boundaries=[warmup_steps])


def weight_decay_mask(params: Any) -> Any:
    """True for every parameter that weight decay applies to: those with ndim > 1.

    1-D (and scalar) parameters -- biases, BatchNorm scale/bias, FilterNorm gains --
    get no decay, as in the official DDF recipe.

    Args:
        params: A pytree of arrays (e.g. the `nnx.State` of a model's `nnx.Param`s).

    Returns:
        A pytree of Python bools with the structure of `params`.
    """
    return jax.tree.map(lambda p: p.ndim > 1, params)


def build_optimizer(
    learning_rate: Union[float, optax.Schedule],
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    decay_mask: Callable[[Any], Any] = weight_decay_mask,
    grad_clip_norm: float | None = None,
) -> optax.GradientTransformation:
    """SGD with momentum and coupled (L2) weight decay, the PyTorch `torch.optim.SGD` rule.

    The update is `v = momentum * v + (g + weight_decay * p)`, `p -= lr * v` (or the
    Nesterov variant), with weight decay only on parameters selected by `decay_mask`.

    Args:
        learning_rate: A float or an optax schedule (see `build_schedule`).
        momentum: Momentum coefficient in [0, 1); 0 disables momentum.
        nesterov: Use Nesterov momentum.
        weight_decay: L2 coefficient (>= 0) added to the gradient of masked parameters.
        decay_mask: Callable params -> pytree of bools; default skips 1-D parameters.
        grad_clip_norm: If set, clip the global gradient norm to this value first.

    Returns:
        An `optax.GradientTransformation`.

    Raises:
        ValueError: If `momentum` or `weight_decay` is out of range.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    parts = []
    if grad_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(grad_clip_norm))
    if weight_decay > 0:
        parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
    parts.append(
        optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov and momentum > 0)
    )
    return optax.chain(*parts)
