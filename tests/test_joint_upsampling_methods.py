"""Tests for the up-samplers of experiments/joint_upsampling: the classical baselines and the networks.

The data, protocol and training tests are in test_joint_upsampling.py, NYU Depth v2 in
test_joint_upsampling_nyu.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ddf_jax
from experiments.joint_upsampling import baselines, downsampling, models, synthetic, train

# --------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------


def _slow_box_mean(x, r):
    h, w = x.shape[:2]
    out = np.zeros(x.shape, np.float64)
    for i in range(h):
        for j in range(w):
            out[i, j] = x[max(i - r, 0) : i + r + 1, max(j - r, 0) : j + r + 1].mean(axis=(0, 1))
    return out


def _slow_guided_filter(guide, p, r, eps):
    """Per-window ridge regression, then per-pixel average of the covering windows' models."""
    guide = guide if guide.ndim == 3 else guide[..., None]
    h, w, c = guide.shape
    a = np.zeros((h, w, c))
    b = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            window = (slice(max(i - r, 0), i + r + 1), slice(max(j - r, 0), j + r + 1))
            gi = guide[window].reshape(-1, c)
            pi = p[window].reshape(-1)
            mu, pm = gi.mean(0), pi.mean()
            sigma = (gi - mu).T @ (gi - mu) / len(gi)
            cov = (gi - mu).T @ (pi - pm) / len(gi)
            a[i, j] = np.linalg.solve(sigma + eps * np.eye(c), cov)
            b[i, j] = pm - a[i, j] @ mu
    q = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            window = (slice(max(i - r, 0), i + r + 1), slice(max(j - r, 0), j + r + 1))
            q[i, j] = a[window].reshape(-1, c).mean(0) @ guide[i, j] + b[window].mean()
    return q


def test_box_mean_matches_loop():
    x = np.random.default_rng(0).normal(size=(7, 9, 2))
    for r in (0, 1, 3, 12):
        np.testing.assert_allclose(baselines.box_mean(x, r), _slow_box_mean(x, r), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("radius,eps", [(1, 1e-3), (2, 1e-1)])
def test_guided_filter_matches_slow_reference(channels, radius, eps):
    rng = np.random.default_rng(channels * 10 + radius)
    guide = rng.uniform(size=(7, 10, channels))
    if channels == 1:
        guide = guide[..., 0]
    p = rng.normal(size=(7, 10))
    got = baselines.guided_filter(guide, p, radius, eps)
    np.testing.assert_allclose(got, _slow_guided_filter(guide, p, radius, eps), rtol=1e-4, atol=1e-5)


def test_guided_filter_keeps_edges_that_the_guide_has():
    guide = np.zeros((20, 20))
    guide[:, 10:] = 1.0
    p = guide * 5.0 + 1.0
    np.testing.assert_allclose(baselines.guided_filter(guide, p, 3, 1e-6), p, atol=1e-3)
    with pytest.raises(ValueError, match="eps"):
        baselines.guided_filter(guide, p, 3, 0.0)
    with pytest.raises(ValueError, match="guide"):
        baselines.guided_filter(guide[:5], p, 3, 1e-3)


def test_bilinear_and_bicubic_shapes_and_constants():
    low = np.random.default_rng(0).normal(size=(2, 3, 5, 1)).astype(np.float32)
    assert baselines.bilinear(low, 4).shape == (2, 12, 20, 1)
    assert baselines.bicubic(low[0, ..., 0], 2).shape == (6, 10)
    np.testing.assert_allclose(baselines.bicubic(np.full((3, 4), 7.0), 8), 7.0, rtol=1e-6)
    # Half-pixel centres: the mean of each 2x2 block of a bilinear x2 of a ramp is the ramp.
    ramp = np.arange(6, dtype=np.float32)[None, :].repeat(4, 0)
    up = baselines.bilinear(ramp, 2)
    np.testing.assert_allclose(up.reshape(4, 2, 6, 2).mean(axis=(1, 3))[:, 1:-1], ramp[:, 1:-1], atol=1e-6)


def test_tune_guided_filter_picks_grid_minimum():
    source = synthetic.SyntheticRGBD(seed=4, height=32, width=32)
    examples = [downsampling.make_example(**source[i], scale=4) for i in range(2)]
    tuned = baselines.tune_guided_filter(examples, 4, (1, 4), (1e-3, 1e-1))
    assert len(tuned["grid"]) == 4
    assert tuned["rmse"] == min(row[2] for row in tuned["grid"])


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddf_up_net", "plain_net"])
def test_models_shapes_and_bilinear_residual(name):
    model = models.create_model(name, 4, base_features=4, max_features=8, guide_base_features=4,
                                guide_max_features=4, rngs=train.init_rngs(0))
    guide = jax.random.uniform(jax.random.key(0), (2, 16, 24, 3))
    low_res = 10.0 + jax.random.uniform(jax.random.key(1), (2, 4, 6, 1))
    forward = nnx.jit(lambda m, g, l: m(g, l))
    out = forward(model, guide, low_res)
    assert out.shape == (2, 16, 24, 1) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out)) and not np.allclose(out, baselines.bilinear(low_res, 4))
    # With a zero head the output is exactly the bilinear up-sampling.
    model.head.kernel[...] = jnp.zeros_like(model.head.kernel[...])
    model.head.bias[...] = jnp.zeros_like(model.head.bias[...])
    np.testing.assert_allclose(forward(model, guide, low_res), baselines.bilinear(low_res, 4), rtol=1e-6)
    with pytest.raises(ValueError, match="low_res"):
        model(guide, low_res[:, :3])


def test_pixel_unshuffle_and_unshuffled_guide_option():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    y = models.pixel_unshuffle(x, 2)
    assert y.shape == (2, 2, 3, 12)
    # Channel (i*2 + j)*C + c of output pixel (p, q) is input pixel (2p + i, 2q + j), channel c.
    np.testing.assert_array_equal(y[1, 1, 2, (1 * 2 + 0) * 3 + 2], x[1, 3, 4, 2])
    with pytest.raises(ValueError, match="divisible"):
        models.pixel_unshuffle(x[:, :3], 2)
    net = models.ddf_up_net(4, base_features=8, max_features=8, guide_base_features=4, guide_max_features=4,
                            guide_unshuffle=True, rngs=train.init_rngs(0))
    assert net.stages[0].up.guide_features == 4 + 4 * 4
    out = nnx.jit(lambda m, g, l: m(g, l))(net, jnp.ones((1, 8, 8, 3)) * 0.3, jnp.ones((1, 2, 2, 1)))
    assert out.shape == (1, 8, 8, 1)


class _ZeroUp(nnx.Module):
    def __call__(self, x, guide=None):
        n, h, w, c = x.shape
        return jnp.zeros((n, 2 * h, 2 * w, c), x.dtype)


@pytest.mark.parametrize("bilinear_skip", [True, False])
def test_ddf_stage_bilinear_skip(bilinear_skip):
    stage = models.UpStage(8, 4, 4, 4, "ddf", bilinear_skip=bilinear_skip, rngs=train.init_rngs(0))
    stage.up = _ZeroUp()  # Isolate the skip: DDF-Up contributes nothing.
    x = jax.random.normal(jax.random.key(0), (1, 3, 5, 8))
    guide_in = jax.random.normal(jax.random.key(1), (1, 3, 5, 4))
    guide_out = jax.random.normal(jax.random.key(2), (1, 6, 10, 4))
    up = models.upsample_bilinear(x, 2) if bilinear_skip else jnp.zeros((1, 6, 10, 8))
    expected = jax.nn.relu(stage.refine(jax.nn.relu(stage.fuse(jnp.concatenate([up, guide_out], -1)))))
    np.testing.assert_allclose(stage(x, guide_in, guide_out), expected, rtol=1e-5, atol=1e-6)


def test_model_param_counts_are_close_and_ddf_up_is_used():
    ddf = nnx.eval_shape(lambda: models.ddf_up_net(8, rngs=nnx.Rngs(0)))
    plain = nnx.eval_shape(lambda: models.plain_net(8, rngs=nnx.Rngs(0)))
    n_ddf, n_plain = ddf_jax.count_params(ddf), ddf_jax.count_params(plain)
    assert abs(n_ddf - n_plain) / n_plain < 0.15
    from ddf_jax.nn import DDFUp

    assert all(isinstance(stage.up, DDFUp) for stage in ddf.stages) and len(ddf.stages) == 3
    with pytest.raises(ValueError, match="power of two"):
        models.ddf_up_net(6, rngs=nnx.Rngs(0))
    assert [models.num_stages(s) for s in (2, 4, 8, 16)] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="model must be"):
        models.create_model("resnet", 4, rngs=nnx.Rngs(0))


