"""Procedural RGB-D scenes for training guided depth up-samplers.

`SyntheticRGBD` is a random-access source of examples: example `i` of seed `s`
is a pure function of `(s, i)`, so any number of crops can be made on the fly
and a resumed run sees the same data as an uninterrupted one. Each example is

    image       (H, W, 3) uint8     the RGB guide
    disparity   (H, W)    float32   the ground truth, in pixels (all finite)

Depth is piecewise smooth (slanted planes and curved patches, with occluding
shapes painted far to near). The RGB image has edges where depth has edges, and
also texture edges where depth has none (stripes, checkers, decals: the
"texture-copy traps" that a guided upsampler must learn to ignore), and some
depth edges with almost no colour contrast. The data are synthetic: nothing
here is a real photograph.
"""

from __future__ import annotations

import dataclasses

import numpy as np

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
