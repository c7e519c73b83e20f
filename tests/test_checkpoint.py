"""Official checkpoint import/export, proven against an independent PyTorch implementation."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from ddf_jax import models  # noqa: E402
from tests import official_torch  # noqa: E402
from tests.reference import ddf_reference  # noqa: E402

# Architecture of each registered model, in the torch twin's terms.
TORCH_ARCHS = {
    "ddf_mul_resnet26": dict(block="bottleneck", layers=(2, 2, 2, 2), conv2="ddf_mul"),
    "resnet18": dict(block="basic", layers=(2, 2, 2, 2)),
    "ddf_add_resnet20_cifar": dict(
        block="bottleneck", layers=(2, 2, 2), widths=(16, 32, 64), stem="cifar", stem_width=16, conv2="ddf_add"
    ),
}


def _torch_model(name, num_classes=10, in_chans=3, seed=0):
    model = official_torch.ResNet(num_classes=num_classes, in_chans=in_chans, **TORCH_ARCHS[name])
    return official_torch.randomize_(model, seed).eval()


def _abstract(name, **kwargs):
    """The model without initialisation (abstract values), ready to be loaded."""
    return nnx.eval_shape(lambda: models.create_model(name, rngs=nnx.Rngs(0), **kwargs))


def _numpy_state(torch_model):
    return {key: value.numpy() for key, value in torch_model.state_dict().items()}


@nnx.jit
def _forward(model, x):
    return model(x, return_features=True)


def _run_both(torch_model, model, x_nhwc):
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
        torch_features = {k: v.numpy().transpose(0, 2, 3, 1) for k, v in torch_model.forward_features(x).items()}
        torch_logits = torch_model(x).numpy()
    logits, features = _forward(model, jnp.asarray(x_nhwc))
    return (torch_logits, torch_features), (np.asarray(logits), {k: np.asarray(v) for k, v in features.items()})


def _assert_close(actual, expected, name):
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=2e-5 * scale, err_msg=name)


def _images(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------
# The torch twin's op agrees with the independent NumPy reference.


@pytest.mark.parametrize(
    "shape, k, stride, dilation, heads, combine",
    [
        ((2, 7, 6, 4), 3, 1, 1, 1, "mul"),
        ((1, 9, 7, 6), 3, 2, 1, 2, "add"),
        ((2, 8, 5, 4), 5, 2, 2, 1, "mul"),
    ],
)
def test_torch_ddf_unfold_matches_numpy_reference(shape, k, stride, dilation, heads, combine):
    n, h, w, c = shape
    taps = k * k
    out_h, out_w = -(-h // stride), -(-w // stride)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    cf = rng.standard_normal((n, c, taps))
    sf = rng.standard_normal((n, out_h, out_w, heads, taps))
    expected = ddf_reference(x, cf, sf, k, stride=stride, dilation=dilation, combine=combine)
    got = official_torch.ddf_unfold(
        torch.from_numpy(x.transpose(0, 3, 1, 2)),
        torch.from_numpy(cf.reshape(n, c, k, k)),
        torch.from_numpy(sf.reshape(n, out_h, out_w, heads * taps).transpose(0, 3, 1, 2)),
        k,
        dilation,
        stride,
        combine,
    ).numpy()
    np.testing.assert_allclose(got.transpose(0, 2, 3, 1), expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------
# Import: official state dict -> our model gives the official outputs.


def test_ddf_resnet26_import_matches_torch_logits_and_features():
    torch_model = _torch_model("ddf_mul_resnet26")
    model = _abstract("ddf_mul_resnet26", num_classes=10)
    models.load_official_checkpoint(model, _numpy_state(torch_model))
    # 56 px: stages at 14, 7, 4 (odd -> ceil) and 2.
    (t_logits, t_features), (logits, features) = _run_both(torch_model, model, _images((2, 56, 56, 3)))
    assert set(features) == set(t_features) == {"stem", "stage1", "stage2", "stage3", "stage4"}
    for key in t_features:
        _assert_close(features[key], t_features[key], key)
    _assert_close(logits, t_logits, "logits")
    assert features["stage3"].shape == (2, 4, 4, 1024)


def test_basic_block_resnet_import_from_torch_tensors():
    torch_model = _torch_model("resnet18", num_classes=7, in_chans=2, seed=3)
    # A mapping of torch tensors (not numpy) is accepted too.
    model = models.load_official_checkpoint(
        _abstract("resnet18", num_classes=7, in_chans=2), torch_model.state_dict()
    )
    (t_logits, _), (logits, _) = _run_both(torch_model, model, _images((2, 40, 40, 2), seed=4))
    _assert_close(logits, t_logits, "logits")


@pytest.fixture(scope="module")
def cifar_torch():
    return _torch_model("ddf_add_resnet20_cifar", num_classes=10, in_chans=1, seed=5)


def test_import_from_files_npz_safetensors_pth(tmp_path, cifar_torch):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    state = _numpy_state(cifar_torch)
    np.savez(tmp_path / "weights.npz", **state)
    safetensors_numpy.save_file(
        {k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp_path / "weights.safetensors")
    )
    # A training checkpoint saved from DataParallel: wrapped and prefixed.
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in cifar_torch.state_dict().items()}},
        tmp_path / "checkpoint.pth",
    )
    x = _images((3, 16, 16, 1), seed=6)
    reference = None
    for filename in ("weights.npz", "weights.safetensors", "checkpoint.pth"):
        model = models.load_official_checkpoint(
            _abstract("ddf_add_resnet20_cifar", num_classes=10, in_chans=1), tmp_path / filename
        )
        (t_logits, _), (logits, _) = _run_both(cifar_torch, model, x)
        _assert_close(logits, t_logits, filename)
        if reference is None:
            reference = logits
        np.testing.assert_array_equal(logits, reference, err_msg=filename)


def test_loaded_layouts_and_export_round_trip(cifar_torch):
    state = _numpy_state(cifar_torch)
    model = models.load_official_checkpoint(_abstract("ddf_add_resnet20_cifar", num_classes=10, in_chans=1), state)
    # Layout spot checks: OIHW -> HWIO, 1x1-conv-as-dense, FilterNorm scale, BN stats, classifier.
    block = model.layer1[0]
    np.testing.assert_array_equal(block.conv1.kernel[...], state["layer1.0.conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        block.conv2.spatial_branch.conv.kernel[...],
        state["layer1.0.conv2.spatial_branch.0.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        block.conv2.channel_branch.fc1.kernel[...], state["layer1.0.conv2.channel_branch.1.weight"][:, :, 0, 0].T
    )
    np.testing.assert_array_equal(
        block.conv2.channel_branch.fc2.kernel[...], state["layer1.0.conv2.channel_branch.3.weight"][:, :, 0, 0].T
    )
    np.testing.assert_array_equal(
        block.conv2.channel_branch.norm.scale[...], state["layer1.0.conv2.channel_branch.4.std"]
    )
    np.testing.assert_array_equal(block.downsample.bn.var[...], state["layer1.0.downsample.1.running_var"])
    np.testing.assert_array_equal(model.fc.kernel[...], state["fc.weight"].T)

    # Export gives the official state dict back, and torch loads it strictly.
    exported = models.official_state_dict(model)
    expected = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert set(exported) == set(expected)
    for key, value in expected.items():
        assert exported[key].dtype == np.float32, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    fresh = official_torch.ResNet(num_classes=10, in_chans=1, **TORCH_ARCHS["ddf_add_resnet20_cifar"])
    fresh.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in exported.items()}, strict=True)
    for key, value in fresh.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(value.numpy(), state[key], err_msg=key)


def test_load_casts_to_param_dtype(cifar_torch):
    model = models.load_official_checkpoint(
        _abstract("ddf_add_resnet20_cifar", num_classes=10, in_chans=1, param_dtype=jnp.bfloat16),
        _numpy_state(cifar_torch),
    )
    assert model.layer2[1].conv2.channel_branch.norm.scale[...].dtype == jnp.bfloat16
    assert model.bn1.scale[...].dtype == jnp.bfloat16
    assert model.bn1.mean[...].dtype == jnp.float32  # nnx.BatchNorm keeps its statistics in float32
    assert models.official_state_dict(model)["conv1.weight"].dtype == jnp.bfloat16


# ---------------------------------------------------------------------------
# Errors name the offending keys.


@pytest.fixture(scope="module")
def cifar_state(cifar_torch):
    return _numpy_state(cifar_torch)


def _load(state):
    return models.load_official_checkpoint(_abstract("ddf_add_resnet20_cifar", num_classes=10, in_chans=1), state)


def test_missing_key_is_named(cifar_state):
    state = dict(cifar_state)
    del state["layer2.1.conv2.channel_branch.4.std"]
    with pytest.raises(ValueError, match=r"missing keys: layer2\.1\.conv2\.channel_branch\.4\.std"):
        _load(state)


def test_unexpected_key_is_named(cifar_state):
    state = dict(cifar_state, **{"head.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected keys: head\.extra\.weight"):
        _load(state)


def test_wrong_shape_is_named(cifar_state):
    state = dict(cifar_state)
    state["layer3.0.conv2.spatial_branch.0.weight"] = np.zeros((9, 64, 3, 3), np.float32)
    with pytest.raises(
        ValueError,
        match=r"layer3\.0\.conv2\.spatial_branch\.0\.weight: expected \(9, 64, 1, 1\), got \(9, 64, 3, 3\)",
    ):
        _load(state)


def test_wrong_architecture_is_rejected(cifar_state):
    # The same weights into the "mul" twin load fine (same keys), into the conv twin they do not.
    with pytest.raises(ValueError, match=r"unexpected keys: .*spatial_branch"):
        models.load_official_checkpoint(_abstract("resnet20_cifar", num_classes=10, in_chans=1), cifar_state)
    with pytest.raises(ValueError, match=r"fc\.weight: expected \(1000, 256\), got \(10, 256\)"):
        models.load_official_checkpoint(_abstract("ddf_add_resnet20_cifar", in_chans=1), cifar_state)


def test_num_batches_tracked_is_ignored(cifar_state):
    assert any(k.endswith("num_batches_tracked") for k in cifar_state)
    _load(cifar_state)
    _load({k: v for k, v in cifar_state.items() if not k.endswith("num_batches_tracked")})


def test_bad_sources(tmp_path):
    model = _abstract("resnet20_cifar", num_classes=10)
    with pytest.raises(ValueError, match=r"source must be .*weights\.h5"):
        models.load_official_checkpoint(model, tmp_path / "weights.h5")
    with pytest.raises(TypeError, match="source must be a mapping of arrays or a path, got int"):
        models.load_official_checkpoint(model, 3)
