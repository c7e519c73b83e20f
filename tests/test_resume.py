"""Checkpoints and data that cannot silently corrupt a run (experiments/common).

Damaged checkpoints are found by their integrity manifest and skipped with a warning;
a resumed run logs the same records as an uninterrupted one; changed or unreadable
data stop the run with an error that names the files.
"""

from __future__ import annotations

import logging
import os
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.classification import datasets, input_pipeline, sources, train
from experiments.common import checkpoint as checkpoint_lib
from experiments.common import errors, integrity, optim, sharding
from experiments.common import run_dir as run_dir_lib
from experiments.common.metrics import MetricsWriter, read_metrics
from experiments.common.train_state import Trainer
from tests.test_classification import final_state, run_dir_of, tiny_config
from tests.test_classification_data import _write_image

MODEL = "resnet20_cifar"
TIMING_FIELDS = ("time", "steps_per_second", "examples_per_second")


def records(run_dir):
    """metrics.jsonl without the fields that measure time."""
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_metrics(run_dir)]


def resume_config(**overrides):
    # Checkpoints at 2, 4, 6; log records at 3 and 6: a resume at 4 starts mid-window.
    return tiny_config(num_train_steps=6, checkpoint_every_steps=2, log_every_steps=3, **overrides)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run: its run directory, final state and log."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    train.train_and_evaluate(resume_config(), workdir)
    run_dir = run_dir_of(workdir, MODEL)
    return run_dir, final_state(run_dir), records(run_dir)


def interrupted(workdir, stop_after_steps=4):
    """A run stopped (as if pre-empted) after `stop_after_steps` steps, with checkpoints."""
    rows = train.train_and_evaluate(resume_config(stop_after_steps=stop_after_steps), workdir)["runs"]
    assert rows[0]["steps"] == stop_after_steps and not rows[0]["finished"]
    return run_dir_of(workdir, MODEL)


# ----------------------------------------------------------------------------- exact logs


def test_resumed_run_logs_the_same_records(straight, tmp_path):
    """12.5: the first train record after a resume averaged a shorter window."""
    run_dir = interrupted(str(tmp_path))
    assert [r["step"] for r in read_metrics(run_dir, split="train")] == [3]
    train.train_and_evaluate(resume_config(), str(tmp_path))
    straight_dir, (step, state), straight_records = straight
    assert final_state(run_dir)[0] == step == 6
    chex.assert_trees_all_equal(final_state(run_dir)[1], state)
    # Every record (loss, top-1, lr, epoch; evaluation) as in the uninterrupted run.
    assert records(run_dir) == straight_records
    assert [r["step"] for r in straight_records if r["split"] == "train"] == [3, 6]


# ----------------------------------------------------------------------------- damaged checkpoints


def _invert_bytes(path, count=4096):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        start = max(0, len(data) // 2 - count // 2)
        for i in range(start, min(len(data), start + count)):
            data[i] ^= 0xFF
        f.seek(0)
        f.write(data)


def _data_files(directory):
    """The array-data files (ocdbt `d/` chunks) below `directory`."""
    return [os.path.join(root, n) for root, _, names in os.walk(directory) for n in names
            if os.path.basename(root) == "d"]


def test_damaged_newest_checkpoint_falls_back_and_finishes_exactly(straight, tmp_path, caplog):
    """12.1: inverted bytes in a data file of the newest checkpoint went unnoticed."""
    run_dir = interrupted(str(tmp_path))
    checkpoints = os.path.join(run_dir, checkpoint_lib.CHECKPOINT_DIR)
    assert sorted(n for n in os.listdir(checkpoints) if n.isdigit()) == ["2", "4"]
    for path in _data_files(os.path.join(checkpoints, "4", "state")):
        _invert_bytes(path)
    with caplog.at_level(logging.WARNING):
        rows = train.train_and_evaluate(resume_config(), str(tmp_path))["runs"]
    warning = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert warning and os.path.join(checkpoints, "4") in warning[0] and "checksum" in warning[0]
    assert os.path.isdir(os.path.join(checkpoints, checkpoint_lib.DAMAGED_DIR, "4"))
    assert rows[0]["finished"]
    _, (step, state), straight_records = straight
    chex.assert_trees_all_equal(final_state(run_dir)[1], state)
    assert records(run_dir) == straight_records


def _loader_and_tree():
    images = np.arange(12 * 2 * 2, dtype=np.uint8).reshape(12, 2, 2, 1)
    dataset = datasets.Dataset(
        info=None, train_source=sources.ArraySource(images, np.arange(12)),
        validation_source=None, test_source=None,
    )
    loader = input_pipeline.train_loader(dataset, batch_size=3, seed=1)
    return loader, lambda step: {"w": jnp.full((3,), float(step)), "step": jnp.int32(step)}


def _save_two_steps(directory):
    """Steps 1 and 2, each after one more batch, with data position and meta."""
    loader, tree = _loader_and_tree()
    iterator = iter(loader)
    expected_next = {}
    with checkpoint_lib.Checkpointer(directory) as ckpt:
        for step in (1, 2):
            next(iterator)
            ckpt.save(step, tree(step), data_iterator=iterator, meta={"step": step})
            expected_next[step] = next(iter_copy(loader, iterator))["label"]
    return loader, tree, expected_next


def iter_copy(loader, iterator):
    copy = iter(loader)
    copy.set_state(iterator.get_state())
    return copy


def _truncate(path, size=0):
    with open(path, "r+b") as f:
        f.truncate(size)


DAMAGE = {
    "state files truncated": lambda d: [_truncate(os.path.join(r, n)) for r, _, ns in
                                        os.walk(os.path.join(d, "state")) for n in ns],
    "_METADATA deleted": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "data json truncated": lambda d: _truncate(os.path.join(d, "data", "process_0-of-1.json"), 10),
    "meta json truncated": lambda d: _truncate(os.path.join(d, "meta", "metadata"), 3),
    "manifest missing": lambda d: os.remove(os.path.join(d, integrity.MANIFEST_FILE)),
    "manifest truncated": lambda d: _truncate(os.path.join(d, integrity.MANIFEST_FILE), 20),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_step_is_named_and_skipped(tmp_path, caplog, damage):
    """12.1: damaged metadata gave JSONDecodeError / pytree errors that name no file."""
    directory = str(tmp_path)
    loader, tree, expected_next = _save_two_steps(directory)
    DAMAGE[damage](os.path.join(directory, "2"))
    iterator = iter(loader)
    with caplog.at_level(logging.WARNING), checkpoint_lib.Checkpointer(directory) as ckpt:
        step, restored, meta = ckpt.restore_latest_intact(jax.eval_shape(lambda: tree(0)),
                                                          data_iterator=iterator)
    assert (step, meta) == (1, {"step": 1})
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(tree(1)))
    np.testing.assert_array_equal(next(iterator)["label"], expected_next[1])
    [warning] = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert os.path.join(directory, "2") in warning
    assert os.listdir(os.path.join(directory, checkpoint_lib.DAMAGED_DIR)) == ["2"]


def test_no_intact_checkpoint_is_an_error_that_says_what_to_do(tmp_path):
    directory = str(tmp_path)
    loader, tree, _ = _save_two_steps(directory)
    DAMAGE["state files truncated"](os.path.join(directory, "2"))
    DAMAGE["manifest missing"](os.path.join(directory, "1"))
    with checkpoint_lib.Checkpointer(directory) as ckpt:
        with pytest.raises(errors.CheckpointDamagedError) as info:
            ckpt.restore_latest_intact(jax.eval_shape(lambda: tree(0)), data_iterator=iter(loader))
    message = str(info.value)
    assert message.startswith(f"no intact checkpoint in {directory}: step 2: file state/")
    assert "step 1: it has no integrity.json" in message and "--overwrite" in message
    assert len(message) < 700 and message.count("\n") == 0
    assert sorted(os.listdir(directory)) == ["1", "2"]  # Nothing moved: the user decides.


def test_step_that_verifies_but_fails_to_restore_is_skipped(tmp_path, caplog):
    directory = str(tmp_path)
    loader, tree, _ = _save_two_steps(directory)
    step_dir = os.path.join(directory, "2")
    os.remove(os.path.join(step_dir, "state", "_METADATA"))
    integrity.write_manifest(step_dir)  # The manifest now agrees with the damage.
    with caplog.at_level(logging.WARNING), checkpoint_lib.Checkpointer(directory) as ckpt:
        step, _, _ = ckpt.restore_latest_intact(jax.eval_shape(lambda: tree(0)),
                                                data_iterator=iter(loader))
    assert step == 1
    assert any("fails to restore" in r.getMessage() and step_dir in r.getMessage()
               for r in caplog.records)


# ----------------------------------------------------------------------------- data


def make_image_folder(root, train_count=3, val_count=2):
    """root/{train,val}/{cat,dog}/ with small JPEG and PNG files."""
    for split, count in (("train", train_count), ("val", val_count)):
        for name, color in (("cat", 40), ("dog", 210)):
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(count):
                ext = ".JPEG" if i % 2 == 0 else ".png"
                _write_image(str(root / split / name / f"{i}{ext}"), (20 + 3 * i, 18), color)
    return root


def folder_config(data_dir, **overrides):
    return tiny_config(dataset="imagenet", data_dir=str(data_dir), image_size=8, batch_size=2,
                       eval_batch_size=2, read_threads=1, num_devices=2, **overrides)


def test_bad_images_are_all_named_before_training(tmp_path):
    """12.2: a corrupt evaluation image crashed the run after its first epoch."""
    data = make_image_folder(tmp_path / "data")
    (data / "val" / "dog" / "1.png").write_bytes(b"not an image")
    good = data / "train" / "cat" / "0.JPEG"
    (data / "train" / "cat" / "2.JPEG").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    workdir = tmp_path / "run"
    with pytest.raises(errors.BadDataError) as info:
        train.train_and_evaluate(folder_config(data, num_train_steps=2), str(workdir))
    message = str(info.value)
    assert message.startswith(f"2 of 10 image files under {data} cannot be read: ")
    assert str(data / "val" / "dog" / "1.png") in message
    assert str(data / "train" / "cat" / "2.JPEG") in message  # Truncated: found by decoding.
    assert not os.path.exists(workdir / MODEL)  # Before any training.


def test_failed_evaluation_keeps_the_checkpoint_and_is_rerun(tmp_path):
    """12.2: the epoch's checkpoint is written before evaluating, and the rerun evaluates."""
    data = make_image_folder(tmp_path / "data")
    # A file of the validation split (carved out of train/), read after every epoch.
    held_out = datasets.load_image_folder(str(data), 8, check_images=False).validation_source.files
    bad = pathlib.Path(held_out[-1])
    saved = bad.read_bytes()
    bad.write_bytes(b"not an image")
    config = folder_config(data, num_epochs=2, num_train_steps=-1, check_images=False,
                           warmup_epochs=0.0)
    workdir = str(tmp_path / "run")
    with pytest.raises(Exception, match=os.path.basename(held_out[-1])):
        train.train_and_evaluate(config, workdir)  # Evaluation after epoch 1 (step 2) fails.
    run_dir = run_dir_of(workdir, MODEL)
    checkpoints = os.path.join(run_dir, checkpoint_lib.CHECKPOINT_DIR)
    assert [n for n in os.listdir(checkpoints) if n.isdigit()] == ["2"]
    bad.write_bytes(saved)
    rows = train.train_and_evaluate(config, workdir)["runs"]
    assert rows[0]["finished"] and rows[0]["steps"] == 4
    assert [r["step"] for r in read_metrics(run_dir, split="eval")] == [2, 4]


def test_changed_training_data_is_named_and_can_be_accepted(tmp_path, caplog):
    """12.3: deleting a bad training image, then resuming, gave grain's sampler error."""
    data = make_image_folder(tmp_path / "data", train_count=5)  # 8 train, 2 validation.
    config = folder_config(data, num_train_steps=4, checkpoint_every_steps=2)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config(**{**config, "stop_after_steps": 2}), workdir)
    os.remove(data / "train" / "dog" / "1.png")
    with pytest.raises(errors.DataChangedError) as info:
        train.train_and_evaluate(config, workdir)
    message = str(info.value)
    assert "8 examples then, 7 now" in message and "allow_data_change=True" in message
    assert os.path.join(run_dir_of(workdir, MODEL), checkpoint_lib.CHECKPOINT_DIR) in message
    with caplog.at_level(logging.WARNING):
        rows = train.train_and_evaluate(tiny_config(**{**config, "allow_data_change": True}),
                                        workdir)["runs"]
    assert rows[0]["finished"] and rows[0]["steps"] == 4
    assert any("no longer bit-exact" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- metrics log


def test_cut_off_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    """12.4: a partial last line of metrics.jsonl (power loss) blocked the resume."""
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(str(tmp_path), tensorboard=False) as writer:
        for step in (1, 2):
            writer.write(step, {"loss": 0.5 * step})
    with open(path, "a") as f:
        f.write('{"step": 3, "split": "train", "loss": 0.')
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
        with MetricsWriter(str(tmp_path), resume_step=2, tensorboard=False) as writer:
            writer.write(3, {"loss": 1.5})
    assert any(str(path) in r.getMessage() and "line 3" in r.getMessage() for r in caplog.records)
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=rf"{path}, line 2: not a JSON record"):
        read_metrics(str(tmp_path))


# ----------------------------------------------------------------------------- holes in the resume tests


def test_each_step_gets_its_own_key_folded_with_the_step():
    """12.8: a trainer that reused one key for every step passed the whole suite."""

    def loss_fn(model, batch, rng):
        draw = jax.random.uniform(rng)
        return jnp.mean((model(batch["x"]) - batch["y"]) ** 2), {"draw": draw}

    seed = 7
    trainer = Trainer(nnx.Linear(3, 1, rngs=nnx.Rngs(0)), optim.build_optimizer(0.1, momentum=0.9),
                      loss_fn=loss_fn, mesh=sharding.create_mesh(1), seed=seed)
    batch = sharding.shard_batch({"x": np.ones((2, 3), np.float32), "y": np.zeros((2, 1), np.float32)},
                                 trainer.mesh)
    draws = [float(trainer.train_step(batch)["draw"]) for _ in range(3)]  # One fixed batch.
    assert len(set(draws)) == 3
    expected = [float(jax.random.uniform(jax.random.fold_in(jax.random.key(seed), step)))
                for step in range(3)]
    assert draws == expected


def test_run_control_keys_match_by_name_or_dotted_prefix_only(tmp_path):
    """12.8: allowed keys matched by bare prefix let 'width' differ when 'w' may."""

    def prepare(config):
        return run_dir_lib.prepare_run_dir(str(tmp_path), config, run_control_keys=("w", "log"))

    prepare({"w": 1, "width": 1, "log": {"every": 1}, "logits": 1})
    os.makedirs(tmp_path / checkpoint_lib.CHECKPOINT_DIR / "2")
    # The allowed names themselves and their dotted children may differ...
    assert prepare({"w": 2, "width": 1, "log": {"every": 5}, "logits": 1}) is None
    # ...a key that merely starts with an allowed name may not.
    with pytest.raises(errors.ConfigMismatchError, match=r"width: 1 -> 2"):
        prepare({"w": 1, "width": 2, "log": {"every": 1}, "logits": 1})
    with pytest.raises(errors.ConfigMismatchError, match=r"logits: 1 -> 3"):
        prepare({"w": 1, "width": 1, "log": {"every": 1}, "logits": 3})
    # The experiments' own run-control keys: a near-miss name is not one of them.
    assert not run_dir_lib.config_differences({"log_every_steps": 1}, {"log_every_steps": 2},
                                              train.RUN_CONTROL_KEYS)
    assert run_dir_lib.config_differences({"log_every_stepsx": 1}, {"log_every_stepsx": 2},
                                          train.RUN_CONTROL_KEYS)

