"""Training-curve plots from `metrics.jsonl` logs (matplotlib, Agg backend, no display)."""

from __future__ import annotations

import os
from typing import Mapping, Sequence, Union

from experiments.common.metrics import read_metrics

Records = Sequence[Mapping[str, object]]


def plot_training_curves(
    runs: Mapping[str, Union[str, Records]],
    path: str,
    *,
    panels: Sequence[tuple[str, str, str]] = (
        ("train", "loss", "train loss"),
        ("eval", "loss", "eval loss"),
        ("eval", "top1", "eval top-1"),
    ),
    x_key: str = "epoch",
    title: str = "",
) -> str:
    """Draws one panel per `(split, metric, label)`, with one line per run, and saves a PNG.

    Args:
        runs: Run name -> run directory (holding `metrics.jsonl`) or a list of
            metric records as written by `MetricsWriter`.
        path: Output file (PNG); parent directories are created.
        panels: `(split, metric, y-label)` for each panel.
        x_key: Record field for the x axis ("epoch" or "step"); records without it
            fall back to "step".
        title: Figure title.

    Returns:
        `path`.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for name, source in runs.items():
        records = read_metrics(source) if isinstance(source, str) else list(source)
        for ax, (split, metric, _) in zip(axes[0], panels):
            points = [
                (r.get(x_key, r["step"]), r[metric])
                for r in records
                if r.get("split") == split and isinstance(r.get(metric), (int, float))
            ]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="." if len(xs) < 60 else None, label=name)
    for ax, (_, _, label) in zip(axes[0], panels):
        ax.set_xlabel(x_key)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
