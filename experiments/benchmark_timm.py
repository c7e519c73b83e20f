"""Training throughput of timm's ResNet-50 in PyTorch: the peer a user would pick instead of DDF-ResNet-50.

Usage:
    python -m experiments.benchmark_timm                      # batch 128, 224 px, on the GPU if there is one
    python -m experiments.benchmark_timm --json timm.json

The same train step as `experiments.benchmark_model` (SGD with momentum 0.9,
softmax cross-entropy, BatchNorm in training mode) on device-resident random
images and labels, in channels_last memory format under bfloat16 autocast,
with `torch.backends.cudnn.benchmark` on. After three warm-up steps, each run
times `--steps` steps with CUDA events (the host clock on a CPU) and the
step time is the median over `--runs` runs. Run it in its own process, after
any JAX process on the same GPU has exited.

Without torch or timm it reports them as unavailable and exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time


def measure_train(model, batch: int, size: int, steps: int, runs: int, device: str = "cuda", num_classes: int = 1000) -> float:
    """Median seconds per SGD train step of a torch `model` on random (batch, 3, size, size) images.

    Args:
        model: a `torch.nn.Module` classifier with `num_classes` outputs.
        batch, size: images per step and their height = width.
        steps: steps per timed run.
        runs: timed runs; the median is returned.
        device: "cuda" or "cpu".
        num_classes: the model's number of outputs (labels are drawn below it).
    """
    import torch
    import torch.nn.functional as F

    torch.backends.cudnn.benchmark = True
    model = model.to(device=device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(batch, 3, size, size, device=device, generator=generator).to(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch,), device=device, generator=generator)

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(3):
        step()
    times = []
    for _ in range(runs):
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / steps)
        else:
            begin = time.perf_counter()
            for _ in range(steps):
                loss = step()
            float(loss.detach())
            times.append((time.perf_counter() - begin) / steps)
    return statistics.median(times)


def main(argv=None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="a timm model name")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the result to this file")
    args = parser.parse_args(argv)

    row = {"model": f"timm {args.model}", "framework": "torch", "batch": args.batch, "size": args.size,
           "dtype": "bfloat16 autocast", "memory_format": "channels_last"}
    try:
        torch = importlib.import_module("torch")
        timm = importlib.import_module("timm")
    except ImportError as error:
        row.update(status="unavailable", error=f"{type(error).__name__}: {error}")
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        row.update(torch=torch.__version__, timm=timm.__version__, device=device,
                   device_name=torch.cuda.get_device_name() if device == "cuda" else "cpu")
        try:
            model = timm.create_model(args.model, pretrained=False, num_classes=1000)
            seconds = measure_train(model, args.batch, args.size, args.steps, args.runs, device)
            row.update(status="ok", train_s=seconds, train_img_s=args.batch / seconds)
        except Exception as error:  # report it; the caller goes on
            row.update(status="error", error=f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f)
    return 1 if row["status"] == "error" else 0


if __name__ == "__main__":
    sys.exit(main())
