"""Mean and spread of several runs of the experiment (e.g. one workdir per seed).

    python -m experiments.joint_upsampling.summarize DIR [DIR ...]

Reads each DIR/results.json ({set: {method: {"x4": rmse, ...}}}) and prints, per
test set, a markdown table of every method's mean ± sample standard deviation
over the runs, with the per-run values, and how many runs each network beats
each network listed earlier in.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from typing import Sequence

import numpy as np

from experiments.joint_upsampling.evaluate import BASELINES, RESULTS_FILE


def load_runs(workdirs: Sequence[str]) -> list[dict]:
    """The results.json of each workdir; a ValueError names a missing or mismatched one."""
    runs = []
    for workdir in workdirs:
        path = os.path.join(workdir, RESULTS_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"no {RESULTS_FILE} in {workdir!r}: has the experiment finished there?")
        with open(path) as f:
            runs.append(json.load(f))
    shape = {name: {m: sorted(r) for m, r in part.items()} for name, part in runs[0].items()}
    for workdir, run in zip(workdirs, runs):
        if {name: {m: sorted(r) for m, r in part.items()} for name, part in run.items()} != shape:
            raise ValueError(f"{workdir!r} holds other test sets, methods or scales than {workdirs[0]!r}")
    return runs


def summarize(runs: Sequence[dict]) -> str:
    """Markdown tables: per test set, method and scale, mean ± std (per-run values)."""
    parts = []
    for name, part in runs[0].items():
        keys = list(next(iter(part.values())))
        lines = [f"{name}, {len(runs)} runs: mean ± standard deviation (per run)", "",
                 "| method | " + " | ".join(keys) + " |", "| --- | " + " | ".join("---" for _ in keys) + " |"]
        for method in part:
            cells = []
            for key in keys:
                values = np.array([run[name][method][key] for run in runs])
                spread = values.std(ddof=1) if len(values) > 1 else 0.0
                cells.append(f"{values.mean():.3f} ± {spread:.3f} ({' / '.join(f'{v:.3f}' for v in values)})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        networks = [m for m in part if m not in BASELINES]
        for first, second in itertools.combinations(networks[::-1], 2):
            wins = [sum(run[name][first][key] < run[name][second][key] for run in runs) for key in keys]
            lines.append("")
            lines.append(f"{first} beats {second} in " + ", ".join(
                f"{w} of {len(runs)} runs at {key}" for w, key in zip(wins, keys)) + ".")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def main(argv: Sequence[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        print(summarize(load_runs(argv)))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
