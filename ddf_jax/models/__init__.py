"""Model zoo: ResNets and DDF-ResNets (Flax NNX, NHWC), a timm-style registry and official checkpoint import.

Public names:
    create_model, list_models, is_model, register_model: the registry.
    ResNet, BasicBlock, Bottleneck, Downsample: the modules.
    load_official_checkpoint: import an official PyTorch/timm state dict.
    official_state_dict: export a model in the official key layout.

Example:
    >>> from flax import nnx
    >>> import ddf_jax
    >>> from ddf_jax import models
    >>> "ddf_mul_resnet50" in models.list_models("ddf_*")
    True
    >>> model = nnx.eval_shape(lambda: models.create_model("ddf_mul_resnet50", rngs=nnx.Rngs(0)))
    >>> ddf_jax.count_params(model)
    16843748
"""

from ddf_jax.models.checkpoint import load_official_checkpoint, official_state_dict
from ddf_jax.models.registry import create_model, is_model, list_models, register_model
from ddf_jax.models.blocks import BasicBlock, Bottleneck, Downsample
from ddf_jax.models.resnet import ResNet

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "Downsample",
    "ResNet",
    "create_model",
    "is_model",
    "list_models",
    "load_official_checkpoint",
    "official_state_dict",
    "register_model",
]
