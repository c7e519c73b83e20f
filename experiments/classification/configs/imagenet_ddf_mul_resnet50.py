"""The official DDF recipe: ddf_mul_resnet50 on ImageNet-1k, for a GPU cluster.

Command (one host with 8 GPUs; data in the ImageNet folder layout
`DATA/train/<wnid>/*.JPEG`, `DATA/val/<wnid>/*.JPEG`):

    python -m experiments.classification --workdir /ckpt/ddf_mul_resnet50 \
        --config experiments/classification/configs/imagenet_ddf_mul_resnet50.py \
        --config.data_dir /data/imagenet

Several hosts (same command on every host, global batch unchanged): add
`--config.distributed=True` (see README.md, "Several hosts").

Recipe (official, 8 GPUs x 128 = global batch 1024): SGD momentum 0.9, peak
lr 0.4, 5 linear warm-up epochs then cosine decay to 0, 120 epochs, weight decay
1e-4 on every parameter except 1-D ones (biases, BatchNorm, FilterNorm gains),
label smoothing 0.1, bf16 compute (float32 parameters); training crops:
RandomResizedCrop 224 (scale 0.08-1) + horizontal flip; evaluation: bicubic
resize to 256, centre crop 224 (crop_pct 0.875).

Not implemented (the official recipe has them): RandAugment (m7, mstd 0.5), random
erasing (p 0.4) and the 10 cool-down epochs at the minimum learning rate.

Splits: validation = a fixed stratified 1% of `train/` (about 12,800 images, used for
evaluation during training and any selection); test = `val/` (50,000), evaluated once
at the end. The official recipe trains on all of `train/`; this one on 99% of it.

Expected wall time: not measured here (no GPU cluster was used to run this config).
Expected result: not measured here. The official model zoo reports 79.1% top-1 for
ddf_mul_resnet50 with the full recipe; without RandAugment and random erasing the
result should be expected to be somewhat lower.
"""

import ml_collections

from experiments.classification.configs import default


def get_config() -> ml_collections.ConfigDict:
    """ImageNet ddf_mul_resnet50 config; see the module docstring."""
    config = default.get_config()
    config.models = ("ddf_mul_resnet50",)
    config.dtype = "bfloat16"

    config.dataset = "imagenet"
    config.data_dir = ""  # Set on the command line: --config.data_dir=/data/imagenet
    config.image_size = 224
    config.crop_pct = 0.875
    config.min_scale = 0.08
    config.validation_fraction = 0.01  # About 12,800 of the 1,281,167 training images.
    config.worker_count = 16  # grain worker processes per host (JPEG decoding).
    config.worker_buffer_size = 2
    config.read_threads = 8

    config.batch_size = 1024  # Global: 8 devices x 128.
    config.eval_batch_size = 1024
    config.num_epochs = 120
    config.learning_rate = 0.4
    config.warmup_epochs = 5.0
    config.momentum = 0.9
    config.nesterov = False
    config.weight_decay = 1e-4
    config.label_smoothing = 0.1

    config.log_every_steps = 100
    config.eval_every_epochs = 1
    config.checkpoint_every_steps = 0  # Once per epoch (1,251 steps).
    config.keep_checkpoints = 3
    return config
