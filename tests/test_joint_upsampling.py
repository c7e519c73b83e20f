"""Tests for experiments/joint_upsampling: data, protocol, metric, evaluation, training.

The baselines and networks are tested in test_joint_upsampling_methods.py, the NYU Depth v2
loader and its published protocol in test_joint_upsampling_nyu.py.
"""

import json
import os

import chex
import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from experiments.joint_upsampling import (
    baselines,
    downsampling,
    evaluate,
    input_pipeline,
    synthetic,
    train,
)
from experiments.joint_upsampling.configs import default as default_config

# --------------------------------------------------------------------------
# Synthetic generator
# --------------------------------------------------------------------------


def test_synthetic_shapes_dtypes_and_range():
    source = synthetic.SyntheticRGBD(seed=3, height=40, width=56)
    ex = source[7]
    assert ex["image"].shape == (40, 56, 3) and ex["image"].dtype == np.uint8
    assert ex["disparity"].shape == (40, 56) and ex["disparity"].dtype == np.float32
    assert np.all(np.isfinite(ex["disparity"]))
    assert ex["disparity"].min() >= 0.5 * source.min_disparity
    assert ex["disparity"].max() <= 1.1 * source.max_disparity
    # Not degenerate: depth has several levels, the image has contrast.
    assert np.ptp(ex["disparity"]) > 1.0 and ex["image"].std() > 1.0


def test_synthetic_is_deterministic_per_seed_and_index():
    a = synthetic.SyntheticRGBD(seed=5, height=32, width=32)
    b = synthetic.SyntheticRGBD(seed=5, height=32, width=32)
    for index in (0, 11, 2**31 - 2):
        chex.assert_trees_all_equal(a[index], b[index])
    # Order of access does not matter.
    first = a[4]
    _ = a[9]
    chex.assert_trees_all_equal(first, a[4])
    assert not np.array_equal(a[0]["disparity"], a[1]["disparity"])
    other_seed = synthetic.SyntheticRGBD(seed=6, height=32, width=32)
    assert not np.array_equal(a[0]["image"], other_seed[0]["image"])


def _colour_edges_without_depth_edges(trap_probability):
    source = synthetic.SyntheticRGBD(
        seed=1, height=64, width=64, trap_probability=trap_probability, noise_std=0.0
    )
    found = 0
    for index in range(4):
        ex = source[index]
        depth_edge = np.abs(np.diff(ex["disparity"], axis=1)) > 0.5  # Planes are slanted: ignore slopes.
        depth_edge = depth_edge | np.roll(depth_edge, 1, 0) | np.roll(depth_edge, -1, 0)
        depth_edge = depth_edge | np.roll(depth_edge, 1, 1) | np.roll(depth_edge, -1, 1)
        colour_edge = np.abs(np.diff(ex["image"].astype(np.float32), axis=1)).max(-1) > 30
        found += np.sum(colour_edge & ~depth_edge)
    return found


def test_synthetic_has_texture_edges_without_depth_edges():
    with_traps = _colour_edges_without_depth_edges(1.0)
    without = _colour_edges_without_depth_edges(0.0)
    assert with_traps > 500 and with_traps > 3 * without


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="height"):
        synthetic.SyntheticRGBD(height=0)
    with pytest.raises(ValueError, match="min_disparity"):
        synthetic.SyntheticRGBD(min_disparity=10.0, max_disparity=5.0)
    with pytest.raises(ValueError, match="trap_probability"):
        synthetic.SyntheticRGBD(trap_probability=1.5)
    with pytest.raises(IndexError):
        synthetic.SyntheticRGBD(num_examples=3)[3]


def test_batches_resume_at_any_step_and_pool_cycles_with_transforms():
    source = input_pipeline.CachedSource(synthetic.SyntheticRGBD(seed=2, height=16, width=16))
    full = list(input_pipeline.synthetic_batches(source, 4, 3, num_steps=5, pool_size=4))
    resumed = list(input_pipeline.synthetic_batches(source, 4, 3, start_step=3, num_steps=2, pool_size=4))
    chex.assert_trees_all_equal(full[3:], resumed)
    assert full[0]["guide"].shape == (3, 16, 16, 3) and full[0]["low_res"].shape == (3, 4, 4, 1)
    # Position 4 is example 0 under transform 1 (a 90-degree rotation).
    np.testing.assert_array_equal(full[1]["target"][1, ..., 0], np.rot90(full[0]["target"][0, ..., 0]))
    fresh = list(input_pipeline.synthetic_batches(synthetic.SyntheticRGBD(seed=2, height=16, width=16),
                                                  4, 3, num_steps=2))
    np.testing.assert_array_equal(fresh[1]["target"][0, ..., 0], source[3]["disparity"])


def test_dihedral_covers_eight_distinct_transforms():
    a = np.arange(12).reshape(3, 4)
    outs = {(input_pipeline.dihedral(a, t).shape, input_pipeline.dihedral(a, t).tobytes()) for t in range(8)}
    assert len(outs) == 8
    with pytest.raises(ValueError, match="transform"):
        input_pipeline.dihedral(a, 8)


# --------------------------------------------------------------------------
# Down-sampling protocol and metric
# --------------------------------------------------------------------------


def test_downsample_block_mean_over_valid_pixels_and_fill():
    d = np.array(
        [
            [1.0, 3.0, 10.0, np.inf],
            [5.0, 7.0, np.inf, 20.0],
            [np.inf, np.inf, 2.0, 2.0],
            [np.inf, np.nan, 4.0, 4.0],
        ],
        np.float32,
    )
    low, valid = downsampling.downsample_disparity(d, 2)
    # Block (1, 0) has no valid pixel: nearest valid blocks are (0, 0) and (1, 1)
    # at distance 1; the EDT picks one of them.
    np.testing.assert_array_equal(valid, [[True, True], [False, True]])
    np.testing.assert_allclose(low[0], [4.0, 15.0])
    np.testing.assert_allclose(low[1, 1], 3.0)
    assert low[1, 0] in (4.0, 3.0)
    with pytest.raises(ValueError, match="multiple of scale"):
        downsampling.downsample_disparity(np.ones((5, 4)), 2)
    with pytest.raises(ValueError, match="no valid"):
        downsampling.downsample_disparity(np.full((4, 4), np.inf), 2)


def test_rmse_hand_checked_and_excludes_invalid():
    target = np.array([[1.0, 2.0], [np.inf, 4.0]])
    prediction = np.array([[2.0, 2.0], [100.0, 1.0]])
    # Valid errors 1, 0, -3: sqrt((1 + 0 + 9) / 3).
    assert baselines.rmse(prediction, target) == pytest.approx(np.sqrt(10.0 / 3.0))
    valid = np.array([[True, False], [True, True]])
    assert baselines.rmse(prediction, target, valid) == pytest.approx(np.sqrt(10.0 / 2.0))
    assert baselines.rmse(target, target) == 0.0
    with pytest.raises(ValueError, match="shape"):
        baselines.rmse(prediction[:1], target)
    with pytest.raises(ValueError, match="no valid"):
        baselines.rmse(prediction, np.full((2, 2), np.nan))


def test_middlebury_crop_and_invalid_pixels():
    m = input_pipeline.load_middlebury(16)
    assert m["image"].shape == (496, 736, 3) and m["disparity"].shape == (496, 736)
    invalid = ~np.isfinite(m["disparity"])
    assert 0.01 < invalid.mean() < 0.2
    ex = downsampling.make_example(m["image"], m["disparity"], 8)
    assert ex["low_res"].shape == (62, 92, 1) and np.all(np.isfinite(ex["low_res"]))
    np.testing.assert_array_equal(ex["valid"][..., 0], ~invalid)


def test_point_sampling_takes_every_scale_th_pixel_from_the_offset():
    d = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
    for scale, offset in ((2, 0), (4, 1), (8, 3)):
        low, valid = downsampling.downsample_disparity(d, scale, "point")
        # Pixel (offset + i*scale, offset + j*scale) of the full frame, unfiltered.
        np.testing.assert_array_equal(low, d[offset::scale, offset::scale])
        assert low.shape == (8 // scale, 16 // scale) and valid.all()
    assert downsampling.downsample_disparity(d, 4, "point")[0][1, 2] == d[5, 9]
    # An invalid sample is filled from the nearest valid one; invalid pixels off the
    # sampling grid change nothing.
    d[1, 1] = np.inf
    d[0, 0] = np.nan
    low, valid = downsampling.downsample_disparity(d, 4, "point")
    assert not valid[0, 0] and valid.sum() == valid.size - 1
    assert low[0, 0] in (d[1, 5], d[5, 1])
    example = downsampling.make_example(np.zeros((8, 16, 3), np.uint8), d, 4, "point")
    np.testing.assert_array_equal(example["low_res"][..., 0], low)
    with pytest.raises(ValueError, match="method must be one of"):
        downsampling.downsample_disparity(d, 4, "nearest")


def test_middlebury_halves_are_the_two_halves_of_one_frame():
    whole = input_pipeline.load_middlebury(16)
    halves = input_pipeline.middlebury_halves(16)
    for key in ("image", "disparity"):
        assert halves["left"][key].shape[:2] == halves["right"][key].shape[:2] == (496, 368)
        np.testing.assert_array_equal(np.concatenate([halves["left"][key], halves["right"][key]], 1),
                                      whole[key])


def test_each_middlebury_half_is_tuned_on_the_other():
    config = tiny_config()
    left, right = evaluate.test_sets(config)
    assert (left.name, right.name) == ("middlebury_left", "middlebury_right")
    chex.assert_trees_all_equal(left.tuning_frames, right.frames)
    chex.assert_trees_all_equal(right.tuning_frames, left.frames)
    assert left.unit == "disparity pixels" and left.unit_scale == 1.0
    # The tuned values are the grid minimum on the other half, whatever the evaluated half holds.
    tuned = evaluate.tune_guided_filter(config, left, 2)
    example = downsampling.make_example(**right.frames[0], scale=2)
    expected = baselines.tune_guided_filter([example], 2, config.guided_filter.radii,
                                            config.guided_filter.epsilons)
    assert (tuned["radius"], tuned["eps"], tuned["grid"]) == (expected["radius"], expected["eps"],
                                                              expected["grid"])


def test_evaluation_mask_drops_the_border_and_invalid_pixels():
    example = {"valid": np.ones((10, 12, 1), bool)}
    example["valid"][5, 5] = False
    mask = evaluate.evaluation_mask(example, 3)
    assert mask.sum() == (10 - 6) * (12 - 6) - 1 and mask[3:7, 3:9].sum() == mask.sum()
    np.testing.assert_array_equal(evaluate.evaluation_mask(example, 0), example["valid"][..., 0])
    with pytest.raises(ValueError, match="eval_border"):
        evaluate.evaluation_mask(example, 5)


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def tiny_config(**overrides):
    """The default config shrunk to one tiny network at x2, for tests."""
    config = default_config.get_config()
    config.models = ("plain_net",)
    config.scales = (2,)
    config.per_scale = ml_collections.ConfigDict({"x2": {"steps": 4, "crop_size": 16, "batch_size": 4}})
    config.model.base_features = 4
    config.model.max_features = 4
    config.model.guide_base_features = 4
    config.model.guide_max_features = 4
    config.model.encoder_layers = 1
    config.synthetic.pool_size = 8
    config.validation_examples = 4
    config.guided_filter.tune_examples = 1
    config.guided_filter.radii = (1, 2)
    config.guided_filter.epsilons = (1e-2,)
    config.num_devices = 1
    config.log_every_steps = 1
    config.checkpoint_every_steps = 1
    config.progress_bar = False
    config.panels = False
    for key, value in overrides.items():
        config[key] = value
    return config


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_train_model_resumes_exactly(tmp_path):
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    config = tiny_config()
    data = input_pipeline.TrainData(config)
    straight = train.train_model(config, "plain_net", 2, str(tmp_path / "straight"), data, mesh)
    assert straight.row["finished"] and straight.row["steps"] == 4

    interrupted = tiny_config(stop_after_steps=2)
    first = train.train_model(interrupted, "plain_net", 2, str(tmp_path / "resumed"), data, mesh)
    assert not first.row["finished"] and first.row["steps"] == 2
    assert not os.path.exists(tmp_path / "resumed" / "result.json")
    second = train.train_model(config, "plain_net", 2, str(tmp_path / "resumed"), data, mesh)
    assert second.row["finished"] and second.row["steps"] == 4
    chex.assert_trees_all_equal(_params(straight.model), _params(second.model))
    assert not np.allclose(
        jax.tree.leaves(_params(first.model))[0], jax.tree.leaves(_params(second.model))[0]
    )
    # A finished run is reloaded, not retrained, and a changed config is refused.
    again = train.train_model(config, "plain_net", 2, str(tmp_path / "resumed"), data, mesh)
    chex.assert_trees_all_equal(_params(again.model), _params(second.model))
    from experiments.common.errors import RunFinishedError

    with pytest.raises(RunFinishedError):
        train.train_model(tiny_config(learning_rate=1e-4), "plain_net", 2, str(tmp_path / "resumed"), data,
                          mesh)


@pytest.mark.slow
def test_train_and_evaluate_one_step_writes_results(tmp_path):
    config = tiny_config(models=("ddf_up_net",))
    config.model.base_features = 8  # DDF-Up's channel branch needs int(0.2 * C) >= 1.
    config.model.max_features = 8
    config.per_scale.x2.steps = 1
    config.panels = True
    results = train.train_and_evaluate(config, str(tmp_path))
    # Both Middlebury halves, every method on each.
    assert set(results) == {"middlebury_left", "middlebury_right"}
    for part in results.values():
        assert set(part) == {"bilinear", "bicubic", "guided_filter", "ddf_up_net"}
        for method, row in part.items():
            assert set(row) == {"x2"} and np.isfinite(row["x2"]) and row["x2"] > 0
    assert results["middlebury_left"] != results["middlebury_right"]
    with open(tmp_path / "results.json") as f:
        assert json.load(f) == results
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("RMSE") and "left half (496 x 368)" in table and "right half" in table
    assert "guided_filter tuned on the right half of the image" in table
    assert (tmp_path / "panels_middlebury_right_x2.png").stat().st_size > 1000
    details = json.loads((tmp_path / "details.json").read_text())
    assert details["networks"]["ddf_up_net_x2"]["steps"] == 1
    assert details["protocol"] == {"downsampling": "area", "eval_border": 0}
    guided = json.loads((tmp_path / "guided_filter.json").read_text())
    assert guided["middlebury_left"]["x2"]["tuned_on"] == "the right half of the image"
    assert len(guided["middlebury_left"]["x2"]["grid"]) == 2
    metrics = [json.loads(line) for line in open(tmp_path / "ddf_up_net_x2" / "metrics.jsonl")]
    assert {"loss", "rmse", "bilinear_rmse"} <= set(metrics[0])
    # A rerun reloads the finished run: same results, and the timings of the run that
    # trained are kept, not replaced by the rerun's.
    assert train.train_and_evaluate(config, str(tmp_path)) == results
    again = json.loads((tmp_path / "details.json").read_text())
    assert again["seconds"] == details["seconds"] and again["networks"] == details["networks"]


def test_config_validation(tmp_path):
    config = tiny_config(scales=(3,))
    with pytest.raises(ValueError, match="power of two"):
        train.train_and_evaluate(config, str(tmp_path))
    config = tiny_config(scales=(4,))
    with pytest.raises(ValueError, match="per_scale"):
        train.train_and_evaluate(config, str(tmp_path))
    config = tiny_config(models=("resnet",))
    with pytest.raises(ValueError, match="unknown models"):
        train.train_and_evaluate(config, str(tmp_path))
    config = tiny_config(train_data="kitti")
    with pytest.raises(ValueError, match="train_data"):
        input_pipeline.TrainData(config)
    with pytest.raises(ValueError, match="loss"):
        train.make_loss_fn("huber", 2)
    config = tiny_config(downsampling="bicubic")
    with pytest.raises(ValueError, match="config.downsampling must be one of"):
        train.train_and_evaluate(config, str(tmp_path))
    config = tiny_config()
    config.guided_filter.epsilons = (0.0,)
    with pytest.raises(ValueError, match="config.guided_filter.epsilons"):
        train.train_and_evaluate(config, str(tmp_path))
    config = tiny_config(train_data="nyu")
    with pytest.raises(ValueError, match="config.nyu_mat_path must be the local path"):
        train.train_and_evaluate(config, str(tmp_path))
    config = tiny_config(scales=(32,))
    config.per_scale = {"x32": {"steps": 1, "crop_size": 32, "batch_size": 4}}
    with pytest.raises(ValueError, match="config.scales: 32 does not divide the 496 x 368 frames"):
        train.train_and_evaluate(config, str(tmp_path))
    with pytest.raises(ValueError, match="config.eval_border=184 leaves nothing"):
        train.train_and_evaluate(tiny_config(eval_border=184), str(tmp_path))


def test_summarize_reports_mean_spread_and_wins(tmp_path, capsys):
    from experiments.joint_upsampling import summarize

    rows = [(1.0, 2.0, 1.5), (3.0, 2.5, 2.6)]  # (bilinear, plain_net, ddf_up_net) per run.
    dirs = []
    for index, (bil, plain, ddf) in enumerate(rows):
        dirs.append(str(tmp_path / f"seed{index}"))
        os.makedirs(dirs[-1])
        results = {"middlebury_left": {"bilinear": {"x4": bil}, "plain_net": {"x4": plain},
                                       "ddf_up_net": {"x4": ddf}}}
        (tmp_path / f"seed{index}" / "results.json").write_text(json.dumps(results))
    assert summarize.main(dirs) == 0
    out = capsys.readouterr().out
    assert "middlebury_left, 2 runs" in out
    assert f"| bilinear | 2.000 ± {np.std([1.0, 3.0], ddof=1):.3f} (1.000 / 3.000) |" in out
    assert "ddf_up_net beats plain_net in 1 of 2 runs at x4." in out
    assert summarize.main([str(tmp_path)]) == 1
    assert "no results.json" in capsys.readouterr().err
