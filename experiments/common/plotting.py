"""Training-curve plots from `metrics.jsonl` logs (matplotlib, Agg backend, no display)."""

from __future__ import annotations

import os
from typing import Mapping, Sequence, Union

import numpy as np

from experiments.common.metrics import read_metrics

Records = Sequence[Mapping[str, object]]
Source = Union[str, Records]


def _is_records(source: object) -> bool:
    return not isinstance(source, str) and len(source) > 0 and isinstance(source[0], Mapping)


def _sources(value: Union[Source, Sequence[Source]]) -> list[Source]:
    """One run (a directory or its records) or several (e.g. seeds) -> a list of runs."""
    if isinstance(value, str) or _is_records(value):
        return [value]
    return list(value)


def _points(records: Records, split: str, metric: str, x_key: str) -> dict[float, float]:
    return {
        r.get(x_key, r["step"]): r[metric]
        for r in records
        if r.get("split") == split and isinstance(r.get(metric), (int, float))
    }


def mean_band(curves: Sequence[Mapping[float, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(x, mean, std)` over the x values that every curve has; std has ddof=1 (0 for one curve)."""
    if not curves:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    common = sorted(set.intersection(*(set(c) for c in curves)))
    values = np.array([[c[x] for x in common] for c in curves], np.float64).reshape(len(curves), -1)
    std = values.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(common))
    return np.asarray(common, np.float64), values.mean(0), std


def plot_training_curves(
    runs: Mapping[str, Union[Source, Sequence[Source]]],
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
    """Draws one panel per `(split, metric, label)`, with one line per name, and saves a PNG.

    A name mapped to several runs (e.g. one per seed) is drawn as their mean, with a
    band of +-1 standard deviation (ddof=1) over the x values that all runs have.

    Args:
        runs: Name -> one run, or a list of runs; a run is a run directory (holding
            `metrics.jsonl`) or a list of metric records as written by
            `MetricsWriter`.
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
    for name, value in runs.items():
        records = [read_metrics(s) if isinstance(s, str) else list(s) for s in _sources(value)]
        label = name if len(records) == 1 else f"{name} ({len(records)} runs)"
        for ax, (split, metric, _) in zip(axes[0], panels):
            xs, mean, std = mean_band([_points(r, split, metric, x_key) for r in records])
            if not len(xs):
                continue
            (line,) = ax.plot(xs, mean, marker="." if len(xs) < 60 else None, label=label)
            if len(records) > 1:
                ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.25,
                                linewidth=0)
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
