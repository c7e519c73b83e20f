"""`PointwiseConv`: a 1x1 conv computed as a product of matrices (NHWC, Flax NNX)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


def _pair(value) -> tuple:
    """An int as (value, value); a sequence as a tuple."""
    return (value, value) if isinstance(value, int) else tuple(value)


class PointwiseConv(nnx.Conv):
    """A 1x1 `nnx.Conv` without padding, computed as a (pixels, C_in) x (C_in, C_out) product.

    The constructor and the parameters are those of `nnx.Conv` (``kernel``
    (1, 1, C_in, C_out), optional ``bias``), for kernel size 1, padding
    "VALID", no dilation and one feature group; so is the result, up to
    rounding: output pixel (i, j) is input pixel (i*s, j*s) times the kernel.

    Why not `nnx.Conv`: on XLA:CPU the gradient of a 1x1 conv, and equally that
    of a product over the channels of the 4-D (N, H, W, C) array, runs its
    weight gradient through transposed copies of the activations and of the
    cotangent. Of a product of 2-D matrices it does not, and the layers train
    faster (BENCHMARKS.md).

    Example:
        >>> import jax
        >>> from flax import nnx
        >>> from ddf_jax.pointwise_conv import PointwiseConv
        >>> conv = PointwiseConv(8, 4, (1, 1), strides=2, padding="VALID", rngs=nnx.Rngs(0))
        >>> conv(jax.random.normal(jax.random.key(1), (2, 9, 7, 8))).shape
        (2, 5, 4, 4)
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        checks = {  # name: (the value as a pair, or as given; what a 1x1 VALID conv has)
            "kernel_size": (_pair(self.kernel_size), (1, 1)),
            "padding": (self.padding, "VALID"),
            "feature_group_count": (self.feature_group_count, 1),
            "input_dilation": (_pair(self.input_dilation or 1), (1, 1)),
            "kernel_dilation": (_pair(self.kernel_dilation or 1), (1, 1)),
        }
        for name, (value, expected) in checks.items():
            if value != expected:
                raise ValueError(f"PointwiseConv needs {name}={expected!r}, got {value!r}")
        strides = _pair(self.strides)
        if len(strides) != 2 or strides[0] != strides[1]:
            raise ValueError(f"PointwiseConv needs one stride for both axes, got strides={self.strides!r}")
        self.stride = int(strides[0])

    def __call__(self, inputs):
        """Applies the conv.

        Args:
            inputs: (N, H, W, C_in).

        Returns:
            (N, ceil(H / s), ceil(W / s), C_out), in the promoted dtype.
        """
        if self.stride != 1:
            inputs = inputs[:, :: self.stride, :: self.stride]
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
        n, h, w, c = inputs.shape
        out = jnp.dot(inputs.reshape(n * h * w, c), kernel[0, 0], precision=self.precision,
                      preferred_element_type=self.preferred_element_type)
        out = out.reshape(n, h, w, -1)
        return out if bias is None else out + bias
