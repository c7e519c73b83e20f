"""Selection on the validation split, aggregation over seeds, and what a command writes.

`select_learning_rates` picks, per model, the learning rate with the best mean
validation top-1 over the seeds; it is given the runs' validation metrics only (the
test split is evaluated afterwards, for the chosen runs). `build_results` assembles
`results.json`: the dataset and its split, the selection, every run, and one summary
per model with the mean and standard deviation over the seeds (`mean_std`).
`write_results` writes it, draws the curves (a band over the seeds per model) and
prints the tables.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from experiments.common import plotting

RESULTS_FILE = "results.json"
CURVES_FILE = "curves.png"
STD = "sample standard deviation over the seeds (ddof=1); null for a single seed"
RULE = ("per model, the learning rate with the highest mean validation top-1 over the seeds "
        "(ties: lower mean validation loss, then the smaller learning rate); the test split "
        "is evaluated only for the chosen learning rate, after the selection")


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """`{"mean", "std", "n", "values"}` of per-seed values; `std` has ddof=1 (None if n < 2)."""
    values = [float(v) for v in values]
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": float(np.mean(values)), "std": std, "n": len(values), "values": values}


def _group(rows: Sequence[Mapping[str, Any]], *keys: str) -> dict[tuple, list[Mapping[str, Any]]]:
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def select_learning_rates(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per model, the learning rate chosen on the validation split.

    Args:
        rows: Run rows with `"model"`, `"learning_rate"`, `"finished"` and
            `"validation"` (`{"top1", "loss", ...}`); nothing else is read.

    Returns:
        Model -> learning rate, for every model whose runs have all finished (see
        `RULE`); a model with an unfinished run is left out (nothing is chosen, and
        its test split is not evaluated).
    """
    chosen = {}
    for (model,), model_rows in _group(rows, "model").items():
        if not all(r["finished"] and r.get("validation") for r in model_rows):
            continue
        candidates = []
        for (lr,), lr_rows in _group(model_rows, "learning_rate").items():
            top1 = float(np.mean([r["validation"]["top1"] for r in lr_rows]))
            loss = float(np.mean([r["validation"]["loss"] for r in lr_rows]))
            candidates.append((-top1, loss, lr))
        chosen[model] = min(candidates)[2]
    return chosen


def _metric(rows: Sequence[Mapping[str, Any]], split: str, name: str) -> dict[str, Any]:
    return mean_std([r[split][name] for r in rows if r.get(split)])


def summarize(rows: Sequence[Mapping[str, Any]], chosen: Mapping[str, float]) -> list[dict[str, Any]]:
    """One summary per model over the seeds of its chosen learning rate.

    Returns:
        `{"model", "learning_rate", "seeds", "params", "macs", "validation_top1",
        "validation_top5", "test_top1", "test_top5", "train_seconds", "finished"}`
        per model; the metrics are `mean_std` dicts (fractions); a model without a
        chosen learning rate has `finished` False and no metrics.
    """
    summaries = []
    for (model,), model_rows in _group(rows, "model").items():
        if model not in chosen:
            summaries.append({"model": model, "learning_rate": None, "finished": False})
            continue
        picked = [r for r in model_rows if r["learning_rate"] == chosen[model]]
        summaries.append({
            "model": model,
            "learning_rate": chosen[model],
            "seeds": [r["seed"] for r in picked],
            "params": picked[0]["params"],
            "macs": picked[0]["macs"],
            "validation_top1": _metric(picked, "validation", "top1"),
            "validation_top5": _metric(picked, "validation", "top5"),
            "test_top1": _metric(picked, "test", "top1"),
            "test_top5": _metric(picked, "test", "top5"),
            "train_seconds": mean_std([r["train_seconds"] for r in picked]),
            "finished": True,
        })
    return summaries


def sweep_table(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per model and learning rate: validation top-1 and loss over the seeds (finished runs)."""
    table = []
    for (model, lr), lr_rows in _group(rows, "model", "learning_rate").items():
        done = [r for r in lr_rows if r["finished"] and r.get("validation")]
        table.append({"model": model, "learning_rate": lr,
                      "validation_top1": _metric(done, "validation", "top1"),
                      "validation_loss": _metric(done, "validation", "loss")})
    return table


def build_results(config, info, split: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                  chosen: Mapping[str, float]) -> dict[str, Any]:
    """The contents of `results.json` (see the module docstring)."""
    sweep = [float(lr) for lr in config.sweep_learning_rates]
    return {
        "dataset": dataclasses.asdict(info),
        "split": dict(split),
        "seeds": [int(s) for s in config.seeds],
        "selection": {
            "split": "validation",
            "rule": RULE,
            "learning_rates": sweep or [float(config.learning_rate)],
            "chosen": dict(chosen),
        },
        "std": STD,
        "models": summarize(rows, chosen),
        "sweep": sweep_table(rows) if sweep else [],
        "runs": [dict(r) for r in rows],
    }


def _percent(stats: Optional[Mapping[str, Any]]) -> str:
    if not stats or stats.get("mean") is None:
        return "-"
    if stats.get("std") is None:
        return f"{100 * stats['mean']:.2f}"
    return f"{100 * stats['mean']:.2f}±{100 * stats['std']:.2f}"


def format_table(results: Mapping[str, Any]) -> str:
    """Per seed and mean ± std per model (chosen learning rates; top-1/top-5 in %)."""
    header = (f"{'model':<26} {'lr':>7} {'seed':>5} {'params':>10} {'MACs':>13} {'val top-1':>12} "
              f"{'test top-1':>12} {'test top-5':>12} {'train s':>8}")
    lines = [header, "-" * len(header)]
    chosen = results["selection"]["chosen"]
    for summary in results["models"]:
        model = summary["model"]
        rows = [r for r in results["runs"] if r["model"] == model
                and (model not in chosen or r["learning_rate"] == chosen[model])]
        for r in rows:
            val = r["validation"]["top1"] if r.get("validation") else None
            test = r.get("test") or {}
            lines.append(
                f"{model:<26} {r['learning_rate']:>7g} {r['seed']:>5} {r['params']:>10,} "
                f"{r['macs']:>13,} {_percent({'mean': val}):>12} {_percent({'mean': test.get('top1')}):>12} "
                f"{_percent({'mean': test.get('top5')}):>12} {r['train_seconds']:>8.1f}"
                + ("" if r["finished"] else "  (unfinished: no selection, no test)")
            )
        if summary["finished"] and len(rows) > 1:
            lines.append(
                f"{model:<26} {summary['learning_rate']:>7g} {'mean':>5} {'':>10} {'':>13} "
                f"{_percent(summary['validation_top1']):>12} {_percent(summary['test_top1']):>12} "
                f"{_percent(summary['test_top5']):>12} {summary['train_seconds']['mean']:>8.1f}"
            )
    return "\n".join(lines)


def format_sweep(results: Mapping[str, Any]) -> str:
    """Validation top-1 (%, mean ± std over the seeds) per model and learning rate; * = chosen."""
    rates = results["selection"]["learning_rates"]
    header = f"{'validation top-1':<26} " + " ".join(f"{f'lr {lr:g}':>14}" for lr in rates)
    lines = [header, "-" * len(header)]
    chosen = results["selection"]["chosen"]
    by_key = {(e["model"], e["learning_rate"]): e for e in results["sweep"]}
    for summary in results["models"]:
        model = summary["model"]
        cells = []
        for lr in rates:
            entry = by_key.get((model, lr))
            mark = "*" if chosen.get(model) == lr else " "
            cells.append(f"{_percent(entry and entry['validation_top1']) + mark:>14}")
        lines.append(f"{model:<26} " + " ".join(cells))
    return "\n".join(lines)


def write_results(results: Mapping[str, Any], workdir: str, runs: Sequence[Any]) -> None:
    """Writes `results.json` and `curves.png` in `workdir` and prints the tables (process 0)."""
    path = os.path.join(workdir, RESULTS_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)
    chosen = results["selection"]["chosen"]
    curves = {}
    for run in runs:
        first_lr = next(r.learning_rate for r in runs if r.model == run.model)
        if run.learning_rate == chosen.get(run.model, first_lr):
            curves.setdefault(run.model, []).append(run.directory)
    info = results["dataset"]
    seeds = len(results["seeds"])
    plotting.plot_training_curves(
        curves,
        os.path.join(workdir, CURVES_FILE),
        panels=(
            ("train", "loss", "train loss"),
            ("train", "top1", "train top-1 (batch)"),
            ("eval", "loss", "validation loss"),
            ("eval", "top1", "validation top-1"),
        ),
        title=(f"{info['name']} {info['image_size']}px, {seeds} seed{'s' if seeds > 1 else ''}"
               + (": mean, band = ±1 s.d." if seeds > 1 else "")),
    )
    if results["sweep"]:
        print(format_sweep(results), flush=True)
        print(flush=True)
    print(format_table(results), flush=True)
    if seeds > 1:
        print("mean±std: over the seeds (sample standard deviation)", flush=True)
    print(f"results: {path}; curves: {os.path.join(workdir, CURVES_FILE)}", flush=True)

