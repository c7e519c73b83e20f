"""Multiply-accumulate (MAC) counting from a traced forward pass.

`count_macs` traces one forward pass with `jax.make_jaxpr` (nothing is
computed or allocated, so it works on `nnx.eval_shape` models) and adds up

- `conv_general_dilated`: output elements x (kernel elements / output features),
  i.e. kh * kw * C_in / groups per output element;
- `dot_general`: output elements x the product of the contracted sizes;
- the DDF op: k * k per output element, N * Ho * Wo * C * k*k in all.

Everything else (BatchNorm, activations, pooling, FilterNorm, elementwise
ops) counts zero, the convention behind the usual "ResNet-50 = 4.1 G" figure.

The DDF op is recognised as a `custom_vjp` call with the DDF contract's
signature (`ddf_jax.kernels.common`): inputs x (N, H, W, C), channel filter
(N, C, K) and spatial filter (N, Ho, Wo, G, K), output (N, Ho, Wo, C). Its
inner computation is not descended into. Calls (`jit`, `custom_jvp`, other
`custom_vjp`s, `remat`) are descended into; a `scan` body counts `length`
times; for `cond` the most expensive branch counts; a `while` body counts once.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

_CUSTOM_VJP_PRIMITIVES = ("custom_vjp_call", "custom_vjp_call_jaxpr")


def _shape(var) -> tuple[int, ...]:
    return tuple(getattr(var.aval, "shape", ()))


def _ddf_macs(eqn) -> int | None:
    """N*Ho*Wo*C*K if `eqn` is a DDF op call, else None."""
    if eqn.primitive.name not in _CUSTOM_VJP_PRIMITIVES or len(eqn.outvars) != 1:
        return None
    # custom_vjp_call puts captured constants in front of the three inputs.
    inputs = eqn.invars[eqn.params.get("num_consts", 0) :]
    if len(inputs) != 3:
        return None
    x, channel_filter, spatial_filter = (_shape(v) for v in inputs)
    out = _shape(eqn.outvars[0])
    if (len(x), len(channel_filter), len(spatial_filter), len(out)) != (4, 3, 5, 4):
        return None
    n, _, _, c = x
    _, ho, wo, heads, taps = spatial_filter
    if channel_filter != (n, c, taps) or out != (n, ho, wo, c) or spatial_filter[0] != n or c % heads:
        return None
    return n * ho * wo * c * taps


def _conv_macs(eqn) -> int:
    rhs = _shape(eqn.invars[1])
    out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
    # Each output element reads one filter: (C_in / groups) * kh * kw taps.
    return math.prod(_shape(eqn.outvars[0])) * (math.prod(rhs) // out_features)


def _dot_macs(eqn) -> int:
    lhs = _shape(eqn.invars[0])
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    return math.prod(_shape(eqn.outvars[0])) * math.prod(lhs[d] for d in lhs_contract)


def _sub_jaxprs(value) -> list:
    if isinstance(value, jex_core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jex_core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for item in value for j in _sub_jaxprs(item)]
    return []


def _jaxpr_macs(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        ddf = _ddf_macs(eqn)
        if ddf is not None:
            total += ddf
        elif name == "conv_general_dilated":
            total += _conv_macs(eqn)
        elif name == "dot_general":
            total += _dot_macs(eqn)
        elif name == "cond":
            total += max((_jaxpr_macs(j) for j in _sub_jaxprs(eqn.params["branches"])), default=0)
        elif name == "scan":
            total += eqn.params["length"] * sum(_jaxpr_macs(j) for j in _sub_jaxprs(eqn.params["jaxpr"]))
        elif name == "while":
            total += sum(_jaxpr_macs(j) for j in _sub_jaxprs(eqn.params["body_jaxpr"]))
        else:
            for key, value in eqn.params.items():
                # A custom_vjp/custom_jvp call holds its forward in `call_jaxpr`;
                # its derivative rules (thunks, other keys) are not part of the forward.
                if name.startswith(("custom_vjp", "custom_jvp")) and key != "call_jaxpr":
                    continue
                for sub in _sub_jaxprs(value):
                    total += _jaxpr_macs(sub)
    return total


def count_jaxpr_macs(closed_jaxpr) -> int:
    """MACs of a (closed) jaxpr, counted as described in the module docstring."""
    jaxpr = closed_jaxpr.jaxpr if isinstance(closed_jaxpr, jex_core.ClosedJaxpr) else closed_jaxpr
    return int(_jaxpr_macs(jaxpr))


def count_macs(
    model: Union[Callable[..., Any], Any],
    input_shape: Sequence[int],
    *,
    dtype: Any = jnp.float32,
) -> int:
    """Multiply-accumulates of one eval-mode forward pass, counted from the traced computation.

    Nothing is executed: the forward is traced with `jax.make_jaxpr` on an
    abstract input, so abstract models from `nnx.eval_shape` work and big
    models cost no memory. Convolutions, dense layers (`dot_general`) and the
    DDF op (k*k MACs per output element) are counted; see the module
    docstring.

    Args:
        model: a Flax NNX module (traced as a copy in eval mode; `model`
            itself is not changed) or any callable `model(x)`.
        input_shape: the full input shape including the batch, e.g.
            (1, 224, 224, 3) (NHWC for the models here). The count is for
            the whole batch.
        dtype: the input dtype.

    Returns:
        The MAC count, a Python int.

    Raises:
        ValueError: `input_shape` has a non-positive or non-integer entry.

    Example:
        >>> from flax import nnx
        >>> import ddf_jax
        >>> dense = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
        >>> ddf_jax.count_macs(dense, (2, 8))
        64
    """
    shape = tuple(input_shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"input_shape must be a non-empty sequence of positive ints, got {input_shape!r}")
    x = jax.ShapeDtypeStruct(shape, dtype)

    from flax import nnx  # Imported here so that `import ddf_jax` stays light.

    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)

        def forward(state, x):
            copy = nnx.merge(graphdef, state)
            copy.eval()
            return copy(x)

        closed = jax.make_jaxpr(forward)(state, x)
    elif callable(model):
        closed = jax.make_jaxpr(model)(x)
    else:
        raise TypeError(f"model must be an nnx.Module or a callable, got {type(model).__name__}")
    return count_jaxpr_macs(closed)


__all__ = ["count_jaxpr_macs", "count_macs"]
