"""The model zoo: registry walk, architecture, parameter counts, initialisation and the CLI (MACs: test_macs.py)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ddf_jax
from ddf_jax import models
from ddf_jax.models import __main__ as cli
from ddf_jax.nn import DDF
from tests.utils import built_model, small_model

EXPECTED_MODELS = {
    "resnet18", "resnet26", "resnet34", "resnet50", "resnet101", "resnet152",
    "ddf_mul_resnet26", "ddf_mul_resnet50", "ddf_mul_resnet101", "ddf_mul_resnet152",
    "ddf_add_resnet26", "ddf_add_resnet50", "ddf_add_resnet101", "ddf_add_resnet152",
    "resnet20_cifar", "ddf_mul_resnet20_cifar", "ddf_add_resnet20_cifar",
}  # fmt: skip

# Official counts (1000 classes): ddf-spec.md; resnet18/34 are the torchvision counts.
PARAM_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "ddf_mul_resnet50": 16_843_748,
    "ddf_add_resnet50": 16_843_748,
    "resnet101": 44_549_160,
    "ddf_mul_resnet101": 28_146_912,
    "resnet152": 60_192_808,
    "ddf_mul_resnet152": 37_462_900,
}
# Building and tracing the 101/152-layer models takes seconds each on 2 CPU cores.
BIG = ("101", "152")


def _slow_if_big(name):
    return pytest.param(name, marks=pytest.mark.slow) if name.endswith(BIG) else name


def eval_output_shapes(model, input_shape):
    """Output shapes of the eval-mode forward (with features), traced abstractly."""
    graphdef, state = nnx.split(model)

    def forward(state, x):
        copy = nnx.merge(graphdef, state)
        copy.eval()
        return copy(x, return_features=True)

    return jax.eval_shape(forward, state, jax.ShapeDtypeStruct(input_shape, jnp.float32))


def _images(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


@nnx.jit
def _forward(model, x):
    return model(x, return_features=True)


# ---------------------------------------------------------------------------
# Registry.


def test_registry_holds_every_variant():
    assert set(models.list_models()) == EXPECTED_MODELS
    assert models.list_models() == sorted(EXPECTED_MODELS)
    assert models.list_models("ddf_add_*") == sorted(n for n in EXPECTED_MODELS if n.startswith("ddf_add_"))
    assert models.is_model("ddf_mul_resnet50") and not models.is_model("ddf_resnet50")


def test_unknown_model_names_close_matches():
    with pytest.raises(ValueError, match=r"got 'ddf_mul_resnet5'.*did you mean 'ddf_mul_resnet50'"):
        models.create_model("ddf_mul_resnet5", rngs=nnx.Rngs(0))


def test_register_model_rejects_duplicates():
    def resnet50(**kwargs):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="'resnet50' is already registered"):
        models.register_model(resnet50)


# ---------------------------------------------------------------------------
# Every registered model builds and runs.


IMAGENET_MODELS = sorted(n for n in EXPECTED_MODELS if not n.endswith("_cifar"))
CIFAR_MODELS = sorted(n for n in EXPECTED_MODELS if n.endswith("_cifar"))


@pytest.mark.parametrize("name", [_slow_if_big(n) for n in IMAGENET_MODELS])
def test_every_imagenet_model_builds_traces_and_has_the_official_parameter_count(name):
    model = built_model(name)
    if name in PARAM_COUNTS:
        assert ddf_jax.count_params(model) == PARAM_COUNTS[name]
    logits, features = eval_output_shapes(model, (2, 64, 64, 3))
    assert logits.shape == (2, 1000)
    expansion = 1 if name in ("resnet18", "resnet34") else 4
    assert {k: v.shape for k, v in features.items()} == {
        "stem": (2, 16, 16, 64),
        "stage1": (2, 16, 16, 64 * expansion),
        "stage2": (2, 8, 8, 128 * expansion),
        "stage3": (2, 4, 4, 256 * expansion),
        "stage4": (2, 2, 2, 512 * expansion),
    }
    conv2 = model.layer1[0].conv2
    if name.startswith("ddf_"):
        assert isinstance(conv2, DDF) and conv2.combine == name.split("_")[1]
        assert all(isinstance(block.conv2, DDF) for stage in model.stages for block in stage)
    else:
        assert isinstance(conv2, nnx.Conv)


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_every_cifar_model_runs_a_real_forward(name):
    model = small_model(name)
    model.eval()
    x = _images((2, 16, 16, 1))
    logits, features = _forward(model, x)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert {k: v.shape for k, v in features.items()} == {
        "stem": (2, 16, 16, 16),
        "stage1": (2, 16, 16, 64),
        "stage2": (2, 8, 8, 128),
        "stage3": (2, 4, 4, 256),
    }
    # The logits are the classifier applied to the pooled last stage.
    np.testing.assert_allclose(
        logits, model.fc(jnp.mean(features["stage3"], axis=(1, 2))), rtol=1e-5, atol=1e-5
    )
    # Different images give different logits (the network is not constant).
    assert float(jnp.abs(logits[0] - logits[1]).max()) > 1e-4


def test_odd_input_sizes_round_up():
    logits, features = eval_output_shapes(built_model("ddf_mul_resnet26"), (1, 57, 45, 3))
    assert logits.shape == (1, 1000)
    assert features["stem"].shape[1:3] == (15, 12)
    assert features["stage4"].shape[1:3] == (2, 2)


# ---------------------------------------------------------------------------
# Parameter layout.


def test_ddf_and_add_variants_share_parameter_layout():
    mul = nnx.state(built_model("ddf_mul_resnet50"), nnx.Param)
    add = nnx.state(built_model("ddf_add_resnet50"), nnx.Param)
    assert jax.tree.map(lambda v: v.shape, mul) == jax.tree.map(lambda v: v.shape, add)


# ---------------------------------------------------------------------------
# Initialisation (timm).


def test_timm_initialisation():
    model = small_model("ddf_mul_resnet20_cifar")

    def std(variable):
        return float(jnp.std(variable[...]))

    def kaiming(fan_out):
        return math.sqrt(2.0 / fan_out)

    block = model.layer3[1]
    # Kaiming normal, fan_out: a 3x3 conv, a 1x1 conv and the DDF branches' convs and dense layers.
    assert std(model.layer3[0].conv3.kernel) == pytest.approx(kaiming(256), rel=0.05)
    assert std(block.conv1.kernel) == pytest.approx(kaiming(64), rel=0.05)
    ddf = block.conv2
    assert std(ddf.spatial_branch.conv.kernel) == pytest.approx(kaiming(9), rel=0.1)
    assert std(ddf.channel_branch.fc1.kernel) == pytest.approx(kaiming(12), rel=0.1)
    assert std(ddf.channel_branch.fc2.kernel) == pytest.approx(kaiming(64 * 9), rel=0.05)
    assert abs(float(jnp.mean(ddf.channel_branch.fc2.kernel[...]))) < 0.1 * kaiming(64 * 9)
    conv_model = small_model("resnet20_cifar")
    assert std(conv_model.layer3[1].conv2.kernel) == pytest.approx(kaiming(9 * 64), rel=0.05)
    # BatchNorm 1/0, except the last BN of every block, which starts at 0.
    for stage in model.stages:
        for b in stage:
            for bn in (b.bn1, b.bn2):
                assert bool(jnp.all(bn.scale[...] == 1)) and bool(jnp.all(bn.bias[...] == 0))
            assert bool(jnp.all(b.bn3.scale[...] == 0))
            if b.downsample is not None:
                assert bool(jnp.all(b.downsample.bn.scale[...] == 1))
    # The classifier: PyTorch's nn.Linear default, uniform in +-1/sqrt(fan_in).
    bound = 1 / math.sqrt(256)
    assert float(jnp.abs(model.fc.kernel[...]).max()) <= bound
    assert float(jnp.abs(model.fc.kernel[...]).max()) > 0.9 * bound


def test_zero_init_last_can_be_turned_off():
    model = nnx.eval_shape(lambda: models.create_model("resnet18", zero_init_last=False, rngs=nnx.Rngs(0)))
    assert isinstance(model.layer1[0].bn2.scale, nnx.Param)
    real = models.create_model(
        "resnet20_cifar", num_classes=10, in_chans=1, zero_init_last=False, rngs=nnx.Rngs(0)
    )
    assert bool(jnp.all(real.layer1[0].bn3.scale[...] == 1))


# ---------------------------------------------------------------------------
# Train / eval, dtypes, overrides.


def test_train_mode_updates_batch_stats_and_eval_mode_uses_them():
    model = models.create_model("ddf_add_resnet20_cifar", num_classes=10, in_chans=1, rngs=nnx.Rngs(1))
    x = _images((4, 16, 16, 1), seed=2) * 3.0 + 1.0
    model.train()
    before = np.asarray(model.bn1.mean[...])
    train_logits, _ = _forward(model, x)
    after = np.asarray(model.bn1.mean[...])
    assert not np.allclose(before, after)
    # PyTorch momentum 0.1: new = 0.9 * old + 0.1 * batch mean.
    stem = model.conv1(x)
    batch_mean = np.asarray(jnp.mean(stem, axis=(0, 1, 2)))
    np.testing.assert_allclose(after, 0.9 * before + 0.1 * batch_mean, rtol=1e-4, atol=1e-5)
    model.eval()
    eval_logits, _ = _forward(model, x)
    np.testing.assert_array_equal(np.asarray(model.bn1.mean[...]), after)
    assert not np.allclose(train_logits, eval_logits)


def test_dtype_and_param_dtype():
    bf16 = nnx.eval_shape(
        lambda: models.create_model("ddf_mul_resnet20_cifar", num_classes=10, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    )
    assert bf16.layer1[0].conv2.channel_branch.fc2.kernel.dtype == jnp.float32
    logits, features = eval_output_shapes(bf16, (2, 16, 16, 3))
    assert logits.dtype == jnp.bfloat16 and features["stage3"].dtype == jnp.bfloat16
    half_params = nnx.eval_shape(
        lambda: models.create_model("ddf_mul_resnet20_cifar", param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    )
    dtypes = {v.dtype for v in jax.tree.leaves(nnx.state(half_params, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.slow
def test_bfloat16_forward_is_close_to_float32():
    model = small_model("ddf_mul_resnet20_cifar")
    model.eval()
    x = _images((2, 16, 16, 1), seed=3)
    # The same weights with bfloat16 computation.
    bf16_graphdef = nnx.graphdef(
        nnx.eval_shape(
            lambda: models.create_model(
                "ddf_mul_resnet20_cifar", num_classes=10, in_chans=1, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
            )
        )
    )
    bf16 = nnx.merge(bf16_graphdef, nnx.state(model))
    bf16.eval()
    reference, _ = _forward(model, x)
    low, _ = _forward(bf16, x)
    assert low.dtype == jnp.bfloat16
    tolerance = 0.05 * float(jnp.abs(reference).max()) + 0.02
    np.testing.assert_allclose(np.asarray(low, np.float32), reference, atol=tolerance)


@pytest.mark.parametrize("implementation", ["xla", ddf_jax.kernels.get_op("xla", "cpu")], ids=["name", "op"])
def test_implementation_is_passed_to_every_ddf_layer(implementation):
    model = nnx.eval_shape(
        lambda: models.create_model("ddf_add_resnet20_cifar", implementation=implementation, rngs=nnx.Rngs(0))
    )
    layers = [block.conv2 for stage in model.stages for block in stage]
    assert len(layers) == 6
    assert all(isinstance(layer, DDF) and layer.implementation is implementation for layer in layers)


def test_bad_implementation_fails_when_the_model_is_built():
    with pytest.raises(ValueError, match=r"implementation must be one of \('xla', .*\), None or an op, got 'cuda'"):
        models.create_model("ddf_add_resnet20_cifar", implementation="cuda", rngs=nnx.Rngs(0))


def test_in_chans_and_num_classes_overrides_and_input_check():
    model = built_model("resnet26", 7)
    assert eval_output_shapes(model, (1, 32, 32, 3))[0].shape == (1, 7)
    gray = nnx.eval_shape(lambda: models.create_model("resnet26", in_chans=1, rngs=nnx.Rngs(0)))
    assert gray.conv1.kernel.shape == (7, 7, 1, 64)
    with pytest.raises(ValueError, match=r"C = in_chans = 1, got shape \(1, 32, 32, 3\)"):
        eval_output_shapes(gray, (1, 32, 32, 3))


def test_bad_constructor_arguments():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="needs block='bottleneck'"):
        models.ResNet("basic", (1, 1), widths=(8, 8), conv2="ddf_mul", rngs=rngs)
    with pytest.raises(ValueError, match="equal length"):
        models.ResNet("bottleneck", (1, 1), widths=(8,), rngs=rngs)
    with pytest.raises(ValueError, match="block must be one of"):
        models.ResNet("wide", (1,), widths=(8,), rngs=rngs)
    with pytest.raises(ValueError, match="stem must be one of"):
        models.ResNet("basic", (1,), widths=(8,), stem="tiny", rngs=rngs)
    with pytest.raises(ValueError, match=r"conv2 must be one of \('conv', 'ddf_mul', 'ddf_add'\), got 'ddf_mull'"):
        models.Bottleneck(8, 4, norm=None, conv2="ddf_mull", rngs=rngs)
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        models.ResNet("basic", (1,), widths=(8,), num_classes=0, rngs=rngs)
    with pytest.raises(TypeError, match="layers"):
        models.ResNet("basic", (1.5,), widths=(8,), rngs=rngs)
    with pytest.raises(ValueError, match="se_ratio"):
        models.ResNet("bottleneck", (1,), widths=(4,), conv2="ddf_mul", se_ratio=0.1, rngs=rngs)


# ---------------------------------------------------------------------------
# Command line.


def test_cli_list(capsys):
    assert cli.main(["--list"]) == 0
    assert capsys.readouterr().out.split() == models.list_models()


def test_cli_counts(capsys):
    assert cli.main(["ddf_mul_resnet20_cifar", "--image-size", "32", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    model = nnx.eval_shape(
        lambda: models.create_model("ddf_mul_resnet20_cifar", num_classes=10, rngs=nnx.Rngs(0))
    )
    assert f"params: {ddf_jax.count_params(model):,}" in out
    assert f"MACs:   {ddf_jax.count_macs(model, (1, 32, 32, 3)):,}" in out


def test_cli_rejects_unknown_model(capsys):
    with pytest.raises(SystemExit):
        cli.main(["resnet5"])
    assert "unknown model 'resnet5'" in capsys.readouterr().err
