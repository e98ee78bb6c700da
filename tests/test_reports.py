"""Tables and figures of a run draw the data they are given."""

import matplotlib.image
import numpy as np
import pytest

from experiments import reports


def test_fig1_perturbations_share_one_colour_scale(tmp_path):
    rng = np.random.default_rng(0)
    originals = rng.uniform(0, 255, (3, 8, 8, 1)).astype(np.float32)
    adv = {"R0": np.clip(originals + rng.normal(0, 5, originals.shape), 0, 255),
           "B1": np.clip(originals + rng.normal(0, 40, originals.shape), 0, 255)}
    fig = reports.plot_hc1_examples(tmp_path / "fig1.png", originals, adv, "t")  # the old call still works
    rows = np.asarray(fig.axes[:15]).reshape(5, 3)  # original, R0 adv, R0 pert, B1 adv, B1 pert
    lim = max(float(np.abs(adv[n] - originals).max()) for n in adv)
    for row, name in ((2, "R0"), (4, "B1")):
        for j in range(3):
            image = rows[row, j].images[0]
            np.testing.assert_allclose(image.get_clim(), (-lim, lim), rtol=1e-6)
            np.testing.assert_allclose(image.get_array(), (adv[name][j] - originals[j]).mean(-1), atol=1e-4)
            assert rows[row, j].get_xlabel() == f"L∞ {np.abs(adv[name][j] - originals[j]).max():.0f}"
    assert "perturbation" in fig.axes[15].get_ylabel()  # the colour bar
    assert matplotlib.image.imread(tmp_path / "fig1.png").std() > 0.05


def _fig1_inputs(rng, n, channels, models):
    """n random images (26×30, not square) and per model an adversarial per image, the last one failed."""
    originals = np.round(rng.uniform(0, 255, (n, 26, 30, channels))).astype(np.float32)
    adv, predicted = {}, {}
    for k, name in enumerate(models):
        a = np.clip(originals + np.round(rng.normal(0, 8 * (k + 1), originals.shape)), 0, 255)
        a[-1] = originals[-1]  # no adversarial found: the line search returns the original
        adv[name], predicted[name] = a, rng.integers(0, 10, n)
    return originals, adv, predicted


def _extents(fig):
    """Lays out a (closed) figure as saved; returns the renderer for window extents."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _overlap(a, b):
    """Whether two display boxes overlap by more than half a pixel each way."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) > 0.5 and min(a.y1, b.y1) - max(a.y0, b.y0) > 0.5


@pytest.mark.parametrize(("n", "channels", "models"), [
    (6, 1, ("R0", "B1")), (1, 1, ("R0", "B1")), (3, 3, ("B0",)), (4, 3, ("R0", "B0", "LeNet B1 (BANG, long name)")),
])
def test_fig1_geometry_panels_align_and_the_colour_bar_stands_apart(tmp_path, n, channels, models):
    rng = np.random.default_rng(n + channels)
    originals, adv, predicted = _fig1_inputs(rng, n, channels, models)
    fig = reports.plot_hc1_examples(tmp_path / "fig1.png", originals, adv, "minimal HC1 perturbations: " +
                                    " vs ".join(models), predicted=predicted, labels=np.arange(n))
    rows = 1 + 2 * len(models)
    assert len(fig.axes) == rows * n + 1  # the image panels, row by row, then the colour bar
    grid = np.asarray(fig.axes[: rows * n]).reshape(rows, n)
    cbar = fig.axes[-1]
    renderer = _extents(fig)
    boxes = np.array([[ax.get_position().bounds for ax in row] for row in grid])  # x0, y0, w, h (after aspect)
    # every panel the same size, rows share their bottom edge, columns their left edge
    np.testing.assert_allclose(boxes[..., 2], boxes[0, 0, 2], rtol=1e-6)
    np.testing.assert_allclose(boxes[..., 3], boxes[0, 0, 3], rtol=1e-6)
    np.testing.assert_allclose(boxes[..., 0], np.broadcast_to(boxes[0, :, 0], (rows, n)), atol=1e-9)
    np.testing.assert_allclose(boxes[..., 1], np.broadcast_to(boxes[:, :1, 1], (rows, n)), atol=1e-9)
    assert np.all(np.diff(boxes[..., 0], axis=1) > boxes[..., :-1, 2])  # columns left to right, apart
    assert np.all(-np.diff(boxes[..., 1], axis=0) > boxes[1:, :, 3])  # rows top to bottom, apart
    # the image keeps its aspect: width / height of the panel in inches = 30 / 26
    w_in, h_in = boxes[0, 0, 2] * fig.get_figwidth(), boxes[0, 0, 3] * fig.get_figheight()
    assert w_in / h_in == pytest.approx(30 / 26, rel=1e-3)
    assert w_in > 0.9  # and is not shrunk to a thumbnail
    # the colour bar: right of every image, beside the perturbation rows, its label clear of its tick labels
    cb = cbar.get_position()
    assert cb.x0 > boxes[..., 0].max() + boxes[0, 0, 2]
    assert not any(_overlap(cbar.get_window_extent(renderer), ax.get_window_extent(renderer)) for ax in grid.flat)
    label = cbar.yaxis.label
    assert "perturbation" in label.get_text()
    lo, hi = sorted(cbar.get_ylim())
    ticks = [t for loc, t in zip(cbar.get_yticks(), cbar.yaxis.get_ticklabels()) if lo <= loc <= hi]
    assert ticks
    assert not any(_overlap(label.get_window_extent(renderer), t.get_window_extent(renderer)) for t in ticks)
    # no text covers an image, and every text is inside the figure
    texts = [t for ax in fig.axes for t in (ax.xaxis.label, ax.yaxis.label, ax.title) if t.get_text()]
    texts += [fig._suptitle, *ticks]
    for t in texts:
        box = t.get_window_extent(renderer)
        assert not any(_overlap(box, ax.get_window_extent(renderer)) for ax in grid.flat), t.get_text()
        assert fig.bbox.x0 - 0.5 <= box.x0 and box.x1 <= fig.bbox.x1 + 0.5, t.get_text()
        assert fig.bbox.y0 - 0.5 <= box.y0 and box.y1 <= fig.bbox.y1 + 0.5, t.get_text()
    # the PNG is the figure at 110 dpi
    png = matplotlib.image.imread(tmp_path / "fig1.png")
    np.testing.assert_allclose(png.shape[:2], (fig.get_figheight() * 110, fig.get_figwidth() * 110), atol=1)
    assert png.shape[2] in (3, 4)


def test_fig1_shows_the_class_fooled_into_and_failures(tmp_path):
    rng = np.random.default_rng(1)
    originals, adv, predicted = _fig1_inputs(rng, 4, 3, ("R0", "B1"))
    fig = reports.plot_hc1_examples(tmp_path / "a.png", originals, adv, "t", predicted=predicted)
    grid = np.asarray(fig.axes[:20]).reshape(5, 4)
    for i, name in enumerate(("R0", "B1")):
        assert [ax.get_xlabel() for ax in grid[1 + 2 * i, :3]] == [f"→ {k}" for k in predicted[name][:3]]
        assert [ax.get_xlabel() for ax in grid[2 + 2 * i, :3]] == [
            f"L∞ {np.abs(adv[name][j] - originals[j]).max():.0f}" for j in range(3)]
        # the last image equals its original: inferred as failed, no "L∞ 0" and no class
        assert grid[2 + 2 * i, 3].get_xlabel() == "failed"
        assert "→" not in grid[1 + 2 * i, 3].get_xlabel()
    # the caller's flags win: B1's first image marked failed, R0 (not named) still inferred
    failed = {"B1": np.array([True, False, False, False])}
    fig = reports.plot_hc1_examples(tmp_path / "b.png", originals, adv, "t", predicted=predicted, failed=failed)
    grid = np.asarray(fig.axes[:20]).reshape(5, 4)
    assert [ax.get_xlabel() for ax in grid[4]][0] == "failed"
    assert grid[4, 3].get_xlabel().startswith("L∞ 0")  # said not failed (e.g. misclassified when clean)
    assert grid[2, 3].get_xlabel() == "failed"
    # without predicted classes: no "→" labels, the rest unchanged
    fig = reports.plot_hc1_examples(tmp_path / "c.png", originals, adv, "t")
    assert not any("→" in ax.get_xlabel() for ax in fig.axes)
    assert np.asarray(fig.axes[:20]).reshape(5, 4)[2, 3].get_xlabel() == "failed"


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
