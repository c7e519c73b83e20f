"""NYU Depth v2 in experiments/joint_upsampling: the loader, and the published protocol end to end.

The fixture is a generated `nyu_depth_v2_labeled.mat` with the real layout: MATLAB v7.3
(HDF5 with MATLAB's 512-byte header), 1,449 frames, `images` (N, 3, W, H) uint8 and
`depths` (N, W, H) float32 in metres, plus other datasets the loader must ignore. Only
the frames are small (32 x 48 instead of 480 x 640).
"""

import json
import os

import h5py
import numpy as np
import pytest

from experiments.joint_upsampling import evaluate, input_pipeline, nyu, train
from experiments.joint_upsampling.configs import nyu_pac
from tests.test_joint_upsampling import tiny_config

HEIGHT, WIDTH = 32, 48
# MATLAB v7.3 files are HDF5 with a 512-byte user block that starts with this header.
_MATLAB_HEADER = (b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 "
                  b"HDF5 schema 1.00 .").ljust(116, b" ") + bytes(8) + b"\x00\x02IM"


def _scenes(frames: int, seed: int = 0):
    """(images (N, H, W, 3) uint8, depths (N, H, W) float32 metres): a slanted room and a box."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    base = rng.uniform(1.0, 6.0, size=(frames, 1, 1)).astype(np.float32)
    slope = rng.uniform(-0.05, 0.05, size=(frames, 2, 1, 1)).astype(np.float32)
    depths = base + slope[:, 0] * ys + slope[:, 1] * xs
    top, left = rng.integers(0, HEIGHT // 2, frames), rng.integers(0, WIDTH // 2, frames)
    for i in range(frames):
        depths[i, top[i] : top[i] + 12, left[i] : left[i] + 16] -= 0.8
    depths = np.clip(depths, 0.7, 10.0).astype(np.float32)
    images = np.clip(depths[..., None] * 25 + rng.normal(0, 8, (frames, HEIGHT, WIDTH, 3)), 0, 255)
    return images.astype(np.uint8), depths


def write_labeled_file(path, frames: int = nyu.NUM_LABELED_FRAMES):
    """Writes a labeled-set file with the real layout; returns (images, depths) as (H, W) frames."""
    images, depths = _scenes(frames)
    with h5py.File(path, "w", userblock_size=512) as f:
        # As h5py sees MATLAB's column-major arrays: W and H swapped.
        f["images"] = images.transpose(0, 3, 2, 1)  # (N, 3, W, H) uint8
        f["depths"] = depths.transpose(0, 2, 1)  # (N, W, H) float32, metres
        f["rawDepths"] = np.where(depths > 3.0, 0.0, depths).transpose(0, 2, 1)
        f["labels"] = np.zeros((frames, WIDTH, HEIGHT), np.uint16)
    with open(path, "r+b") as f:
        f.write(_MATLAB_HEADER)
    return images, depths


@pytest.fixture(scope="module")
def labeled_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("nyu") / "nyu_depth_v2_labeled.mat")
    images, depths = write_labeled_file(path)
    return path, images, depths


def test_published_split_reads_the_real_layout(labeled_file):
    path, images, depths = labeled_file
    train_set = nyu.NYUDepthV2(path, "train")
    test_set = nyu.NYUDepthV2(path, "test")
    assert (len(train_set), len(test_set)) == (1000, 449)
    for source, frame in ((train_set, 0), (train_set, 999), (test_set, 0), (test_set, 448)):
        index = frame + (1000 if source is test_set else 0)
        example = source[frame]
        assert example["image"].shape == (HEIGHT, WIDTH, 3) and example["image"].dtype == np.uint8
        assert example["disparity"].shape == (HEIGHT, WIDTH) and example["disparity"].dtype == np.float32
        np.testing.assert_array_equal(example["image"], images[index])
        np.testing.assert_array_equal(example["disparity"], depths[index])
    train_set.close()


def test_published_split_needs_the_1449_frames(tmp_path):
    path = str(tmp_path / "short.mat")
    write_labeled_file(path, frames=5)
    with pytest.raises(ValueError, match="needs the 1449 frames of the labeled set, got 5"):
        nyu.NYUDepthV2(path, "test")


def _bilinear(low: np.ndarray, factor: int) -> np.ndarray:
    """Half-pixel-centre bilinear up-sampling with edge clamping, written out in numpy (float64)."""

    def axis_weights(n_in):
        source = (np.arange(n_in * factor) + 0.5) / factor - 0.5
        source = np.clip(source, 0, n_in - 1)
        lower = np.floor(source).astype(int)
        upper = np.minimum(lower + 1, n_in - 1)
        return lower, upper, source - lower

    r0, r1, wr = axis_weights(low.shape[0])
    c0, c1, wc = axis_weights(low.shape[1])
    low = low.astype(np.float64)
    rows = low[r0] * (1 - wr)[:, None] + low[r1] * wr[:, None]
    return rows[:, c0] * (1 - wc)[None, :] + rows[:, c1] * wc[None, :]


def _pac_config(path):
    config = nyu_pac.get_config()
    small = tiny_config()
    config.model = small.model
    config.model.disparity_scale = 4.0
    config.models, config.num_devices = ("plain_net",), 1
    config.per_scale = {"x4": {"steps": 2, "crop_size": 16, "batch_size": 4}}
    config.scales = (4,)
    config.guided_filter.update(radii=(1, 2), epsilons=(1e-4, 1e-2))
    config.log_every_steps = config.checkpoint_every_steps = 1
    config.progress_bar = config.panels = False
    config.nyu_mat_path = path
    return config


def test_published_protocol_step_by_step(labeled_file, tmp_path):
    """Split, point sampling, 6-pixel border, centimetres, mean over the 449 images."""
    path, images, depths = labeled_file
    config = _pac_config(path)
    assert (config.downsampling, config.eval_border, config.nyu_split_path) == ("point", 6, "")
    config.scales = (4, 8, 16)
    [test_set] = evaluate.test_sets(config)
    assert len(test_set.frames) == 449 and test_set.unit == "centimetres of depth"
    # The guided filter is tuned on training frames only: 16 evenly spaced in [0, 1000).
    assert len(test_set.tuning_frames) == 16
    np.testing.assert_array_equal(test_set.tuning_frames[0]["disparity"], depths[0])
    np.testing.assert_array_equal(test_set.tuning_frames[-1]["disparity"], depths[999])
    results, guided = evaluate.evaluate(config, [test_set], {}, str(tmp_path), panels=False)
    for factor in (4, 8, 16):
        offset = (factor - 1) // 2
        per_image = []
        for target in depths[1000:]:
            low = target[offset::factor, offset::factor]
            error = _bilinear(low, factor) - target
            per_image.append(100.0 * np.sqrt(np.mean(error[6:-6, 6:-6] ** 2)))
        got = results["nyu_test"]["bilinear"][f"x{factor}"]
        np.testing.assert_allclose(got, np.mean(per_image), rtol=1e-5)
        assert guided["nyu_test"][f"x{factor}"]["tuned_on"].endswith("frames of the NYU training split")


def test_published_protocol_config_trains_and_evaluates(labeled_file, tmp_path):
    path, _, _ = labeled_file
    results = train.train_and_evaluate(_pac_config(path), str(tmp_path / "work"))
    assert set(results) == {"nyu_test"}
    assert set(results["nyu_test"]) == {"bilinear", "bicubic", "guided_filter", "plain_net"}
    assert all(np.isfinite(row["x4"]) and row["x4"] > 0 for row in results["nyu_test"].values())
    details = json.loads((tmp_path / "work" / "details.json").read_text())
    assert details["test_sets"]["nyu_test"]["frames"] == 449
    assert details["protocol"] == {"downsampling": "point", "eval_border": 6}
    table = (tmp_path / "work" / "results.md").read_text()
    assert "RMSE in centimetres of depth" in table and "the published split" in table
    stored = json.loads((tmp_path / "work" / "plain_net_x4" / "config.json").read_text())
    assert stored["downsampling"] == "point" and stored["nyu_split_path"] == ""


def test_missing_nyu_file_is_a_config_error_before_any_work(tmp_path):
    config = nyu_pac.get_config()
    with pytest.raises(ValueError, match="config.nyu_mat_path must be the local path"):
        train.train_and_evaluate(config, str(tmp_path))


# --------------------------------------------------------------------------
# A split file instead of the published split
# --------------------------------------------------------------------------


def _write_small_file(directory, frames=5):
    path = os.path.join(directory, "nyu.mat")
    images, depths = write_labeled_file(path, frames)
    depths[0, 0, 0] = 0.0  # A missing depth.
    with h5py.File(path, "r+") as f:
        f["depths"][0, 0, 0] = 0.0
    return path, images, depths


def test_split_file_loader(tmp_path):
    from scipy import io as scipy_io

    mat, images, depths = _write_small_file(str(tmp_path))
    split_mat = str(tmp_path / "splits.mat")
    scipy_io.savemat(split_mat, {"trainNdxs": np.array([[1], [3], [4]]), "testNdxs": np.array([[2], [5]])})
    train_set = nyu.NYUDepthV2(mat, "train", split_mat)
    test_set = nyu.NYUDepthV2(mat, "test", split_mat)
    assert len(train_set) == 3 and len(test_set) == 2
    ex = train_set[1]  # 1-based index 3 -> frame 2.
    np.testing.assert_array_equal(ex["image"], images[2])
    np.testing.assert_allclose(ex["disparity"], depths[2])
    first = train_set[0]
    assert np.isinf(first["disparity"][0, 0]) and np.isfinite(first["disparity"][0, 1])
    np.testing.assert_array_equal(test_set[-1]["image"], images[4])
    train_set.close()
    split_npz = str(tmp_path / "splits.npz")
    np.savez(split_npz, trainNdxs=np.array([5, 1]), testNdxs=np.array([2]))
    np.testing.assert_array_equal(nyu.load_nyu_split(split_npz)["train"], [4, 0])
    crops = next(input_pipeline.random_crops(train_set, 8, 4, batch_size=2, seed=0, downsampling="point"))
    assert crops["guide"].shape == (2, 8, 8, 3) and crops["low_res"].shape == (2, 2, 2, 1)


def test_split_file_loader_errors(tmp_path):
    mat, _, _ = _write_small_file(str(tmp_path))
    split = str(tmp_path / "s.npz")
    np.savez(split, trainNdxs=np.array([1, 2]), testNdxs=np.array([3]))
    with pytest.raises(FileNotFoundError, match="mat_path"):
        nyu.NYUDepthV2(str(tmp_path / "missing.mat"), "train", split)
    with pytest.raises(FileNotFoundError, match="split_path"):
        nyu.NYUDepthV2(mat, "train", str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match="URL"):
        nyu.NYUDepthV2("http://example.com/nyu.mat", "train", split)
    with pytest.raises(ValueError, match="split must be"):
        nyu.NYUDepthV2(mat, "val", split)
    for name, arrays, message in (
        ("bad", {"train": np.array([1])}, "trainNdxs"),
        ("zero_based", {"trainNdxs": np.array([0, 1]), "testNdxs": np.array([2])}, "1-based"),
        ("overlap", {"trainNdxs": np.array([1, 2]), "testNdxs": np.array([2])}, "both"),
        ("beyond", {"trainNdxs": np.array([1, 9]), "testNdxs": np.array([2])}, "beyond"),
    ):
        path = str(tmp_path / f"{name}.npz")
        np.savez(path, **arrays)
        with pytest.raises(ValueError, match=message):
            nyu.NYUDepthV2(mat, "train", path)
    not_hdf5 = str(tmp_path / "text.mat")
    with open(not_hdf5, "w") as f:
        f.write("not a mat file")
    with pytest.raises(ValueError, match="HDF5"):
        nyu.NYUDepthV2(not_hdf5, "train", split)
    wrong = str(tmp_path / "wrong.mat")
    with h5py.File(wrong, "w") as f:
        f["images"] = np.zeros((2, 3, 4, 5), np.uint8)
    with pytest.raises(ValueError, match="depths"):
        nyu.NYUDepthV2(wrong, "train", split)


def test_split_file_config_trains_and_evaluates(tmp_path):
    mat, _, _ = _write_small_file(str(tmp_path), frames=4)
    split = str(tmp_path / "split.npz")
    np.savez(split, trainNdxs=np.array([1, 2, 3]), testNdxs=np.array([4]))
    config = tiny_config(train_data="nyu", nyu_mat_path=mat, nyu_split_path=split)
    config.model.disparity_scale = 4.0
    config.per_scale.x2.steps = 2
    results = train.train_and_evaluate(config, str(tmp_path / "work"))
    row = results["nyu_test"]["plain_net"]
    assert set(row) == {"x2"} and np.isfinite(row["x2"])
    details = json.loads((tmp_path / "work" / "details.json").read_text())
    assert details["test_sets"]["nyu_test"]["frames"] == 1
    assert "split file" in details["test_sets"]["nyu_test"]["title"]
