"""BANG's η and the bang() optax transformation against independent computations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bang_jax
from bang_jax import bang, eta, mark_per_example, safe_norm


def eta_reference(norms, correct, epsilon, ratio):
    """docs/semantics.md written out with Python floats, one example at a time."""
    m = max(norms)
    out = []
    for n, c in zip(norms, correct):
        if n == 0:
            out.append(1.0)
            continue
        e = epsilon if c else epsilon * ratio
        out.append((m / n) ** (e * (1 - n / m)))
    return np.array(out)


def test_eta_matches_formula():
    norms = [0.5, 2.0, 1.0, 0.0, 0.01]
    correct = [True, True, False, True, False]
    got = np.asarray(eta(jnp.asarray(norms), jnp.asarray(correct), 0.8, 0.5))
    np.testing.assert_allclose(got, eta_reference(norms, correct, 0.8, 0.5), rtol=1e-6)
    assert got[1] == 1.0  # the largest norm gets η = 1
    assert got[3] == 1.0  # zero norm is skipped


def test_eta_all_zero_and_single_example():
    np.testing.assert_array_equal(eta(jnp.zeros(4), jnp.ones(4, bool), 0.8), np.ones(4))
    np.testing.assert_array_equal(eta(jnp.asarray([3.0]), jnp.asarray([True]), 0.8), [1.0])


def test_eta_saturated_regime_is_finite_and_accurate():
    # n_i/m = 1e-18: η = (1e18)^(ε(1-1e-18)) ≈ 1e18^0.815 ≈ 4.4e14 must stay finite in float32.
    norms = jnp.asarray([1e-20, 1e-2], jnp.float32)
    got = eta(norms, jnp.asarray([True, True]), 0.815)
    expected = math.exp(0.815 * (1 - 1e-18) * math.log(1e18))
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(float(got[0]), expected, rtol=1e-5)
    assert float(got[0] * norms[0]) <= float(norms[1])  # scaled norm stays ≤ m


def test_safe_norm_does_not_underflow():
    x = jnp.full((2, 100), 1e-22, jnp.float32).at[1].set(0.0)
    np.testing.assert_allclose(np.asarray(safe_norm(x)), [1e-21, 0.0], rtol=1e-5)
    # a naive sqrt(sum(x^2)) underflows to 0 in float32
    assert float(jnp.sqrt(jnp.sum(x[0] ** 2))) == 0.0


def _per_example_tree(n, seed=0):
    rng = np.random.default_rng(seed)
    grads = {
        "a": {
            "kernel": jnp.asarray(rng.normal(size=(n, 3, 2)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(n, 2)), jnp.float32),
        },
        "b": {"kernel": jnp.asarray(rng.normal(size=(n, 2, 4)), jnp.float32)},
    }
    na = jnp.asarray(rng.uniform(0.1, 3.0, n), jnp.float32)
    nb = jnp.asarray(rng.uniform(0.1, 3.0, n), jnp.float32)
    norms = {"a": {"kernel": na, "bias": na}, "b": {"kernel": nb}}
    correct = jnp.asarray(rng.uniform(size=n) > 0.3)
    return grads, norms, correct


def test_bang_matches_python_loop_with_per_layer_hyperparameters():
    n = 6
    grads, norms, correct = _per_example_tree(n)
    eps = {"a": 0.8, "b": 0.5}
    beta = {"a": 1.3, "b": 0.7}
    tx = bang(epsilon=eps, beta=beta, ratio=0.5)
    out, _ = jax.jit(lambda g, k, c: tx.update(mark_per_example(g), tx.init(None), kappa_norms=k, correct=c))(
        grads, norms, correct
    )
    for layer in ("a", "b"):
        w = eta_reference(list(np.asarray(norms[layer]["kernel"])), list(np.asarray(correct)), eps[layer], 0.5)
        for leaf in grads[layer]:
            g = np.asarray(grads[layer][leaf], np.float64)
            expected = beta[layer] * sum(w[i] * g[i] for i in range(n)) / n
            np.testing.assert_allclose(np.asarray(out[layer][leaf]), expected, rtol=2e-5, atol=1e-7)


def test_epsilon_zero_beta_one_is_the_plain_mean_exactly():
    grads, norms, correct = _per_example_tree(5, seed=1)
    tx = bang(epsilon=0.0, beta=1.0)
    out, _ = tx.update(mark_per_example(grads), tx.init(None), kappa_norms=norms, correct=correct)
    for g, o in zip(jax.tree.leaves(grads), jax.tree.leaves(out)):
        np.testing.assert_array_equal(np.asarray(o), np.asarray(jnp.tensordot(jnp.ones(5), g, axes=1) / 5))
        np.testing.assert_allclose(np.asarray(o), np.asarray(g).mean(0), rtol=1e-6)


def test_zero_norms_and_single_example_batches_are_finite():
    grads, norms, correct = _per_example_tree(4, seed=2)
    zero_norms = jax.tree.map(jnp.zeros_like, norms)
    tx = bang(epsilon=0.8)
    out, _ = tx.update(mark_per_example(grads), tx.init(None), kappa_norms=zero_norms, correct=correct)
    for g, o in zip(jax.tree.leaves(grads), jax.tree.leaves(out)):
        np.testing.assert_allclose(np.asarray(o), np.asarray(g).mean(0), rtol=1e-6)  # all zero: unchanged
    one = jax.tree.map(lambda x: x[:1], (grads, norms, correct))
    out1, _ = tx.update(mark_per_example(one[0]), tx.init(None), kappa_norms=one[1], correct=one[2])
    for g, o in zip(jax.tree.leaves(one[0]), jax.tree.leaves(out1)):
        np.testing.assert_allclose(np.asarray(o), np.asarray(g)[0], rtol=1e-6)


def test_bang_first_in_chain_then_decay():
    grads, norms, correct = _per_example_tree(4, seed=3)
    params = jax.tree.map(lambda g: jnp.ones(g.shape[1:]), grads)
    tx = optax.chain(bang(epsilon=0.0, beta=2.0), optax.add_decayed_weights(0.5))
    out, _ = tx.update(mark_per_example(grads), tx.init(params), params, kappa_norms=norms, correct=correct)
    for g, o in zip(jax.tree.leaves(grads), jax.tree.leaves(out)):
        # β scales the balanced gradient, not the decay
        np.testing.assert_allclose(np.asarray(o), 2.0 * np.asarray(g).mean(0) + 0.5, rtol=1e-5)


def test_no_recompilation_on_second_call():
    grads, norms, correct = _per_example_tree(4, seed=4)
    tx = bang(epsilon=0.8)
    traces = []

    @jax.jit
    def f(g, k, c):
        traces.append(1)
        return tx.update(mark_per_example(g), tx.init(None), kappa_norms=k, correct=c)[0]

    f(grads, norms, correct)
    f(jax.tree.map(lambda x: x + 1, grads), norms, correct)
    assert len(traces) == 1


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), {"a": -1.0}])
def test_bad_hyperparameters_raise(bad):
    for name in ("epsilon", "beta", "ratio"):
        kwargs = {"epsilon": 0.8, name: bad}
        with pytest.raises(ValueError, match=name):
            bang(**kwargs)


def test_misuse_raises_clear_errors():
    grads, norms, correct = _per_example_tree(4, seed=5)
    tx = bang(epsilon=0.8)
    state = tx.init(None)
    mean_grads = jax.tree.map(lambda g: g.mean(0), grads)
    with pytest.raises(ValueError, match="batch-mean"):
        tx.update(mean_grads, state, kappa_norms=norms, correct=correct)
    with pytest.raises(ValueError, match="batch"):
        tx.update(mark_per_example(jax.tree.map(lambda g: g[:3], grads)), state, kappa_norms=norms, correct=correct)
    grads = mark_per_example(grads)
    with pytest.raises(ValueError, match="kappa_norms"):
        tx.update(grads, state, correct=correct)
    with pytest.raises(ValueError, match="kappa_norms"):
        tx.update(grads, state, kappa_norms=jax.tree.map(lambda k: k[:3], norms), correct=correct)
    with pytest.raises(ValueError, match="correct"):
        tx.update(grads, state, kappa_norms=norms, correct=correct[:, None])
    with pytest.raises(ValueError, match="structure"):
        tx.update(grads, state, kappa_norms={"a": norms["a"]}, correct=correct)
    with pytest.raises(ValueError, match="cover"):
        bang(epsilon={"a": 0.8}).update(grads, state, kappa_norms=norms, correct=correct)


def test_subnormal_norms_count_as_zero_instead_of_producing_nan():
    tiny = np.finfo(np.float32).tiny
    norms = jnp.asarray([tiny / 8, 1e-3, 1e-37], jnp.float32)  # subnormal, normal, small normal
    e = np.asarray(jax.jit(eta)(norms, jnp.ones(3, bool), 0.815))
    assert np.isfinite(e).all() and e[0] == 1.0 and e[2] > 1e25
    kappa = jnp.asarray([[tiny / 4, -tiny / 8], [3.0, 4.0]], jnp.float32)
    np.testing.assert_allclose(np.asarray(jax.jit(safe_norm)(kappa)), [0.0, 5.0])


def test_bang_config_is_the_one_validator_and_a_pytree():
    cfg = bang_jax.BangConfig(epsilon={"a": 0.8, "b": 0.7}, beta=1.2)
    assert not cfg.is_regular and bang_jax.BangConfig().is_regular and bang_jax.BangConfig(beta=1.0).is_regular
    assert cfg.to_json() == {"epsilon": {"a": 0.8, "b": 0.7}, "beta": 1.2, "ratio": 1.0}
    params = {"a": {"w": jnp.ones(2), "b": jnp.ones(())}, "b": {"w": jnp.ones(3)}}
    full = cfg.broadcast(params)
    assert jax.tree.structure(full.epsilon) == jax.tree.structure(params)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), full, bang_jax.BangConfig().broadcast(params))
    assert isinstance(stacked, bang_jax.BangConfig) and stacked.beta["a"]["w"].shape == (2,)
    with pytest.raises(ValueError, match="ratio"):
        bang_jax.BangConfig(ratio=-1.0)
    with pytest.raises(ValueError, match="epsilon"):
        bang_jax.BangConfig(epsilon={"a": float("nan")})
    with pytest.raises(ValueError, match="either config"):
        bang_jax.bang(epsilon=0.8, config=cfg)
    with pytest.raises(TypeError, match="epsilon"):
        bang_jax.bang()


def _chain_setup(seed=6):
    grads, norms, correct = _per_example_tree(4, seed=seed)
    params = jax.tree.map(lambda g: jnp.ones(g.shape[1:]), grads)
    return mark_per_example(grads), norms, correct, params


@pytest.mark.parametrize("before", [optax.adamw(1e-3), optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9)])
def test_bang_after_a_stateful_transformation_fails_naming_bang(before):
    """Adam's moments, momentum and weight decay would take per-example shapes silently: the marker stops them."""
    grads, norms, correct, params = _chain_setup()
    tx = optax.chain(before, bang(epsilon=0.8))
    with pytest.raises((ValueError, TypeError), match="bang_jax.bang\\(\\), placed FIRST"):
        tx.update(grads, tx.init(params), params, kappa_norms=norms, correct=correct)


@pytest.mark.parametrize("before", [optax.clip_by_global_norm(1e-3), optax.scale(0.5), optax.scale_by_sign()])
def test_bang_after_an_elementwise_transformation_fails_eagerly_and_under_jit(before):
    grads, norms, correct, params = _chain_setup()
    tx = optax.chain(before, bang(epsilon=0.8))
    with pytest.raises(ValueError, match="placed before bang"):
        tx.update(grads, tx.init(params), params, kappa_norms=norms, correct=correct)
    step = jax.jit(lambda g, k, c: tx.update(g, tx.init(params), params, kappa_norms=k, correct=c)[0])
    with pytest.raises(Exception, match="placed before bang"):
        jax.block_until_ready(step(grads, norms, correct))
    # First in the chain, the same transformation is fine.
    ok = optax.chain(bang(epsilon=0.8), before)
    jax.block_until_ready(
        jax.jit(lambda g, k, c: ok.update(g, ok.init(params), params, kappa_norms=k, correct=c)[0])(
            grads, norms, correct
        )
    )


def test_per_example_gradients_cannot_reach_apply_updates_or_multisteps():
    grads, norms, correct, params = _chain_setup()
    with pytest.raises(TypeError, match="only bang_jax.bang\\(\\) accepts them"):
        optax.apply_updates(params, grads)
    inner = optax.chain(bang(epsilon=0.8), optax.sgd(0.1))
    ms = optax.MultiSteps(inner, 2)
    with pytest.raises(ValueError, match="MultiSteps"):
        ms.update(grads, ms.init(params), params, kappa_norms=norms, correct=correct)
    # Accumulating the balanced gradient is the right composition.
    acc = optax.chain(bang(epsilon=0.8), optax.MultiSteps(optax.sgd(0.1), 2).gradient_transformation())
    state = acc.init(params)
    for _ in range(2):
        updates, state = acc.update(grads, state, params, kappa_norms=norms, correct=correct)
    assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))


def test_bang_inside_masked_and_multi_transform():
    grads, norms, correct, params = _chain_setup()
    ref, _ = bang(epsilon=0.8).update(grads, None, params, kappa_norms=norms, correct=correct)
    labels = {"a": "bang", "b": "other"}
    tx = optax.multi_transform(
        {
            "bang": optax.chain(bang(epsilon=0.8), optax.scale(-1.0)),
            "other": optax.chain(bang(epsilon=0.0), optax.scale(-2.0)),
        },
        labels,
    )
    out, _ = tx.update(grads, tx.init(params), params, kappa_norms=norms, correct=correct)
    for leaf in ("kernel", "bias"):
        np.testing.assert_allclose(np.asarray(out["a"][leaf]), -np.asarray(ref["a"][leaf]), rtol=1e-6)
    plain_b = np.asarray(grads["b"]["kernel"].value).mean(0)
    np.testing.assert_allclose(np.asarray(out["b"]["kernel"]), -2.0 * plain_b, rtol=1e-5)
    # optax.masked alone leaves the masked-out leaves' per-example gradients unconsumed: applying them fails.
    masked = optax.masked(bang(epsilon=0.8), {"a": True, "b": False})
    out, _ = masked.update(grads, masked.init(params), params, kappa_norms=norms, correct=correct)
    np.testing.assert_allclose(np.asarray(out["a"]["bias"]), np.asarray(ref["a"]["bias"]), rtol=1e-6)
    with pytest.raises(TypeError, match="every partition must start with bang"):
        optax.apply_updates(params, out)


def test_fingerprints_sit_on_small_leaves_and_still_catch_a_transformation_before_bang():
    """Large per-example leaves carry no fingerprint (XLA may then fuse them away); the smallest always does."""
    rng = np.random.default_rng(8)
    grads = {
        "big": jnp.asarray(rng.normal(size=(3, 5000)), jnp.float32),
        "bigger": jnp.asarray(rng.normal(size=(3, 9000)), jnp.float32),
    }
    marked = mark_per_example(grads)
    assert marked["big"].fingerprint.shape == (3,) and marked["bigger"].fingerprint is None
    norms = {"big": jnp.ones(3), "bigger": jnp.ones(3)}
    tx = optax.chain(optax.scale(0.5), bang(epsilon=0.8))
    with pytest.raises(ValueError, match="placed before bang"):
        tx.update(marked, tx.init(None), kappa_norms=norms, correct=jnp.ones(3, bool))


def test_invalid_kappa_norms_are_refused_or_poison_the_whole_layer():
    """Concrete NaN, infinite or negative norms raise; traced ones make every η of the layer NaN (never a silent
    rescaling of the other examples, as one NaN once gave [1, 29.65, 1.76, 1])."""
    correct = jnp.ones(4, bool)
    for bad in (float("nan"), float("inf"), -1.0):
        norms = jnp.array([bad, 4.0, 2.0, 1.0])
        with pytest.raises(ValueError, match="kappa_norms must be finite and non-negative"):
            eta(norms, correct, 0.8)
        assert np.isnan(np.asarray(jax.jit(lambda n: eta(n, correct, 0.8))(norms))).all()
    ok = np.asarray(jax.jit(lambda n: eta(n, correct, 0.8))(jnp.array([8.0, 4.0, 2.0, 0.0])))
    assert np.isfinite(ok).all() and ok[0] == 1.0 and ok[3] == 1.0
