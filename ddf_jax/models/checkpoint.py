"""Import (and export) official PyTorch/timm ResNet and DDF-ResNet state dicts.

The official models are timm ResNets whose bottleneck `conv2` is the official
`DDFPack`. Their state-dict keys map one to one onto our attributes:

    official key                                   ours (NHWC)                       transform
    conv1.weight  (O, I, kh, kw)                   conv1.kernel (kh, kw, I, O)       OIHW -> HWIO
    bn1.weight / bias / running_mean / running_var bn1.scale / bias / mean / var     -
    layerL.B.convJ.weight, layerL.B.bnJ.*          layerL[B].convJ, .bnJ             as above
    layerL.B.downsample.0.weight / .1.*            layerL[B].downsample.conv / .bn   as above
    ...conv2.spatial_branch.0.weight (G*K, C, 1, 1) conv2.spatial_branch.conv.kernel  OIHW -> HWIO
    ...conv2.spatial_branch.0.bias   (G*K,)         conv2.spatial_branch.conv.bias    -
    ...conv2.channel_branch.1.weight (mid, C, 1, 1) conv2.channel_branch.fc1.kernel   (O, I, 1, 1) -> (I, O)
    ...conv2.channel_branch.3.weight (C*K, mid, 1, 1) conv2.channel_branch.fc2.kernel (O, I, 1, 1) -> (I, O)
    ...conv2.channel_branch.{1,3}.bias             ...fc1.bias / fc2.bias            -
    ...conv2.channel_branch.4.std    (C*K,)         conv2.channel_branch.norm.scale   -
    fc.weight (classes, F) / fc.bias               fc.kernel (F, classes) / fc.bias  transpose

`num_batches_tracked` buffers are ignored. The filter layouts need no
permutation: the spatial branch's output channel g*K + t and the channel
branch's output c*K + t (t = ky*k + kx, row-major) are the layouts our DDF
layer reads, exactly as the official op reads its (B, G*K, H, W) spatial and
(B, C, k, k) channel filters.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple, Union

import jax.numpy as jnp
import numpy as np
from flax import nnx

# (parent attribute, attribute) -> the official nn.Sequential index.
_SEQUENTIAL_INDEX = {
    ("downsample", "conv"): "0",
    ("downsample", "bn"): "1",
    ("spatial_branch", "conv"): "0",
    ("channel_branch", "fc1"): "1",
    ("channel_branch", "fc2"): "3",
    ("channel_branch", "norm"): "4",
}
_BATCHNORM_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_IGNORED_SUFFIXES = ("num_batches_tracked",)
_WRAPPER_KEYS = ("state_dict", "model")


class _Entry(NamedTuple):
    """One official tensor and the model variable it loads into."""

    key: str
    variable: nnx.Variable
    official_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_official: Callable[[np.ndarray], np.ndarray]


def _identity(a):
    return a


def _conv_to_ours(w):  # (O, I, kh, kw) -> (kh, kw, I, O)
    return np.transpose(w, (2, 3, 1, 0))


def _conv_to_official(k):  # (kh, kw, I, O) -> (O, I, kh, kw)
    return np.transpose(k, (3, 2, 0, 1))


def _conv1x1_to_ours(w):  # (O, I, 1, 1) -> (I, O)
    return np.transpose(w[:, :, 0, 0])


def _conv1x1_to_official(k):  # (I, O) -> (O, I, 1, 1)
    return np.transpose(k)[:, :, None, None]


def _official_module_name(path: tuple) -> str:
    parts = []
    for i, part in enumerate(path):
        part = str(part)
        if i > 0:
            part = _SEQUENTIAL_INDEX.get((str(path[i - 1]), part), part)
        parts.append(part)
    return ".".join(parts)


def _shape(variable: nnx.Variable) -> tuple[int, ...]:
    return tuple(variable.get_value().shape)


def _entries(model: nnx.Module) -> list[_Entry]:
    """The official key of every `nnx.Param` / `nnx.BatchStat` of `model`."""
    modules = {path: node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)}
    entries = []
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))):
        parent_path, name = tuple(path[:-1]), path[-1]
        parent = modules.get(parent_path)
        prefix = _official_module_name(parent_path)
        shape = _shape(variable)
        if isinstance(parent, nnx.Conv) and name == "kernel":
            official_shape = (shape[3], shape[2], shape[0], shape[1])
            entry = (f"{prefix}.weight", official_shape, _conv_to_ours, _conv_to_official)
        elif isinstance(parent, (nnx.Conv, nnx.Linear)) and name == "bias":
            entry = (f"{prefix}.bias", shape, _identity, _identity)
        elif isinstance(parent, nnx.Linear) and name == "kernel":
            if "channel_branch" in parent_path:  # a Conv2d 1x1 in the official model
                entry = (f"{prefix}.weight", (shape[1], shape[0], 1, 1), _conv1x1_to_ours, _conv1x1_to_official)
            else:  # nn.Linear
                entry = (f"{prefix}.weight", (shape[1], shape[0]), np.transpose, np.transpose)
        elif isinstance(parent, nnx.BatchNorm) and name in _BATCHNORM_NAMES:
            entry = (f"{prefix}.{_BATCHNORM_NAMES[name]}", shape, _identity, _identity)
        elif parent_path[-2:] == ("channel_branch", "norm") and name == "scale":
            entry = (f"{prefix}.std", shape, _identity, _identity)
        else:
            raise NotImplementedError(
                f"model variable {'.'.join(map(str, path))} ({type(parent).__name__}.{name}) has no "
                "official checkpoint key"
            )
        entries.append(_Entry(entry[0], variable, tuple(entry[1]), entry[2], entry[3]))
    return entries


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; bfloat16 has no numpy dtype in torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _read_file(path: str, suffix: str) -> Mapping:
    """The state dict stored in `path`; a file that cannot be read raises an error naming it."""
    if suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as error:
            raise ImportError("reading .safetensors files needs the `safetensors` package") from error
        reader, kind = load_file, "a .safetensors file"
    elif suffix == ".npz":

        def reader(path):
            with np.load(path, allow_pickle=False) as data:
                return {key: data[key] for key in data.files}

        kind = "an .npz archive"
    else:
        try:
            import torch
        except ImportError as error:
            raise ImportError(
                f"reading {suffix} checkpoints needs PyTorch; install torch, or convert the file to .npz "
                "or .safetensors"
            ) from error

        def reader(path):
            return torch.load(path, map_location="cpu", weights_only=True)

        kind = "a PyTorch checkpoint"
    try:
        state = reader(path)
    except Exception as error:  # noqa: BLE001 -- zipfile, numpy, torch and safetensors differ.
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise ValueError(
            f"checkpoint file {path!r} is not {kind} that can be read "
            f"({os.path.getsize(path)} bytes; {type(error).__name__}: {detail})"
        ) from None
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint file {path!r} must hold a mapping of arrays, got {type(state).__name__}")
    return state


def _read(source: Union[str, os.PathLike, Mapping]) -> dict[str, np.ndarray]:
    if isinstance(source, Mapping):
        state = source
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in (".npz", ".safetensors", ".pth", ".pt", ".bin", ".tar", ".ckpt"):
            raise ValueError(
                f"source must be a mapping or a path ending in .pth/.pt/.bin/.tar/.ckpt, .npz or .safetensors, "
                f"got {path!r}"
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
        state = _read_file(path, suffix)
    else:
        raise TypeError(
            f"source must be a mapping of arrays or a path, got {type(source).__name__}"
        )
    # Training checkpoints wrap the weights: {"state_dict": {...}, "epoch": ...}.
    for wrapper in _WRAPPER_KEYS:
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    keys = list(state)
    if keys and all(str(k).startswith("module.") for k in keys):  # saved from DataParallel
        state = {str(k)[len("module."):]: v for k, v in state.items()}
    return {
        str(k): _to_numpy(v) for k, v in state.items() if not str(k).endswith(_IGNORED_SUFFIXES)
    }


def _list(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:10])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 10 else "")


def load_official_checkpoint(model: nnx.Module, source: Union[str, os.PathLike, Mapping]) -> nnx.Module:
    """Loads an official PyTorch/timm (DDF-)ResNet state dict into `model`, in place.

    Every parameter and BatchNorm running statistic of `model` must be in the
    checkpoint with the official shape, and the checkpoint must hold nothing
    else (`num_batches_tracked` buffers are skipped). Values are cast to each
    variable's dtype. See the module docstring for the key mapping.

    Args:
        model: a `ddf_jax.models.ResNet` built with the checkpoint's
            architecture and `num_classes`; it may be abstract (built with
            `nnx.eval_shape`), which skips the cost of initialisation.
        source: a mapping from official keys to arrays (numpy arrays or torch
            tensors), or a path: `.pth`/`.pt`/`.bin`/`.tar`/`.ckpt` (read with
            `torch.load`, imported only then), `.npz`, or `.safetensors`. A
            training checkpoint that wraps the weights in "state_dict" or
            "model" and a "module." key prefix are both accepted.

    Returns:
        `model` (updated in place), for chaining.

    Raises:
        ValueError: keys are missing, unexpected, or have the wrong shape; the
            message names them (with expected and actual shapes). Also a file
            that cannot be read (truncated, empty, another format); the message
            names it.
        FileNotFoundError: the path does not exist.
        TypeError: `source` is neither a mapping nor a path.
        ImportError: a `.pth` file without torch, or `.safetensors` without
            safetensors.

    Example:
        >>> from flax import nnx
        >>> from ddf_jax.models import create_model, load_official_checkpoint, official_state_dict
        >>> a = create_model("ddf_mul_resnet20_cifar", num_classes=10, rngs=nnx.Rngs(0))
        >>> # Loading needs no initialisation: an abstract (shapes-only) model works.
        >>> b = nnx.eval_shape(lambda: create_model("ddf_mul_resnet20_cifar", num_classes=10, rngs=nnx.Rngs(1)))
        >>> b = load_official_checkpoint(b, official_state_dict(a))
        >>> bool((a.fc.kernel[...] == b.fc.kernel[...]).all())
        True
    """
    state = _read(source)
    entries = _entries(model)
    expected = {entry.key: entry for entry in entries}
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    misshaped = [
        f"{key}: expected {expected[key].official_shape}, got {tuple(state[key].shape)}"
        for key in sorted(set(expected) & set(state))
        if tuple(state[key].shape) != expected[key].official_shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list(unexpected)}")
    if misshaped:
        problems.append("wrong shapes: " + "; ".join(misshaped[:10]) + (" ..." if len(misshaped) > 10 else ""))
    if problems:
        raise ValueError("the checkpoint does not match the model: " + " | ".join(problems))
    for entry in entries:
        dtype = entry.variable.get_value().dtype
        entry.variable.set_value(jnp.asarray(entry.to_ours(state[entry.key]), dtype=dtype))
    return model


def official_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """Exports `model` as an official-layout state dict (the inverse of `load_official_checkpoint`).

    Args:
        model: a `ddf_jax.models.ResNet` with concrete (not abstract) values.

    Returns:
        `{official_key: numpy array}` in the official (PyTorch, OIHW) layouts and
        the parameters' dtypes; loadable with torch's `load_state_dict` after
        `torch.from_numpy` (BatchNorm `num_batches_tracked` buffers are absent).
    """
    return {
        entry.key: np.ascontiguousarray(entry.to_official(np.asarray(entry.variable.get_value())))
        for entry in _entries(model)
    }
