"""Tables and figures of a run draw the data they are given."""

import matplotlib.image
import numpy as np

from experiments import reports


def test_fig1_perturbations_share_one_colour_scale(tmp_path):
    rng = np.random.default_rng(0)
    originals = rng.uniform(0, 255, (3, 8, 8, 1)).astype(np.float32)
    adv = {"R0": np.clip(originals + rng.normal(0, 5, originals.shape), 0, 255),
           "B1": np.clip(originals + rng.normal(0, 40, originals.shape), 0, 255)}
    fig = reports.plot_hc1_examples(tmp_path / "fig1.png", originals, adv, "t")
    rows = np.asarray(fig.axes[:15]).reshape(5, 3)  # original, R0 adv, R0 pert, B1 adv, B1 pert
    lim = max(float(np.abs(adv[n] - originals).max()) for n in adv)
    for row, name in ((2, "R0"), (4, "B1")):
        for j in range(3):
            image = rows[row, j].images[0]
            np.testing.assert_allclose(image.get_clim(), (-lim, lim), rtol=1e-6)
            np.testing.assert_allclose(image.get_array(), (adv[name][j] - originals[j]).mean(-1), atol=1e-4)
    assert any("perturbation" in ax.get_ylabel() for ax in fig.axes[15:])  # the colour bar
    assert matplotlib.image.imread(tmp_path / "fig1.png").std() > 0.05


def test_grid_plot_draws_the_models_given(tmp_path):
    results = [{"regular": True, "epsilon": 0.0, "beta": 1.0, "accuracy": 99.0}]
    pts = [(e, b) for b in (1.0, 1.3, 1.6) for e in (0.78, 0.81, 0.84)]
    results += [{"regular": False, "epsilon": e, "beta": b, "accuracy": 98 + e, "fgs_rate": 10 * b,
                 "hc1_pass_mean": 0.5} for e, b in pts]
    fig = reports.plot_grid(tmp_path / "grid.png", results, "t")
    scatter = [c for c in fig.axes[0].collections if c.get_offsets().shape[0] == len(pts)][0]
    np.testing.assert_allclose(sorted(map(tuple, scatter.get_offsets())), sorted(pts))
    assert fig.axes[0].get_title() == "accuracy (%)"
    assert matplotlib.image.imread(tmp_path / "grid.png").std() > 0.05


def test_table_rows_give_hyperparameters_for_every_model(tmp_path):
    rows = [{"id": "R0", "epsilon": 0.0, "beta": 1.0, "ratio": 1.0, "regular": True, "accuracy": 99.0},
            {"id": "L", "epsilon": {"conv1": 0.7, "ip1": 0.8}, "beta": 1.1, "ratio": 0.5, "accuracy": 98.0}]
    text = reports.write_table(tmp_path / "t.md", "T", rows, {"R0": {"accuracy": 99.16}})
    assert "| R0 | 1.00 | 0.000 | 1.00 | ours | 99.00% |" in text
    assert "| R0 | | | | paper | 99.16% |" in text
    assert "| L | 1.10 | conv1:0.700 ip1:0.800 | 0.50 | ours | 98.00% |" in text
    assert (tmp_path / "t.md").read_text() == text
