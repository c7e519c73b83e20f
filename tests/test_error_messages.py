"""Errors name the argument or file, say what was expected, and come before expensive work.

Each case once gave an error that named the wrong thing, named nothing, or came only
after model building or guided-filter tuning.
"""

from __future__ import annotations

import os
import sys

import ml_collections
import numpy as np
import pytest
from flax import nnx

import ddf_jax
from ddf_jax import models as ddf_models
from experiments.classification import datasets as classification_data
from experiments.classification import train as classification
from experiments.common import errors
from experiments.joint_upsampling import evaluate as joint_evaluate
from experiments.joint_upsampling import train as joint
from experiments.joint_upsampling.configs import default as joint_default
from tests.test_classification import tiny_config


def _forbid(monkeypatch, module, name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} ran before the bad config was reported")

    monkeypatch.setattr(module, name, fail)


def _short(message: str) -> str:
    assert len(message) < 400 and message.count("\n") <= 2, message
    return message


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("num_epochs", 0, "config.num_epochs must be a number > 0, got 0"),
        ("learning_rate", -0.1, "config.learning_rate must be a number > 0, got -0.1"),
        ("momentum", 1.0, "config.momentum must be a number in [0.0, 1.0), got 1.0"),
        ("log_every_steps", 0, "config.log_every_steps must be an int >= 1, got 0"),
        ("dtype", "float8", "config.dtype must be one of ('float32', 'bfloat16', 'float16'), got 'float8'"),
        ("keep_checkpoints", 0, "config.keep_checkpoints must be an int >= 1, got 0"),
    ],
)
def test_classification_config_fields_are_checked_by_name_first(tmp_path, monkeypatch, field, value,
                                                                expected):
    _forbid(monkeypatch, classification_data, "get_dataset")
    _forbid(monkeypatch, classification, "create_model")
    config = tiny_config(num_train_steps=-1)
    config[field] = value
    with pytest.raises(errors.ConfigError) as info:
        classification.train_and_evaluate(config, str(tmp_path))
    assert _short(str(info.value)) == expected


def _joint_config(**overrides):
    config = joint_default.get_config()
    config.models, config.scales = ("plain_net",), (2,)
    config.per_scale = ml_collections.ConfigDict({"x2": {"steps": 2, "crop_size": 16, "batch_size": 4}})
    config.num_devices = 1
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"learning_rate": 0.0}, "config.learning_rate must be a number > 0, got 0.0"),
        ({"scales": (3,)}, "config.scales: scale must be a power of two >= 2"),
        ({"loss": "huber"}, "config.loss must be one of ('l1', 'l2'), got 'huber'"),
        ({"validation_examples": 2}, "config.validation_examples must be 0 or >= the batch size 4"),
    ],
)
def test_joint_config_fields_are_checked_by_name_first(tmp_path, monkeypatch, overrides, expected):
    _forbid(monkeypatch, joint_evaluate, "tune_guided_filter")
    _forbid(monkeypatch, joint, "create_model")
    with pytest.raises(errors.ConfigError) as info:
        joint.train_and_evaluate(_joint_config(**overrides), str(tmp_path))
    assert _short(str(info.value)).startswith(expected)


@pytest.mark.parametrize("content", [b"", b"MATLAB 5.0 MAT-file garbage" + bytes(range(200))])
def test_garbage_nyu_split_file_is_named_before_tuning(tmp_path, monkeypatch, content):
    _forbid(monkeypatch, joint_evaluate, "tune_guided_filter")
    import h5py

    mat = str(tmp_path / "nyu.mat")
    with h5py.File(mat, "w") as f:
        f["images"] = np.zeros((2, 3, 16, 16), np.uint8)
        f["depths"] = np.ones((2, 16, 16), np.float32)
    split = tmp_path / "splits.mat"
    split.write_bytes(content)
    config = _joint_config(train_data="nyu", nyu_mat_path=mat, nyu_split_path=str(split))
    with pytest.raises(ValueError) as info:
        joint.train_and_evaluate(config, str(tmp_path / "work"))
    message = _short(str(info.value))
    assert message.startswith(f"split_path {str(split)!r} is not a MATLAB .mat file")


def test_garbage_nyu_data_file_is_named_before_tuning(tmp_path, monkeypatch):
    _forbid(monkeypatch, joint_evaluate, "tune_guided_filter")
    mat = tmp_path / "nyu.mat"
    mat.write_bytes(b"\x00garbage" * 100)
    split = str(tmp_path / "s.npz")
    np.savez(split, trainNdxs=np.array([1]), testNdxs=np.array([2]))
    config = _joint_config(train_data="nyu", nyu_mat_path=str(mat), nyu_split_path=split)
    with pytest.raises(ValueError, match=f"mat_path {str(mat)!r} is not an HDF5"):
        joint.train_and_evaluate(config, str(tmp_path / "work"))


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut off", b"\x93NUMPY garbage"])
def test_unreadable_official_checkpoint_names_the_file(tmp_path, content):
    path = tmp_path / "weights.npz"
    path.write_bytes(content)
    model = nnx.eval_shape(lambda: ddf_models.create_model("resnet20_cifar", num_classes=10,
                                                           rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError) as info:
        ddf_models.load_official_checkpoint(model, path)
    assert _short(str(info.value)).startswith(f"checkpoint file {str(path)!r} is not an .npz archive")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        ddf_models.load_official_checkpoint(model, tmp_path / "missing.npz")


@pytest.mark.parametrize("name", ["config.json", "result.json"])
@pytest.mark.parametrize("content", [b"{truncated", b"[1, 2]", b"\xff\xfe"])
def test_damaged_run_records_are_named(tmp_path, name, content):
    from experiments.common import run_dir

    config = {"model": "resnet20_cifar", "seed": 0}
    run_dir.prepare_run_dir(str(tmp_path), config)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(errors.RunDirDamagedError, match=f"{name}: expected a JSON object"):
        run_dir.prepare_run_dir(str(tmp_path), config)
    # --overwrite deletes the damaged record with the rest of the run.
    assert run_dir.prepare_run_dir(str(tmp_path), config, overwrite=True) is None
    assert run_dir.read_result(str(tmp_path)) is None


def test_python_lists_given_to_ddf_are_named_without_repeating_them():
    x = np.random.default_rng(0).normal(size=(1, 60, 60, 8))
    cf = np.ones((1, 8, 9), np.float32)
    sf = np.ones((1, 60, 60, 9), np.float32)
    with pytest.raises(TypeError) as info:
        ddf_jax.ddf(x.tolist(), cf, sf, kernel_size=3)
    assert str(info.value) == "x must be an array (jax.Array or numpy.ndarray), got list"
    with pytest.raises(TypeError, match="spatial_filter must be an array"):
        ddf_jax.ddf(x.astype(np.float32), cf, sf.tolist(), kernel_size=3)


def test_both_command_lines_report_user_errors_alike(tmp_path, monkeypatch):
    """Both experiments share one command line: a user error is one 'error:' line, exit status 1."""
    from experiments.classification import main as classification_main
    from experiments.common import cli
    from experiments.joint_upsampling import main as joint_main

    cases = (
        (classification_main, classification, errors.RunFinishedError("run A finished")),
        (joint_main, joint, errors.ConfigMismatchError("run B has another config")),
        (joint_main, joint, errors.CheckpointDamagedError("no intact checkpoint in C")),
    )
    for main, train_module, error in cases:
        def train_and_evaluate(config, workdir, error=error):
            raise error

        monkeypatch.setattr(train_module, "train_and_evaluate", train_and_evaluate)
        config_file = os.path.join(os.path.dirname(main.__file__), "configs", "default.py")
        argv = ["main", f"--workdir={tmp_path}", f"--config={config_file}"]
        monkeypatch.setattr(sys, "argv", argv)
        try:
            cli.FLAGS(argv)
            with pytest.raises(SystemExit) as info:
                main.main(["main"])
            assert info.value.code == f"error: {error}"  # Printed to stderr, exit status 1.
        finally:
            cli.FLAGS.unparse_flags()
    # A bug is not a user error: its traceback is kept.
    monkeypatch.setattr(joint, "train_and_evaluate", lambda config, workdir: 1 / 0)
    try:
        cli.FLAGS(argv)
        with pytest.raises(ZeroDivisionError):
            joint_main.main(["main"])
    finally:
        cli.FLAGS.unparse_flags()


@pytest.mark.parametrize("name", ["classification", "joint_upsampling"])
def test_importing_main_modules_runs_nothing(name):
    """grain worker processes re-import `__main__`; the command must not run again there."""
    import importlib

    module = importlib.import_module(f"experiments.{name}.__main__")
    assert callable(module.run)  # Imported, and the guard kept the command line from starting.
