"""A timm-style model registry: one decorated function per variant.

A variant is a function `fn(*, num_classes, rngs, **overrides) -> nnx.Module`
decorated with `@register_model`; its name is the function's name.
`create_model(name, ...)` looks it up and calls it, and `list_models()` lists
what is registered, so a test can walk every variant without knowing them.
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, Optional

from flax import nnx

ModelFn = Callable[..., nnx.Module]

_MODELS: dict[str, ModelFn] = {}


def register_model(fn: ModelFn) -> ModelFn:
    """Registers a model function under its `__name__` and returns it unchanged.

    Args:
        fn: `fn(*, num_classes, rngs, **overrides) -> nnx.Module`.

    Returns:
        `fn` itself, so this works as a decorator.

    Raises:
        ValueError: a model with the same name is already registered.
    """
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"a model named {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models(pattern: Optional[str] = None) -> list[str]:
    """Names of the registered models, sorted.

    Args:
        pattern: optional shell-style wildcard (`fnmatch`), e.g. "ddf_*".

    Returns:
        The sorted model names that match `pattern` (all of them if None).
    """
    names = sorted(_MODELS)
    if pattern is not None:
        names = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
    return names


def is_model(name: str) -> bool:
    """Whether `name` is a registered model."""
    return name in _MODELS


def create_model(name: str, *, num_classes: int = 1000, rngs: nnx.Rngs, **overrides: Any) -> nnx.Module:
    """Builds a registered model.

    Args:
        name: a name from `list_models()`, e.g. "ddf_mul_resnet50".
        num_classes: size of the classifier output.
        rngs: `nnx.Rngs` for parameter initialisation (its "params" stream, or
            "default").
        **overrides: passed to the model's constructor, e.g. `in_chans=1`,
            `dtype=jnp.bfloat16`, `param_dtype`, `implementation="xla"`.

    Returns:
        The model, an `nnx.Module` in training mode. Its input is NHWC.

    Raises:
        ValueError: `name` is not registered (the message lists close matches).

    Example:
        >>> from flax import nnx
        >>> from ddf_jax.models import create_model
        >>> model = create_model("resnet20_cifar", num_classes=10, in_chans=1, rngs=nnx.Rngs(0))
        >>> type(model).__name__
        'ResNet'
    """
    if not isinstance(name, str) or name not in _MODELS:
        close = difflib.get_close_matches(str(name), list(_MODELS), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"name must be a registered model (see ddf_jax.models.list_models()), got {name!r}{hint}"
        )
    return _MODELS[name](num_classes=num_classes, rngs=rngs, **overrides)
