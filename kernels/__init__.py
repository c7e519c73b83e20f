"""DDF filtering kernels: one contract (`common`), several implementations.

Each implementation module exposes `get_op(platform)`, which returns a
`jax.custom_vjp` function `op(x, channel_filter, spatial_filter, config)` made
by `common.make_ddf_op`, or raises `ImplementationUnavailable` saying why it
cannot run on that platform. Optional backends are imported only when asked
for, so `import ddf_jax` never needs Triton or a GPU.
"""

from __future__ import annotations

import importlib

from .common import COMBINES, DDFConfig, ImplementationUnavailable, make_ddf_op

# name -> module (relative to this package) that provides `get_op(platform)`.
_MODULES = {
    "xla": ".xla",
    "pallas_triton": ".pallas_triton",
    "jax_triton": ".jax_triton",
}
IMPLEMENTATIONS = tuple(_MODULES)


def get_op(name: str, platform: str):
    """Returns implementation `name`'s custom-VJP op for `platform` ("cpu", "gpu", ...).

    Raises:
        ValueError: `name` is not an implementation.
        ImplementationUnavailable: it cannot run on `platform` here.
    """
    if name not in _MODULES:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {name!r}")
    module = importlib.import_module(_MODULES[name], __name__)
    return module.get_op(platform)


__all__ = [
    "COMBINES",
    "DDFConfig",
    "IMPLEMENTATIONS",
    "ImplementationUnavailable",
    "get_op",
    "make_ddf_op",
]
