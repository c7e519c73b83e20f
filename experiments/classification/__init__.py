"""Image classification with DDF-ResNets and their conv twins (digits, MNIST, CIFAR-10, ImageNet).

Run `python -m experiments.classification --workdir DIR`; see README.md and
configs/default.py.
"""
