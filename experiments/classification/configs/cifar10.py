"""CIFAR-10: a small DDF-ResNet and its conv twin at 32x32, for one GPU.

Command (the python-pickle batches from cifar-10-python.tar.gz, unpacked):

    python -m experiments.classification --workdir /tmp/ddf_cifar10 \
        --config experiments/classification/configs/cifar10.py \
        --config.data_dir /data/cifar-10-batches-py

Recipe: 100 epochs, batch 128, SGD momentum 0.9 (Nesterov), peak lr 0.1 with one
warm-up epoch and cosine decay, weight decay 5e-4 (not on 1-D parameters), label
smoothing 0.1; augmentation: zero-pad 4 + random crop + horizontal flip.

Splits: validation = a fixed stratified 10% (5,000) of the 50,000 training images,
used for evaluation during training and for any selection (add
`--config.sweep_learning_rates="(0.05,0.1,0.2)"` to choose the rate on it); test =
`test_batch` (10,000), evaluated once at the end. Training uses 45,000 images, so the
numbers are not directly comparable with results trained on all 50,000. The learning
rate 0.1 is the usual CIFAR ResNet rate, not tuned here.

Expected wall time: not measured here (the dataset is not on the development machine).
Expected result: not measured here.
"""

import ml_collections

from experiments.classification.configs import default


def get_config() -> ml_collections.ConfigDict:
    """CIFAR-10 config; see the module docstring."""
    config = default.get_config()
    config.models = ("ddf_mul_resnet20_cifar", "resnet20_cifar")
    config.dataset = "cifar10"
    config.data_dir = ""  # Set on the command line.
    config.image_size = 32
    config.crop_padding = 4
    config.validation_fraction = 0.1  # 5,000 of the 50,000 training images.
    config.worker_count = 4
    config.batch_size = 128
    config.eval_batch_size = 1000
    config.num_epochs = 100
    config.learning_rate = 0.1
    config.warmup_epochs = 1.0
    config.weight_decay = 5e-4
    config.log_every_steps = 50
    return config
