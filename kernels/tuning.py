"""Tile sizes and launch parameters of the GPU kernels, per shape class, in one place.

Both GPU implementations of the DDF op (`pallas_triton` and `jax_triton`) run
three kernels, called *roles* here:

    forward   out = DDF(x, channel_filter, spatial_filter)   tiles over output pixels x channels
    dx        the gradient with respect to x               tiles over input pixels x channels
    filters   d_spatial_filter and d_channel_filter         tiles over output pixels, loops over channels

Each role is launched with a `LaunchConfig`: a tile of `block_pixels` flattened
pixels by `block_channels` channels (powers of two: the Triton lowering needs
power-of-two array sizes), and Triton's `num_warps` and `num_stages`. The
three roles' configurations together form a `BlockSizes`, which is what both
implementations take (`BlockSizes.get_default` picks one per call).

How a launch configuration is chosen (`choose_configs`), role by role:

1. The call's *shape class* (`ShapeClass`) is
   (implementation, role, dtype width, channel bucket, taps):
   - dtype width: 16 (bfloat16, float16), 32 (float32) or 64 (float64) bits,
     from x's dtype;
   - channel bucket: the next power of two of the channels one tile row
     spans, capped at `CHANNEL_BUCKET_CAP`: C for forward and dx, C // G (the
     channels of one spatial-filter head) for filters, which loops inside a
     head;
   - taps: K = kernel_size ** 2, exactly (K sets the unrolled code size and
     the filters kernel's register use, and only a few values occur).
   Image size and batch are not part of the class: the autotuner scores a
   configuration over several image sizes of one class.
2. If the active tuning table (below) has an entry for that class *and was
   tuned on the device kind of the current default JAX device*, the entry is
   used as it is (jax_triton's heuristic caps pixel tiles at the image size;
   table entries are not capped).
3. Otherwise the heuristic defaults (`heuristic_config`) are used. They are the
   untuned starting points the kernels shipped with and are always safe.

The tuning table is a JSON file (`tuning_table.json` next to this module,
shipped in the wheel as package data), loaded lazily on first use and cached
for the process. `experiments/autotune.py` writes it on a GPU. Format
(version 1):

    {
      "format_version": 1,
      "devices": [
        {
          "device_kind": "NVIDIA H100 80GB HBM3",   # jax.devices()[0].device_kind
          "platform": "gpu",
          "jax_version": "0.11.2",
          "date": "2026-01-31",                      # ISO date of the tuning run
          "entries": [
            {"implementation": "pallas_triton", "role": "forward", "dtype_bits": 16,
             "channels": 256, "taps": 9,
             "block_pixels": 64, "block_channels": 64, "num_warps": 4, "num_stages": 1,
             "measured": {...}}                      # optional, informational only
          ]
        }
      ]
    }

Device-kind rule: only the device table whose `device_kind` equals, exactly,
the `device_kind` of `jax.devices()[0]` is consulted; entries tuned on any
other device (another GPU model, or a GPU table on a CPU) are ignored and the
heuristic is used. Tiles only change speed, never results (every kernel masks
its partial tiles), but a configuration that won on one GPU can be slow or fail
to compile on another.

A missing file, an empty file, or a table without a matching device means
"use the heuristic defaults". A file that cannot be parsed or validated is
ignored with a `RuntimeWarning` (the op keeps working with the heuristic).
The environment variable `DDF_JAX_TUNING_TABLE` selects another table file;
set it to `none` to turn the table off. Call `clear_cache()` after changing it
within a process (already compiled shapes keep their tiles).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import tempfile
import threading
import warnings
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("pallas_triton", "jax_triton")
ROLES = ("forward", "dx", "filters")
DTYPE_BITS = (16, 32, 64)
CHANNEL_BUCKET_CAP = 512
TABLE_FORMAT_VERSION = 1
TABLE_FILENAME = "tuning_table.json"
TABLE_ENV_VAR = "DDF_JAX_TUNING_TABLE"

def next_power_of_2(value: int) -> int:
    """The smallest power of two >= value (1 for value <= 1)."""
    return 1 if value <= 1 else 1 << (int(value) - 1).bit_length()


def previous_power_of_2(value: int) -> int:
    """The largest power of two <= value (1 for value <= 1)."""
    return 1 << (max(1, int(value)).bit_length() - 1)


def is_power_of_2(value) -> bool:
    """Whether value is a positive int power of two (bools are not ints here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1 and value & (value - 1) == 0


def _check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


@dataclasses.dataclass(frozen=True, order=True)
class LaunchConfig:
    """How one kernel role is launched.

    Attributes:
        block_pixels: flattened pixels per tile (a power of two).
        block_channels: channels per tile (a power of two).
        num_warps: Triton warps per program (a positive int; Triton itself
            wants a power of two, which table entries must be).
        num_stages: Triton software-pipelining stages (a positive int).
    """

    block_pixels: int
    block_channels: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name in ("block_pixels", "block_channels"):
            value = getattr(self, name)
            if not is_power_of_2(value):
                raise ValueError(f"LaunchConfig.{name} must be a positive power of two, got {value!r}")
        for name in ("num_warps", "num_stages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LaunchConfig.{name} must be a positive int, got {value!r}")

    @property
    def tile_elements(self) -> int:
        """block_pixels * block_channels."""
        return self.block_pixels * self.block_channels

    def describe(self) -> str:
        """Short text such as "64x64 w4 s1" (pixels x channels, warps, stages)."""
        return f"{self.block_pixels}x{self.block_channels} w{self.num_warps} s{self.num_stages}"


@dataclasses.dataclass(frozen=True, order=True)
class ShapeClass:
    """The key of a tuning-table entry (see the module docstring).

    Attributes:
        implementation: "pallas_triton" or "jax_triton".
        role: "forward", "dx" or "filters".
        dtype_bits: 16, 32 or 64, the width of x's dtype.
        channels: channel bucket, a power of two <= `CHANNEL_BUCKET_CAP`.
        taps: K = kernel_size ** 2.
    """

    implementation: str
    role: str
    dtype_bits: int
    channels: int
    taps: int

    def __post_init__(self):
        _check_choice(self.implementation, "implementation", IMPLEMENTATIONS)
        _check_choice(self.role, "role", ROLES)
        _check_choice(self.dtype_bits, "dtype_bits", DTYPE_BITS)
        if not is_power_of_2(self.channels) or self.channels > CHANNEL_BUCKET_CAP:
            raise ValueError(
                f"channels must be a power of two <= {CHANNEL_BUCKET_CAP} (a channel bucket), "
                f"got {self.channels!r}"
            )
        if isinstance(self.taps, bool) or not isinstance(self.taps, int) or self.taps < 1:
            raise ValueError(f"taps must be a positive int, got {self.taps!r}")

    def describe(self) -> str:
        """Short text such as "pallas_triton/forward 16-bit C256 K9"."""
        return f"{self.implementation}/{self.role} {self.dtype_bits}-bit C{self.channels} K{self.taps}"


def dtype_bits(dtype) -> int:
    """16, 32 or 64: the width class of a floating dtype.

    Raises:
        TypeError: dtype is not float16, bfloat16, float32 or float64.
    """
    try:
        dtype = jnp.dtype(dtype)  # understands "bfloat16", unlike np.dtype
    except TypeError:
        raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype!r}") from None
    if dtype.kind != "f" and dtype.name != "bfloat16":
        raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype}")
    bits = dtype.itemsize * 8
    if bits not in DTYPE_BITS:
        raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype}")
    return bits


def channel_bucket(channels: int) -> int:
    """next_power_of_2(channels), capped at `CHANNEL_BUCKET_CAP`."""
    return min(next_power_of_2(channels), CHANNEL_BUCKET_CAP)


def shape_class(
    implementation: str, role: str, *, channels: int, taps: int, dtype, heads: int = 1
) -> ShapeClass:
    """The shape class of one kernel launch.

    Args:
        implementation: "pallas_triton" or "jax_triton".
        role: "forward", "dx" or "filters".
        channels: C, the channels of x (N, H, W, C).
        taps: K = kernel_size ** 2.
        dtype: x's dtype.
        heads: G, the spatial-filter heads (divides C); the filters role is
            bucketed by C // G.

    Returns:
        The `ShapeClass`.
    """
    span = channels // max(1, heads) if role == "filters" else channels
    return ShapeClass(implementation, role, dtype_bits(dtype), channel_bucket(max(1, span)), int(taps))


# --------------------------------------------------------------------------
# Heuristic defaults: the untuned starting points, always safe.
# --------------------------------------------------------------------------


def heuristic_config(
    implementation: str,
    role: str,
    *,
    channels: int,
    taps: int,
    heads: int = 1,
    in_pixels: Optional[int] = None,
    out_pixels: Optional[int] = None,
) -> LaunchConfig:
    """The heuristic launch configuration of one role (used when the table has no entry).

    Args:
        implementation: "pallas_triton" or "jax_triton".
        role: "forward", "dx" or "filters".
        channels: C.
        taps: K = kernel_size ** 2.
        heads: G (divides C).
        in_pixels: H * W if known; jax_triton caps its dx pixel tile by it.
        out_pixels: Ho * Wo if known; jax_triton caps its forward and filters
            pixel tiles by it.

    Returns:
        The `LaunchConfig`.
    """
    _check_choice(implementation, "implementation", IMPLEMENTATIONS)
    _check_choice(role, "role", ROLES)
    group = max(1, channels // max(1, heads))
    if implementation == "pallas_triton":
        return _pallas_heuristic(role, channels, taps, group)
    return _jax_triton_heuristic(role, channels, group, in_pixels, out_pixels)


def _pallas_heuristic(role: str, channels: int, taps: int, group: int) -> LaunchConfig:
    if role in ("forward", "dx"):
        # A (BP, BC) tile of about 2K elements per tap. A channel run is
        # contiguous in memory, so BC up to 64 channels gives coalesced 128-byte
        # (bf16) to 256-byte (f32) rows; small C gets a smaller BC rather than
        # masked lanes, and BP grows to keep the tile at ~2K elements (more
        # pixels in flight hide the gather latency). dx uses the forward tile.
        block_channels = min(next_power_of_2(channels), 64)
        block_pixels = min(max(2048 // block_channels, 16), 256)
    else:
        # K accumulators of BP pixels live in registers for the whole channel
        # loop, so K * BP stays near 2K elements (k=3 -> 128, k=5 -> 64, k=7 ->
        # 32, k=9 -> 16). Channel tiles cover one head's channels and keep the
        # per-tap (BP, BC) tile near 2K elements as well.
        block_pixels = min(max(previous_power_of_2(2048 // max(1, taps)), 16), 128)
        block_channels = min(next_power_of_2(group), max(2048 // block_pixels, 16), 128)
    # num_warps 4 and a single stage: the kernels are gather-bound and the
    # loops are short.
    return LaunchConfig(block_pixels, block_channels, num_warps=4, num_stages=1)


def _jax_triton_heuristic(role, channels, group, in_pixels, out_pixels) -> LaunchConfig:
    # Channel tiles are capped at 64 (forward, dx) or 32 (filters, per head);
    # pixel tiles fill about 4096 elements, at most 256 pixels and no more than
    # the image has (rounded up to a power of two, at least 16).
    def pixel_tile(channel_tile, pixels):
        tile = min(256, max(16, 4096 // channel_tile))
        if pixels is not None:
            tile = min(tile, max(16, next_power_of_2(pixels)))
        return tile

    if role == "filters":
        channel_tile = min(32, next_power_of_2(group))
        pixels = out_pixels
    else:
        channel_tile = min(64, next_power_of_2(channels))
        pixels = in_pixels if role == "dx" else out_pixels
    return LaunchConfig(pixel_tile(channel_tile, pixels), channel_tile, num_warps=4, num_stages=2)


# --------------------------------------------------------------------------
# The table.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeviceTable:
    """Tuned configurations for one device kind.

    Attributes:
        device_kind: `jax.Device.device_kind` of the device it was tuned on.
        platform: JAX platform of that device ("gpu").
        jax_version: jax version used for tuning.
        date: ISO date (YYYY-MM-DD) of the tuning run.
        entries: the tuned `LaunchConfig` per `ShapeClass`.
        measured: optional free-form measurements per `ShapeClass` (JSON
            values), for people reading the table; never used for lookups.
    """

    device_kind: str
    platform: str
    jax_version: str
    date: str
    entries: Mapping[ShapeClass, LaunchConfig] = dataclasses.field(default_factory=dict)
    measured: Mapping[ShapeClass, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TuningTable:
    """A tuning table: at most one `DeviceTable` per device kind.

    Attributes:
        devices: device kind -> `DeviceTable`.
    """

    devices: Mapping[str, DeviceTable] = dataclasses.field(default_factory=dict)

    def for_device(self, device_kind: Optional[str]) -> Optional[DeviceTable]:
        """The device table tuned on exactly this device kind, or None."""
        return self.devices.get(device_kind) if device_kind is not None else None

    def merged(self, update: DeviceTable, replace: bool = False) -> "TuningTable":
        """A copy with `update` merged into the table of its device kind.

        Entries of `update` replace those of the same class; other classes of
        that device are kept unless `replace`. The device's metadata (jax
        version, date, platform) becomes `update`'s. Other devices are kept.
        """
        old = self.devices.get(update.device_kind)
        entries, measured = {}, {}
        if old is not None and not replace:
            entries.update(old.entries)
            measured.update(old.measured)
        for key in update.entries:
            measured.pop(key, None)
        entries.update(update.entries)
        measured.update(update.measured)
        merged = dataclasses.replace(update, entries=entries, measured=measured)
        return TuningTable({**self.devices, update.device_kind: merged})


_ENTRY_KEYS = ("implementation", "role", "dtype_bits", "channels", "taps")
_CONFIG_KEYS = ("block_pixels", "block_channels", "num_warps", "num_stages")
_DEVICE_KEYS = ("device_kind", "platform", "jax_version", "date", "entries")


def table_to_json(table: TuningTable) -> dict:
    """The JSON object (format version 1) of a table, with devices and entries sorted."""
    devices = []
    for kind in sorted(table.devices):
        device = table.devices[kind]
        entries = []
        for key in sorted(device.entries):
            entry = {name: getattr(key, name) for name in _ENTRY_KEYS}
            entry.update(dataclasses.asdict(device.entries[key]))
            if key in device.measured:
                entry["measured"] = device.measured[key]
            entries.append(entry)
        devices.append(
            {
                "device_kind": device.device_kind,
                "platform": device.platform,
                "jax_version": device.jax_version,
                "date": device.date,
                "entries": entries,
            }
        )
    return {"format_version": TABLE_FORMAT_VERSION, "devices": devices}


def _require(mapping, key: str, kind, where: str):
    if not isinstance(mapping, dict) or key not in mapping:
        raise ValueError(f"{where}: missing key {key!r}")
    value = mapping[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}: {key!r} must be of type {kind.__name__}, got {value!r}")
    return value


def _check_table_config(config: LaunchConfig) -> None:
    """Launch limits a table entry must respect (so that a hand-edited table cannot break the op)."""
    if not is_power_of_2(config.num_warps) or config.num_warps > 32:
        raise ValueError(f"num_warps must be a power of two <= 32, got {config.num_warps}")
    if config.num_stages > 8:
        raise ValueError(f"num_stages must be <= 8, got {config.num_stages}")
    if config.tile_elements > 65536:
        raise ValueError(f"block_pixels * block_channels must be <= 65536, got {config.tile_elements}")


def table_from_json(data) -> TuningTable:
    """Parses and validates a table's JSON object.

    An empty object ({}) is an empty table.

    Raises:
        ValueError: the object is not a valid format-1 table (the message names
            the device and entry at fault).
    """
    if not isinstance(data, dict):
        raise ValueError(f"a tuning table must be a JSON object, got {type(data).__name__}")
    if not data:
        return TuningTable()
    version = data.get("format_version")
    if version != TABLE_FORMAT_VERSION:
        raise ValueError(f"format_version must be {TABLE_FORMAT_VERSION}, got {version!r}")
    raw_devices = _require(data, "devices", list, "tuning table")
    devices = {}
    for d, raw in enumerate(raw_devices):
        where = f"devices[{d}]"
        meta = {key: _require(raw, key, str, where) for key in _DEVICE_KEYS[:-1]}
        if not meta["device_kind"]:
            raise ValueError(f"{where}: device_kind must not be empty")
        if meta["device_kind"] in devices:
            raise ValueError(f"{where}: device_kind {meta['device_kind']!r} appears twice")
        entries, measured = {}, {}
        for e, raw_entry in enumerate(_require(raw, "entries", list, where)):
            entry_where = f"{where}.entries[{e}]"
            try:
                key = ShapeClass(
                    _require(raw_entry, "implementation", str, entry_where),
                    _require(raw_entry, "role", str, entry_where),
                    *(_require(raw_entry, name, int, entry_where) for name in _ENTRY_KEYS[2:]),
                )
                config = LaunchConfig(*(_require(raw_entry, name, int, entry_where) for name in _CONFIG_KEYS))
                _check_table_config(config)
            except ValueError as error:
                raise ValueError(f"{entry_where}: {error}") from None
            if key in entries:
                raise ValueError(f"{entry_where}: {key.describe()} appears twice")
            entries[key] = config
            if "measured" in raw_entry:
                measured[key] = raw_entry["measured"]
        devices[meta["device_kind"]] = DeviceTable(**meta, entries=entries, measured=measured)
    return TuningTable(devices)


def read_table(path: Union[str, os.PathLike]) -> TuningTable:
    """Reads a table file; a missing or empty (whitespace-only) file is an empty table.

    Raises:
        ValueError: the file is not valid JSON or not a valid table.
    """
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return TuningTable()
    if not text.strip():
        return TuningTable()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    try:
        return table_from_json(data)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def write_table(table: TuningTable, path: Union[str, os.PathLike]) -> None:
    """Writes a table as indented JSON, atomically (a temporary file, then a rename).

    The file keeps its permissions if it exists, else gets rw-r--r--.
    """
    path = pathlib.Path(path)
    text = json.dumps(table_to_json(table), indent=2) + "\n"
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    handle, temporary = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise


def new_device_table(device: Optional[jax.Device] = None, date: Optional[str] = None) -> DeviceTable:
    """An empty `DeviceTable` describing `device` (default: jax.devices()[0]) and this jax version."""
    device = device if device is not None else jax.devices()[0]
    return DeviceTable(
        device_kind=device.device_kind,
        platform=device.platform,
        jax_version=jax.__version__,
        date=date or datetime.date.today().isoformat(),
    )


# --------------------------------------------------------------------------
# The active table and lookups.
# --------------------------------------------------------------------------

_lock = threading.Lock()
_active: dict = {}  # "table" -> TuningTable, "device_kind" -> str, once loaded


def default_table_path() -> pathlib.Path:
    """The table shipped with the package: `tuning_table.json` next to this module."""
    return pathlib.Path(__file__).with_name(TABLE_FILENAME)


def active_table_path() -> Optional[pathlib.Path]:
    """The table file in use.

    Returns:
        `$DDF_JAX_TUNING_TABLE` if set (None when it is "none" or empty: no
        table), else `default_table_path()`.
    """
    value = os.environ.get(TABLE_ENV_VAR)
    if value is None:
        return default_table_path()
    if value.strip().lower() in ("", "none"):
        return None
    return pathlib.Path(value)


def active_table() -> TuningTable:
    """The active table, read once per process (after `clear_cache`, read again).

    An unreadable or invalid file gives an empty table and a `RuntimeWarning`.
    """
    with _lock:
        if "table" not in _active:
            path = active_table_path()
            table = TuningTable()
            if path is not None:
                try:
                    table = read_table(path)
                except (OSError, ValueError) as error:
                    warnings.warn(
                        f"ignoring the DDF tuning table ({error}); using the heuristic tile sizes",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            _active["table"] = table
        return _active["table"]


def current_device_kind() -> str:
    """`device_kind` of `jax.devices()[0]` (e.g. "NVIDIA H100 80GB HBM3", or "cpu"), cached."""
    with _lock:
        if "device_kind" not in _active:
            _active["device_kind"] = jax.devices()[0].device_kind
        return _active["device_kind"]


def clear_cache() -> None:
    """Forgets the loaded table and device kind; the next lookup reads them again."""
    with _lock:
        _active.clear()


def lookup(
    key: ShapeClass, *, table: Optional[TuningTable] = None, device_kind: Optional[str] = None
) -> Optional[LaunchConfig]:
    """The tuned configuration of a shape class, or None.

    Args:
        key: the shape class.
        table: the table to search; default `active_table()`.
        device_kind: the device kind the entry must have been tuned on;
            default `current_device_kind()`.

    Returns:
        The entry of the device table whose device kind equals `device_kind`,
        or None when there is no such device table or entry.
    """
    table = active_table() if table is None else table
    device_kind = current_device_kind() if device_kind is None else device_kind
    device = table.for_device(device_kind)
    return None if device is None else device.entries.get(key)


def choose_configs(
    implementation: str,
    *,
    channels: int,
    taps: int,
    heads: int = 1,
    dtype=None,
    in_pixels: Optional[int] = None,
    out_pixels: Optional[int] = None,
    table: Optional[TuningTable] = None,
    device_kind: Optional[str] = None,
) -> dict[str, LaunchConfig]:
    """The launch configuration of every role: the table's entry, else the heuristic.

    Args:
        implementation: "pallas_triton" or "jax_triton".
        channels: C of x (N, H, W, C).
        taps: K = kernel_size ** 2.
        heads: G (divides C).
        dtype: x's dtype. None skips the table (heuristic only), since the
            shape class needs the dtype width.
        in_pixels: H * W if known (heuristic pixel caps of jax_triton).
        out_pixels: Ho * Wo if known (likewise).
        table: the table; default `active_table()`.
        device_kind: default `current_device_kind()`.

    Returns:
        {"forward": LaunchConfig, "dx": ..., "filters": ...}.
    """
    configs = {}
    for role in ROLES:
        config = None
        if dtype is not None:
            key = shape_class(implementation, role, channels=channels, taps=taps, dtype=dtype, heads=heads)
            config = lookup(key, table=table, device_kind=device_kind)
        if config is None:
            config = heuristic_config(
                implementation,
                role,
                channels=channels,
                taps=taps,
                heads=heads,
                in_pixels=in_pixels,
                out_pixels=out_pixels,
            )
        configs[role] = config
    return configs


# --------------------------------------------------------------------------
# The launch configurations of all three roles, as the kernels take them.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles and launch options of the three kernels of a GPU implementation, one `LaunchConfig` per role.

    Both `pallas_triton` and `jax_triton` take one. It is frozen and
    hashable, so ops built with fixed tiles can be cached on it. Every tile
    size is a power of two (the Triton lowering needs power-of-two array
    sizes); edges that do not fill a tile are masked by the kernels, so tiles
    change speed, never results.

    Attributes:
        forward: the forward kernel's tile of flattened *output* pixels x
            channels, and its num_warps and num_stages.
        dx: the dx kernel's tile of flattened *input* pixels x channels.
        filters: the filter-gradient kernel: block_pixels flattened output
            pixels per program (pallas_triton carries K accumulators of this
            length; the d_channel_filter partial buffer has ceil(Ho * Wo /
            block_pixels) rows) and block_channels channels per step of its
            loop over one head's channels.
    """

    forward: LaunchConfig
    dx: LaunchConfig
    filters: LaunchConfig

    def __post_init__(self):
        for role in ROLES:
            config = getattr(self, role)
            if not isinstance(config, LaunchConfig):
                raise TypeError(f"BlockSizes.{role} must be a LaunchConfig, got {config!r}")
            if not is_power_of_2(config.num_warps):
                raise ValueError(
                    f"BlockSizes.{role}.num_warps must be a power of two, got {config.num_warps}"
                )

    def for_role(self, role: str) -> LaunchConfig:
        """The `LaunchConfig` of "forward", "dx" or "filters"."""
        _check_choice(role, "role", ROLES)
        return getattr(self, role)

    def describe(self) -> str:
        """Short text such as "forward 32x64 w4 s1, dx 32x64 w4 s1, filters 128x16 w4 s1"."""
        return ", ".join(f"{role} {self.for_role(role).describe()}" for role in ROLES)

    @classmethod
    def get_default(
        cls,
        implementation: str,
        *,
        channels: int,
        taps: int,
        heads: int = 1,
        dtype=None,
        in_pixels: Optional[int] = None,
        out_pixels: Optional[int] = None,
        table: Optional[TuningTable] = None,
        device_kind: Optional[str] = None,
    ) -> "BlockSizes":
        """Each role's tuned configuration if the table has one for this device, else the heuristic.

        See `choose_configs` (this is its result as a `BlockSizes`).

        Args:
            implementation: "pallas_triton" or "jax_triton".
            channels: C of x (N, H, W, C).
            taps: K = kernel_size ** 2.
            heads: G, the spatial-filter heads (divides C).
            dtype: x's dtype; None skips the table (heuristic only).
            in_pixels: H * W if known (jax_triton's heuristic caps its dx
                pixel tile by it).
            out_pixels: Ho * Wo if known (caps jax_triton's heuristic
                forward and filters pixel tiles).
            table: the table; default `active_table()`.
            device_kind: default `current_device_kind()`.

        Returns:
            The `BlockSizes`.
        """
        return cls(
            **choose_configs(
                implementation,
                channels=channels,
                taps=taps,
                heads=heads,
                dtype=dtype,
                in_pixels=in_pixels,
                out_pixels=out_pixels,
                table=table,
                device_kind=device_kind,
            )
        )


__all__ = [
    "BlockSizes",
    "CHANNEL_BUCKET_CAP",
    "DeviceTable",
    "IMPLEMENTATIONS",
    "LaunchConfig",
    "ROLES",
    "ShapeClass",
    "TABLE_ENV_VAR",
    "TuningTable",
    "active_table",
    "active_table_path",
    "channel_bucket",
    "choose_configs",
    "clear_cache",
    "current_device_kind",
    "default_table_path",
    "dtype_bits",
    "heuristic_config",
    "lookup",
    "new_device_table",
    "is_power_of_2",
    "next_power_of_2",
    "previous_power_of_2",
    "read_table",
    "shape_class",
    "table_from_json",
    "table_to_json",
    "write_table",
]
