"""Random-noise robustness (Figs. 3/5): flip rates against an analytic answer, image selection, heat maps."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from bang_jax.noise import flip_rates, noise_study, plot_noise_study, select_noise_images


def threshold_apply(variables, x):
    """Two classes: class 1 iff the single pixel exceeds variables['t']."""
    s = x.reshape(x.shape[0], -1)[:, 0] - variables["t"]
    return jnp.stack([jnp.zeros_like(s), s], axis=1)


def test_flip_rate_matches_the_normal_tail():
    x = np.full((4, 1, 1, 1), 90.0, np.float32)
    rates = flip_rates(threshold_apply, {"t": 100.0}, x, [0.0, 10.0, 20.0], copies=2000, seed=1)
    expected = [0.0, 100 * 0.5 * math.erfc(1.0 / math.sqrt(2)), 100 * 0.5 * math.erfc(0.5 / math.sqrt(2))]
    assert rates[0] == 0.0
    np.testing.assert_allclose(rates[1:], expected[1:], atol=1.5)  # 8,000 draws each: σ of the estimate ≈ 0.4


def test_select_noise_images_needs_every_model_right():
    labels = np.array([0, 1, 0, 1, 0, 1])
    a = np.array([0, 1, 1, 1, 0, 1])
    b = np.array([0, 1, 0, 0, 0, 1])
    np.testing.assert_array_equal(select_noise_images([a, b], labels, per_class=2), [0, 1, 4, 5])
    with pytest.raises(ValueError, match="class 0"):
        select_noise_images([a, b], labels, per_class=3)


def test_noise_study_and_heat_maps(tmp_path):
    x = np.concatenate([np.full((3, 1, 1, 1), 90.0), np.full((3, 1, 1, 1), 140.0)]).astype(np.float32)
    y = np.array([0, 0, 0, 1, 1, 1])
    ckpts = {
        "easy": [(0, {"t": 100.0}), (500, {"t": 110.0})],  # margin 10 then 20 for class 0
        "hard": [(0, {"t": 95.0}), (500, {"t": 95.0})],
    }
    study = noise_study(threshold_apply, ckpts, x, y, [0.0, 10.0, 30.0], per_class=3, copies=200, progress=False)
    assert study.rates["easy"].shape == (2, 3) and study.iterations == [0, 500]
    assert (study.rates["hard"][:, 1:] > study.rates["easy"][:, 1:]).all()
    assert study.rates["easy"][1, 1] < study.rates["easy"][0, 1]  # larger margin, fewer flips
    fig = plot_noise_study(study, tmp_path / "noise.png", title="test")
    meshes = [ax.collections[0] for ax in fig.axes[:3]]  # the panels (their colour bars come after)
    assert len(meshes) == 3
    # The cells drawn are the rates given (one per measured iteration and σ), the third their difference.
    np.testing.assert_array_equal(np.asarray(meshes[0].get_array()).reshape(2, 3), study.rates["easy"])
    np.testing.assert_array_equal(np.asarray(meshes[2].get_array()).reshape(2, 3),
                                  study.rates["easy"] - study.rates["hard"])
    # Each cell holds its measured σ and iteration, and cells meet halfway between measurements.
    coords = meshes[0].get_coordinates()
    x_edges, y_edges = coords[0, :, 0], coords[:, 0, 1]
    np.testing.assert_allclose(x_edges[1:-1], [5.0, 20.0])
    np.testing.assert_allclose(y_edges[1:-1], [250.0])
    assert all(x_edges[i] < s < x_edges[i + 1] for i, s in enumerate([0.0, 10.0, 30.0]))
    assert "difference" in fig.axes[-1].get_ylabel()
    image = plt_imread(tmp_path / "noise.png")
    assert image.std() > 0.05  # not a blank canvas


def plt_imread(path):
    import matplotlib.image

    return matplotlib.image.imread(path)
