"""NYU Depth v2 with the protocol of the published joint-upsampling tables (PAC, CVPR 2019).

Command (the file is not bundled and nothing is downloaded; give its local path):

    python -m experiments.joint_upsampling --workdir /tmp/ddf_nyu \
        --config=experiments/joint_upsampling/configs/nyu_pac.py \
        --config.nyu_mat_path=/data/nyu_depth_v2_labeled.mat

The protocol, step by step (that of Li et al.'s DJIF, which PAC's code and the
DDF paper follow):

1. Data: `nyu_depth_v2_labeled.mat`, the 1,449 labeled frames at 640 x 480
   (MATLAB v7.3; `images` (1449, 3, 640, 480) uint8 and `depths`
   (1449, 640, 480) float32 in metres, W and H swapped on disk; see `nyu.py`).
2. Split: the first 1,000 frames for training, the last 449 for testing
   (`nyu_split_path = ""`).
3. Low resolution: every factor-th pixel of the full-resolution depth,
   starting at offset `(factor - 1) // 2` in both axes, with no pre-filter
   (`downsampling = "point"`). 480 and 640 are multiples of 4, 8 and 16, so
   nothing is resized first.
4. Evaluation: a 6-pixel border is cropped from the 480 x 640 target and from
   the (equally sized) output (`eval_border = 6`), leaving 468 x 628 pixels.
5. Metric: RMSE per test image in centimetres, then the mean over the 449
   images.

Published RMSE in centimetres on this protocol, x4 / x8 / x16 (PAC's README):

    bilinear   5.43 / 8.36 / 12.90
    DJIF       2.64 / 5.15 /  9.39
    PAC        2.39 / 4.59 /  8.09

What is and is not comparable with them:

* The bilinear row depends only on the protocol: on the real file ours should
  match theirs, and it is the check that the protocol was reproduced.
* Bicubic and the guided filter are ours. The guided filter's radius and eps
  are tuned on 16 evenly spaced frames of the training split (never on the
  test split), with the same protocol and metric.
* The networks are not the papers': `plain_net` and `ddf_up_net` have 37 k
  (x4) to 112 k (x16) parameters and train here for 2,000 Adam steps of 8
  random 256 x 256 crops (16,000 crops, 16 per training frame), where PAC's
  recipe runs 5,000 epochs over the training frames on a GPU. Their numbers
  would measure this budget, not the methods' best.

Status: this config has not been run on the real file here (it is not
available on this machine). The whole path -- the real layout, keys, dtypes,
the 1,000 / 449 split, point sampling, the border, centimetres, the mean over
images -- is tested end to end on a generated file of 1,449 small frames
(`tests/test_joint_upsampling_nyu.py`). Expected wall time on a 2-core CPU:
several hours (six runs of 2,000 steps at 256 px, then 449 test frames per
scale); not measured.
"""

import ml_collections

from experiments.joint_upsampling.configs import default


def get_config() -> ml_collections.ConfigDict:
    """The NYU Depth v2 config with the published protocol; see the module docstring."""
    config = default.get_config()
    config.train_data = "nyu"
    config.nyu_mat_path = ""  # Required: the local path of nyu_depth_v2_labeled.mat.
    config.nyu_split_path = ""  # The published split: frames [0, 1000) train, [1000, 1449) test.
    config.nyu_eval_frames = 0  # All 449 test frames.
    config.downsampling = "point"
    config.eval_border = 6
    # Depth in metres (about 0.7 to 10) enters the networks divided by this.
    config.model.disparity_scale = 4.0
    crop = {"steps": 2000, "crop_size": 256, "batch_size": 8}
    config.per_scale = ml_collections.ConfigDict({key: dict(crop) for key in ("x4", "x8", "x16")})
    config.warmup_steps = 100
    config.checkpoint_every_steps = 250
    config.log_every_steps = 50
    config.validation_examples = 0  # The synthetic validation scenes say nothing about NYU.
    config.guided_filter.tune_examples = 16
    return config
