"""NYU Depth v2, labeled set (`nyu_depth_v2_labeled.mat`), from a local file.

The file is MATLAB v7.3, i.e. HDF5, read with h5py. MATLAB stores arrays
column-major, so h5py sees them with the axes reversed:

    images   (N, 3, W, H) uint8               (1449, 3, 640, 480) in the real file
    depths   (N, W, H)    float32, metres     (1449, 640, 480), dense (filled in), 0 to 10

`NYUDepthV2` returns frames in the usual layout, {'image': (H, W, 3) uint8,
'disparity': (H, W) float32} (the key is shared with the other sources; it
holds depth in metres here). Two splits:

* `split_path=""` (the default): the first 1,000 frames for training and the
  last 449 for testing, the split of the published joint-upsampling tables
  (Li et al.'s DJIF, then PAC and the DDF paper). The file must hold the 1,449
  frames of the labeled set.
* a split file (`load_nyu_split`): the 1-based `trainNdxs` / `testNdxs` of the
  official `splits.mat` (795 train / 654 test, the split of monocular depth
  estimation) or of an `.npz` with the same two arrays.
"""

from __future__ import annotations

import os

import numpy as np

# The labeled set and the split of the published joint-upsampling tables.
NUM_LABELED_FRAMES = 1449
PUBLISHED_TRAIN_FRAMES = 1000
STANDARD_SPLIT_SIZES = {"train": 795, "test": 654}  # splits.mat (depth estimation)
_SPLIT_KEYS = {"train": "trainNdxs", "test": "testNdxs"}


def local_path(path, name: str) -> str:
    """`path` as an existing local file; errors name the argument `name`."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    if "://" in path:
        raise ValueError(f"{name} must be a local file path, got a URL: {path!r}")
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: no such file: {path!r}")
    return path


def published_split(num_frames: int = NUM_LABELED_FRAMES) -> dict[str, np.ndarray]:
    """The split of the published tables: {'train': [0, 1000), 'test': [1000, 1449)}.

    Raises:
      ValueError: `num_frames` is not the 1,449 of the labeled set.
    """
    if num_frames != NUM_LABELED_FRAMES:
        raise ValueError(
            f"the split of the published tables (first {PUBLISHED_TRAIN_FRAMES} frames train, the rest "
            f"test) needs the {NUM_LABELED_FRAMES} frames of the labeled set, got {num_frames}; give a "
            "split file (config.nyu_split_path) for another file"
        )
    return {
        "train": np.arange(PUBLISHED_TRAIN_FRAMES, dtype=np.int64),
        "test": np.arange(PUBLISHED_TRAIN_FRAMES, NUM_LABELED_FRAMES, dtype=np.int64),
    }


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
    path = local_path(split_path, "split_path")
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
    """One split of the labeled NYU Depth v2 set; a random-access source of frames.

    The file is opened lazily and read one frame at a time.

    Args:
      mat_path: local path of `nyu_depth_v2_labeled.mat`.
      split: 'train' or 'test'.
      split_path: "" for the split of the published tables (first 1,000 frames
        train, last 449 test; the file must hold 1,449 frames), or the local
        path of a split file (see `load_nyu_split`).

    Example `i` is {'image': (H, W, 3) uint8, 'disparity': (H, W) float32}
    with depth in metres under 'disparity'; non-positive depths (none in the
    labeled set, whose depths are filled in) are set to +inf (invalid).

    Raises:
      FileNotFoundError: a path does not exist.
      ValueError: a URL, a bad split name, missing datasets, inconsistent
        shapes, a file without the 1,449 frames for the published split, or
        split indices outside the file.
    """

    def __init__(self, mat_path, split: str = "train", split_path=""):
        if split not in _SPLIT_KEYS:
            raise ValueError(f"split must be one of {tuple(_SPLIT_KEYS)}, got {split!r}")
        self.mat_path = local_path(mat_path, "mat_path")
        self.split = split
        split_indices = load_nyu_split(split_path) if split_path else None
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
            raise ValueError(f"'images' in {self.mat_path!r} must be (N, 3, W, H), got {images}")
        if depths != (images[0], images[2], images[3]):
            expected = (images[0], images[2], images[3])
            raise ValueError(f"'depths' in {self.mat_path!r} must be (N, W, H) = {expected}, got {depths}")
        self.num_frames = images[0]
        if split_indices is None:
            try:
                split_indices = published_split(self.num_frames)
            except ValueError as error:
                raise ValueError(f"mat_path {self.mat_path!r}: {error}") from None
        self.indices = split_indices[split]
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
