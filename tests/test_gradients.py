"""per_example_grads and bang_grad against a hand-written model with a Python loop, and against each other."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bang_jax
from bang_jax import BangState, bang, bang_grad, per_example_grads, plain_grad, sample_dropout_masks
from bang_jax.models import CifarQuick, LeNet


class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Conv(2, (3, 3), padding="VALID", name="conv")(x)
        h = nn.relu(h).reshape((x.shape[0], -1))
        return nn.Dense(3, name="fc")(h)


def tiny_forward(params, x):
    """TinyNet for one example, written with lax directly; returns logits and the two pre-activations."""
    h1 = jax.lax.conv_general_dilated(
        x[None], params["conv"]["kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )[0] + params["conv"]["bias"].reshape(1, 1, -1)
    logits = jnp.maximum(h1, 0).reshape(-1) @ params["fc"]["kernel"] + params["fc"]["bias"]
    return logits, h1


def loop_reference(params, xs, ys, epsilon, beta, ratio):
    """BANG (paper eq. 6) by a Python loop over examples, κ from explicit derivatives w.r.t. pre-activations."""
    n = len(xs)
    grads, k1, k2, correct = [], [], [], []
    for x, y in zip(xs, ys):
        def loss_of(p):
            logits, _ = tiny_forward(p, x)
            return -jax.nn.log_softmax(logits)[y]

        logits, h1 = tiny_forward(params, x)
        grads.append(jax.grad(loss_of)(params))
        k2.append(float(jnp.linalg.norm(jax.nn.softmax(logits) - jax.nn.one_hot(y, 3))))
        def loss_of_h1(h):
            z = jnp.maximum(h, 0).reshape(-1) @ params["fc"]["kernel"] + params["fc"]["bias"]
            return -jax.nn.log_softmax(z)[y]
        k1.append(float(jnp.linalg.norm(jax.grad(loss_of_h1)(h1))))
        correct.append(int(jnp.argmax(logits)) == int(y))
    out = {}
    for layer, norms in (("conv", k1), ("fc", k2)):
        m = max(norms)
        etas = [
            1.0 if nn_ == 0 else (m / nn_) ** ((epsilon if c else epsilon * ratio) * (1 - nn_ / m))
            for nn_, c in zip(norms, correct)
        ]
        out[layer] = {
            leaf: beta * sum(etas[i] * np.asarray(grads[i][layer][leaf], np.float64) for i in range(n)) / n
            for leaf in ("kernel", "bias")
        }
    return out, np.array(correct), {"conv": np.array(k1), "fc": np.array(k2)}


@pytest.fixture(scope="module")
def tiny():
    model = TinyNet()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(7, 6, 6, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 7), jnp.int32)
    variables = model.init(jax.random.PRNGKey(0), x)
    return model, variables, x, y


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_both_paths_match_python_loop(tiny, ratio):
    model, variables, x, y = tiny
    expected, correct, norms = loop_reference(variables["params"], x, y, 0.8, 1.3, ratio)
    pe = per_example_grads(model.apply, variables, x, y)
    np.testing.assert_array_equal(np.asarray(pe.correct), correct)
    np.testing.assert_allclose(np.asarray(pe.kappa_norms["conv"]["kernel"]), norms["conv"], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(pe.kappa_norms["fc"]["bias"]), norms["fc"], rtol=1e-5)
    tx = bang(epsilon=0.8, beta=1.3, ratio=ratio)
    via_tx, _ = tx.update(pe.grads, tx.init(variables["params"]), kappa_norms=pe.kappa_norms, correct=pe.correct)
    single = jax.jit(lambda v: bang_grad(model.apply, v, x, y, epsilon=0.8, beta=1.3, ratio=ratio))(variables)
    for layer in expected:
        for leaf in expected[layer]:
            np.testing.assert_allclose(np.asarray(via_tx[layer][leaf]), expected[layer][leaf], rtol=2e-5, atol=1e-7)
            np.testing.assert_allclose(np.asarray(single[layer][leaf]), expected[layer][leaf], rtol=2e-5, atol=1e-7)


def test_epsilon_zero_is_plain_gradient(tiny):
    model, variables, x, y = tiny
    plain = plain_grad(model.apply, variables, x, y)
    single = bang_grad(model.apply, variables, x, y, epsilon=0.0)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(single)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)


def rel_err(a, b):
    return max(
        float(jnp.max(jnp.abs(u - v)) / jnp.maximum(jnp.max(jnp.abs(v)), 1e-30))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


@pytest.mark.parametrize("model_cls,shape", [(LeNet, (16, 28, 28, 1)), (CifarQuick, (12, 32, 32, 3))])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_single_pass_equals_per_example_on_paper_models(model_cls, shape, dropout, ratio):
    model = model_cls()
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(0, 256, shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, shape[0]), jnp.int32)
    variables = model.init(jax.random.PRNGKey(2), x[:1])
    if model_cls is CifarQuick:  # larger init so that the gradients are not dominated by rounding
        variables = {**variables, "params": jax.tree.map(lambda p: p * 30.0, variables["params"])}
    masks = (
        sample_dropout_masks(model.apply, variables, x, rngs={"dropout": jax.random.PRNGKey(3)}, train=True)
        if dropout
        else None
    )
    kw = dict(train=dropout, dropout_masks=masks)
    pe = jax.jit(lambda v: per_example_grads(model.apply, v, x, y, **kw))(variables)
    tx = bang(epsilon=0.815, beta=1.2, ratio=ratio)
    ref, _ = tx.update(pe.grads, BangState(), kappa_norms=pe.kappa_norms, correct=pe.correct)
    single = jax.jit(lambda v: bang_grad(model.apply, v, x, y, epsilon=0.815, beta=1.2, ratio=ratio, **kw))(variables)
    assert rel_err(single, ref) < 1e-5
    if dropout:  # masks drawn by sample_dropout_masks are exactly Flax's own
        with_rngs = bang_grad(
            model.apply,
            variables,
            x,
            y,
            epsilon=0.815,
            beta=1.2,
            ratio=ratio,
            rngs={"dropout": jax.random.PRNGKey(3)},
            train=True,
        )
        assert rel_err(with_rngs, single) < 1e-6


def test_layer_factored_per_example_grads_equal_vmap_of_grad_on_lenet():
    """LeNet's large leaves (the conv2, ip1 and ip2 kernels) come back layer-factored; their values, and bang() of
    them, equal plain jax.vmap(jax.grad(...)) of each example's loss, materialised and marked by hand."""
    model = LeNet()
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.integers(0, 256, (10, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 10), jnp.int32)
    variables = model.init(jax.random.PRNGKey(4), x[:1])
    pe = jax.jit(lambda v: per_example_grads(model.apply, v, x, y, factor_layers=True))(variables)
    factored = {k: {leaf: g.factored for leaf, g in d.items()} for k, d in pe.grads.items()}
    assert factored == {
        "conv1": {"kernel": False, "bias": False},
        "conv2": {"kernel": True, "bias": False},
        "ip1": {"kernel": True, "bias": False},
        "ip2": {"kernel": True, "bias": False},
    }
    assert "layer-factored" in repr(pe.grads["ip1"]["kernel"])

    def loss1(params, x1, y1):
        logits = model.apply({"params": params}, x1[None])
        return -jax.nn.log_softmax(logits[0])[y1]

    ref = jax.jit(jax.vmap(jax.grad(loss1), in_axes=(None, 0, 0)))(variables["params"], x, y)
    values = jax.tree.map(lambda g: g.value, pe.grads, is_leaf=lambda g: isinstance(g, bang_jax.PerExampleGrad))
    assert rel_err(values, ref) < 1e-5
    tx = bang(epsilon=0.815, beta=1.2, ratio=0.5)
    got = jax.jit(lambda g, k, c: tx.update(g, BangState(), kappa_norms=k, correct=c)[0])(
        pe.grads, pe.kappa_norms, pe.correct
    )
    want, _ = tx.update(bang_jax.mark_per_example(ref), BangState(), kappa_norms=pe.kappa_norms, correct=pe.correct)
    assert rel_err(got, want) < 1e-5
    # a transformation placed before bang() is still caught (on the stored leaves' fingerprints)
    with pytest.raises(ValueError, match="changed after they were computed"):
        optax.chain(optax.scale(0.5), bang(epsilon=0.8)).update(
            pe.grads,
            optax.chain(optax.scale(0.5), bang(epsilon=0.8)).init(variables["params"]),
            kappa_norms=pe.kappa_norms,
            correct=pe.correct,
        )


def test_saturated_softmax_regime_in_float64():
    """η up to ~1e15: both paths agree in float64 and stay finite (docs/semantics.md numerics)."""
    with jax.enable_x64(True):
        model = TinyNet()
        rng = np.random.default_rng(5)
        x = jnp.asarray(rng.normal(size=(8, 6, 6, 1)) * 20.0, jnp.float64)
        variables = model.init(jax.random.PRNGKey(0), x)
        params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64) * 8.0, variables["params"])
        variables = {"params": params}
        logits = model.apply(variables, x)
        y = jnp.argmax(logits, axis=1).astype(jnp.int32).at[0].set(((jnp.argmax(logits[0]) + 1) % 3).astype(jnp.int32))

        @jax.jit
        def paths(variables):
            pe = per_example_grads(model.apply, variables, x, y)
            ref, _ = bang(epsilon=0.815).update(pe.grads, BangState(), kappa_norms=pe.kappa_norms, correct=pe.correct)
            return pe.kappa_norms, ref, bang_grad(model.apply, variables, x, y, epsilon=0.815, return_aux=True)

        kappa_norms, ref, (single, aux) = paths(variables)
        norms = np.asarray(kappa_norms["fc"]["kernel"])
        assert norms.min() / norms.max() < 1e-12  # really saturated
        assert float(jnp.max(aux.layer_eta[("fc",)])) > 1e9
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(single))
        assert rel_err(single, ref) < 1e-10


def test_clear_errors():
    model = TinyNet()
    x = jnp.zeros((4, 6, 6, 1))
    variables = model.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="labels"):
        bang_grad(model.apply, variables, x, jnp.zeros((3,), jnp.int32), epsilon=0.8)
    with pytest.raises(ValueError, match="integer"):
        per_example_grads(model.apply, variables, x, jnp.zeros((4,)))
    with pytest.raises(ValueError, match="epsilon"):
        bang_grad(model.apply, variables, x, jnp.zeros((4,), jnp.int32), epsilon=-1.0)
    with pytest.raises(ValueError, match="params"):
        bang_grad(model.apply, {"consts": {}}, x, jnp.zeros((4,), jnp.int32), epsilon=0.8)

    class NoWeights(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            w = self.param("w", nn.initializers.ones, (x.shape[-1], 3))
            return x.reshape((x.shape[0], -1))[:, :1] * w[:1]

    nw = NoWeights()
    v = nw.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="no weighted layer"):
        bang_grad(nw.apply, v, x, jnp.zeros((4,), jnp.int32), epsilon=0.8)

    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            d = nn.Dense(3)
            return d(d(x.reshape((x.shape[0], -1))[:, :3]))

    sh = Shared()
    v = sh.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="more than once"):
        per_example_grads(sh.apply, v, x, jnp.zeros((4,), jnp.int32))


def test_params_outside_weighted_layers_get_plain_gradient():
    class WithScale(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            s = self.param("scale", nn.initializers.ones, ())
            return nn.Dense(3, name="fc")(x.reshape((x.shape[0], -1)) * s)

    model = WithScale()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(5, 2, 2, 1)), jnp.float32)
    y = jnp.asarray([0, 1, 2, 0, 1], jnp.int32)
    v = model.init(jax.random.PRNGKey(0), x)
    single = bang_grad(model.apply, v, x, y, epsilon=0.8, beta=1.5)
    plain = plain_grad(model.apply, v, x, y)
    np.testing.assert_allclose(float(single["scale"]), 1.5 * float(plain["scale"]), rtol=1e-5)
    pe = per_example_grads(model.apply, v, x, y)
    np.testing.assert_array_equal(np.asarray(pe.kappa_norms["scale"]), np.zeros(5))
    assert bang_jax.weighted_layers(model.apply, v, x) == {("fc",): (5, 3)}


def test_per_layer_and_per_leaf_config_agree_on_both_paths(tiny):
    """bang_grad takes every per-layer / per-leaf value that bang() takes (one BangConfig for both)."""
    model, variables, x, y = tiny
    cfg = bang_jax.BangConfig(
        epsilon={"conv": 0.5, "fc": {"kernel": 0.9, "bias": 0.2}}, beta={"conv": 1.2, "fc": 0.7}, ratio=0.5
    )
    pe = per_example_grads(model.apply, variables, x, y)
    tx = bang(config=cfg)
    via_tx, _ = tx.update(pe.grads, tx.init(variables["params"]), kappa_norms=pe.kappa_norms, correct=pe.correct)
    single, aux = bang_grad(model.apply, variables, x, y, config=cfg, return_aux=True)
    assert rel_err(single, via_tx) < 1e-5
    assert set(aux.layer_eta) == {("conv",), ("fc", "kernel"), ("fc", "bias")}
    # The broadcast (per-leaf) form, as a train state carries it, traced under jit, gives the same gradient.
    full = cfg.broadcast(variables["params"])
    traced, traced_aux = jax.jit(lambda c: bang_grad(model.apply, variables, x, y, config=c, return_aux=True))(full)
    assert rel_err(traced, via_tx) < 1e-5
    # η is grouped by the config's structure, statically (not by the values, which are traced here): a
    # broadcast config has one entry per leaf, so one η per leaf; a scalar ε under jit still gives one per layer.
    assert set(traced_aux.layer_eta) == {("conv", "kernel"), ("conv", "bias"), ("fc", "kernel"), ("fc", "bias")}
    _, scalar_aux = jax.jit(lambda e: bang_grad(model.apply, variables, x, y, epsilon=e, return_aux=True))(0.7)
    assert set(scalar_aux.layer_eta) == {("conv",), ("fc",)}
    # And each layer's values are the one-layer configs' values.
    only_fc = bang_grad(
        model.apply,
        variables,
        x,
        y,
        epsilon={"conv": 0.0, "fc": {"kernel": 0.9, "bias": 0.2}},
        beta={"conv": 1.0, "fc": 0.7},
        ratio=0.5,
    )
    assert rel_err(only_fc["fc"], via_tx["fc"]) < 1e-5
    assert rel_err(only_fc["conv"], plain_grad(model.apply, variables, x, y)["conv"]) < 1e-5


def test_sampled_masks_are_the_masks_a_forward_draws_with_several_dropout_layers():
    """One draw per dropout layer: recording a mask must not consume the rng stream a second time."""

    class TwoDropouts(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            h = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(8, name="a")(x)))
            h = nn.Dropout(0.3, deterministic=not train)(nn.relu(nn.Dense(8, name="b")(h)))
            return nn.Dense(3, name="c")(h)

    model = TwoDropouts()
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 6), jnp.int32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    rngs = {"dropout": jax.random.PRNGKey(7)}

    @jax.jit
    def paths(variables):
        masks = sample_dropout_masks(model.apply, variables, x, rngs=rngs, train=True)
        drawn = bang_grad(model.apply, variables, x, y, epsilon=0.8, rngs=rngs, train=True)
        shared = bang_grad(model.apply, variables, x, y, epsilon=0.8, dropout_masks=masks, train=True)
        pe = per_example_grads(model.apply, variables, x, y, dropout_masks=masks, train=True)
        via_tx, _ = bang(epsilon=0.8).update(pe.grads, BangState(), kappa_norms=pe.kappa_norms, correct=pe.correct)
        return masks, drawn, shared, via_tx

    masks, drawn, shared, via_tx = paths(variables)
    assert set(masks) == {("Dropout_0",), ("Dropout_1",)}
    assert rel_err(drawn, shared) < 1e-6
    assert rel_err(via_tx, shared) < 1e-5


def test_bang_grad_compiles_once_and_matches_under_vmap_over_configs(tiny):
    """Two models' configs vmapped (as training does) give each model's own gradient; a second call reuses the trace."""
    model, variables, x, y = tiny
    traces = []

    def f(cfg):
        traces.append(1)
        return bang_grad(model.apply, variables, x, y, config=cfg)

    cfgs = [bang_jax.BangConfig(epsilon=e, beta=b).broadcast(variables["params"]) for e, b in ((0.8, 1.0), (0.3, 2.0))]
    stacked = jax.tree.map(lambda *v: jnp.stack(v), *cfgs)
    batched = jax.jit(jax.vmap(f))
    out = batched(stacked)
    batched(jax.tree.map(lambda v: v + 0.0, stacked))
    assert len(traces) == 1
    for i, cfg in enumerate(cfgs):
        assert rel_err(jax.tree.map(lambda g: g[i], out), bang_grad(model.apply, variables, x, y, config=cfg)) < 1e-5


def test_factor_layers_keeps_the_stored_form_for_transformed_or_frozen_parameters():
    """A layer that sees a transformed copy of its parameters (map_variables ×2, or frozen by stop_gradient) is not
    factored: its VJP would not be their gradient. bang() then still equals vmap(grad) of each example's loss."""
    for fn in (lambda a: a * 2.0, jax.lax.stop_gradient):
        Scaled = nn.map_variables(nn.Dense, "params", lambda t, fn=fn: jax.tree.map(fn, t), init=True)

        class Net(nn.Module):
            @nn.compact
            def __call__(self, x):
                return nn.Dense(3)(nn.relu(Scaled(100)(x)))

        model, rng = Net(), np.random.default_rng(6)
        x = jnp.asarray(rng.normal(size=(6, 64)), jnp.float32)
        y = jnp.asarray(rng.integers(0, 3, 6), jnp.int32)
        variables = model.init(jax.random.PRNGKey(0), x[:1])
        pe = per_example_grads(model.apply, variables, x, y, factor_layers=True)
        assert not any(
            g.factored for g in jax.tree.leaves(pe.grads, is_leaf=lambda g: isinstance(g, bang_jax.PerExampleGrad))
        )

        def loss1(params, x1, y1):
            return -jax.nn.log_softmax(model.apply({"params": params}, x1[None])[0])[y1]

        ref = jax.vmap(jax.grad(loss1), in_axes=(None, 0, 0))(variables["params"], x, y)
        tx = bang(epsilon=0.8)
        got, _ = tx.update(pe.grads, BangState(), kappa_norms=pe.kappa_norms, correct=pe.correct)
        want, _ = tx.update(bang_jax.mark_per_example(ref), BangState(), kappa_norms=pe.kappa_norms, correct=pe.correct)
        assert rel_err(got, want) < 1e-5


def test_non_finite_inputs_are_refused_in_eager_calls(tiny):
    model, variables, x, y = tiny
    bad = jnp.asarray(x).at[1, 0, 0, 0].set(jnp.nan)
    for fn in (lambda: bang_grad(model.apply, variables, bad, y, epsilon=0.8),
               lambda: per_example_grads(model.apply, variables, bad, y),
               lambda: plain_grad(model.apply, variables, bad, y)):
        with pytest.raises(ValueError, match=r"inputs holds NaN or infinite values \(first at index \(1, 0, 0, 0\)\)"):
            fn()
    from bang_jax.evaluate import evaluate_model

    with pytest.raises(ValueError, match="images holds NaN or infinite values"):
        evaluate_model(model, variables, jnp.asarray(x).at[0, 0, 0, 0].set(jnp.inf), y, attacks=())
