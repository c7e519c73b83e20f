"""Data for joint (guided) depth upsampling: synthetic scenes, Middlebury, NYU Depth v2.

Three sources, all returning the same kind of example, a dict of numpy arrays:

    image       (H, W, 3) uint8     the RGB guide at full resolution
    disparity   (H, W)    float32   the ground truth at full resolution
                                     (disparity in pixels for synthetic and
                                     Middlebury, depth in metres for NYU);
                                     invalid pixels are not finite

* `SyntheticRGBD`: procedural, seeded, deterministic scenes. Depth is
  piecewise smooth (slanted planes and curved patches, with occluding shapes
  painted far to near). The RGB image has edges where depth has edges, and
  also texture edges where depth has none (stripes, checkers, decals: the
  "texture-copy traps" that a guided upsampler must learn to ignore), and some
  depth edges with almost no colour contrast. Example `i` of seed `s` is a pure
  function of `(s, i)`, so any number of crops can be made on the fly and a
  resumed run sees the same data as an uninterrupted one.
* `load_middlebury`: the Middlebury 2014 "motorcycle" left view and ground
  truth disparity that ship inside scikit-image (no download).
* `NYUDepthV2`: the labeled NYU Depth v2 .mat file (HDF5) with a user-supplied
  train/test split file. Local paths only.

Low-resolution inputs are made by `downsample_disparity`: block averaging over
the valid pixels of each `scale x scale` block (an area sensor), with blocks
that hold no valid pixel filled from the nearest valid low-resolution pixel.
Low-resolution pixel (i, j) is then centred on full-resolution coordinate
`(i*scale + (scale-1)/2, j*scale + (scale-1)/2)`, which is exactly the
half-pixel-centre convention of `jax.image.resize` and of pixel shuffle, so
bilinear/bicubic upsampling and DDF-Up all see correctly aligned inputs.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Optional, Sequence

import numpy as np

# --------------------------------------------------------------------------
# Down-sampling protocol (shared by training and evaluation)
# --------------------------------------------------------------------------


def _check_scale(scale) -> int:
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)):
        raise TypeError(f"scale must be an int, got {scale!r} of type {type(scale).__name__}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    return int(scale)


def downsample_disparity(disparity: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Block-averages a disparity map over its valid pixels.

    Args:
      disparity: (H, W) float array; pixels that are not finite are invalid.
        H and W must be multiples of `scale`.
      scale: the integer down-sampling factor.

    Returns:
      `(low_res, block_valid)`: `low_res` is (H/scale, W/scale) float32, the
      mean of the valid pixels of each block; a block with no valid pixel
      takes the value of the nearest block that has one (Euclidean distance
      on the low-resolution grid). `block_valid` is (H/scale, W/scale) bool,
      True where the block had at least one valid pixel.

    Raises:
      ValueError: on a bad shape, a size that `scale` does not divide, or a map
        without any valid pixel.
    """
    scale = _check_scale(scale)
    disparity = np.asarray(disparity)
    if disparity.ndim != 2:
        raise ValueError(f"disparity must be 2-D (H, W), got shape {disparity.shape}")
    h, w = disparity.shape
    if h % scale or w % scale:
        raise ValueError(
            f"disparity shape {disparity.shape} must be a multiple of scale={scale} in both dimensions"
        )
    valid = np.isfinite(disparity)
    if not valid.any():
        raise ValueError("disparity has no valid (finite) pixel")
    values = np.where(valid, disparity, 0.0).astype(np.float64)
    blocks = (h // scale, scale, w // scale, scale)
    total = values.reshape(blocks).sum(axis=(1, 3))
    count = valid.reshape(blocks).sum(axis=(1, 3))
    block_valid = count > 0
    low_res = np.where(block_valid, total / np.maximum(count, 1), 0.0)
    if not block_valid.all():
        from scipy import ndimage

        _, (rows, cols) = ndimage.distance_transform_edt(~block_valid, return_indices=True)
        low_res = low_res[rows, cols]
    return low_res.astype(np.float32), block_valid


def crop_to_multiple(array: np.ndarray, multiple: int) -> np.ndarray:
    """Centre-crops the first two axes of `array` down to multiples of `multiple`.

    Args:
      array: (H, W, ...) array.
      multiple: positive int.

    Returns:
      (H', W', ...) with H' = H - H % multiple (same for W); the crop drops
      `(H % multiple) // 2` rows at the top and the rest at the bottom.
    """
    multiple = _check_scale(multiple)
    h, w = array.shape[:2]
    top, left = (h % multiple) // 2, (w % multiple) // 2
    return array[top : top + h - h % multiple, left : left + w - w % multiple]


# --------------------------------------------------------------------------
# Synthetic RGB-D scenes
# --------------------------------------------------------------------------

# Sub-pixel sample offsets for the anti-aliased (soft) masks of the RGB image.
_SUBPIXEL = (-0.25, 0.25)


@dataclasses.dataclass(frozen=True)
class SyntheticRGBD:
    """Procedural RGB-D scenes; a random-access source of examples.

    `source[i]` is a pure function of `(seed, i)`. Disparities are in pixels
    at full resolution and span roughly `[min_disparity, max_disparity]`; the
    defaults cover the range of the Middlebury "motorcycle" ground truth
    (about 7 to 60).

    Attributes:
      seed: int, the scene seed.
      height: int, image height in pixels.
      width: int, image width in pixels.
      min_disparity: float, the farthest disparity.
      max_disparity: float, the nearest disparity.
      min_shapes: int, fewest occluding shapes per scene.
      max_shapes: int, most occluding shapes per scene.
      trap_probability: float in [0, 1], the chance that a region carries a
        texture with edges that are not depth edges (stripes, checkers,
        decals); decals that cross region borders are added with the same
        probability per scene.
      texture_probability: float in [0, 1], the chance that a region carries a
        smooth multi-scale intensity texture (shading-like detail with no
        edges, common in real photographs).
      camouflage_probability: float in [0, 1], the chance that a shape takes
        (almost) the colour of what lies behind it: a depth edge with little
        colour contrast.
      noise_std: float, the standard deviation of the RGB noise (0-255 units).
      num_examples: int, the value of `len(source)` (examples are generated on
        demand, so this only bounds the index range).

    Example:
      >>> source = SyntheticRGBD(seed=0, height=64, width=96)
      >>> ex = source[3]
      >>> ex["image"].shape, ex["image"].dtype, ex["disparity"].shape
      ((64, 96, 3), dtype('uint8'), (64, 96))
    """

    seed: int = 0
    height: int = 128
    width: int = 128
    min_disparity: float = 4.0
    max_disparity: float = 72.0
    min_shapes: int = 3
    max_shapes: int = 10
    trap_probability: float = 0.5
    texture_probability: float = 0.5
    camouflage_probability: float = 0.15
    noise_std: float = 3.0
    num_examples: int = 2**31 - 1

    def __post_init__(self):
        for name in ("height", "width", "min_shapes", "max_shapes", "num_examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.min_shapes > self.max_shapes:
            raise ValueError(
                f"min_shapes must be <= max_shapes, got {self.min_shapes} > {self.max_shapes}"
            )
        if not 0 < self.min_disparity < self.max_disparity:
            raise ValueError(
                "need 0 < min_disparity < max_disparity, got "
                f"{self.min_disparity} and {self.max_disparity}"
            )
        for name in ("trap_probability", "texture_probability", "camouflage_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """Example `index`: {'image': (H, W, 3) uint8, 'disparity': (H, W) float32}."""
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index must be in [0, {self.num_examples}), got {index}")
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, index]))
        return _render_scene(self, rng)


def _grid(height: int, width: int, dy: float = 0.0, dx: float = 0.0):
    ys = np.arange(height, dtype=np.float32)[:, None] + dy
    xs = np.arange(width, dtype=np.float32)[None, :] + dx
    return ys, xs


def _random_shape(rng: np.random.Generator, height: int, width: int):
    """A random implicit shape: a function (ys, xs) -> bool mask (inside)."""
    size = min(height, width)
    cy = rng.uniform(-0.1, 1.1) * height
    cx = rng.uniform(-0.1, 1.1) * width
    angle = rng.uniform(0, np.pi)
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    kinds = ["ellipse", "rectangle", "polygon", "bar", "superellipse"]
    kind = rng.choice(kinds, p=[0.25, 0.2, 0.25, 0.15, 0.15])

    def rotated(ys, xs):
        u = (xs - cx) * cos + (ys - cy) * sin
        v = -(xs - cx) * sin + (ys - cy) * cos
        return u, v

    if kind == "ellipse":
        a, b = rng.uniform(0.06, 0.4, size=2) * size
        return lambda ys, xs: _ellipse(rotated(ys, xs), a, b, 2.0)
    if kind == "superellipse":
        a, b = rng.uniform(0.08, 0.4, size=2) * size
        power = rng.uniform(3.0, 6.0)
        return lambda ys, xs: _ellipse(rotated(ys, xs), a, b, power)
    if kind == "rectangle":
        a, b = rng.uniform(0.05, 0.4, size=2) * size

        def rectangle(ys, xs):
            u, v = rotated(ys, xs)
            return (np.abs(u) <= a) & (np.abs(v) <= b)

        return rectangle
    if kind == "bar":
        # Thin structures (poles, spokes, cables) are where upsamplers fail.
        length = rng.uniform(0.3, 1.2) * size
        half_width = rng.uniform(0.8, 0.04 * size + 1.0)

        def bar(ys, xs):
            u, v = rotated(ys, xs)
            return (np.abs(u) <= length / 2) & (np.abs(v) <= half_width)

        return bar
    # Convex polygon: half-plane tests around a centre.
    sides = int(rng.integers(3, 8))
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=sides))
    radius = rng.uniform(0.08, 0.4) * size
    vertices = np.stack([cy + radius * np.sin(angles), cx + radius * np.cos(angles)], axis=1)

    def polygon(ys, xs):
        inside = np.ones(np.broadcast(ys, xs).shape, bool)
        for k in range(sides):
            (y0, x0), (y1, x1) = vertices[k], vertices[(k + 1) % sides]
            inside &= (x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0) <= 0
        return inside

    return polygon


def _ellipse(uv, a, b, power):
    u, v = uv
    return np.abs(u / a) ** power + np.abs(v / b) ** power <= 1.0


def _masks(shape_fn, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(hard, soft): the pixel-centre mask (bool) and the 2x2 supersampled coverage (float32)."""
    hard = shape_fn(*_grid(height, width))
    soft = np.zeros((height, width), np.float32)
    for dy in _SUBPIXEL:
        for dx in _SUBPIXEL:
            soft += shape_fn(*_grid(height, width, dy, dx))
    return hard, soft / 4.0


def _surface(rng: np.random.Generator, base: float, height: int, width: int, spread: float) -> np.ndarray:
    """A smooth disparity surface around `base`: a slanted plane, sometimes curved."""
    ys, xs = _grid(height, width)
    ys = (ys - height / 2) / max(height, width)
    xs = (xs - width / 2) / max(height, width)
    gy, gx = rng.normal(0.0, spread, size=2)
    surface = base + gy * ys + gx * xs
    if rng.random() < 0.3:
        curvature = rng.normal(0.0, spread)
        surface = surface + curvature * (ys**2 + xs**2)
    return surface.astype(np.float32)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 255.0, size=3).astype(np.float32)


def _appearance(
    rng: np.random.Generator,
    height: int,
    width: int,
    trap_probability: float,
    texture_probability: float,
    base=None,
):
    """An (H, W, 3) float32 texture for one region."""
    base = _random_colour(rng) if base is None else base
    ys, xs = _grid(height, width)
    scale = max(height, width)
    # Smooth shading: a linear ramp in brightness.
    gy, gx = rng.normal(0.0, 0.25, size=2)
    shade = 1.0 + gy * (ys / scale - 0.5) + gx * (xs / scale - 0.5)
    image = base[None, None, :] * shade[..., None]
    if rng.random() < trap_probability:
        second = _random_colour(rng)
        kind = rng.choice(["stripes", "checker", "decals", "sine"])
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(3.0, 0.3 * scale)
        u = xs * np.cos(angle) + ys * np.sin(angle)
        v = -xs * np.sin(angle) + ys * np.cos(angle)
        if kind == "stripes":
            pattern = (np.floor(u / period) % 2).astype(np.float32)
        elif kind == "checker":
            pattern = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
        elif kind == "sine":
            pattern = (0.5 + 0.5 * np.sin(2 * np.pi * u / period)).astype(np.float32)
        else:
            pattern = np.zeros((height, width), np.float32)
            for _ in range(int(rng.integers(1, 6))):
                pattern = np.maximum(pattern, _masks(_random_shape(rng, height, width), height, width)[1])
        image = image * (1.0 - pattern[..., None]) + second[None, None, :] * pattern[..., None]
    if rng.random() < texture_probability:
        # Smooth multi-scale (1/f-like) texture: shading and surface detail without edges.
        amplitude = rng.uniform(5.0, 40.0)
        tint = 1.0 + rng.normal(0.0, 0.2, size=3).astype(np.float32)
        image = image + amplitude * _fractal_noise(rng, height, width)[..., None] * tint
    if rng.random() < 0.3:
        # Fine grain noise texture (no edges).
        image = image + rng.normal(0.0, rng.uniform(2.0, 12.0), size=(height, width, 1)).astype(np.float32)
    return image


def _fractal_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W) float32 sum of bilinearly interpolated random grids (cells 2..64 px), unit std-ish."""
    total = np.zeros((height, width), np.float32)
    for cell in (2, 4, 8, 16, 32, 64):
        grid = rng.normal(0.0, 1.0, size=(height // cell + 3, width // cell + 3)).astype(np.float32)
        ys = np.arange(height, dtype=np.float32) / cell + rng.uniform(0, 1)
        xs = np.arange(width, dtype=np.float32) / cell + rng.uniform(0, 1)
        y0, x0 = ys.astype(int), xs.astype(int)
        fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
        top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
        bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
        total += (top * (1 - fy) + bottom * fy) * np.sqrt(cell / 64.0)
    return total / 1.5


def _render_scene(config: SyntheticRGBD, rng: np.random.Generator) -> dict[str, np.ndarray]:
    h, w = config.height, config.width
    lo, hi = config.min_disparity, config.max_disparity
    span = hi - lo
    # Background: far, gently slanted.
    disparity = _surface(rng, rng.uniform(lo, lo + 0.4 * span), h, w, spread=0.15 * span)
    background = _random_colour(rng)
    image = _appearance(rng, h, w, config.trap_probability, config.texture_probability, base=background)
    num_shapes = int(rng.integers(config.min_shapes, config.max_shapes + 1))
    # Paint far to near so nearer shapes occlude farther ones.
    bases = np.sort(rng.uniform(lo + 0.1 * span, hi, size=num_shapes))
    for base in bases:
        hard, soft = _masks(_random_shape(rng, h, w), h, w)
        if not soft.any():
            continue
        surface = _surface(rng, base, h, w, spread=0.1 * span)
        disparity = np.where(hard, surface, disparity)
        if rng.random() < config.camouflage_probability:
            colour = np.clip(background + rng.normal(0.0, 6.0, size=3), 0, 255).astype(np.float32)
            texture = _appearance(rng, h, w, 0.0, config.texture_probability, base=colour)
        else:
            texture = _appearance(rng, h, w, config.trap_probability, config.texture_probability)
        image = image * (1.0 - soft[..., None]) + texture * soft[..., None]
    if rng.random() < config.trap_probability:
        # Decals that cross region borders: colour edges that are never depth edges.
        for _ in range(int(rng.integers(1, 4))):
            _, soft = _masks(_random_shape(rng, h, w), h, w)
            alpha = rng.uniform(0.4, 1.0)
            image = image * (1.0 - alpha * soft[..., None]) + alpha * soft[..., None] * _random_colour(rng)
    # Global exposure change and sensor noise.
    image = image * rng.uniform(0.7, 1.2) + rng.normal(0.0, config.noise_std, size=image.shape)
    disparity = np.clip(disparity, 0.5 * lo, hi * 1.1)
    return {
        "image": np.clip(np.rint(image), 0, 255).astype(np.uint8),
        "disparity": disparity.astype(np.float32),
    }


# --------------------------------------------------------------------------
# Examples and batches
# --------------------------------------------------------------------------


def make_example(image: np.ndarray, disparity: np.ndarray, scale: int) -> dict[str, np.ndarray]:
    """Turns a full-resolution (image, disparity) pair into a model example.

    Args:
      image: (H, W, 3) uint8 RGB; H and W multiples of `scale`.
      disparity: (H, W) float; non-finite pixels are invalid.
      scale: the up-sampling factor.

    Returns:
      A dict of float32/bool numpy arrays:
        'guide' (H, W, 3) float32 in [0, 1];
        'low_res' (H/scale, W/scale, 1) float32, from `downsample_disparity`;
        'target' (H, W, 1) float32, invalid pixels set to 0;
        'valid' (H, W, 1) bool.
    """
    image = np.asarray(image)
    disparity = np.asarray(disparity)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    if disparity.shape != image.shape[:2]:
        raise ValueError(
            f"disparity must have the image's (H, W) = {image.shape[:2]}, got {disparity.shape}"
        )
    low_res, _ = downsample_disparity(disparity, scale)
    valid = np.isfinite(disparity)
    return {
        "guide": (image.astype(np.float32) / 255.0),
        "low_res": low_res[..., None],
        "target": np.where(valid, disparity, 0.0).astype(np.float32)[..., None],
        "valid": valid[..., None],
    }


def stack_examples(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks a list of examples into a batch (leading axis N)."""
    return {key: np.stack([ex[key] for ex in examples]) for key in examples[0]}


def dihedral(array: np.ndarray, transform: int) -> np.ndarray:
    """One of the 8 rotations/reflections of the first two axes of `array`.

    Args:
      array: (H, W, ...) array.
      transform: int in [0, 8): rotate by 90 * (transform % 4) degrees, then
        flip left-right if transform >= 4. 0 is the identity.

    Returns:
      The transformed array (a view where possible).
    """
    if not 0 <= transform < 8:
        raise ValueError(f"transform must be in [0, 8), got {transform}")
    array = np.rot90(array, transform % 4, axes=(0, 1))
    return array[:, ::-1] if transform >= 4 else array


class CachedSource:
    """Memoises a random-access source (e.g. `SyntheticRGBD`) so examples are generated once.

    Args:
      source: object with `__len__` and `__getitem__(index)`.

    The cache grows with every distinct index read; use it with a bounded index
    set (as `synthetic_batches` does with `pool_size`).
    """

    def __init__(self, source):
        self.source = source
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if index not in self._cache:
            self._cache[index] = self.source[index]
        return self._cache[index]


def synthetic_batches(
    source,
    scale: int,
    batch_size: int,
    start_step: int = 0,
    num_steps: Optional[int] = None,
    pool_size: int = 0,
    rows: Optional[slice] = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Deterministic training batches from a random-access source of full frames.

    Batch `k` holds the examples with flat positions `p = k*B .. k*B + B - 1`.
    With `pool_size == 0` position p is example p (every example is new).
    With `pool_size > 0` position p is example `p % pool_size` under the
    dihedral transform `(p // pool_size) % 8` (identity in the first pass over
    the pool, then rotations and reflections; only the four that keep the
    shape for non-square frames); wrap `source` in `CachedSource` so the pool
    is generated once. Either way batch k depends only on k, so starting at
    `start_step` gives exactly the batches an uninterrupted run would have
    seen from that step on: what exact resumption needs.

    Args:
      source: e.g. `SyntheticRGBD` (its height/width are the crop size) or a
        `CachedSource` of it; examples {'image' (H, W, 3), 'disparity' (H, W)}.
      scale: the up-sampling factor.
      batch_size: examples per batch.
      start_step: the first batch index.
      num_steps: stop after this many batches (None: never stop).
      pool_size: see above; 0 for fresh examples throughout.
      rows: the rows of each batch to make (default: all), e.g. this process's
        `experiments.common.sharding.process_slice(batch_size)`.

    Yields:
      Batches from `stack_examples(make_example(...))`: 'guide' (B, H, W, 3)
      float32, 'low_res' (B, H/scale, W/scale, 1) float32, 'target'
      (B, H, W, 1) float32, 'valid' (B, H, W, 1) bool.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pool_size < 0:
        raise ValueError(f"pool_size must be >= 0, got {pool_size}")
    first, last, _ = (rows or slice(0, batch_size)).indices(batch_size)
    step = start_step
    while num_steps is None or step < start_step + num_steps:
        examples = []
        for position in range(step * batch_size + first, step * batch_size + last):
            if pool_size:
                example = source[position % pool_size]
                transform = (position // pool_size) % 8
                h, w = example["disparity"].shape
                if h != w:
                    transform = (0, 4, 2, 6)[transform % 4]
                example = {key: dihedral(value, transform) for key, value in example.items()}
            else:
                example = source[position]
            examples.append(make_example(example["image"], example["disparity"], scale))
        yield stack_examples(examples)
        step += 1


# --------------------------------------------------------------------------
# Middlebury 2014 "motorcycle" (embedded in scikit-image)
# --------------------------------------------------------------------------


def load_middlebury(multiple: int = 16) -> dict[str, np.ndarray]:
    """The Middlebury 2014 "motorcycle" left view and its ground-truth disparity.

    The data ship with scikit-image (`skimage.data.stereo_motorcycle`); the
    (500, 741) frame is centre-cropped to a multiple of `multiple` (496 x 736
    for 16) so that every evaluated scale divides it.

    Args:
      multiple: the crop multiple (16 covers x4, x8 and x16).

    Returns:
      {'image': (H, W, 3) uint8, 'disparity': (H, W) float32 in pixels at full
      resolution, +inf on invalid/occluded pixels}.
    """
    from skimage import data

    left, _, disparity = data.stereo_motorcycle()
    return {
        "image": crop_to_multiple(np.asarray(left), multiple),
        "disparity": crop_to_multiple(np.asarray(disparity, np.float32), multiple),
    }


# --------------------------------------------------------------------------
# NYU Depth v2 (labeled set)
# --------------------------------------------------------------------------

NYU_STANDARD_SPLIT_SIZES = {"train": 795, "test": 654}
_SPLIT_KEYS = {"train": "trainNdxs", "test": "testNdxs"}


def _local_path(path, name: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    if "://" in path:
        raise ValueError(f"{name} must be a local file path, got a URL: {path!r}")
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: no such file: {path!r}")
    return path


def load_nyu_split(split_path) -> dict[str, np.ndarray]:
    """Reads a NYU Depth v2 train/test split file.

    Two formats:
      * `.mat` (the official `splits.mat`): variables `trainNdxs` and
        `testNdxs`, 1-based indices into the labeled set. MATLAB v5 files are
        read with scipy, v7.3 (HDF5) files with h5py.
      * `.npz`: arrays `trainNdxs` and `testNdxs`, also 1-based.

    Args:
      split_path: local path of the split file.

    Returns:
      {'train': int64 array, 'test': int64 array} of 0-based indices.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: a URL, an unknown extension, missing keys, or bad indices
        (non-integer, < 1, duplicated, or in both splits).
    """
    path = _local_path(split_path, "split_path")
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".mat", ".npz"):
        raise ValueError(f"split_path must end in .mat or .npz, got {path!r}")
    try:
        if extension == ".npz":
            with np.load(path) as f:
                raw = {key: np.asarray(f[key]) for key in f.files}
        else:
            from scipy import io as scipy_io

            try:
                raw = scipy_io.loadmat(path)
            except NotImplementedError:  # MATLAB v7.3 is HDF5.
                import h5py

                with h5py.File(path, "r") as f:
                    raw = {key: np.asarray(f[key]) for key in f.keys()}
    except Exception as err:  # noqa: BLE001 -- scipy, h5py and zipfile raise many types.
        kind = "an .npz archive" if extension == ".npz" else "a MATLAB .mat file (v5 or v7.3)"
        raise ValueError(
            f"split_path {path!r} is not {kind}: {type(err).__name__}: {str(err)[:200]}"
        ) from None
    split = {}
    for name, key in _SPLIT_KEYS.items():
        if key not in raw:
            found = sorted(k for k in raw if not k.startswith("__"))
            raise ValueError(f"split file {path!r} lacks {key!r}; it holds {found}")
        values = np.asarray(raw[key]).ravel()
        if values.size and not np.all(values == np.round(values)):
            raise ValueError(f"{key} in {path!r} must hold integers")
        values = values.astype(np.int64)
        if values.size and values.min() < 1:
            raise ValueError(f"{key} in {path!r} must be 1-based (>= 1), got minimum {values.min()}")
        if len(np.unique(values)) != len(values):
            raise ValueError(f"{key} in {path!r} holds duplicate indices")
        split[name] = values - 1
    overlap = np.intersect1d(split["train"], split["test"])
    if overlap.size:
        raise ValueError(f"{overlap.size} indices are in both trainNdxs and testNdxs in {path!r}")
    return split


class NYUDepthV2:
    """The labeled NYU Depth v2 set (`nyu_depth_v2_labeled.mat`, HDF5), one split.

    The file stores MATLAB's column-major layout as seen by h5py: 'images' is
    (N, 3, W, H) uint8 and 'depths' is (N, W, H) float (metres). Examples are
    returned transposed to the usual (H, W, ...) layout. The file is opened
    lazily and read one frame at a time.

    Args:
      mat_path: local path of the labeled .mat file.
      split_path: local path of the split file (see `load_nyu_split`); the
        standard split has 795 train and 654 test frames.
      split: 'train' or 'test'.

    Example `i` is {'image': (H, W, 3) uint8, 'disparity': (H, W) float32}; the
    'disparity' key holds depth in metres (the key name is shared with the
    other sources), with non-positive depths set to +inf (invalid).

    Raises:
      FileNotFoundError: a path does not exist.
      ValueError: a URL, a bad split name, missing datasets, inconsistent
        shapes, or split indices outside the file.
    """

    def __init__(self, mat_path, split_path, split: str = "train"):
        if split not in _SPLIT_KEYS:
            raise ValueError(f"split must be one of {tuple(_SPLIT_KEYS)}, got {split!r}")
        self.mat_path = _local_path(mat_path, "mat_path")
        self.split = split
        self.indices = load_nyu_split(split_path)[split]
        import h5py

        try:
            with h5py.File(self.mat_path, "r") as f:
                for key in ("images", "depths"):
                    if key not in f:
                        raise ValueError(
                            f"{self.mat_path!r} lacks the dataset {key!r}; it holds {sorted(f.keys())}"
                        )
                images, depths = f["images"].shape, f["depths"].shape
        except OSError as error:
            raise ValueError(
                f"mat_path {self.mat_path!r} is not an HDF5 (MATLAB v7.3) file: {error}"
            ) from None
        if len(images) != 4 or images[1] != 3:
            raise ValueError(f"'images' must be (N, 3, W, H), got {images}")
        if depths != (images[0], images[2], images[3]):
            expected = (images[0], images[2], images[3])
            raise ValueError(f"'depths' must be (N, W, H) = {expected}, got {depths}")
        self.num_frames = images[0]
        if self.indices.size and self.indices.max() >= self.num_frames:
            raise ValueError(
                f"split index {self.indices.max() + 1} (1-based) is beyond the {self.num_frames} frames "
                f"of {self.mat_path!r}"
            )
        self._file = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index must be in [0, {len(self)}), got {i}")
        if self._file is None:
            import h5py

            self._file = h5py.File(self.mat_path, "r")
        frame = int(self.indices[i])
        image = np.asarray(self._file["images"][frame]).transpose(2, 1, 0)
        depth = np.asarray(self._file["depths"][frame], np.float32).T
        depth = np.where(depth > 0, depth, np.inf).astype(np.float32)
        return {"image": np.ascontiguousarray(image, dtype=np.uint8), "disparity": depth}

    def close(self):
        """Closes the HDF5 file (it reopens on the next access)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        return state


def random_crops(
    source,
    crop_size: int,
    scale: int,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    num_steps: Optional[int] = None,
    min_valid_fraction: float = 0.5,
    rows: Optional[slice] = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Deterministic batches of random crops from a source of full frames (e.g. NYU).

    Crop `i` of batch `k` depends only on `(seed, k, i)`; crops are flipped
    horizontally at random. Frames are indexed modulo `len(source)`.

    Args:
      source: random-access examples {'image' (H, W, 3) uint8, 'disparity' (H, W)}.
      crop_size: crop side, a multiple of `scale`, at most the frame size.
      scale: the up-sampling factor.
      batch_size: crops per batch.
      seed: the crop seed.
      start_step: first batch index.
      num_steps: number of batches (None: endless).
      min_valid_fraction: crops with fewer valid ground-truth pixels are
        redrawn.
      rows: the rows of each batch to make (default: all); see `synthetic_batches`.

    Yields:
      Batches as in `synthetic_batches`.
    """
    if crop_size % scale:
        raise ValueError(f"crop_size must be a multiple of scale={scale}, got {crop_size}")
    if len(source) == 0:
        raise ValueError("source is empty")
    first, last, _ = (rows or slice(0, batch_size)).indices(batch_size)
    step = start_step
    while num_steps is None or step < start_step + num_steps:
        examples = []
        for row in range(first, last):
            rng = np.random.default_rng(np.random.SeedSequence([seed, step, row]))
            for _attempt in range(100):
                ex = source[int(rng.integers(len(source)))]
                h, w = ex["disparity"].shape
                if crop_size > min(h, w):
                    raise ValueError(f"crop_size {crop_size} exceeds the frame size {(h, w)}")
                top = int(rng.integers(h - crop_size + 1))
                left = int(rng.integers(w - crop_size + 1))
                image = ex["image"][top : top + crop_size, left : left + crop_size]
                disparity = ex["disparity"][top : top + crop_size, left : left + crop_size]
                if np.isfinite(disparity).mean() >= min_valid_fraction:
                    break
            else:
                raise ValueError(
                    f"found no crop with at least {min_valid_fraction:.0%} valid pixels in 100 tries"
                )
            if rng.random() < 0.5:
                image, disparity = image[:, ::-1], disparity[:, ::-1]
            examples.append(make_example(image, disparity, scale))
        yield stack_examples(examples)
        step += 1
