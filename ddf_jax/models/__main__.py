"""Command line: list the registered models, or print a model's parameters and MACs.

    python -m ddf_jax.models --list
    python -m ddf_jax.models ddf_mul_resnet50 --image-size 224

Models are built abstractly (`nnx.eval_shape`), so nothing is allocated and
even the largest variant takes seconds.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from flax import nnx

from ddf_jax.flops import count_macs
from ddf_jax.models.registry import create_model, list_models
from ddf_jax.utils import count_params


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ddf_jax.models", description="ddf-jax model zoo: list models, or count a model's cost."
    )
    parser.add_argument("name", nargs="?", help="a registered model name (see --list)")
    parser.add_argument("--list", action="store_true", help="print the registered model names and exit")
    parser.add_argument("--image-size", type=int, default=224, help="square input size in pixels (default 224)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default 1000)")
    parser.add_argument("--in-chans", type=int, default=3, help="input channels (default 3)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(list_models()))
        return 0
    if args.name is None:
        parser.error("give a model name, or --list")
    if args.name not in list_models():
        parser.error(f"unknown model {args.name!r}; see --list")
    if args.image_size < 1:
        parser.error(f"--image-size must be >= 1, got {args.image_size}")
    model = nnx.eval_shape(
        lambda: create_model(args.name, num_classes=args.num_classes, in_chans=args.in_chans, rngs=nnx.Rngs(0))
    )
    params = count_params(model)
    macs = count_macs(model, (1, args.image_size, args.image_size, args.in_chans))
    print(f"model:  {args.name}")
    print(f"input:  1 x {args.image_size} x {args.image_size} x {args.in_chans} (NHWC)")
    print(f"params: {params:,} ({params / 1e6:.2f} M)")
    print(f"MACs:   {macs:,} ({macs / 1e9:.3f} G)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
