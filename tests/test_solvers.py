"""Caffe's SGD against a hand-computed update."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bang_jax.solvers import caffe_sgd, inv_schedule, multistep_schedule


def test_inv_and_multistep_schedules():
    inv = inv_schedule(0.01, 1e-4, 0.75)
    np.testing.assert_allclose(float(inv(0)), 0.01)
    np.testing.assert_allclose(float(inv(1000)), 0.01 * 1.1 ** -0.75, rtol=1e-6)
    np.testing.assert_allclose(float(inv(9999)), 0.01 * (1 + 0.9999) ** -0.75, rtol=1e-6)
    ms = multistep_schedule(0.001, (18000, 19000), 0.1)
    got = [float(ms(i)) for i in (0, 17999, 18000, 18999, 19000, 19999)]
    np.testing.assert_allclose(got, [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5], rtol=1e-6)


def test_two_steps_against_hand_computed_caffe_update():
    mu, wd = 0.9, 5e-4
    lr = inv_schedule(0.01, 1e-4, 0.75)
    params = {"fc": {"kernel": jnp.asarray([1.0, -2.0]), "bias": jnp.asarray([0.5])}}
    g1 = {"fc": {"kernel": jnp.asarray([0.3, 0.1]), "bias": jnp.asarray([-0.2])}}
    g2 = {"fc": {"kernel": jnp.asarray([-0.4, 0.2]), "bias": jnp.asarray([0.1])}}
    tx = caffe_sgd(inv_schedule(0.01, 1e-4, 0.75), mu, wd)
    state = tx.init(params)
    p = params
    for g in (g1, g2):
        u, state = tx.update(g, state, p)
        p = optax.apply_updates(p, u)

    # Caffe by hand: v ← μv + lr·lr_mult·(g + wd·w); w ← w − v
    w = {"kernel": np.array([1.0, -2.0]), "bias": np.array([0.5])}
    v = {k: np.zeros_like(a) for k, a in w.items()}
    for it, g in enumerate((g1, g2)):
        for k, mult in (("kernel", 1.0), ("bias", 2.0)):
            v[k] = mu * v[k] + float(lr(it)) * mult * (np.asarray(g["fc"][k]) + wd * w[k])
            w[k] = w[k] - v[k]
    for k in w:
        np.testing.assert_allclose(np.asarray(p["fc"][k]), w[k], rtol=1e-6)

    # optax.sgd puts lr outside the momentum buffer: different as soon as lr changes
    sgd = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=mu))
    s = sgd.init(params)
    q = params
    for g in (g1, g2):
        u, s = sgd.update(g, s, q)
        q = optax.apply_updates(q, u)
    assert not np.allclose(np.asarray(q["fc"]["kernel"]), w["kernel"], rtol=1e-9, atol=0)


@pytest.mark.parametrize("kwargs", [dict(momentum=-0.1), dict(weight_decay=float("nan")), dict(learning_rate=-1.0)])
def test_bad_solver_settings_raise(kwargs):
    with pytest.raises(ValueError):
        caffe_sgd(**({"learning_rate": 0.01} | kwargs))
