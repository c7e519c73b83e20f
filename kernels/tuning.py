"""Tuned launch configurations of the GPU kernels: a read-only lookup in `tuning_table.json`.

`experiments/autotune.py` writes the table on a GPU; `common.BlockSizes.get_default`
asks `lookup` first and falls back on the one heuristic, `common.BlockSizes.heuristic`. The table ships in the wheel as package data.
Format (version 1):

    {
      "format_version": 1,
      "devices": {
        "NVIDIA H200": {                      # jax.Device.device_kind, matched exactly
          "jax_version": "0.11.2",
          "date": "2026-12-02",
          "entries": [
            {"implementation": "pallas_triton", "dtype_bits": 16, "channels": 256,
             "group": 256, "taps": 9,
             "forward": [64, 32, 4, 1],      # block_pixels, block_channels, num_warps, num_stages
             "backward": [128, 16, 4, 1]}
          ]
        }
      }
    }

An entry covers a *shape class*: `shape_class` of the call (the dtype width
of x, the channel count C and the channels per head C // G, each rounded up
to a power of two and capped at `CHANNEL_CAP`, and the taps K). Entries tuned
on another device kind are never used. The device is only asked for its kind
when the table has a device at all, so an empty table costs nothing.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp

FORMAT_VERSION = 1
CHANNEL_CAP = 512
TABLE_PATH = pathlib.Path(__file__).with_name("tuning_table.json")
KEY_FIELDS = ("implementation", "dtype_bits", "channels", "group", "taps")
ROLES = ("forward", "backward")


def _bucket(channels: int) -> int:
    return min(1 << max(0, int(channels) - 1).bit_length(), CHANNEL_CAP)


def shape_class(implementation: str, dtype, channels: int, heads: int, taps: int) -> tuple:
    """The table key of a call: (implementation, dtype bits, C bucket, C // G bucket, K)."""
    bits = jnp.dtype(dtype).itemsize * 8
    return (implementation, bits, _bucket(channels), _bucket(channels // heads), taps)


@functools.lru_cache(maxsize=None)
def read_table(path: pathlib.Path) -> dict:
    """{device kind: {shape class: {"forward": [4 ints], "backward": [4 ints]}}} from a table file.

    A missing file is an empty table (every call then takes the heuristic).

    Raises:
        ValueError: the file is not a format-1 table (the message names the file).
    """
    if not pathlib.Path(path).exists():
        return {}
    try:
        data = json.loads(pathlib.Path(path).read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version must be {FORMAT_VERSION}, got {data.get('format_version')!r}")
        from .common import LaunchConfig  # the launch options' one check (common imports this module)

        devices = {}
        for kind, device in data["devices"].items():
            devices[kind] = {}
            for index, entry in enumerate(device["entries"]):
                where = f"devices[{kind!r}].entries[{index}]"
                for role in ROLES:
                    try:
                        if not isinstance(entry[role], list) or len(entry[role]) != 4:
                            raise ValueError("expected a list of 4 ints")
                        LaunchConfig(*entry[role])
                    except (ValueError, TypeError) as error:
                        raise ValueError(
                            f"{where}.{role} must be [block_pixels, block_channels, num_warps, num_stages], "
                            f"got {entry[role]!r}: {error}"
                        ) from None
                key = tuple(entry[name] for name in KEY_FIELDS)
                devices[kind][key] = {role: list(entry[role]) for role in ROLES}
        return devices
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: not a DDF tuning table ({type(error).__name__}: {error})") from None


def lookup(key: tuple, path: pathlib.Path | None = None) -> dict | None:
    """The tuned {"forward": [...], "backward": [...]} of a shape class on this device, or None.

    Args:
        key: a `shape_class`.
        path: the table file; `TABLE_PATH` (the shipped table) when None.
    """
    devices = read_table(pathlib.Path(path or TABLE_PATH))
    if not devices:
        return None
    return devices.get(jax.devices()[0].device_kind, {}).get(key)
