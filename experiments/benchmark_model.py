"""Training and inference throughput of DDF-ResNets against their conv twins.

Usage (on a GPU; the defaults measure ddf_mul_resnet50 against resnet50 at batch 128, 224 px, bf16):
    python -m experiments.benchmark_model
    python -m experiments.benchmark_model --models ddf_mul_resnet50,resnet50 --batch 128 --size 224
    python -m experiments.benchmark_model --models ddf_mul_resnet20_cifar,resnet20_cifar \
        --batch 32 --size 32 --steps 5      # a quick CPU run

Each model runs one jitted SGD train step (forward, backward, optimizer
update, BatchNorm statistics) over `nnx.split` state, on device-resident
random images and labels, so the input pipeline is not measured. Inference
is one jitted eval-mode forward. Reported: median step time over `--steps`
timed steps after warm-up, and images/s, with the ratio to the first model.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import ddf_jax
from ddf_jax import models


def _median_seconds(fn, steps: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, batch: int, size: int, dtype, steps: int, implementation=None) -> dict:
    """Returns train and inference seconds per step for one registered model."""
    overrides = {"dtype": dtype}
    if name.startswith("ddf_"):
        overrides["implementation"] = implementation
    model = models.create_model(name, num_classes=1000, rngs=nnx.Rngs(0), **overrides)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    images = jax.random.normal(jax.random.key(1), (batch, size, size, 3), dtype)
    labels = jax.random.randint(jax.random.key(2), (batch,), 0, 1000)

    @jax.jit
    def train_step(state, images, labels):
        model, optimizer = nnx.merge(graphdef, state)
        model.train()

        def loss_fn(model):
            logits = model(images).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    box = {"state": state}

    def one_train_step():
        box["state"], loss = train_step(box["state"], images, labels)
        return loss

    train_seconds = _median_seconds(one_train_step, steps)

    model, _ = nnx.merge(graphdef, box["state"])
    model.eval()
    eval_graphdef, eval_state = nnx.split(model)

    @jax.jit
    def infer(state, images):
        return nnx.merge(eval_graphdef, state)(images)

    infer_seconds = _median_seconds(lambda: infer(eval_state, images), steps)
    return {
        "model": name,
        "params": ddf_jax.count_params(model),
        "train_s": train_seconds,
        "train_img_s": batch / train_seconds,
        "infer_s": infer_seconds,
        "infer_img_s": batch / infer_seconds,
    }


def main(argv=None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ddf_mul_resnet50,resnet50")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--implementation", default=None, help="DDF implementation for the DDF models")
    parser.add_argument("--markdown", default=None, help="also append the table to this file")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    rows = []
    for name in args.models.split(","):
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        rows.append(measure(name, args.batch, args.size, jnp.dtype(args.dtype), args.steps, args.implementation))
    base = rows[0]
    lines = [
        "| model | params | train ms/step | train img/s | vs first | infer ms | infer img/s | vs first |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['train_s'] * 1e3:.1f} | {r['train_img_s']:.0f} | "
            f"{r['train_img_s'] / base['train_img_s']:.2f}x | {r['infer_s'] * 1e3:.1f} | {r['infer_img_s']:.0f} | "
            f"{r['infer_img_s'] / base['infer_img_s']:.2f}x |"
        )
    title = (
        f"Model throughput, batch {args.batch}, {args.size}x{args.size}, {args.dtype}, "
        f"DDF implementation {args.implementation or ddf_jax.default_implementation()}, "
        f"{device.device_kind}, jax {jax.__version__}, {datetime.date.today().isoformat()}"
    )
    table = "\n".join(lines)
    print(f"\n{title}\n\n{table}")
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(f"### {title}\n\n`python -m experiments.benchmark_model {' '.join(argv or sys.argv[1:])}`\n\n")
            f.write(table + "\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
