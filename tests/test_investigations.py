"""The investigation scripts behind robustness.md's findings (benchmarks/fgs_precision.py, cifar_variants.py)
compute what they say: checked on small synthetic cases, no data needed."""

import importlib
import sys
from pathlib import Path
from unittest import mock

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
cifar_variants = importlib.import_module("cifar_variants")
fgs_precision = importlib.import_module("fgs_precision")


def test_full_window_pooling_divides_every_window_by_nine_and_reaches_the_model():
    from bang_jax import models

    x = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
    full = np.asarray(cifar_variants.full_window_avg_pool(jnp.asarray(x), 3, 2))
    caffe = np.asarray(models.caffe_avg_pool(jnp.asarray(x), 3, 2))
    assert full.shape == caffe.shape == (2, 4, 4, 3)  # ceil mode: (8 − 3) / 2 → 4 outputs
    padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # the last window hangs over by one pixel
    expected = np.stack([np.stack([padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].sum(axis=(1, 2)) / 9
                                   for j in range(4)], 1) for i in range(4)], 1)
    np.testing.assert_allclose(full, expected, rtol=1e-6)
    np.testing.assert_allclose(full[:, :3, :3], caffe[:, :3, :3], rtol=1e-6)  # inner windows agree
    assert not np.allclose(full[:, 3], caffe[:, 3])  # border windows do not
    # the variant replaces the pooling the model calls (a refactor that bypassed the patch would fail here)
    model, v = models.build("cifar_quick")
    images = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)), jnp.float32)
    plain = model.apply(v, images)
    with mock.patch.object(models, "caffe_avg_pool", cifar_variants.full_window_avg_pool):
        patched = model.apply(v, images)
    assert not np.allclose(plain, patched)


class _Linear(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10, use_bias=False)(x.reshape(x.shape[0], -1))


def test_float64_softmax_loses_the_true_class_where_the_reference_does_not():
    """A linear model with a logit margin of ~100: 1 − p_true rounds to 0 in float64, so softmax − onehot keeps
    only the wrong classes' tiny terms, while the float64 stable loss gives −∇z_true + Σ p_j ∇z_j exactly."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(16, 10)).astype(np.float32)
    x = rng.uniform(0, 1, (3, 16)).astype(np.float32)
    y = np.array([0, 3, 7])
    x[:, 13:] = 0.0
    for i, c in enumerate(y):  # image i alone has marker pixel 13 + i, which raises its true logit by 100
        x[i, 13 + i] = 1.0
        w[13 + i, c] += 100.0
    model, v = _Linear(), {"params": {"Dense_0": {"kernel": jnp.asarray(w)}}}
    z = np.asarray(model.apply(v, x), np.float64)
    others = np.where(np.eye(10, dtype=bool)[y], -np.inf, z)
    assert (z[np.arange(3), y] - others.max(axis=1) > 80).all()
    ref = fgs_precision.reference_direction(model, v, x, y)
    f64 = fgs_precision.float64_softmax_direction(model, v, x, y)
    # ∇ softplus(lse_{j≠y} z_j − z_y) points along Σ_{j≠y} q_j w_j − w_y, q the softmax over the other classes
    q = np.exp(others - others.max(axis=1, keepdims=True))
    q /= q.sum(axis=1, keepdims=True)
    expected = np.sign(q @ w.T.astype(np.float64) - w.T[y])
    np.testing.assert_array_equal(ref, expected)
    assert ref.dtype == np.float32 and not np.array_equal(f64, ref)
