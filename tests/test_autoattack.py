"""AutoAttack's APGD in JAX: the step-size schedule, the losses, and the attacks on a model whose minimal
adversarial perturbations are known exactly (a linear classifier)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bang_jax.autoattack import (
    apgd,
    apgd_checkpoints,
    apgd_targeted,
    autoattack,
    dlr_loss,
    dlr_targeted_loss,
    fab_targeted,
    project_linf_box,
)


def test_checkpoints_follow_the_reference_schedule():
    assert list(np.flatnonzero(apgd_checkpoints(100))) == [21, 40, 56, 69, 79, 86, 92, 98]
    assert list(np.flatnonzero(apgd_checkpoints(10))) == list(range(1, 10))


def test_dlr_losses_ignore_shifts_and_scales_of_the_logits():
    z = jax.random.normal(jax.random.key(0), (6, 10)) * 5
    y = jnp.arange(6) % 10
    t = (y + 3) % 10
    np.testing.assert_allclose(dlr_loss(3 * z + 7, y), dlr_loss(z, y), rtol=1e-5)
    np.testing.assert_allclose(dlr_targeted_loss(0.5 * z - 2, y, t), dlr_targeted_loss(z, y, t), rtol=1e-5)
    wrong = np.argmax(z, axis=-1) != y
    np.testing.assert_array_equal(np.asarray(dlr_loss(z, y)) > 0, wrong)


@pytest.fixture(scope="module")
def linear():
    """A 10-class linear model on 4×4×1 images: the smallest L∞ change that flips image i to class j is
    (z_y − z_j) / ‖w_y − w_j‖₁ (the images sit mid-range, so the pixel bounds never bind)."""
    rng = np.random.default_rng(0)
    w = (0.01 * rng.normal(size=(16, 10))).astype(np.float32)  # logits of a few units: CE does not saturate
    x = rng.uniform(100, 155, (40, 4, 4, 1)).astype(np.float32)

    def logits_fn(images):
        return (images.reshape(images.shape[0], -1) - 127.5) @ w

    z = np.asarray(logits_fn(jnp.asarray(x)))
    y = np.argmax(z, axis=1)
    with np.errstate(invalid="ignore"):  # 0/0 on the true class, replaced by inf below
        gaps = (z[np.arange(40), y][:, None] - z) / np.abs(w[:, y].T[:, :, None] - w[None]).sum(axis=1)
    gaps[np.arange(40), y] = np.inf
    return logits_fn, x, y, gaps.min(axis=1), gaps


@pytest.mark.parametrize("loss, share", [("ce", 0.7), ("dlr", 0.9)])
def test_apgd_never_beats_the_minimal_perturbation_and_finds_most_that_fit(linear, loss, share):
    logits_fn, x, y, minimal, _ = linear
    eps = np.median(minimal)
    res = apgd(logits_fn, x, y, epsilon=eps, loss=loss, n_iter=30)
    assert len(set(y)) >= 5  # a varied problem
    assert not res.success[minimal > eps * 1.02].any()  # impossible: would be a wrong success
    # A loss's gradient need not point at the nearest class (PGD on the CE misses some too), so "most".
    assert res.success[minimal < eps * 0.98].mean() >= share
    assert np.all(res.linf[res.success] <= eps + 1e-3)
    assert np.all((res.adversarial >= 0) & (res.adversarial <= 255))
    # Each image has its own random stream: batching changes nothing.
    again = apgd(logits_fn, x, y, epsilon=eps, loss=loss, n_iter=30, batch_size=7)
    np.testing.assert_array_equal(again.success, res.success)
    np.testing.assert_allclose(again.adversarial, res.adversarial, atol=1e-4)


def test_dlr_sees_through_a_saturated_softmax_where_ce_does_not(linear):
    """The same linear model with logits 10⁵× larger: the float32 softmax saturates and the cross-entropy's
    gradient is exactly zero; the DLR loss is scale-invariant and finds what it finds on the unscaled model."""
    logits_fn, x, y, minimal, _ = linear
    big = lambda images: 1e5 * logits_fn(images)  # noqa: E731
    eps = np.median(minimal)
    ce = apgd(big, x, y, epsilon=eps, loss="ce", n_iter=30)
    dlr = apgd(big, x, y, epsilon=eps, loss="dlr", n_iter=30)
    np.testing.assert_array_equal(dlr.success, apgd(logits_fn, x, y, epsilon=eps, loss="dlr", n_iter=30).success)
    assert ce.success.sum() <= 0.5 * dlr.success.sum()


def test_targeted_apgd_reaches_the_classes_it_aims_at(linear):
    logits_fn, x, y, minimal, gaps = linear
    z = np.asarray(logits_fn(jnp.asarray(x)))
    second = np.argsort(z, axis=1)[:, -2]
    to_second = gaps[np.arange(len(x)), second]
    eps = np.median(to_second)
    one = apgd_targeted(logits_fn, x, y, epsilon=eps, n_targets=1, n_iter=30)
    assert one.success[to_second < eps * 0.98].all()
    # With every target, it finds every image whose nearest wrong class fits the budget.
    every = apgd_targeted(logits_fn, x, y, epsilon=eps, n_targets=9, n_iter=30)
    assert every.success[minimal < eps * 0.98].all() and not every.success[minimal > eps * 1.02].any()


def test_bad_inputs_are_named(linear):
    logits_fn, x, y, _, _ = linear
    with pytest.raises(ValueError, match="loss"):
        apgd(logits_fn, x, y, epsilon=4, loss="margin")
    with pytest.raises(ValueError, match="epsilon"):
        apgd(logits_fn, x, y, epsilon=-1)
    with pytest.raises(ValueError, match="bounds"):
        apgd(logits_fn, x / 255.0 - 0.5, y, epsilon=0.1)
    with pytest.raises(ValueError, match="labels"):
        apgd(logits_fn, x, y[:3], epsilon=4)
    with pytest.raises(ValueError, match="n_iter"):
        apgd(logits_fn, x, y, epsilon=4, n_iter=0)


def test_the_linf_projection_onto_a_hyperplane_in_a_box_is_the_smallest_step():
    rng = np.random.default_rng(3)
    for trial in range(20):
        n = 12
        x = rng.uniform(0, 10, n).astype(np.float32)
        w = rng.normal(size=n).astype(np.float32) * (rng.uniform(size=n) > 0.2)
        c = np.float32(rng.normal() * 20)
        d = np.asarray(project_linf_box(jnp.asarray(x), jnp.asarray(w), c, 0.0, 10.0))
        assert np.all(x + d >= -1e-4) and np.all(x + d <= 10 + 1e-4)
        r = float(w @ x + c)
        # brute force: the smallest λ whose best box-limited step reaches the hyperplane
        room = np.where(-np.sign(r) * np.sign(w) > 0, 10 - x, x)
        reach = lambda lam: float(np.sum(np.abs(w) * np.minimum(lam, room)))  # noqa: E731
        if reach(np.inf) < abs(r):  # unreachable: every pixel at its bound, as close as the box allows
            assert abs(float(w @ (x + d) + c)) <= abs(r)
            continue
        lo_, hi_ = 0.0, 20.0
        for _ in range(60):
            mid = (lo_ + hi_) / 2
            lo_, hi_ = (lo_, mid) if reach(mid) >= abs(r) else (mid, hi_)
        assert abs(float(w @ (x + d) + c)) < 1e-3 * max(1.0, abs(r)), trial
        assert np.abs(d).max() == pytest.approx(hi_, rel=1e-4, abs=1e-5), trial


def test_targeted_fab_finds_the_minimal_perturbations_of_a_linear_model(linear):
    """On a linear model the linearised boundary is the boundary: FAB-T succeeds exactly where the nearest class
    lies within the budget, and its perturbations are nearly minimal."""
    logits_fn, x, y, minimal, _ = linear
    eps = np.median(minimal)
    res = fab_targeted(logits_fn, x, y, epsilon=eps, n_iter=20)
    assert res.success[minimal < eps * 0.97].all() and not res.success[minimal > eps * 1.0001].any()
    big = fab_targeted(logits_fn, x, y, epsilon=1e3, n_iter=20)  # every image: its minimal-norm adversarial
    assert big.success.all()
    assert np.all(big.linf >= minimal * (1 - 1e-3)) and np.median(big.linf / minimal) < 1.03


def test_the_ensemble_leaves_robust_exactly_the_images_no_perturbation_within_the_budget_can_flip(linear):
    logits_fn, x, y, minimal, _ = linear
    eps = float(np.median(minimal))
    y_wrong = y.copy()
    y_wrong[0] = (y[0] + 1) % 10  # a clean error counts as not robust
    res = autoattack(logits_fn, x, y_wrong, eps)
    assert res.attack[0] == "clean" and not res.robust[0]
    rest = np.arange(1, len(x))
    assert res.robust[rest][minimal[rest] > eps * 1.0001].all()
    assert not res.robust[rest][minimal[rest] < eps * 0.97].any()
    assert set(res.attack) <= {"", "clean", "apgd-ce", "apgd-t", "fab-t", "square"}
    assert sum(res.fooled_by().values()) == int((~res.robust).sum())
    assert np.all(res.linf[~res.robust] <= eps + 1e-3) and res.robust_accuracy == pytest.approx(100 * res.robust.mean())
    fooled = ~res.robust & (res.attack != "clean")
    assert np.all(np.argmax(np.asarray(logits_fn(jnp.asarray(res.adversarial[fooled]))), axis=1) != y_wrong[fooled])
    with pytest.raises(ValueError, match="standard"):
        autoattack(logits_fn, x, y, eps, version="rand")


def test_autoattack_curve_is_the_exact_robust_accuracy_of_a_linear_model(linear):
    """In the robustness curves AutoAttack's robust accuracy at each budget is the share of images whose minimal
    perturbation exceeds it (known exactly here), never above what PGD-margin leaves; the report says which
    attack won where."""
    from bang_jax.robustness import masking_report, robustness_curves

    logits_fn, x, y, minimal, _ = linear
    budgets = [0.0] + [float(np.quantile(minimal, q)) for q in (0.3, 0.7)]
    budgets = [b * s for b, s in zip(budgets, (1.0, 0.98, 1.02))]  # clear of the exact thresholds
    curves = robustness_curves(logits_fn, x, y, budgets, attacks=("pgd_margin", "autoattack"), pgd_steps=10)
    aa = curves["attacks"]["autoattack"]
    exact = [100.0 * np.mean(minimal > b) for b in curves["epsilons"]]
    np.testing.assert_allclose(aa["robust_accuracy"], exact)
    assert all(a <= p for a, p in zip(aa["robust_accuracy"], curves["attacks"]["pgd_margin"]["robust_accuracy"]))
    assert [r["epsilon"] for r in aa["fooled_by"]] == [b for b in curves["epsilons"] if b > 0]
    fooled_total = sum(sum(v for k, v in r.items() if k != "epsilon") for r in aa["fooled_by"])
    assert fooled_total == int(np.sum(minimal <= max(budgets)))
    report = masking_report(logits_fn, x, y, curves=curves)
    assert report["autoattack"]["fooled_by"] == aa["fooled_by"]
    assert "AutoAttack" not in report["verdict"]  # a linear model hides nothing: its gradient attacks find all


def test_masking_report_flags_images_only_autoattacks_square_could_fool():
    """A linear model behind a stop-gradient (its input gradient is exactly zero, its decisions those of the linear
    model): AutoAttack's gradient attacks find nothing, its Square finds the images whose minimal perturbation
    fits the budget, and the verdict says so. (28×28 images: APGD's uniform random start moves a logit difference
    by a standard deviation ~15× smaller than the kept images' distance to the boundary.)"""
    from bang_jax.robustness import masking_report, robustness_curves

    rng = np.random.default_rng(1)
    w = (0.01 * rng.normal(size=(784, 10))).astype(np.float32)
    x = rng.uniform(60, 195, (60, 28, 28, 1)).astype(np.float32)

    def linear(images):
        return (images.reshape(images.shape[0], -1) - 127.5) @ w

    def logits_fn(images):  # the linear model's values, no gradient
        return jax.lax.stop_gradient(linear(images))

    z = np.asarray(linear(jnp.asarray(x)))
    y = np.argmax(z, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        gaps = (z[np.arange(len(x)), y][:, None] - z) / np.abs(w[:, y].T[:, :, None] - w[None]).sum(axis=1)
    gaps[np.arange(len(x)), y] = np.inf
    minimal = gaps.min(axis=1)
    eps = float(np.median(minimal))
    keep = minimal > 0.4 * eps  # nothing a random start could reach
    x, y, minimal = x[keep], y[keep], minimal[keep]
    curves = robustness_curves(logits_fn, x, y, (0.0, eps), attacks=("pgd_margin", "autoattack"), pgd_steps=5)
    by = curves["attacks"]["autoattack"]["fooled_by"][0]
    assert by["apgd-ce"] == by["apgd-t"] == by["fab-t"] == 0, by
    assert by["square"] >= max(2, 0.5 * np.sum(minimal < eps)), by
    assert curves["attacks"]["autoattack"]["robust_accuracy"][1] >= 100 * np.mean(minimal > eps) - 1e-9
    report = masking_report(logits_fn, x, y, curves=curves)
    assert report["verdict"].startswith("gradient masking") and "inside AutoAttack" in report["verdict"]


def test_iteration_chunks_and_empty_inputs():
    from bang_jax.autoattack import _chunk

    # checks for finished images every 5 of 100 iterations, 8 (+ a remainder of 1) of 9; one iteration per CPU call
    assert [_chunk(n, True) for n in (100, 7, 9, 8, 1, 97)] == [(1, 5), (1, 7), (1, 8), (1, 8), (1, 1), (1, 8)]
    assert _chunk(100, False) == (5, 5)  # a whole check interval per dispatch on an accelerator
    empty = np.zeros((0, 4, 4, 1), np.float32)
    res = autoattack(lambda v: v.reshape(v.shape[0], -1)[:, :10], empty, np.zeros(0, np.int32), 8.0)
    assert res.robust.shape == (0,) and res.linf.shape == (0,)


def test_images_leave_the_batch_when_done_without_changing_any_outcome():
    """FAB-T stops an image once it has an adversarial within the budget: the same successes as running every
    iteration (``minimise=True``), whose adversarials are never larger. APGD drops fooled images the same way:
    an image's result does not depend on the others in its batch."""
    rng = np.random.default_rng(5)
    w1 = jnp.asarray(rng.normal(size=(16, 12)) / 4, jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(12, 6)), jnp.float32)
    logits_fn = jax.jit(lambda v: jnp.tanh(v.reshape(v.shape[0], -1) / 64.0 @ w1) @ w2)
    x = rng.uniform(0, 255, (40, 4, 4, 1)).astype(np.float32)
    y = np.argmax(np.asarray(logits_fn(jnp.asarray(x))), axis=1)
    eps = 40.0
    fast = fab_targeted(logits_fn, x, y, epsilon=eps, n_iter=30)
    full = fab_targeted(logits_fn, x, y, epsilon=eps, n_iter=30, minimise=True)
    assert 0 < fast.success.sum() < len(x)
    np.testing.assert_array_equal(fast.success, full.success)
    assert np.all(full.linf[full.success] <= fast.linf[fast.success] + 1e-4)
    assert np.all(fast.linf[fast.success] <= eps + 1e-3)
    together = apgd(logits_fn, x, y, epsilon=eps / 2, n_iter=20)
    alone = [apgd(logits_fn, x[i : i + 1], y[i : i + 1], epsilon=eps / 2, n_iter=20).success[0] for i in range(8)]
    np.testing.assert_array_equal(together.success[:8], alone)
