"""Fixed, stratified splits of a dataset into train / validation / test, and their record.

Every dataset has three disjoint splits:

* **test**: the dataset's official test split (CIFAR-10's `test_batch`, an image
  folder's `val/`), or, for the datasets that have none (digits, MNIST), a fixed
  stratified 20% of all examples;
* **validation**: a fixed stratified fraction (`config.validation_fraction`) carved
  out of the training data; evaluation during training and every selection of
  hyperparameters use it;
* **train**: the rest.

The splits do not depend on the training seed: `stratified_split` always uses
`SPLIT_SEED`. `split_record` describes the splits (sizes, class counts, the held-out
positions, fingerprints of the data) for `results.json`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

SPLIT_SEED = 0
SPLITS = ("train", "validation", "test")
EVAL_SPLITS = ("validation", "test")
METHOD = ("stratified by label: sklearn.model_selection.train_test_split("
          f"test_size=fraction, stratify=labels, random_state={SPLIT_SEED}); held-out size "
          "ceil(fraction * n)")


def stratified_split(labels: np.ndarray, fraction: float, *, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Splits positions `0..len(labels)-1` into a kept and a held-out part, stratified.

    Args:
        labels: (N,) integer labels.
        fraction: Fraction held out, in (0, 1); the held-out part has
            `ceil(fraction * N)` examples with (up to rounding) the label
            proportions of the whole.
        name: What `fraction` is called, for the error message
            (e.g. "config.validation_fraction").

    Returns:
        `(kept, held)`: sorted int64 positions, disjoint, together all of `0..N-1`.
        The same labels and fraction always give the same split (`SPLIT_SEED`).

    Raises:
        ValueError: `fraction` is out of range, or too small or too large for every
            class to appear in both parts.
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    if not 0 < fraction < 1:
        raise ValueError(f"{name} must be in (0, 1), got {fraction}")
    counts = np.bincount(labels) if labels.size else np.zeros(0, np.int64)
    present = counts[counts > 0]
    held = math.ceil(fraction * len(labels))
    if present.size == 0 or present.min() < 2 or min(held, len(labels) - held) < present.size:
        raise ValueError(
            f"{name}={fraction} cannot split {len(labels)} examples of {present.size} classes "
            f"(smallest class: {present.min() if present.size else 0}) into two stratified parts: "
            "each part needs at least one example of every class"
        )
    kept, held_out = train_test_split(
        np.arange(len(labels)), test_size=fraction, random_state=SPLIT_SEED, stratify=labels
    )
    return np.sort(kept), np.sort(held_out)


def split_record(
    *,
    pool: str,
    test: str,
    validation_fraction: float,
    labels: Mapping[str, np.ndarray],
    num_classes: int,
    held_out: Mapping[str, Optional[Sequence[int]]],
    fingerprints: Mapping[str, str],
) -> dict[str, Any]:
    """The description of a dataset's splits that goes into `results.json`.

    Args:
        pool: What the positions in `held_out` index (e.g. "the 1,797 digits of
            sklearn.datasets.load_digits, in its order").
        test: Where the test split comes from.
        validation_fraction: The fraction of the training data held out for validation.
        labels: Split name -> its labels (for the class counts).
        num_classes: Number of classes.
        held_out: Split name -> positions in `pool` of its examples (None: the split
            is not part of the pool, e.g. an official test split).
        fingerprints: Split name -> fingerprint of its data (the source's repr).

    Returns:
        A JSON-serialisable dict.
    """
    return {
        "seed": SPLIT_SEED,
        "method": METHOD,
        "pool": pool,
        "test": test,
        "validation": f"validation_fraction {validation_fraction} of the training data",
        "validation_fraction": validation_fraction,
        "sizes": {name: int(len(labels[name])) for name in SPLITS},
        "class_counts": {
            name: [int(c) for c in np.bincount(np.asarray(labels[name]), minlength=num_classes)]
            for name in SPLITS
        },
        "pool_positions": {
            name: None if positions is None else [int(i) for i in positions]
            for name, positions in held_out.items()
        },
        "fingerprints": dict(fingerprints),
    }
