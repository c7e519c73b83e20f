"""ResNet v1.5 and DDF-ResNet as Flax NNX modules (NHWC).

The architecture is the timm/torchvision ResNet v1.5 (stride on the 3x3 conv
of a bottleneck). The DDF variants replace every bottleneck's 3x3 `conv2`
with `ddf_jax.nn.DDF(width, kernel_size=3, stride=stride)` (one head,
se_ratio 0.2, combine "mul" or "add"), as in the official DDF-ResNets.

Attribute names follow the official PyTorch module names (`conv1`, `bn1`,
`layer1[0].conv2.spatial_branch.conv`, `layer1[0].downsample.conv`, `fc`, ...),
so `ddf_jax.models.load_official_checkpoint` can map a PyTorch state dict
onto the model one key at a time.

Initialisation follows timm: every conv kernel, including the DDF branch 1x1
convs and the channel branch's dense layers (1x1 convs in PyTorch), is Kaiming
normal (fan_out, ReLU gain); BatchNorm starts at scale 1, bias 0, and the last
BatchNorm of each residual block at scale 0; the classifier uses PyTorch's
`nn.Linear` default (uniform in +-1/sqrt(fan_in)).

Registered variants (see `ddf_jax.models.list_models()`):

- `resnet{18,26,34,50,101,152}`: the conv baselines.
- `ddf_mul_resnet{26,50,101,152}`, `ddf_add_resnet{26,50,101,152}`.
- `resnet20_cifar`, `ddf_mul_resnet20_cifar`, `ddf_add_resnet20_cifar`: a small
  bottleneck ResNet for 16x16 to 32x32 inputs: a 3x3 stride-1 stem (no max
  pool), three stages of two bottleneck blocks with widths 16/32/64 (outputs
  64/128/256 channels), strides 1/2/2. 20 weight layers: stem, 18 block convs,
  classifier.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ddf_jax._checks import check_int
from ddf_jax.models.blocks import CONV2_KINDS, BasicBlock, BatchNormFactory, Bottleneck, conv_layer
from ddf_jax.models.registry import register_model
from ddf_jax.ops import Implementation

BLOCKS = ("basic", "bottleneck")
STEMS = ("imagenet", "cifar")


def _torch_linear_kernel_init():
    """PyTorch's nn.Linear weight default: uniform in +-1/sqrt(fan_in)."""
    return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_linear_bias_init(fan_in: int):
    """PyTorch's nn.Linear bias default: uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class ResNet(nnx.Module):
    """ResNet v1.5 / DDF-ResNet classifier over NHWC images.

    Stem ("imagenet"): 7x7 conv stride 2 -> BN -> ReLU -> 3x3 max pool stride 2
    (total stride 4). Stem ("cifar"): 3x3 conv stride 1 -> BN -> ReLU (stride 1).
    Then one stage per entry of `layers` (stage i has `layers[i]` blocks of
    `widths[i]` planes; the first stage has stride 1, the others stride 2),
    global average pooling and a dense classifier.

    Stages are the attributes `layer1`, `layer2`, ... (`nnx.List`s of blocks).
    Call `model.train()` / `model.eval()` to switch BatchNorm between batch
    statistics (updating the running averages) and the running averages.

    Args:
        block: "basic" (two 3x3 convs, expansion 1) or "bottleneck" (expansion 4).
        layers: blocks per stage, e.g. (3, 4, 6, 3).
        num_classes: classifier outputs (>= 1).
        in_chans: input channels C.
        widths: planes per stage (same length as `layers`).
        stem: "imagenet" or "cifar" (see above).
        stem_width: output channels of the stem conv.
        conv2: the bottleneck's 3x3 conv: "conv", "ddf_mul" or "ddf_add". DDF
            needs `block="bottleneck"`.
        se_ratio: DDF channel-branch squeeze ratio (hidden = int(se_ratio * C)).
        implementation: passed to every DDF layer: a name, None (the platform
            default) or an op; see `ddf_jax.ddf`.
        zero_init_last: zero-initialise the last BatchNorm scale of each block.
        bn_momentum: running-average decay (0.9 = PyTorch's momentum 0.1).
        bn_epsilon: BatchNorm epsilon (PyTorch's 1e-5).
        dtype: computation dtype (None: inferred from inputs and params, i.e.
            float32 by default); e.g. jnp.bfloat16 for mixed precision.
        param_dtype: parameter dtype.
        rngs: `nnx.Rngs` for initialisation.

    Raises:
        ValueError / TypeError: an argument is out of range or of the wrong type.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from ddf_jax.models import ResNet
        >>> model = ResNet("bottleneck", (1, 1), widths=(4, 8), stem="cifar", stem_width=8,
        ...                num_classes=5, rngs=nnx.Rngs(0))
        >>> model.eval()
        >>> model(jnp.ones((2, 16, 16, 3))).shape
        (2, 5)
        >>> {k: v.shape for k, v in model.forward_features(jnp.ones((2, 16, 16, 3))).items()}
        {'stem': (2, 16, 16, 8), 'stage1': (2, 16, 16, 16), 'stage2': (2, 8, 8, 32)}
    """

    def __init__(
        self,
        block: str,
        layers: Sequence[int],
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
        stem: str = "imagenet",
        stem_width: int = 64,
        conv2: str = "conv",
        se_ratio: float = 0.2,
        implementation: Implementation = None,
        zero_init_last: bool = True,
        bn_momentum: float = 0.9,
        bn_epsilon: float = 1e-5,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if conv2 not in CONV2_KINDS:
            raise ValueError(f"conv2 must be one of {CONV2_KINDS}, got {conv2!r}")
        if conv2 != "conv" and block != "bottleneck":
            raise ValueError(f"conv2={conv2!r} (DDF) needs block='bottleneck', got block={block!r}")
        layers = tuple(check_int(n, "layers[i]") for n in layers)
        widths = tuple(check_int(w, "widths[i]") for w in widths)
        if not layers or len(layers) != len(widths):
            raise ValueError(
                f"layers and widths must be non-empty and of equal length, got layers={layers}, widths={widths}"
            )
        num_classes = check_int(num_classes, "num_classes")
        in_chans = check_int(in_chans, "in_chans")
        stem_width = check_int(stem_width, "stem_width")

        self.block = block
        self.layers = layers
        self.widths = widths
        self.stem = stem
        self.conv2_kind = conv2
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.dtype = dtype

        norm = BatchNormFactory(bn_momentum, bn_epsilon, dtype, param_dtype)
        stem_kernel, stem_stride = (7, 2) if stem == "imagenet" else (3, 1)
        self.conv1 = conv_layer(
            in_chans, stem_width, stem_kernel, stem_stride, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.bn1 = norm(stem_width, rngs=rngs)

        block_cls = Bottleneck if block == "bottleneck" else BasicBlock
        extra = {}
        if block == "bottleneck":
            extra = {"conv2": conv2, "se_ratio": se_ratio, "implementation": implementation}
        in_features = stem_width
        for i, (depth, planes) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(
                    block_cls(
                        in_features,
                        planes,
                        stride,
                        norm=norm,
                        zero_init_last=zero_init_last,
                        dtype=dtype,
                        param_dtype=param_dtype,
                        rngs=rngs,
                        **extra,
                    )
                )
                in_features = planes * block_cls.expansion
            setattr(self, f"layer{i + 1}", nnx.List(blocks))
        self.num_features = in_features
        self.fc = nnx.Linear(
            in_features,
            num_classes,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=_torch_linear_kernel_init(),
            bias_init=_torch_linear_bias_init(in_features),
            rngs=rngs,
        )

    @property
    def stages(self) -> list[nnx.List]:
        """The stages `[layer1, layer2, ...]`, each an `nnx.List` of blocks."""
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.layers))]

    def _check_input(self, x) -> None:
        if jnp.ndim(x) != 4 or jnp.shape(x)[-1] != self.in_chans:
            raise ValueError(
                f"x must be 4-D (N, H, W, C) with C = in_chans = {self.in_chans}, got shape {jnp.shape(x)}"
            )

    def forward_features(self, x: jax.Array) -> dict[str, jax.Array]:
        """Runs the stem and the stages and returns every stage's output.

        Args:
            x: images, (N, H, W, in_chans), any floating dtype.

        Returns:
            A dict with "stem" (N, H/r, W/r, stem_width), r = 4 for the
            "imagenet" stem and 1 for "cifar", then "stage1", "stage2", ...
            (stage i has stride r * 2**(i-1) and `widths[i-1] * expansion`
            channels). Sizes round up (ceil) at each stride-2 step.
        """
        self._check_input(x)
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        if self.stem == "imagenet":
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        features = {"stem": x}
        for i, stage in enumerate(self.stages):
            for block in stage:
                x = block(x)
            features[f"stage{i + 1}"] = x
        return features

    def forward_head(self, x: jax.Array) -> jax.Array:
        """Global average pool and classifier: (N, H, W, num_features) -> (N, num_classes)."""
        pooled = jnp.mean(x, axis=(1, 2), dtype=jnp.promote_types(x.dtype, jnp.float32)).astype(x.dtype)
        return self.fc(pooled)

    def __call__(self, x: jax.Array, *, return_features: bool = False):
        """Classifies a batch of images.

        Args:
            x: images, (N, H, W, in_chans).
            return_features: also return `forward_features(x)`'s dict.

        Returns:
            logits (N, num_classes) in the computation dtype, or
            `(logits, features)` when `return_features` is true.
        """
        features = self.forward_features(x)
        logits = self.forward_head(features[f"stage{len(self.layers)}"])
        return (logits, features) if return_features else logits


# ----------------------------------------------------------------------------
# Registered variants. Keyword arguments (num_classes, rngs, in_chans, dtype,
# param_dtype, implementation, ...) go to `ResNet`; they may override the
# variant's presets.

_IMAGENET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    26: ("bottleneck", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
_CIFAR = {"block": "bottleneck", "layers": (2, 2, 2), "widths": (16, 32, 64), "stem": "cifar", "stem_width": 16}


def _resnet(depth: int, conv2: str = "conv", **kwargs) -> ResNet:
    block, layers = _IMAGENET_DEPTHS[depth]
    return ResNet(**{"block": block, "layers": layers, "conv2": conv2, **kwargs})


def _cifar(conv2: str, **kwargs) -> ResNet:
    return ResNet(**{**_CIFAR, "conv2": conv2, **kwargs})


@register_model
def resnet18(**kwargs) -> ResNet:
    """ResNet-18 (basic blocks 2-2-2-2)."""
    return _resnet(18, **kwargs)


@register_model
def resnet26(**kwargs) -> ResNet:
    """ResNet-26 (bottlenecks 2-2-2-2)."""
    return _resnet(26, **kwargs)


@register_model
def resnet34(**kwargs) -> ResNet:
    """ResNet-34 (basic blocks 3-4-6-3)."""
    return _resnet(34, **kwargs)


@register_model
def resnet50(**kwargs) -> ResNet:
    """ResNet-50 (bottlenecks 3-4-6-3); 25,557,032 params at 1000 classes."""
    return _resnet(50, **kwargs)


@register_model
def resnet101(**kwargs) -> ResNet:
    """ResNet-101 (bottlenecks 3-4-23-3); 44,549,160 params at 1000 classes."""
    return _resnet(101, **kwargs)


@register_model
def resnet152(**kwargs) -> ResNet:
    """ResNet-152 (bottlenecks 3-8-36-3); 60,192,808 params at 1000 classes."""
    return _resnet(152, **kwargs)


@register_model
def ddf_mul_resnet26(**kwargs) -> ResNet:
    """DDF-ResNet-26, combine "mul"."""
    return _resnet(26, "ddf_mul", **kwargs)


@register_model
def ddf_mul_resnet50(**kwargs) -> ResNet:
    """DDF-ResNet-50, combine "mul"; 16,843,748 params at 1000 classes."""
    return _resnet(50, "ddf_mul", **kwargs)


@register_model
def ddf_mul_resnet101(**kwargs) -> ResNet:
    """DDF-ResNet-101, combine "mul"; 28,146,912 params at 1000 classes."""
    return _resnet(101, "ddf_mul", **kwargs)


@register_model
def ddf_mul_resnet152(**kwargs) -> ResNet:
    """DDF-ResNet-152, combine "mul"; 37,462,900 params at 1000 classes."""
    return _resnet(152, "ddf_mul", **kwargs)


@register_model
def ddf_add_resnet26(**kwargs) -> ResNet:
    """DDF-ResNet-26, combine "add"."""
    return _resnet(26, "ddf_add", **kwargs)


@register_model
def ddf_add_resnet50(**kwargs) -> ResNet:
    """DDF-ResNet-50, combine "add"; 16,843,748 params at 1000 classes."""
    return _resnet(50, "ddf_add", **kwargs)


@register_model
def ddf_add_resnet101(**kwargs) -> ResNet:
    """DDF-ResNet-101, combine "add"; 28,146,912 params at 1000 classes."""
    return _resnet(101, "ddf_add", **kwargs)


@register_model
def ddf_add_resnet152(**kwargs) -> ResNet:
    """DDF-ResNet-152, combine "add"; 37,462,900 params at 1000 classes."""
    return _resnet(152, "ddf_add", **kwargs)


@register_model
def resnet20_cifar(**kwargs) -> ResNet:
    """Small bottleneck ResNet for 16-32 px inputs (3x3 stem, widths 16/32/64, 2 blocks per stage)."""
    return _cifar("conv", **kwargs)


@register_model
def ddf_mul_resnet20_cifar(**kwargs) -> ResNet:
    """`resnet20_cifar` with DDF ("mul") as every bottleneck's 3x3 conv."""
    return _cifar("ddf_mul", **kwargs)


@register_model
def ddf_add_resnet20_cifar(**kwargs) -> ResNet:
    """`resnet20_cifar` with DDF ("add") as every bottleneck's 3x3 conv."""
    return _cifar("ddf_add", **kwargs)
