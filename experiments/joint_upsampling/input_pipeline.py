"""Data for guided depth up-sampling: training batches and the test images.

Sources of full-resolution frames, {'image' (H, W, 3) uint8, 'disparity'
(H, W) float32, invalid pixels not finite}:

* `synthetic.SyntheticRGBD`: procedural scenes (training, default);
* `nyu.NYUDepthV2`: the labeled NYU Depth v2 file (training and testing);
* `load_middlebury`: the Middlebury 2014 "motorcycle" image that ships inside
  scikit-image (testing, default), and `middlebury_halves`, its left and right
  halves.

Examples and batches are made with the protocol of `downsampling`.
`TrainData` turns a config into the deterministic batch iterators of the
training runs: batch k depends only on k, so a run resumed at step S restarts
its iterator at S and sees what an uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import ml_collections
import numpy as np

from experiments.joint_upsampling import nyu, synthetic
from experiments.joint_upsampling.downsampling import crop_to_multiple, make_example, stack_examples

# Offset of the synthetic validation scenes' seed from the training seed.
VALIDATION_SEED_OFFSET = 1_000_003


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
    downsampling: str = "area",
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
      downsampling: the low-resolution protocol ("area" or "point").

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
            examples.append(make_example(example["image"], example["disparity"], scale, downsampling))
        yield stack_examples(examples)
        step += 1


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
    downsampling: str = "area",
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
      downsampling: the low-resolution protocol, applied to each crop.

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
            examples.append(make_example(image, disparity, scale, downsampling))
        yield stack_examples(examples)
        step += 1


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


def middlebury_halves(multiple: int = 16) -> dict[str, dict[str, np.ndarray]]:
    """{'left': frame, 'right': frame}: the two halves of `load_middlebury(multiple)`.

    The 496 x 736 crop splits into two 496 x 368 frames (columns [0, 368) and
    [368, 736)); both sides stay multiples of 16, and the blocks of every scale
    up to 16 fall where they fall in the whole image. They are two parts of one
    scene, not two scenes.
    """
    frame = load_middlebury(multiple)
    width = frame["image"].shape[1]
    half = width // 2 - (width // 2) % multiple
    return {
        "left": {key: value[:, :half] for key, value in frame.items()},
        "right": {key: value[:, half : 2 * half] for key, value in frame.items()},
    }


def synthetic_source(config: ml_collections.ConfigDict, size: int, seed_offset: int = 0):
    """`SyntheticRGBD` of side `size` from `config.synthetic` (seed + seed_offset)."""
    s = config.synthetic
    return synthetic.SyntheticRGBD(
        seed=s.seed + seed_offset,
        height=size,
        width=size,
        min_disparity=s.min_disparity,
        max_disparity=s.max_disparity,
        min_shapes=s.min_shapes,
        max_shapes=s.max_shapes,
        trap_probability=s.trap_probability,
        texture_probability=s.texture_probability,
        camouflage_probability=s.camouflage_probability,
        noise_std=s.noise_std,
    )


def nyu_split(config: ml_collections.ConfigDict, split: str) -> nyu.NYUDepthV2:
    """`nyu.NYUDepthV2` for `split` from `config.nyu_mat_path` and `config.nyu_split_path`."""
    return nyu.NYUDepthV2(config.nyu_mat_path, split, config.nyu_split_path)


class TrainData:
    """Training-batch factory shared by the runs of one `train_and_evaluate` call.

    `batches(scale, crop_size, batch_size, start_step, rows)` returns the
    deterministic batch iterator of a run from `start_step` on (the given rows
    of every global batch); synthetic crops are generated once per crop size
    and shared by all runs (`CachedSource`). NYU training draws random crops
    from the training split.

    Args:
      config: the experiment config (`train_data`, `synthetic`,
        `downsampling`, `seed` and the NYU paths).
    """

    def __init__(self, config: ml_collections.ConfigDict):
        if config.train_data not in ("synthetic", "nyu"):
            raise ValueError(f"config.train_data must be 'synthetic' or 'nyu', got {config.train_data!r}")
        self.config = config
        self._sources: dict[int, Any] = {}
        self.nyu = nyu_split(config, "train") if config.train_data == "nyu" else None

    def source(self, crop_size: int):
        """The (cached) synthetic source of side `crop_size`."""
        if crop_size not in self._sources:
            source = synthetic_source(self.config, crop_size)
            if self.config.synthetic.pool_size:
                source = CachedSource(source)
            self._sources[crop_size] = source
        return self._sources[crop_size]

    def batches(self, scale: int, crop_size: int, batch_size: int, start_step: int,
                rows: Optional[slice] = None) -> Iterator[dict[str, np.ndarray]]:
        """The batches of one run from `start_step` on; see `synthetic_batches`."""
        if self.nyu is not None:
            return random_crops(self.nyu, crop_size, scale, batch_size, seed=self.config.seed,
                                start_step=start_step, rows=rows, downsampling=self.config.downsampling)
        return synthetic_batches(self.source(crop_size), scale, batch_size, start_step=start_step,
                                 pool_size=self.config.synthetic.pool_size, rows=rows,
                                 downsampling=self.config.downsampling)


def validation_batches(config: ml_collections.ConfigDict, scale: int, crop_size: int, batch_size: int,
                       rows: slice) -> list[dict[str, np.ndarray]]:
    """The given rows of the fixed synthetic validation set (another seed), in global batches.

    `config.validation_examples` crops of side `crop_size` (0: none), in batches of
    `batch_size`; the last incomplete batch is dropped.
    """
    count = config.validation_examples
    if count == 0:
        return []
    source = synthetic_source(config, crop_size, VALIDATION_SEED_OFFSET)
    batches = []
    for start in range(0, count - count % batch_size, batch_size):
        examples = [make_example(**source[start + i], scale=scale, downsampling=config.downsampling)
                    for i in range(rows.start, rows.stop)]
        batches.append(stack_examples(examples))
    return batches
