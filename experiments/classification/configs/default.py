"""Default: a DDF-ResNet and its conv twin on scikit-learn's handwritten digits, on CPU.

Command (no other arguments needed):

    python -m experiments.classification --workdir /tmp/ddf_digits

Trains `ddf_mul_resnet20_cifar` and `resnet20_cifar` one after the other on the
1,797 real 8x8 digits that ship with scikit-learn, upsampled to 16x16, 15 epochs
each, batch 64, one seed. Fixed stratified splits (seed 0): 1,149 train, 288
validation (evaluated every epoch), 360 test (evaluated once, at the end).

Learning rate 0.4 for both models, from a validation-split sweep over 0.05 to 0.8
(`--config.sweep_learning_rates="(0.05,0.1,0.2,0.4,0.8)"`, seed 0): 0.4 is the
twin's best; the per-model rule picks 0.8 for the DDF model, one validation image
better. README.md has the sweep and how the one rate was kept.

Expected wall time: a few minutes on a 2-core CPU; README.md has the measured one.
Expected result: README.md has the measured accuracies (one seed and three seeds),
which are the same on every rerun with the same seed, machine and JAX version.
Nothing here is comparable with the paper's ImageNet numbers.

Any field can be overridden on the command line, e.g. `--config.num_epochs=3`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The default (CPU, digits) classification config; see the module docstring."""
    config = ml_collections.ConfigDict()

    # Models: names from ddf_jax.models.list_models(), trained in this order.
    config.models = ("ddf_mul_resnet20_cifar", "resnet20_cifar")
    # Extra constructor arguments for every model, e.g. {"implementation": "xla"}.
    config.model_overrides = ml_collections.ConfigDict()
    # Computation dtype: "float32" or "bfloat16" (parameters stay float32).
    config.dtype = "float32"

    # Data.
    config.dataset = "digits"  # "digits" | "mnist" | "cifar10" | "imagenet"
    config.data_dir = ""  # Local path for cifar10 / imagenet.
    config.image_size = 16
    # Fraction of the training data held out (stratified, fixed) as the validation
    # split: evaluation during training and the learning-rate selection use it; the
    # test split is evaluated once, at the end, for the chosen setting.
    config.validation_fraction = 0.2
    # Train augmentation: zero padding before a random crop back to image_size, i.e. a
    # random shift of up to this many pixels (digits, mnist, cifar10).
    config.crop_padding = 1
    config.crop_pct = 0.875  # imagenet: eval centre-crop fraction.
    config.min_scale = 0.08  # imagenet: RandomResizedCrop smallest area fraction.
    config.worker_count = 0  # grain worker processes (0: load in the main process).
    config.worker_buffer_size = 2
    config.read_threads = 2
    # Folder datasets: open every image file before training and name all that fail.
    config.check_images = True
    # Resume although the training data changed since the checkpoint (e.g. a bad file
    # was deleted): a new sampler continues from the saved step; no longer bit-exact.
    config.allow_data_change = False

    # Optimisation. learning_rate is the peak rate for the global batch_size.
    config.batch_size = 64  # Global batch, over all devices and hosts.
    config.eval_batch_size = 200
    config.num_epochs = 15
    config.num_train_steps = -1  # > 0 overrides num_epochs.
    config.learning_rate = 0.4
    # Several learning rates: each model is trained at each, for every seed; the one
    # with the best mean validation top-1 is chosen (per model) and only it is
    # evaluated on the test split. () trains at learning_rate only.
    config.sweep_learning_rates = ()
    config.warmup_epochs = 1.0
    config.momentum = 0.9
    config.nesterov = True
    config.weight_decay = 5e-4  # Not applied to 1-D parameters.
    config.label_smoothing = 0.1
    # One run per seed (initialisation, data order, augmentation); results.json and
    # the table report each seed and the mean and standard deviation over them.
    config.seeds = (0,)

    # Devices: 0 = every device (data parallel); distributed = multi-host start-up.
    config.num_devices = 0
    config.distributed = False

    # Logging, evaluation and checkpoints.
    config.log_every_steps = 10
    config.eval_every_epochs = 1
    config.checkpoint_every_steps = 0  # 0 = once per epoch.
    config.keep_checkpoints = 2
    config.async_checkpoints = False
    config.progress_bar = True
    config.stop_after_steps = 0  # > 0: stop after this many steps in this process (pre-emption).
    config.overwrite = False  # Retrain a finished run in the same workdir.
    return config
