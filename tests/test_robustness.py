"""Square attack, minimal-budget PGD, robustness curves and the masking report on models with known answers."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bang_jax.attacks import (
    SQUARE_SCHEDULE,
    minimal_pgd_attack,
    pgd_attack,
    square_attack,
    square_fraction,
)
from bang_jax.robustness import (
    ATTACK_LABELS,
    ATTACKS,
    main as robustness_main,
    masking_report,
    plot_curves,
    robustness_curves,
)


def linear_model(scale=1.0, quantise=None):
    """Two classes on 4×4×1 images: z1 − z0 = scale·(x[0,0] − 0.5·x[1,1] − 30); Σ|w| = 1.5.

    For an image of class 0 with unscaled margin m (:func:`image`) the smallest L∞ that flips the class is
    m / 1.5 (x[0,0] up and x[1,1] down by ε); ``scale`` changes the logit margin, not the decision boundary.
    ``quantise`` (pixels) rounds the input first, behind a stop_gradient: the input gradient is then zero.
    """
    w = np.zeros((4, 4, 1), np.float32)
    w[0, 0, 0], w[1, 1, 0] = 1.0, -0.5
    w = jnp.asarray(w.reshape(1, -1))

    def fn(x):
        if quantise:
            x = jax.lax.stop_gradient(jnp.round(x / quantise) * quantise)
        s = jnp.sum(x.reshape(x.shape[0], -1) * w, axis=1) - 30.0
        return scale * jnp.stack([jnp.zeros_like(s), s], axis=1)

    return fn


def image(margin):
    """A 4×4×1 image of class 0 whose logit margin (unscaled) is ``margin``: x[0,0] = 50, x[1,1] set to match."""
    x = np.full((4, 4, 1), 50.0, np.float32)
    x[1, 1, 0] = 2 * (50.0 - 30.0 + margin)  # s = 50 − 0.5·x[1,1] − 30 = −margin
    return x


MARGINS = (2.0, 8.0, 16.0, 40.0)  # minimal L∞ 1.33, 5.33, 10.67, 26.67 pixels


def dataset():
    x = np.stack([image(m) for m in MARGINS] + [image(-5.0)])  # the last one is misclassified when clean
    return x, np.zeros(len(x), np.int32)


def paper_p(p_init, i, n_iters):
    """The Square paper's piecewise schedule, written out as in its description."""
    it = int(i / n_iters * 10000)
    for k, (lo, hi) in enumerate(zip((10,) + SQUARE_SCHEDULE, SQUARE_SCHEDULE[1:] + (10000,))):
        if lo < it <= hi:
            return p_init / 2 ** (k + 1)
    return p_init


def test_square_fraction_is_the_papers_schedule():
    for n_iters in (100, 1000, 10000):
        for i in [0, 1, 9, 10, 11, 49, 50, 51, 200, 201, 499, 999, 1000, 1001, 4000, 7999, 8001, 9999]:
            if i < n_iters:
                assert float(square_fraction(0.8, i, n_iters)) == pytest.approx(paper_p(0.8, i, n_iters)), (i, n_iters)


def test_square_never_beats_the_minimal_budget_and_finds_it_above():
    x, y = dataset()
    fn = linear_model()
    below = square_attack(fn, x[:4], y[:4], epsilon=1.3, queries=300)  # below every minimal L∞
    assert not below.success.any() and (below.queries == 300).all()
    res = square_attack(fn, x, y, epsilon=30.0, queries=300)  # above every minimal L∞ (26.67)
    assert res.success.all()
    assert res.queries[4] == 0 and res.linf[4] == 0  # clean error: nothing to do
    assert (res.queries[:4] >= 1).all() and (res.queries <= 300).all()
    delta = np.abs(res.adversarial - x).reshape(len(x), -1).max(axis=1)
    assert (delta <= 30.0 + 1e-4).all() and res.adversarial.min() >= 0 and res.adversarial.max() <= 255
    np.testing.assert_allclose(res.linf, delta)
    assert (np.asarray(jnp.argmax(fn(res.adversarial), axis=1)) != y).all()


def test_square_result_does_not_depend_on_batching_or_chunks():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(8 * 8 * 3, 5)).astype(np.float32) * 0.05)
    fn = jax.jit(lambda v: (v.reshape(v.shape[0], -1) - 128.0) @ w)
    x = rng.integers(0, 256, (11, 8, 8, 3)).astype(np.float32)
    y = np.asarray(jnp.argmax(fn(x), axis=1))
    a = square_attack(fn, x, y, epsilon=12.0, queries=60, batch_size=16, chunk_queries=None)
    b = square_attack(fn, x, y, epsilon=12.0, queries=60, batch_size=4, chunk_queries=7)
    c = square_attack(fn, x[5:6], y[5:6], epsilon=12.0, queries=60)  # alone: its index is 0, not 5
    np.testing.assert_array_equal(a.adversarial, b.adversarial)
    np.testing.assert_array_equal(a.queries, b.queries)
    assert 0 < a.success.sum() < len(x)  # a budget where it matters
    # an image's stream comes from its index, so alone it is an (equally valid) different random search
    assert c.queries.shape == (1,)
    # stops per image: successful images used fewer queries than the budget, failures all of it
    assert (a.queries[~a.success] == 60).all() and (a.queries[a.success] < 60).all()
    # every success is within the budget and classified wrongly
    assert (a.linf <= 12.0 + 1e-4).all()
    assert (np.asarray(jnp.argmax(fn(a.adversarial[a.success]), axis=1)) != y[a.success]).all()


def test_square_rejects_bad_arguments():
    x, y = dataset()
    fn = linear_model()
    for kwargs, match in [({"epsilon": -1.0}, "epsilon"), ({"epsilon": float("inf")}, "epsilon"),
                          ({"epsilon": 4.0, "queries": 0}, "queries"), ({"epsilon": 4.0, "p_init": 0.0}, "p_init"),
                          ({"epsilon": 4.0, "chunk_queries": 0}, "chunk_queries")]:
        with pytest.raises(ValueError, match=match):
            square_attack(fn, x, y, **kwargs)


def test_pgd_with_per_image_budgets_and_minimal_budget():
    x, y = dataset()
    fn = linear_model()
    thresholds = np.array(MARGINS) / 1.5
    res = pgd_attack(fn, x[:4], y[:4], epsilon=thresholds + np.array([0.2, -0.2, 0.2, -0.2]), steps=20)
    np.testing.assert_array_equal(res.success, [True, False, True, False])
    with pytest.raises(ValueError, match="epsilon"):
        pgd_attack(fn, x, y, epsilon=np.ones(3))
    with pytest.raises(ValueError, match="epsilon"):
        pgd_attack(fn, x[:2], y[:2], epsilon=np.array([1.0, -1.0]))
    mini = minimal_pgd_attack(fn, x, y, max_epsilon=32.0, search_steps=9, steps=20)
    assert mini.success.all()
    assert mini.linf[4] == 0  # misclassified when clean
    resolution = 32.0 / 2**9
    assert np.all(mini.linf[:4] >= thresholds - 1e-4)
    assert np.all(mini.linf[:4] <= thresholds + 2 * resolution), (mini.linf, thresholds)
    small = minimal_pgd_attack(fn, x, y, max_epsilon=8.0, search_steps=6, steps=20)
    np.testing.assert_array_equal(small.success, [True, True, False, False, True])
    with pytest.raises(ValueError, match="max_epsilon"):
        minimal_pgd_attack(fn, x, y, max_epsilon=0.0)


def test_curves_of_a_linear_model_are_known():
    x, y = dataset()
    fn = linear_model()
    eps = (0, 4, 8, 16, 32)
    c = robustness_curves(fn, x, y, eps, pgd_steps=20, square_queries=200)
    json.dumps(c)
    assert c["images"] == 5 and c["attacked"] == 4 and c["clean_accuracy"] == 80.0
    expected = [80.0, 60.0, 40.0, 20.0, 0.0]  # minimal L∞ 1.33, 5.33, 10.67, 26.67; one clean error
    for attack in ("fgs_exact", "pgd_ce", "pgd_margin"):
        assert c["attacks"][attack]["robust_accuracy"] == expected, attack
        assert c["attacks"][attack]["success_rate"] == [0.0, 25.0, 50.0, 75.0, 100.0]
    # FGS-exact gives the paper's integer minimal steps: floor(m / 1.5) + 1
    assert c["attacks"]["fgs_exact"]["min_linf"] == [2.0, 6.0, 11.0, 27.0, 0.0]
    # the paper's rule blanks the image whose margin (40) saturates float32 softmax: FGS never fools it
    assert c["attacks"]["fgs"]["robust_accuracy"] == [80.0, 60.0, 40.0, 20.0, 20.0]
    sq = c["attacks"]["square"]["robust_accuracy"]
    assert all(s >= e for s, e in zip(sq, expected)) and sq[-2] == 20.0
    assert c["best"]["robust_accuracy"] == expected
    for data in c["attacks"].values():
        assert all(a >= b for a, b in zip(data["robust_accuracy"], data["robust_accuracy"][1:]))  # monotone


def test_bad_arguments_are_rejected_before_any_attack_runs():
    calls = []

    def fn(v):
        calls.append(1)
        return linear_model()(v)

    x, y = dataset()
    with pytest.raises(ValueError, match="sqaure"):
        robustness_curves(fn, x, y, (0, 8), attacks=("pgd_margin", "sqaure"))
    with pytest.raises(ValueError, match="non-negative"):
        robustness_curves(fn, x, y, (0, -8))
    with pytest.raises(ValueError, match="square_queries"):
        robustness_curves(fn, x, y, (0, 8), square_queries=0)
    assert not calls

    from bang_jax.evaluate import evaluate_model

    for kwargs in ({"attacks": ("fgs", "bogus")}, {"attacks": ("square",), "square_queries": 0},
                   {"attacks": ("pgd",), "pgd_epsilons": (-1.0,)}, {"attacks": (), "curves": (0, 8),
                                                                    "curve_attacks": ("nope",)}):
        with pytest.raises(ValueError):
            evaluate_model(None, None, x, y, **kwargs)  # a model of None would fail if anything ran


def test_masking_report_verdicts():
    x, y = dataset()
    x = np.concatenate([x[:4]] * 4)  # 16 correctly classified images
    y = np.zeros(len(x), np.int32)
    eps = (0, 32)
    kw = dict(pgd_steps=10, square_queries=100)

    calm = linear_model(scale=0.25)  # logit margins 0.5, 2, 4, 10: the softmax never saturates
    plain = masking_report(calm, x, y, curves=robustness_curves(calm, x, y, eps, attacks=("pgd_margin", "square"),
                                                                **kw))
    json.dumps(plain)
    assert plain["ce_loss_zero_share"] == 0.0 and plain["verdict"].startswith("no sign of gradient masking")
    assert plain["margin_median"] == pytest.approx(3.0)
    assert sum(plain["margin_histogram"]["counts"]) == 16

    saturated = linear_model(scale=10.0)  # logit margins 20 … 400: float32 p_true == 1 (above ~16.6)
    rep = masking_report(
        saturated, x, y, curves=robustness_curves(saturated, x, y, eps, attacks=("fgs", "pgd_margin", "square"), **kw)
    )
    assert rep["ce_loss_zero_share"] == 100.0 and rep["margin_saturated_share"] == 100.0
    assert rep["verdict"].startswith("cross-entropy masking")

    shattered = linear_model(quantise=8.0)  # zero input gradient everywhere: only Square can move
    rep = masking_report(
        shattered, x, y, curves=robustness_curves(shattered, x, y, eps, attacks=("pgd_margin", "square"), **kw)
    )
    assert rep["ce_grad_zero_share"] == 100.0
    assert rep["verdict"].startswith("gradient masking"), rep["verdict"]
    row = rep["gap"]["rows"][-1]
    assert row["significant"] and row["square"] > row["gradient"]


def test_plot_curves_and_cli(tmp_path):
    import matplotlib.image

    x, y = dataset()
    c = robustness_curves(linear_model(), x, y, (0, 8, 32), attacks=("fgs", "pgd_margin"), pgd_steps=5)
    out = plot_curves({"A": c, "B": {"curves": c}}, tmp_path / "c.png")
    assert out == tmp_path / "c.png" and out.stat().st_size > 1000
    assert matplotlib.image.imread(out).shape[1] >= 900
    (tmp_path / "a.json").write_text(json.dumps(c))
    (tmp_path / "b.json").write_text(json.dumps({"curves": c}))
    robustness_main([str(tmp_path / "d.png"), str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--names", "R0,B1"])
    assert (tmp_path / "d.png").stat().st_size > 1000
    # a run's results.json (a list of rows): one panel per row; the same file stem twice needs --names
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps([{"id": "R0", "curves": c}, {"id": "B1", "curves": c}]))
    (tmp_path / "results.json").write_text(json.dumps([{"id": "x", "curves": c}]))
    robustness_main([str(tmp_path / "e.png"), str(run / "results.json")])
    assert (tmp_path / "e.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="two panels would be called results"):
        robustness_main([str(tmp_path / "f.png"), str(tmp_path / "results.json"), str(tmp_path / "results.json")])
    with pytest.raises(SystemExit, match="3 names for 2 panels"):
        robustness_main([str(tmp_path / "f.png"), str(run / "results.json"), "--names", "a,b,c"])
    (run / "bad.json").write_text(json.dumps([{"id": "R0", "curves": c}, {"id": "B1"}]))
    with pytest.raises(SystemExit, match=r"no curves in .*bad.json \(row 1\)"):
        robustness_main([str(tmp_path / "f.png"), str(run / "bad.json")])
    assert not (tmp_path / "f.png").exists()


def _fake_curves(k, attacks=ATTACKS):
    """Curves as :func:`robustness_curves` returns them, without attacking: decaying, a little apart."""
    eps = [0, 4, 8, 16, 24, 32, 48, 64]
    decay = lambda scale: [99.0 * math.exp(-e / scale) for e in eps]  # noqa: E731
    return {"epsilons": eps, "images": 100,
            "attacks": {a: {"robust_accuracy": decay(20 + 5 * j + 3 * k)} for j, a in enumerate(attacks)},
            "best": {"robust_accuracy": decay(18)}}


@pytest.mark.parametrize("models", [1, 2, 3, 4])
@pytest.mark.parametrize("title", [None, "mnist: robust accuracy vs L∞ budget"])
def test_plot_curves_legend_is_outside_the_panels_and_inside_the_image(tmp_path, models, title):
    import matplotlib.image
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from bang_jax.robustness import _CURVE_DPI, _curves_figure

    curves = {f"LeNet model {k} ({'regular' if k % 2 == 0 else 'BANG'})": _fake_curves(k) for k in range(models)}
    fig = _curves_figure(curves, title=title)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [ATTACK_LABELS[a] for a in ATTACKS] + ["best of all"]
    box, inside = legend.get_window_extent(renderer), fig.bbox
    assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    assert len(panels) == models
    for ax in panels:  # the legend covers no panel, so no curve
        a = ax.get_window_extent(renderer)
        assert box.x0 >= a.x1 or box.x1 <= a.x0 or box.y0 >= a.y1 or box.y1 <= a.y0
        assert ax.get_legend() is None
    # nothing is drawn outside the figure (so the tight crop only trims white margins)
    tight = fig.get_tightbbox(renderer)  # inches
    assert tight.x0 >= -0.01 and tight.y0 >= -0.01
    assert tight.x1 <= fig.get_figwidth() + 0.01 and tight.y1 <= fig.get_figheight() + 0.01
    out = plot_curves(curves, tmp_path / "c.png", title=title)
    png = matplotlib.image.imread(out)
    assert png.shape[1] >= 900
    np.testing.assert_allclose(png.shape[:2], (tight.height * _CURVE_DPI + 30, tight.width * _CURVE_DPI + 30), atol=3)
    if models == 4:  # four models wrap into 2 × 2
        assert len({round(ax.get_position().x0, 3) for ax in panels}) == 2


def test_evaluate_model_square_pgd_min_and_curves_are_json():
    import flax.linen as nn

    from bang_jax.evaluate import evaluate_model

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, v, train=False):
            return nn.Dense(3)(v.reshape(v.shape[0], -1) / 255.0 - 0.5)

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (12, 6, 6, 1)).astype(np.float32)
    model = Tiny()
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    y = np.array(jnp.argmax(model.apply(variables, x), axis=1))
    y[0] = (y[0] + 1) % 3  # one clean error
    row = evaluate_model(
        model,
        variables,
        x,
        y,
        attacks=("square", "pgd_min"),
        pgd_epsilons=(8.0,),
        square_queries=40,
        pgd_steps=5,
        curves=(0, 8, 64),
        progress=False,
    )
    json.dumps(row)
    assert row["attacked"] == 11 and {"square_rate_eps8", "pgd_min_rate", "pgd_min_linf_mean"} <= set(row)
    assert row["curves"]["epsilons"] == [0.0, 8.0, 64.0]
    assert set(row["curves"]["attacks"]) == {"fgs", "fgs_exact", "pgd_ce", "pgd_margin", "square"}
    assert isinstance(row["masking"]["verdict"], str)


def test_evaluate_model_runs_autoattack_and_refuses_models_it_cannot_attack():
    import flax.linen as nn

    from bang_jax.evaluate import evaluate_model

    class Tiny(nn.Module):
        classes: int

        @nn.compact
        def __call__(self, v, train=False):
            return nn.Dense(self.classes)(v.reshape(v.shape[0], -1) / 255.0 - 0.5)

    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (10, 6, 6, 1)).astype(np.float32)
    model = Tiny(5)
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    y = np.array(jnp.argmax(model.apply(variables, x), axis=1))
    row = evaluate_model(model, variables, x, y, attacks=("autoattack",), autoattack_budgets=(2.0, 8.0),
                         progress=False)
    json.dumps(row)
    for eps in ("2", "8"):
        fooled = sum(row[f"autoattack_fooled_by_eps{eps}"].values())
        assert row[f"autoattack_rate_eps{eps}"] == pytest.approx(100 * fooled / row["attacked"])
        assert row[f"autoattack_robust_accuracy_eps{eps}"] == pytest.approx(100 * (row["attacked"] - fooled) / 10)
    assert row["autoattack_rate_eps2"] <= row["autoattack_rate_eps8"]
    # Three classes: the targeted DLR loss needs four; refused before any attack runs.
    small = Tiny(3)
    v3 = small.init(jax.random.PRNGKey(0), x[:1])
    y3 = np.array(jnp.argmax(small.apply(v3, x), axis=1))
    with pytest.raises(ValueError, match="at least 4 classes"):
        evaluate_model(small, v3, x, y3, attacks=("fgs", "autoattack"), progress=False)


def test_evaluation_settings_of_older_runs_still_load():
    """Run directories written before a setting existed (here: autoattack_budgets) keep loading."""
    from bang_jax.evaluate import EvalConfig

    # config.json's "eval" as python -m experiments.mnist wrote it before AutoAttack existed (code 53c5385)
    saved = {"attacks": ["fgs", "hc1"], "hc1_max_step": 1020, "pgd_budgets": [16.0, 32.0, 64.0], "pgd_steps": 40,
             "pgd_min_max_budget": 64.0, "square_budgets": None, "square_queries": 1000, "curve_budgets": [],
             "curve_attacks": ["fgs", "fgs_exact", "pgd_ce", "pgd_margin", "square"], "seed": 0}
    loaded = EvalConfig.from_json(saved)
    assert loaded.autoattack_budgets is None and loaded.attacks == ("fgs", "hc1") and loaded.hc1_max_step == 1020
