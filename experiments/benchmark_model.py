"""Training (and inference) throughput of DDF-ResNets against their conv twins, in one run.

Usage (the defaults: ddf_mul_resnet50 against resnet50, batch 128, 224 px, bfloat16):
    python -m experiments.benchmark_model
    python -m experiments.benchmark_model --implementation xla,pallas_triton --modes train
    python -m experiments.benchmark_model --models ddf_mul_resnet20_cifar,resnet20_cifar \
        --batch 32 --size 32 --steps 5 --dtype float32      # a quick CPU run

Each model runs one jitted SGD train step (forward, backward, optimizer
update, BatchNorm statistics) over `nnx.split` state, donated to the next
step, on device-resident random images and labels, so the input pipeline is
not measured. Inference is one jitted eval-mode forward. DDF models (names
starting with "ddf_") are measured once per `--implementation`.

Timing: after two warm-up steps, each run dispatches `--steps` steps with no
host synchronisation between them and blocks once at the end (each step
depends on the previous one through the state); the step time is the median
over `--runs` runs divided by the steps. Reported: step time, images/s, and
the ratio of images/s to the baseline model (`--baseline`, by default the
first model that is not a DDF model), all measured in the same run.

`--json` appends one JSON line per measurement as it is made; `--budget-seconds`
starts no model that the previous one's duration says would not finish.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import ddf_jax
from ddf_jax import models


def median_step_seconds(step, steps: int, runs: int) -> float:
    """Median seconds per call of `step()`, dispatching `steps` calls per run and blocking once."""
    jax.block_until_ready(step())  # compile + warm-up
    jax.block_until_ready(step())
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(steps - 1):
            step()
        jax.block_until_ready(step())
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def measure(name, batch, size, dtype, steps, runs, implementation=None, modes=("train", "infer"),
            model_overrides=None) -> dict:
    """Seconds per train step and per inference forward of one registered model.

    Args:
        name: a registered model (`ddf_jax.models.list_models()`).
        batch, size: images per step and their height = width.
        dtype: the models' computation dtype.
        steps, runs: see `median_step_seconds`.
        implementation: the DDF implementation, for DDF models.
        modes: which of "train" and "infer" to measure.
        model_overrides: more keyword arguments of `models.create_model`, e.g.
            {"layers": (1,), "widths": (8,)} for a smaller variant.

    Returns:
        {"model", "implementation", "params", "train_s", "train_img_s", "infer_s", "infer_img_s"}
        (the entries of modes not measured are None).
    """
    overrides = {**(model_overrides or {}), "dtype": dtype}
    if name.startswith("ddf_"):
        overrides["implementation"] = implementation
    model = models.create_model(name, num_classes=1000, rngs=nnx.Rngs(0), **overrides)
    result = {
        "model": name,
        "implementation": (implementation or ddf_jax.default_implementation()) if name.startswith("ddf_") else None,
        "params": ddf_jax.count_params(model),
        "train_s": None, "train_img_s": None, "infer_s": None, "infer_img_s": None,
    }
    images = jax.random.normal(jax.random.key(1), (batch, size, size, 3), dtype)
    labels = jax.random.randint(jax.random.key(2), (batch,), 0, 1000)

    if "train" in modes:
        optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
        graphdef, state = nnx.split((model, optimizer))

        def train_step(state, images, labels):
            model, optimizer = nnx.merge(graphdef, state)
            model.train()

            def loss_fn(model):
                logits = model(images).astype(jnp.float32)
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            return nnx.state((model, optimizer)), loss

        train_step = jax.jit(train_step, donate_argnums=0)
        box = {"state": state}

        def one_train_step():
            box["state"], loss = train_step(box["state"], images, labels)
            return loss

        result["train_s"] = median_step_seconds(one_train_step, steps, runs)
        result["train_img_s"] = batch / result["train_s"]
        model, _ = nnx.merge(graphdef, box["state"])

    if "infer" in modes:
        model.eval()
        eval_graphdef, eval_state = nnx.split(model)

        @jax.jit
        def infer(state, images):
            return nnx.merge(eval_graphdef, state)(images)

        result["infer_s"] = median_step_seconds(lambda: infer(eval_state, images), steps, runs)
        result["infer_img_s"] = batch / result["infer_s"]
    return result


def json_object(text: str) -> dict:
    """Parses a JSON object given on the command line (an argparse type)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _ratio(value, base):
    return f"{value / base:.2f}x" if value and base else "-"


def table(rows: list[dict], baseline: str) -> str:
    """Markdown table; ratios are images/s over the baseline model's."""
    base = next((r for r in rows if r["model"] == baseline and r.get("train_s") is not None), None)
    base = base or next((r for r in rows if r["model"] == baseline), {})
    lines = [
        f"| model | implementation | params | train ms/step | train img/s | vs {baseline} "
        f"| infer ms | infer img/s | vs {baseline} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r.get('implementation') or '-'} | - | {r['status']}: {r['error']} | | | | | |")
            continue
        ms = lambda s: f"{s * 1e3:.1f}" if s else "-"  # noqa: E731
        ips = lambda v: (f"{v:.0f}" if v >= 100 else f"{v:.3g}") if v else "-"  # noqa: E731
        lines.append(
            f"| {r['model']} | {r.get('implementation') or '-'} | {r['params']:,} | {ms(r['train_s'])} "
            f"| {ips(r['train_img_s'])} | {_ratio(r['train_img_s'], base.get('train_img_s'))} | {ms(r['infer_s'])} "
            f"| {ips(r['infer_img_s'])} | {_ratio(r['infer_img_s'], base.get('infer_img_s'))} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    """Command-line entry point; returns the exit code (1 if a measurement failed)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,ddf_mul_resnet50")
    parser.add_argument("--implementation", default=None,
                        help="comma-separated DDF implementations for the DDF models (default: the default one)")
    parser.add_argument("--baseline", default=None, help="the model the ratios are to (default: the first non-DDF one)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed run")
    parser.add_argument("--runs", type=int, default=3, help="timed runs (the median is reported)")
    parser.add_argument("--modes", default="train,infer", help="comma-separated: train, infer")
    parser.add_argument("--model-overrides", type=json_object, default=None, metavar="JSON",
                        help='more arguments of every model\'s constructor, e.g. \'{"layers": [1], "widths": [8]}\'')
    parser.add_argument("--budget-seconds", type=float, default=None, help="start no model after this long")
    parser.add_argument("--json", default=None, help="append one JSON line per measurement to this file")
    parser.add_argument("--markdown", default=None, help="also append the table to this file")
    args = parser.parse_args(argv)

    names = args.models.split(",")
    unknown = [n for n in names if not models.is_model(n)]
    if unknown:
        parser.error(f"--models must name registered models (python -m ddf_jax.models --list), got {unknown}")
    implementations = args.implementation.split(",") if args.implementation else [None]
    bad = [i for i in implementations if i is not None and i not in ddf_jax.IMPLEMENTATIONS]
    if bad:
        parser.error(f"--implementation must name only {ddf_jax.IMPLEMENTATIONS}, got {bad}")
    modes = tuple(args.modes.split(","))
    if not modes or any(m not in ("train", "infer") for m in modes):
        parser.error(f"--modes must be a comma-separated subset of train,infer, got {args.modes!r}")
    baseline = args.baseline or next((n for n in names if not n.startswith("ddf_")), names[0])
    start = time.monotonic()
    deadline = start + args.budget_seconds if args.budget_seconds else None

    device = jax.devices()[0]
    runs = [(n, i) for n in names for i in (implementations if n.startswith("ddf_") else [None])]
    rows, failed, last = [], False, 0.0
    for name, implementation in runs:
        label = f"{name} ({implementation})" if implementation else name
        now = time.monotonic()
        if deadline is not None and now + last > deadline:
            print(f"stop: the time budget ({args.budget_seconds:.0f} s) leaves no room for {label}", file=sys.stderr)
            break
        print(f"measuring {label} ...", file=sys.stderr, flush=True)
        try:
            row = measure(name, args.batch, args.size, jnp.dtype(args.dtype), args.steps, args.runs, implementation, modes,
                          args.model_overrides)
            row["status"] = "ok"
        except ddf_jax.ImplementationUnavailable as error:
            row = {"model": name, "implementation": implementation, "status": "unavailable",
                   "error": str(error).splitlines()[0]}
        except Exception as error:  # report it and go on with the next model
            traceback.print_exc()
            row = {"model": name, "implementation": implementation, "status": "error",
                   "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
            failed = True
        last = time.monotonic() - now
        row.update(seconds_to_measure=last, batch=args.batch, size=args.size, dtype=args.dtype, device=device.device_kind)
        rows.append(row)
        print(f"  {label}: {row.get('train_img_s') or 0:.1f} train img/s ({last:.0f} s)", file=sys.stderr, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    title = (
        f"Model throughput, batch {args.batch}, {args.size}x{args.size}, {args.dtype}, "
        f"{device.device_kind}, jax {jax.__version__}, {datetime.date.today().isoformat()}"
    )
    text = table(rows, baseline)
    print(f"\n{title}\n\n{text}")
    if args.markdown:
        with open(args.markdown, "a") as f:
            command = " ".join(argv if argv is not None else sys.argv[1:])
            f.write(f"### {title}\n\n`python -m experiments.benchmark_model {command}`\n\n{text}\n\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
