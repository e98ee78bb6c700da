"""A zoo of models researchers bring, linen and NNX: each gets BANG's right gradient or a refusal naming the construct.

Every number is checked against an independent per-example reference written here from Flax and JAX alone (a
test-local interceptor or module wrapper adds zero perturbations to the weighted layers' outputs, a Python loop
runs each example, and η and the weighted means are computed in float64 numpy from docs/semantics.md), never from the
library's internals. BatchNorm in training mode has no per-example gradient; its reference is the batch-loss
definition (κ rows of the batch loss's layer-output gradient, each layer's weight gradient from the η-scaled rows).
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bang_jax
import bang_jax.nnx as bnnx

EPS, BETA, RATIO = 0.8, 1.3, 0.5
TOL = 1e-5
LINEN_WEIGHTED = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)
NNX_WEIGHTED = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Einsum)


# --------------------------------------------------------------------------------------------------------
# Independent references.


def xent(outputs, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(outputs, -1), labels[:, None], axis=-1)[:, 0]


def argmax_correct(outputs, labels):
    return jnp.argmax(outputs, -1) == labels


def eta64(norms, correct):
    """docs/semantics.md in float64, one example at a time."""
    m = max(norms)
    return np.array([1.0 if n == 0 else (m / n) ** ((EPS if c else EPS * RATIO) * (1 - n / m))
                     for n, c in zip(norms, correct)])


def balance64(grads, kappas, correct, owner_of):
    """β · (1/N) Σ_i η_i g_i per leaf (η = 1 outside weighted layers), in float64 numpy.

    grads: list over examples of {leaf key: array}; kappas: list of {layer: array}; owner_of(key) -> layer | None.
    """
    n = len(grads)
    etas = {layer: eta64([float(np.linalg.norm(np.asarray(k[layer], np.float64))) for k in kappas], correct)
            for layer in kappas[0]}
    out = {}
    for key in grads[0]:
        w = etas[owner_of(key)] if owner_of(key) is not None else np.ones(n)
        out[key] = BETA * sum(w[i] * np.asarray(grads[i][key], np.float64) for i in range(n)) / n
    return out


def flat(tree):
    """{key tuple: leaf} with plain keys (dict keys, attribute names, list indices; NNX's '.value' dropped)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
        if keys and keys[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
            keys = keys[:-1]
        out[tuple(keys)] = leaf
    return out


def owner_fn(layers):
    def owner(key):
        hits = [tuple(p) for p in layers if key[: len(p)] == tuple(p)]
        return hits[0] if hits else None
    return owner


def one(tree, i):
    """Example i with batch 1 (numpy slicing: nothing to compile)."""
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[i:i + 1]), tree)


def perturb_outputs(perts):
    """A linen interceptor adding ``perts[layer path]`` to every weighted layer's output (κ is its gradient)."""
    def add(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        if ctx.method_name == "__call__" and isinstance(ctx.module, LINEN_WEIGHTED):
            out = out + perts[tuple(ctx.module.path)]
        return out
    return add


def _fill(path, leaf, rng):
    """A random value for an abstract leaf: parameters ~ N(0, 1/fan_in), biases ~ N(0, 0.1²), statistics 0 / 1."""
    name = str(getattr(path[-2] if getattr(path[-1], "name", None) == "value" else path[-1], "key",
                       getattr(path[-1], "name", "")))
    shape, dtype = leaf.shape, leaf.dtype
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return jax.random.key(int(rng.integers(1 << 30)))
    if not jnp.issubdtype(dtype, jnp.floating):
        return jnp.zeros(shape, dtype)
    if name == "var":
        return jnp.ones(shape, dtype)
    if name == "mean":
        return jnp.zeros(shape, dtype)
    if name == "scale":
        return jnp.asarray(1.0 + 0.1 * rng.normal(size=shape), dtype)
    scale = 1.0 / np.sqrt(np.prod(shape[:-1])) if len(shape) >= 2 else 0.1
    return jnp.asarray(scale * rng.normal(size=shape), dtype)


def init_linen(model, *args, seed=0, **kwargs):
    """Variables of the right structure drawn with numpy (no initialiser to compile: keeps the zoo fast)."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, **kwargs))
    return jax.tree_util.tree_map_with_path(lambda p, a: _fill(p, a, rng), abstract)


def linen_reference(apply_fn, variables, x, y, *, loss=xent, correct_fn=argmax_correct, kw=None, example_kw=None):
    """Per-example reference for a linen model: zero perturbations at weighted outputs, a loop over examples."""
    kw, example_kw = kw or {}, example_kw or {}
    shapes = {}

    def recorder(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        if ctx.method_name == "__call__" and isinstance(ctx.module, LINEN_WEIGHTED):
            shapes[tuple(ctx.module.path)] = out.shape  # one example: batch 1 on whichever axis carries it
        return out

    with nn.intercept_methods(recorder):
        jax.eval_shape(lambda v: apply_fn(v, one(x, 0), **kw, **one(example_kw, 0)), variables)

    @jax.jit
    def per_example(params, xi, yi, kwi):
        def f(params, perts):
            with nn.intercept_methods(perturb_outputs(perts)):
                out = apply_fn({**variables, "params": params}, xi, **kw, **kwi)
            return loss(out, yi)[0], out
        perts = {p: jnp.zeros(s) for p, s in shapes.items()}
        (_, out), (g, k) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, perts)
        return g, k, correct_fn(out, yi)[0]

    n = jax.tree.leaves(x)[0].shape[0]
    runs = [per_example(variables["params"], one(x, i), one(y, i), one(example_kw, i)) for i in range(n)]
    grads = [flat(r[0]) for r in runs]
    correct = [bool(r[2]) for r in runs]
    return balance64(grads, [r[1] for r in runs], correct, owner_fn(shapes)), correct


class Perturbed(nnx.Module):
    """Test-local wrapper: the wrapped layer's output plus a zero perturbation (κ is the perturbation's grad)."""

    def __init__(self, layer, shape):
        self.layer = layer
        self.pert = PertVar(jnp.zeros(shape))

    def __call__(self, x, **kwargs):
        return self.layer(x, **kwargs) + self.pert[...]


class PertVar(nnx.Variable):
    pass


class Recorder(nnx.Module):
    def __init__(self, layer, shapes, path):
        self.layer, self.shapes, self.path = layer, shapes, path

    def __call__(self, x, **kwargs):
        out = self.layer(x, **kwargs)
        self.shapes[self.path] = out.shape  # one example: batch 1 on whichever axis carries it
        return out


def _replace_layers(model, make):
    """Replaces every NNX weighted layer of ``model`` (in place) by ``make(path, layer)``; returns the paths."""
    found = [(tuple(p), node) for p, node in nnx.iter_graph(model) if isinstance(node, NNX_WEIGHTED)]
    for path, layer in found:
        parent = model
        for k in path[:-1]:
            parent = parent[k] if isinstance(k, int) else getattr(parent, k)
        new = make(path, layer)
        if isinstance(path[-1], int):
            parent[path[-1]] = new
        else:
            setattr(parent, path[-1], new)
    return [p for p, _ in found]


def nnx_reference(model, x, y, *, loss=xent, correct_fn=argmax_correct, kw=None, example_kw=None):
    """Per-example reference for an NNX model: wrap each weighted layer, loop over examples."""
    kw, example_kw = kw or {}, example_kw or {}
    shapes = {}
    probe = nnx.clone(model)
    _replace_layers(probe, lambda path, layer: Recorder(layer, shapes, path))
    probe(one(x, 0), **kw, **one(example_kw, 0))
    wrapped = nnx.clone(model)
    layers = _replace_layers(wrapped, lambda path, layer: Perturbed(layer, shapes[path]))
    graphdef, diff, rest = nnx.split(wrapped, nnx.Any(nnx.Param, PertVar), ...)

    @jax.jit
    def per_example(diff, xi, yi, kwi):
        def f(diff):
            out = nnx.merge(graphdef, diff, rest)(xi, **kw, **kwi)
            return loss(out, yi)[0], out
        (_, out), g = jax.value_and_grad(f, has_aux=True)(diff)
        return g, correct_fn(out, yi)[0]

    n = jax.tree.leaves(x)[0].shape[0]
    grads, kappas, correct = [], [], []
    for i in range(n):
        g, c = per_example(diff, one(x, i), one(y, i), one(example_kw, i))
        f = flat(g)
        kappas.append({p: f[p + ("pert",)] for p in layers})
        # back to the unwrapped model's parameter names: drop the wrapper's 'layer' step
        grads.append({_unwrap(k, layers): v for k, v in f.items() if k[-1] != "pert"})
        correct.append(bool(c))
    return balance64(grads, kappas, correct, owner_fn(layers)), correct


def _unwrap(key, layers):
    for p in layers:
        if key[: len(p)] == p and key[len(p): len(p) + 1] == ("layer",):
            return p + key[len(p) + 1:]
    return key


def assert_close(got, ref, tol=TOL):
    """Per-leaf relative error; leaves that vanish in exact arithmetic (an attention key bias) are measured
    against 1% of the largest gradient instead of their own rounding noise."""
    got = flat(got)
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    floor = 1e-2 * max(np.max(np.abs(v)) for v in ref.values())
    for k in ref:
        a, b = np.asarray(got[k], np.float64), ref[k]
        err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), floor, 1e-30)
        assert err <= tol, f"{k}: relative error {err:.2e}"


def both_linen_paths(model, variables, x, y, factor_layers=False, **kw):
    """(bang_grad, bang(per_example_grads)) of a linen model, in one jitted function."""
    cfg = bang_jax.BangConfig(epsilon=EPS, beta=BETA, ratio=RATIO)

    @jax.jit
    def both(v):
        single = bang_jax.bang_grad(model.apply, v, x, y, config=cfg, **kw)
        pe = bang_jax.per_example_grads(model.apply, v, x, y, factor_layers=factor_layers, **kw)
        return single, bang_jax.bang(config=cfg).update(pe.grads, None, v["params"], kappa_norms=pe.kappa_norms,
                                                        correct=pe.correct)[0]

    return both(variables)


def check_linen(model, x, y, *, kw=None, example_kw=None, loss=None, correct_fn=None, init_kw=None,
                factored=1):
    kw, example_kw = kw or {}, example_kw or {}
    variables = init_linen(model, one(x, 0), **(init_kw or {}), **one(example_kw, 0))
    fns = {} if loss is None else {"loss_fn": loss, "correct_fn": correct_fn}
    ref, correct = linen_reference(model.apply, variables, x, y, loss=loss or xent,
                                   correct_fn=correct_fn or argmax_correct, kw=kw, example_kw=example_kw)
    assert 0 < sum(correct) < len(correct) or RATIO == 1.0  # both ε and ε·ratio exercised where possible
    single, via_tx = both_linen_paths(model, variables, x, y, **kw, **example_kw, **fns)
    assert_close(single, ref)
    assert_close(via_tx, ref)
    with factor_layers():  # every weighted layer's gradients in the layer-factored form
        pe = jax.eval_shape(lambda v: bang_jax.per_example_grads(model.apply, v, x, y, factor_layers=True, **kw,
                                                                 **example_kw, **fns), variables)
        assert count_factored(pe.grads) >= factored
        _, via_tx = both_linen_paths(model, variables, x, y, factor_layers=True, **kw, **example_kw, **fns)
    assert_close(via_tx, ref)
    return variables


@contextlib.contextmanager
def factor_layers():
    """per_example_grads hands out the layer-factored form only for leaves too large to fingerprint (> 4,096
    entries); lowering that size sends these small models' layers down that path too."""
    old = bang_jax.per_example._FINGERPRINT_MAX_SIZE
    bang_jax.per_example._FINGERPRINT_MAX_SIZE = 0
    try:
        yield
    finally:
        bang_jax.per_example._FINGERPRINT_MAX_SIZE = old


def count_factored(grads) -> int:
    markers = jax.tree.leaves(grads, is_leaf=lambda g: isinstance(g, bang_jax.PerExampleGrad))
    return sum(m.factored for m in markers)


def data(shape, n=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n,) + shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, classes, n), jnp.int32)
    return x, y


# --------------------------------------------------------------------------------------------------------
# Linen models.


class ResidualCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(4, (3, 3), name="stem")(x))
        h = nn.relu(h + nn.Conv(4, (3, 3), name="res")(h))
        return nn.Dense(3, name="head")(h.mean(axis=(1, 2)))


class TransformerBlock(nn.Module):
    """One pre-norm block from DenseGeneral projections (MultiHeadDotProductAttention) and a Dense MLP."""

    @nn.compact
    def __call__(self, x, mask=None):
        h = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="attn")(nn.LayerNorm()(x), mask=mask)
        h = h + nn.Dense(6, name="mlp_out")(nn.gelu(nn.Dense(12, name="mlp_in")(nn.LayerNorm()(h))))
        return nn.Dense(3, name="head")(h.mean(axis=1))


def causal_padding_mask(n, length, seed=3):
    lengths = np.random.default_rng(seed).integers(2, length + 1, n)
    valid = np.arange(length)[None, :] < lengths[:, None]
    return jnp.asarray(valid[:, None, :, None] & valid[:, None, None, :] & np.tril(np.ones((length, length), bool)))


class DictInputs(nn.Module):
    @nn.compact
    def __call__(self, inputs):
        a = nn.relu(nn.Conv(3, (3, 3), name="conv")(inputs["image"])).reshape((inputs["image"].shape[0], -1))
        b = nn.relu(nn.Dense(4, name="meta")(inputs["meta"]))
        return nn.Dense(3, name="head")(jnp.concatenate([a, b], axis=-1))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(6, name="inner")(x))


class Remat(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.remat(Block)(name="block")(nn.Dense(6, name="stem")(x))
        return nn.Dense(3, name="head")(h)


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        body = nn.scan(lambda mdl, c, _: (mdl(c), None), variable_axes={"params": 0}, split_rngs={"params": True},
                       length=3)
        h, _ = body(Block(name="cell"), nn.Dense(6, name="stem")(x), None)
        return nn.Dense(3, name="head")(h)


class BNCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Conv(4, (3, 3), name="conv")(x)
        h = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(h))
        return nn.Dense(3, name="head")(h.reshape((x.shape[0], -1)))


class Tagger(nn.Module):
    """A sequence model: one prediction per position (per-example loss = mean over positions)."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="out")(nn.tanh(nn.Dense(8, name="hidden")(x)))


def seq_loss(outputs, labels):
    return xent(outputs.reshape(-1, outputs.shape[-1]), labels.reshape(-1)).reshape(labels.shape).mean(-1)


def seq_correct(outputs, labels):
    return jnp.mean(jnp.argmax(outputs, -1) == labels, axis=-1) >= 0.3


def test_mlp_sequential():
    x, y = data((5,), seed=1)
    check_linen(nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)]), x, y)


def test_residual_cnn():
    x, y = data((5, 5, 2), seed=2)
    check_linen(ResidualCNN(), x, y)


def test_transformer_block_with_batch_shaped_mask():
    x, y = data((4, 6), seed=3)
    mask = causal_padding_mask(5, 4)
    model = TransformerBlock()
    variables = check_linen(model, x, y, example_kw={"mask": mask})
    # The mask must reach each example as its own slice; kept whole, the per-example output is not batch 1.
    with pytest.raises(ValueError, match="not batch 1"):
        bang_jax.per_example_grads(model.apply, variables, x, y, mask=mask, batch_kwargs=())


def test_dict_inputs():
    rng = np.random.default_rng(4)
    x = {"image": jnp.asarray(rng.normal(size=(5, 4, 4, 1)), jnp.float32),
         "meta": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}
    y = jnp.asarray([0, 1, 2, 1, 0], jnp.int32)
    check_linen(DictInputs(), x, y)


def test_remat():
    x, y = data((4,), seed=5)
    check_linen(Remat(), x, y, factored=0)  # layers under remat keep the stored form


def test_custom_loss_sequence_model():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(5, 3, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, (5, 3)), jnp.int32)
    check_linen(Tagger(), x, y, loss=seq_loss, correct_fn=seq_correct)


def test_soft_labels():
    x, _ = data((5,), seed=7)
    y = jax.nn.softmax(jnp.asarray(np.random.default_rng(7).normal(size=(5, 3)), jnp.float32) * 2)
    check_linen(nn.Sequential([nn.Dense(6), nn.relu, nn.Dense(3)]), x, y,
                loss=optax.softmax_cross_entropy, correct_fn=lambda o, t: jnp.argmax(o, -1) == jnp.argmax(t, -1))


def bn_reference(model, variables, x, y):
    """BatchNorm in training: κ rows of the batch loss; each layer's weight gradient from the η-scaled rows."""
    modules = {}

    def layer_inputs(v):  # the weighted layers' inputs, from a forward pass outside any grad
        inputs = {}

        def record(next_fun, args, kwargs, ctx):
            if ctx.method_name == "__call__" and isinstance(ctx.module, LINEN_WEIGHTED):
                modules[tuple(ctx.module.path)] = ctx.module.clone(parent=None)
                inputs[tuple(ctx.module.path)] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            model.apply(v, x, train=True, mutable=["batch_stats"])
        return inputs

    inputs = jax.jit(layer_inputs)(variables)

    def run(params, perts):
        with nn.intercept_methods(perturb_outputs(perts)):
            out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(xent(out, y)), out

    perts = {("conv",): jnp.zeros((5, 4, 4, 4)), ("head",): jnp.zeros((5, 3))}
    (_, out), (g, kappa) = jax.jit(jax.value_and_grad(run, argnums=(0, 1), has_aux=True))(variables["params"], perts)
    correct = np.asarray(argmax_correct(out, y))
    ref = {k: BETA * np.asarray(v, np.float64) for k, v in flat(g).items()}
    for path, k in kappa.items():
        e = eta64([float(np.linalg.norm(np.asarray(r, np.float64))) for r in k], correct)
        module, inp = modules[path], inputs[path]
        p = variables["params"][path[0]]
        scaled = jnp.asarray(np.asarray(k, np.float64) * e.reshape((-1,) + (1,) * (k.ndim - 1)), jnp.float32)
        layer_grad = jax.jit(lambda p, ct: jax.vjp(lambda p: module.apply({"params": p}, inp), p)[1](ct)[0])
        for leaf, v in flat(layer_grad(p, scaled)).items():
            ref[path + leaf] = BETA * np.asarray(v, np.float64)
    return ref, out


def test_batchnorm_in_training_mode():
    x, y = data((4, 4, 2), seed=8)
    model = BNCNN()
    variables = init_linen(model, x)
    ref, _ = bn_reference(model, variables, x, y)
    cfg = bang_jax.BangConfig(epsilon=EPS, beta=BETA, ratio=RATIO)
    kw = dict(train=True, mutable=["batch_stats"], return_aux=True)

    @jax.jit
    def grads(v):
        balanced = bang_jax.bang_grad(model.apply, v, x, y, config=cfg, **kw)
        zero = bang_jax.bang_grad(model.apply, v, x, y, epsilon=0.0, **kw)[0]
        plain = bang_jax.plain_grad(model.apply, v, x, y, **kw)
        return balanced, zero, plain, model.apply(v, x, train=True, mutable=["batch_stats"])[1]

    (balanced, aux), zero, (plain, paux), stats = grads(variables)
    assert_close(balanced, ref)
    assert_close(aux.model_state, {k: np.asarray(v, np.float64) for k, v in flat(stats).items()}, tol=1e-6)
    # ε = 0, β = 1 is the ordinary batch gradient, BatchNorm coupling included.
    assert_close(zero, {k: np.asarray(v, np.float64) for k, v in flat(plain).items()}, tol=1e-6)
    assert set(paux.model_state) == {"batch_stats"}
    with pytest.raises(ValueError, match="bn \\(BatchNorm\\).*examples interact.*bang_grad"):
        bang_jax.per_example_grads(lambda v, x, **kw: model.apply(v, x, mutable=["batch_stats"], **kw)[0],
                                   variables, x, y, train=True)
    with pytest.raises(ValueError, match="mutable"):
        bang_jax.per_example_grads(model.apply, variables, x, y, train=False, mutable=["batch_stats"])
    # Running averages (eval mode) do not couple examples: the per-example reference applies to both paths.
    ref_eval, _ = linen_reference(model.apply, variables, x, y)
    single, via_tx = both_linen_paths(model, variables, x, y)
    assert_close(single, ref_eval)
    assert_close(via_tx, ref_eval)


def test_refusals_name_the_construct():
    x, y = data((4,), seed=9)

    def refused(model, match, **kw):
        variables = init_linen(model, x[:1])
        for fn in (bang_jax.per_example_grads, lambda *a, **k: bang_jax.bang_grad(*a, epsilon=EPS, **k)):
            with pytest.raises(ValueError, match=match):
                fn(model.apply, variables, x, y, **kw)

    variables = init_linen(Scanned(), x[:1])
    with pytest.raises(ValueError, match="cell/inner \\(Dense\\) runs inside .*nn.scan.*Use bang_grad"):
        bang_jax.per_example_grads(Scanned().apply, variables, x, y)

    class Vmapped(nn.Module):
        @nn.compact
        def __call__(self, x):
            heads = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None,
                            out_axes=1, axis_size=2)(3, name="heads")
            return heads(x).mean(axis=1)

    refused(Vmapped(), "heads \\(Dense\\) runs inside a `.*` trace .*vectorising.*whole batch")

    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            d = nn.Dense(4, name="tied")
            return nn.Dense(3)(d(d(x)))

    variables = init_linen(Shared(), x[:1])
    with pytest.raises(ValueError, match="tied \\(Dense\\) is called more than once.*use bang_grad"):
        bang_jax.per_example_grads(Shared().apply, variables, x, y)


def test_attention_dropout_is_not_silently_unshared():
    x, y = data((4, 6), seed=10)

    class AttnDrop(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            h = nn.MultiHeadDotProductAttention(num_heads=2, dropout_rate=0.5, deterministic=not train)(x)
            h = nn.Dropout(0.5, deterministic=not train)(h)
            return nn.Dense(3)(h.mean(1))

    model = AttnDrop()
    variables = init_linen(model, x[:1])
    rngs = {"dropout": jax.random.PRNGKey(1)}
    with pytest.raises(ValueError, match="attention dropout"):
        bang_jax.sample_dropout_masks(model.apply, variables, x, rngs=rngs, train=True)
    masks = {("Dropout_0",): jnp.ones((5, 4, 6), bool)}
    with pytest.raises(ValueError, match="attention dropout"):
        bang_jax.bang_grad(model.apply, variables, x, y, epsilon=EPS, dropout_masks=masks, rngs=rngs, train=True)


def test_labels_are_validated():
    x, y = data((4,), seed=11)
    model = nn.Sequential([nn.Dense(3)])
    variables = init_linen(model, x[:1])
    for bad in (3, -1):
        labels = y.at[2].set(bad)
        for fn in (bang_jax.per_example_grads, bang_jax.plain_grad,
                   lambda *a: bang_jax.bang_grad(*a, epsilon=EPS)):
            with pytest.raises(ValueError, match=f"labels\\[2\\] = {bad}"):
                fn(model.apply, variables, x, labels)
    with pytest.raises(ValueError, match="no weighted layer.*bang_jax.nnx"):
        bang_jax.bang_grad(lambda v, x, **k: x[:, :3] * v["params"]["w"][None], {"params": {"w": jnp.ones(3)}}, x, y,
                           epsilon=EPS)


# --------------------------------------------------------------------------------------------------------
# NNX models.


class NNXMLP(nnx.Module):
    def __init__(self, rngs, dropout=0.0):
        self.layers = nnx.List([nnx.Linear(5, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)])
        self.drop = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x):
        return self.layers[1](self.drop(nnx.relu(self.layers[0](x))))


class NNXCNN(nnx.Module):
    def __init__(self, rngs, bn=False):
        self.conv1 = nnx.Conv(2, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs) if bn else None
        self.conv2 = nnx.Conv(4, 4, (3, 3), strides=2, rngs=rngs)
        self.head = nnx.Linear(4 * 3 * 3, 3, rngs=rngs)

    def __call__(self, x):
        h = self.conv1(x)
        h = nnx.relu(self.bn(h) if self.bn is not None else h)
        h = nnx.relu(self.conv2(h))
        return self.head(h.reshape((x.shape[0], -1)))


class NNXAttention(nnx.Module):
    def __init__(self, rngs, dropout=0.0):
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=6, qkv_features=8, decode=False,
                                           dropout_rate=dropout, rngs=rngs)
        self.norm = nnx.LayerNorm(6, rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x, mask=None):
        return self.head(self.norm(x + self.attn(x, mask=mask)).mean(axis=1))


class NNXRemat(nnx.Module):
    def __init__(self, rngs):
        self.stem = nnx.Linear(4, 6, rngs=rngs)
        self.inner = nnx.Linear(6, 6, rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        h = nnx.remat(lambda m, h: nnx.relu(m(h)))(self.inner, self.stem(x))
        return self.head(h)


def make(cls, seed=0, **kw):
    """An NNX model whose state is drawn with numpy (no initialiser to compile: keeps the zoo fast)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: cls(nnx.Rngs(0, dropout=1), **kw)))
    rng = np.random.default_rng(seed)
    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(lambda p, a: _fill(p, a, rng), abstract))


def check_nnx(model, x, y, loss=None, correct_fn=None, factored=1, **example_kw):
    ref, correct = nnx_reference(model, x, y, example_kw=example_kw, loss=loss or xent,
                                 correct_fn=correct_fn or argmax_correct)
    cfg = bang_jax.BangConfig(epsilon=EPS, beta=BETA, ratio=RATIO)
    fns = {} if loss is None else {"loss_fn": loss, "correct_fn": correct_fn}

    def both(model, x, y, kw, factor=False):
        single = bnnx.bang_grad(model, x, y, config=cfg, **fns, **kw)
        pe = bnnx.per_example_grads(model, x, y, factor_layers=factor, **fns, **kw)
        via_tx = bang_jax.bang(config=cfg).update(pe.grads, None, kappa_norms=pe.kappa_norms, correct=pe.correct)[0]
        return single, via_tx, count_factored(pe.grads)

    single, via_tx, _ = nnx.jit(both)(model, x, y, example_kw)
    assert isinstance(single, nnx.State)
    assert jax.tree.structure(single) == jax.tree.structure(nnx.state(model, nnx.Param))
    assert_close(single, ref)
    assert_close(via_tx, ref)
    with factor_layers():  # a fresh jit: traced with every weighted layer's gradients in the layer-factored form
        _, via_tx, n_factored = nnx.jit(both, static_argnums=4)(model, x, y, example_kw, True)
    assert n_factored >= factored
    assert_close(via_tx, ref)


def test_nnx_mlp_with_soft_labels():
    x, _ = data((5,), seed=12)
    y = jax.nn.softmax(jnp.asarray(np.random.default_rng(12).normal(size=(5, 3)), jnp.float32) * 2)
    check_nnx(make(NNXMLP), x, y, loss=optax.softmax_cross_entropy,
              correct_fn=lambda o, t: jnp.argmax(o, -1) == jnp.argmax(t, -1))


def test_nnx_cnn():
    x, y = data((6, 6, 2), seed=13)
    check_nnx(make(NNXCNN), x, y)


def test_nnx_attention_with_batch_shaped_mask():
    x, y = data((4, 6), seed=14)
    check_nnx(make(NNXAttention), x, y, mask=causal_padding_mask(5, 4))


def test_nnx_remat_under_jax_jit():
    x, y = data((4,), seed=15)
    model = make(NNXRemat)
    ref, _ = nnx_reference(model, x, y)
    graphdef, state = nnx.split(model)

    @jax.jit
    def grads(state):
        return bnnx.bang_grad(nnx.merge(graphdef, state), x, y, epsilon=EPS, beta=BETA, ratio=RATIO)

    assert_close(grads(state), ref)


def test_nnx_batchnorm_dropout_and_rngs():
    x, y = data((6, 6, 2), seed=16)
    model = make(NNXCNN, bn=True)
    bang_grad = nnx.jit(lambda m, x, y, **kw: bnnx.bang_grad(m, x, y, **kw), static_argnames=("epsilon",))
    grads = bang_grad(model, x, y, epsilon=0.0)
    plain = nnx.jit(nnx.grad(lambda m: jnp.mean(xent(m(x), y))))(nnx.clone(model))
    assert_close(grads, {k: np.asarray(v, np.float64) for k, v in flat(plain).items()}, tol=1e-6)
    assert float(jnp.max(jnp.abs(model.bn.mean[...]))) > 0  # batch statistics were updated in the model
    with pytest.raises(ValueError, match="bn \\(BatchNorm\\).*examples interact"):
        bnnx.per_example_grads(model, x, y)
    model.eval()  # running averages: examples no longer interact, the per-example path accepts the model
    nnx.eval_shape(lambda m: bnnx.per_example_grads(m, x, y), model)
    # Dropout from nnx.Rngs: masks sampled without advancing the RNG equal what bang_grad then draws.
    drop = make(NNXMLP, dropout=0.5)
    xm, ym = data((5,), seed=17)
    masks = bnnx.sample_dropout_masks(drop, xm)
    assert set(masks) == {("drop",)} and int(drop.drop.rngs.count[...]) == 0
    with_masks = bang_grad(nnx.clone(drop), xm, ym, epsilon=EPS, dropout_masks=masks)
    drawn = bang_grad(drop, xm, ym, epsilon=EPS)
    assert_close(drawn, {k: np.asarray(v, np.float64) for k, v in flat(with_masks).items()}, tol=1e-6)
    assert int(drop.drop.rngs.count[...]) == 1

    @nnx.jit
    def via_tx(m, masks):
        pe = bnnx.per_example_grads(m, xm, ym, dropout_masks=masks)
        return bang_jax.bang(epsilon=EPS).update(pe.grads, None, kappa_norms=pe.kappa_norms, correct=pe.correct)[0]

    assert_close(via_tx(drop, masks), {k: np.asarray(v, np.float64) for k, v in flat(with_masks).items()}, tol=1e-5)


def test_nnx_refusals():
    x, y = data((4,), seed=18)

    class Scanned(nnx.Module):
        def __init__(self, rngs):
            self.stem = nnx.Linear(4, 6, rngs=rngs)
            self.cells = nnx.vmap(lambda r: nnx.Linear(6, 6, rngs=r))(nnx.Rngs(0).fork(split=3))
            self.head = nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, x):
            h, _ = nnx.scan(lambda h, cell: (nnx.relu(cell(h)), None), in_axes=(nnx.Carry, 0))(self.stem(x), self.cells)
            return self.head(h)

    with pytest.raises(ValueError, match="runs inside a `scan` trace.*Use bang_grad"):
        bnnx.per_example_grads(Scanned(nnx.Rngs(0)), x, y)

    class Tied(nnx.Module):
        def __init__(self, rngs):
            self.emb = nnx.Embed(3, 4, rngs=rngs)
            self.body = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            return self.emb.attend(self.body(x) + self.emb(jnp.zeros(x.shape[0], jnp.int32)))

    with pytest.raises(ValueError, match="Embed.attend.*use bang_grad"):
        bnnx.per_example_grads(Tied(nnx.Rngs(0)), x, y)
    attn = NNXAttention(nnx.Rngs(0, dropout=1), dropout=0.5)
    xa, ya = data((4, 6), seed=19)
    with pytest.raises(ValueError, match="attention dropout"):
        bnnx.sample_dropout_masks(attn, xa)


def test_nnx_bridge_linen_layers_are_balanced():
    x, y = data((5,), seed=20)

    class Bridged(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.bridge.ToNNX(nn.Dense(8), rngs=rngs)
            self.b = nnx.bridge.ToNNX(nn.Dense(3), rngs=rngs)

        def __call__(self, x):
            return self.b(nn.relu(self.a(x)))

    model = Bridged(nnx.Rngs(0))
    nnx.bridge.lazy_init(model, x[:1])
    params = nnx.state(model, nnx.Param)
    seq = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
    variables = {"params": {"layers_0": nnx.to_pure_dict(params["a"]), "layers_2": nnx.to_pure_dict(params["b"])}}
    ref, _ = linen_reference(seq.apply, variables, x, y)
    ref = {({"layers_0": "a", "layers_2": "b"}[k[0]],) + k[1:]: v for k, v in ref.items()}
    assert bnnx.weighted_layers(model, x) == {("a",): (5, 8), ("b",): (5, 3)}
    assert_close(bnnx.bang_grad(model, x, y, epsilon=EPS, beta=BETA, ratio=RATIO), ref)


def test_nnx_model_trains_with_nnx_optimizer_on_both_paths():
    x, y = data((5,), n=8, seed=21)
    for route in ("single_pass", "per_example"):
        model = make(NNXMLP)
        if route == "single_pass":
            optimizer = nnx.Optimizer(model, optax.sgd(0.2), wrt=nnx.Param)
        else:
            optimizer = nnx.Optimizer(model, optax.chain(bang_jax.bang(epsilon=EPS), optax.sgd(0.2)), wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer, x, y):
            if route == "single_pass":
                grads, aux = bnnx.bang_grad(model, x, y, epsilon=EPS, return_aux=True)
                optimizer.update(model, grads)
                return aux.loss
            pe = bnnx.per_example_grads(model, x, y)
            optimizer.update(model, pe.grads, kappa_norms=pe.kappa_norms, correct=pe.correct)
            return pe.loss

        losses = [float(step(model, optimizer, x, y)) for _ in range(25)]
        assert losses[-1] < 0.5 * losses[0], (route, losses)


# --------------------------------------------------------------------------------------------------------
# The batch axis of a weighted layer's output is found from the model, never assumed to be axis 0.


class NNXBatchSecond(nnx.Module):
    """A Gemma-style projection whose output carries the batch on axis 1: ``Einsum('bd,sdh->sbh')``."""

    def __init__(self, rngs, s=2):
        self.proj = nnx.Einsum("bd,sdh->sbh", (s, 4, 3), (s, 1, 3), rngs=rngs)
        self.head = nnx.Linear(s * 3, 3, rngs=rngs)

    def __call__(self, x):
        h = nnx.tanh(self.proj(x))  # [S, N, H]
        return self.head(jnp.transpose(h, (1, 0, 2)).reshape((x.shape[0], -1)))


class LinenBatchSecond(nn.Module):
    s: int = 2

    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Einsum((self.s, 4, 3), "bd,sdh->sbh", use_bias=False, name="proj")(x))
        return nn.Dense(3, name="head")(jnp.transpose(h, (1, 0, 2)).reshape((x.shape[0], -1)))


@pytest.mark.parametrize("n", [2, 3])  # n = 2: the trap, axis 0 of the projection's output has the batch's length
def test_batch_on_a_later_axis_is_found_not_assumed(n):
    x, y = data((4,), n=n, seed=40)
    model = make(NNXBatchSecond)
    check_nnx(model, x, y, factored=0)
    assert bnnx.weighted_layers(model, x)[("proj",)] == (2, n, 3)
    check_linen(LinenBatchSecond(), x, y, factored=0)


class MergedBatch(nn.Module):
    """Flattens [N, T, D] to [N·T, D] before a Dense: no output axis carries one example."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4, name="tok")(x.reshape((-1, x.shape[-1])))
        return nn.Dense(3, name="head")(h.reshape((x.shape[0], -1)))


class BatchFree(nn.Module):
    """A weighted layer applied to a parameter only: its output does not depend on the batch size."""

    @nn.compact
    def __call__(self, x):
        w = nn.Dense(4, name="gen")(self.param("seed", nn.initializers.normal(), (1, 3)))
        return nn.Dense(3, name="head")(x) + w[:, :3]


@pytest.mark.parametrize("model, shape, needle", [
    (MergedBatch(), (2, 5), "tok (Dense): its output has shape (4, 4) at batch 2 and (8, 4) at batch 4: the batch is "
                            "merged"),
    (BatchFree(), (3,), "gen (Dense): its output (1, 4) does not depend on the batch size"),
])
def test_no_unique_batch_axis_is_refused_with_a_remedy(model, shape, needle):
    x, y = data(shape, n=2, seed=41)
    variables = init_linen(model, x)
    for fn in (lambda: bang_jax.bang_grad(model.apply, variables, x, y, epsilon=0.8),
               lambda: bang_jax.per_example_grads(model.apply, variables, x, y)):
        with pytest.raises(ValueError, match="layer_types=") as err:
            fn()
        assert needle in str(err.value)


# --------------------------------------------------------------------------------------------------------
# Layers called more than once: each call balanced on its own (its own κ_{i,c}, maximum and η_{i,c}); the layer's
# gradient is β·(1/N)·Σ_c Σ_i η_{i,c}·g_{i,c}. The references untie the calls by hand: each call gets its own copy
# of the weights, so g_{i,c} is the gradient with respect to that copy.


def per_call_reference(f, params, x, y, perts_shapes):
    """``f(params, xi, perts) -> logits [1, C]``: ``params`` maps each call to its own weight copy (keys
    ``(layer, call)``; plain leaves under other keys) and ``perts[(layer, call)]`` is added to that call's output.
    Returns ``{(layer, call) or key: float64 balanced gradient}`` summed over the calls of each layer."""
    n = x.shape[0]
    grads, kappas, correct = [], [], []
    for i in range(n):
        xi, yi = x[i:i + 1], y[i:i + 1]

        def loss(params, perts):
            out = f(params, xi, perts)
            return xent(out, yi)[0], out

        perts = {k: jnp.zeros(s) for k, s in perts_shapes.items()}
        (_, out), (g, k) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, perts)
        grads.append(g)
        kappas.append(k)
        correct.append(bool(argmax_correct(out, yi)[0]))
    out = {}
    for key in params:
        if key in perts_shapes:
            w = eta64([float(np.linalg.norm(np.asarray(k[key], np.float64))) for k in kappas], correct)
        else:
            w = np.ones(n)
        out[key] = jax.tree.map(lambda *gs: BETA * sum(wi * np.asarray(g, np.float64) for wi, g in zip(w, gs)) / n,
                                *[g[key] for g in grads])
    return out, correct


def _sum_calls(ref, layer):
    parts = [v for k, v in ref.items() if isinstance(k, tuple) and k[0] == layer]
    return jax.tree.map(lambda *a: sum(a), *parts)


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


class SharedTwice(nn.Module):
    """One Dense applied twice (weights reused within a forward pass), and a head called twice of which only the
    second call reaches the loss (big_vision's ViT/BiT call their head on the pre-logits too)."""

    @nn.compact
    def __call__(self, x):
        d = nn.Dense(4, name="tied")
        head = nn.Dense(3, name="head")
        h = jnp.tanh(d(jnp.tanh(d(x))))
        _ = head(h * 0.5)  # computed, not used by the loss
        return head(h)


def _shared_twice_reference(params, x, y):
    def dense(p, h):
        return h @ p["kernel"] + p["bias"][None]

    def f(ps, xi, perts):
        h = jnp.tanh(dense(ps[("tied", 0)], xi) + perts[("tied", 0)])
        h = jnp.tanh(dense(ps[("tied", 1)], h) + perts[("tied", 1)])
        _ = dense(ps[("head", 0)], h * 0.5) + perts[("head", 0)]
        return dense(ps[("head", 1)], h) + perts[("head", 1)]

    ps = {("tied", 0): params["tied"], ("tied", 1): params["tied"], ("head", 0): params["head"],
          ("head", 1): params["head"]}
    shapes = {("tied", 0): (1, 4), ("tied", 1): (1, 4), ("head", 0): (1, 3), ("head", 1): (1, 3)}
    ref, correct = per_call_reference(f, ps, x, y, shapes)
    return {"tied": _sum_calls(ref, "tied"), "head": _sum_calls(ref, "head")}, correct


def test_layer_called_twice_is_balanced_per_call_linen():
    x, y = data((4,), n=6, seed=50)
    variables = init_linen(SharedTwice(), x[:1])
    ref, correct = _shared_twice_reference(variables["params"], x, y)
    assert 0 < sum(correct) < len(correct)
    cfg = bang_jax.BangConfig(epsilon=EPS, beta=BETA, ratio=RATIO)
    got, aux = jax.jit(lambda v: bang_jax.bang_grad(SharedTwice().apply, v, x, y, config=cfg, return_aux=True))(
        variables)
    for layer in ("tied", "head"):
        for leaf in ("kernel", "bias"):
            assert _rel_err(got[layer][leaf], ref[layer][leaf]) <= TOL, (layer, leaf)
    # each call has its own κ norms and η, reported under path, path + ('call1',)
    assert set(aux.layer_eta) == {("tied",), ("tied", "call1"), ("head",), ("head", "call1")}
    np.testing.assert_array_equal(np.asarray(aux.layer_kappa_norms[("head",)]), 0.0)  # the unused call: κ = 0
    np.testing.assert_array_equal(np.asarray(aux.layer_eta[("head",)]), 1.0)
    # and it differs from one η per layer: balancing the sum of the calls' κ would give another gradient
    plain = jax.grad(lambda p: jnp.mean(xent(SharedTwice().apply({"params": p}, x), y)))(variables["params"])
    assert _rel_err(got["tied"]["kernel"], BETA * plain["tied"]["kernel"]) > 1e-3


class NNXSharedTwice(nnx.Module):
    def __init__(self, rngs):
        self.tied = nnx.Linear(4, 4, rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.tied(jnp.tanh(self.tied(x))))
        _ = self.head(h * 0.5)
        return self.head(h)


def test_layer_called_twice_is_balanced_per_call_nnx():
    x, y = data((4,), n=6, seed=51)
    model = make(NNXSharedTwice)
    params = {k: {"kernel": getattr(model, k).kernel[...], "bias": getattr(model, k).bias[...]}
              for k in ("tied", "head")}
    ref, _ = _shared_twice_reference(params, x, y)
    got = nnx.jit(lambda m: bnnx.bang_grad(m, x, y, epsilon=EPS, beta=BETA, ratio=RATIO))(model)
    for layer in ("tied", "head"):
        for leaf in ("kernel", "bias"):
            assert _rel_err(got[layer][leaf][...], ref[layer][leaf]) <= TOL, (layer, leaf)


class LinenTied(nn.Module):
    """A language-model style tied output embedding: lookup of a token, output projection with Embed.attend."""

    @nn.compact
    def __call__(self, x, tokens):
        emb = nn.Embed(5, 4, name="emb")
        h = jnp.tanh(nn.Dense(4, name="body")(x) + emb(tokens))
        return emb.attend(h)


class NNXTied(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Embed(5, 4, rngs=rngs)
        self.body = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x, tokens):
        return self.emb.attend(jnp.tanh(self.body(x) + self.emb(tokens)))


def _tied_reference(params, x, y, tokens):
    """The projection call (attend) is balanced; the lookup keeps its ordinary gradient (η = 1)."""
    def f(ps, xi, perts, ti):
        body = xi @ ps[("body", 0)]["kernel"] + ps[("body", 0)]["bias"][None] + perts[("body", 0)]
        h = jnp.tanh(body + ps[("lookup", 0)][ti])
        return h @ ps[("emb", 0)].T + perts[("emb", 0)]

    ps = {("body", 0): params["body"], ("emb", 0): params["emb"], ("lookup", 0): params["emb"]}
    shapes = {("body", 0): (1, 4), ("emb", 0): (1, 5)}
    n = x.shape[0]
    grads, kappas, correct = [], [], []
    for i in range(n):
        def loss(p, perts, i=i):
            out = f(p, x[i:i + 1], perts, tokens[i:i + 1])
            return xent(out, y[i:i + 1])[0], out
        perts = {k: jnp.zeros(s) for k, s in shapes.items()}
        (_, out), (g, k) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(ps, perts)
        grads.append(g)
        kappas.append(k)
        correct.append(bool(argmax_correct(out, y[i:i + 1])[0]))
    etas = {key: eta64([float(np.linalg.norm(np.asarray(k[key], np.float64))) for k in kappas], correct)
            for key in shapes}

    def wsum(key, w):
        return jax.tree.map(lambda *gs: BETA * sum(wi * np.asarray(g, np.float64) for wi, g in zip(w, gs)) / n,
                            *[g[key] for g in grads])

    return {"body": wsum(("body", 0), etas[("body", 0)]),
            "emb": wsum(("emb", 0), etas[("emb", 0)]) + wsum(("lookup", 0), np.ones(n))}


def test_tied_embedding_attend_is_balanced_as_a_call():
    x, y = data((4,), n=6, classes=5, seed=52)
    tokens = jnp.asarray(np.random.default_rng(52).integers(0, 5, 6), jnp.int32)
    variables = init_linen(LinenTied(), x[:1], tokens[:1])
    params = {"body": variables["params"]["body"], "emb": variables["params"]["emb"]["embedding"]}
    ref = _tied_reference(params, x, y, tokens)
    got = jax.jit(lambda v: bang_jax.bang_grad(LinenTied().apply, v, x, y, epsilon=EPS, beta=BETA, ratio=RATIO,
                                               tokens=tokens))(variables)
    assert _rel_err(got["emb"]["embedding"], ref["emb"]) <= TOL
    for leaf in ("kernel", "bias"):
        assert _rel_err(got["body"][leaf], ref["body"][leaf]) <= TOL
    model = make(NNXTied)
    params = {"body": {"kernel": model.body.kernel[...], "bias": model.body.bias[...]},
              "emb": model.emb.embedding[...]}
    ref = _tied_reference(params, x, y, tokens)
    got = nnx.jit(lambda m: bnnx.bang_grad(m, x, y, epsilon=EPS, beta=BETA, ratio=RATIO, tokens=tokens))(model)
    assert _rel_err(got["emb"]["embedding"][...], ref["emb"]) <= TOL
    assert _rel_err(got["body"]["kernel"][...], ref["body"]["kernel"]) <= TOL


# --------------------------------------------------------------------------------------------------------
# Scanned stacks (nn.scan / nnx.scan over stacked weights, with remat inside): slice l of the stack is layer l,
# balanced with η from its own κ. The reference is the same network unrolled into separate layers.


class Unrolled(nn.Module):
    depth: int = 3

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6, name="stem")(x)
        for i in range(self.depth):
            h = jnp.tanh(nn.Dense(6, name=f"cell{i}")(h))
        return nn.Dense(3, name="head")(h)


class ScanBody(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(nn.Dense(6, name="inner")(h)), None


class LinenStack(nn.Module):
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6, name="stem")(x)
        body = nn.remat(ScanBody) if self.remat else ScanBody
        h, _ = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(name="cells")(h, None)
        return nn.Dense(3, name="head")(h)


class NNXStack(nnx.Module):
    def __init__(self, rngs, remat=False):
        self.remat = remat
        self.stem = nnx.Linear(4, 6, rngs=rngs)
        self.cells = nnx.vmap(lambda r: nnx.Linear(6, 6, rngs=r))(rngs.fork(split=3))
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        def step(h, cell):
            return jnp.tanh(cell(h))
        if self.remat:
            step = nnx.remat(step)
        h = nnx.scan(step, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(self.stem(x), self.cells)
        return self.head(h)


def _unrolled_params(stem, cells, head):
    """The unrolled network's params from a stack's (kernel [L, ...], bias [L, ...])."""
    params = {"stem": stem, "head": head}
    for i in range(cells["kernel"].shape[0]):
        params[f"cell{i}"] = {"kernel": cells["kernel"][i], "bias": cells["bias"][i]}
    return params


def _check_stack(got_stem, got_cells, got_head, ref):
    for i in range(got_cells["kernel"].shape[0]):
        for leaf in ("kernel", "bias"):
            assert _rel_err(got_cells[leaf][i], ref[(f"cell{i}", leaf)]) <= TOL, (i, leaf)
    for name, got in (("stem", got_stem), ("head", got_head)):
        for leaf in ("kernel", "bias"):
            assert _rel_err(got[leaf], ref[(name, leaf)]) <= TOL, (name, leaf)


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_stack_is_balanced_per_slice_linen(remat):
    x, y = data((4,), n=6, seed=60)
    variables = init_linen(LinenStack(remat), x[:1])
    p = variables["params"]
    unrolled = {"params": _unrolled_params(p["stem"], p["cells"]["inner"], p["head"])}
    ref, correct = linen_reference(Unrolled().apply, unrolled, x, y)
    assert 0 < sum(correct) < len(correct)
    got = jax.jit(lambda v: bang_jax.bang_grad(LinenStack(remat).apply, v, x, y, epsilon=EPS, beta=BETA,
                                               ratio=RATIO))(variables)
    _check_stack(got["stem"], got["cells"]["inner"], got["head"], ref)


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_stack_is_balanced_per_slice_nnx(remat):
    x, y = data((4,), n=6, seed=61)
    model = make(NNXStack, remat=remat)

    def plain(layer):
        return {"kernel": jnp.asarray(layer.kernel[...]), "bias": jnp.asarray(layer.bias[...])}

    unrolled = {"params": _unrolled_params(plain(model.stem), plain(model.cells), plain(model.head))}
    ref, _ = linen_reference(Unrolled().apply, unrolled, x, y)
    got = nnx.jit(lambda m: bnnx.bang_grad(m, x, y, epsilon=EPS, beta=BETA, ratio=RATIO))(model)
    _check_stack(*({k: v[...] for k, v in got[name].items()} for name in ("stem", "cells", "head")), ref)


# --------------------------------------------------------------------------------------------------------
# Constructs found by review: refused with a remedy rather than a crash or a silently different answer.


def test_review_constructs_are_refused_with_a_remedy():
    x, y = data((4,), n=4, seed=80)

    class Aliased(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(4, 4, rngs=rngs)
            self.b = nnx.Linear(4, 4, rngs=rngs)
            self.b.kernel = self.a.kernel  # one Param, two layers
            self.head = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.head(jnp.tanh(self.b(jnp.tanh(self.a(x)))))

    model = make(Aliased)
    for fn in (lambda: bnnx.bang_grad(model, x, y, epsilon=EPS), lambda: bnnx.per_example_grads(model, x, y)):
        with pytest.raises(ValueError, match="b \\(Linear\\) uses parameter\\(s\\) kernel that are not stored"):
            fn()

    class TwiceDropped(nn.Module):  # one dropout module called twice
        @nn.compact
        def __call__(self, x, train=True):
            drop = nn.Dropout(0.5, deterministic=not train, name="drop")
            return nn.Dense(3, name="head")(drop(jnp.tanh(nn.Dense(4, name="a")(drop(x)))))

    variables = init_linen(TwiceDropped(), x[:1], train=False)
    with pytest.raises(ValueError, match="drop \\(Dropout\\) is called more than once.*separate dropout module"):
        bang_jax.sample_dropout_masks(TwiceDropped().apply, variables, x, rngs={"dropout": jax.random.key(0)})

    class DropCell(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return nn.Dropout(0.3, deterministic=False)(jnp.tanh(nn.Dense(4, name="cell")(h))), None

    class ScanDrop(nn.Module):
        @nn.compact
        def __call__(self, x, train=True):
            h, _ = nn.scan(DropCell, variable_broadcast="params", split_rngs={"params": False, "dropout": True},
                           length=2)(name="rnn")(x, None)
            return nn.Dense(3, name="head")(h)

    variables = jax.eval_shape(lambda: ScanDrop().init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                                                        x[:1]))
    variables = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), variables)
    with pytest.raises(ValueError, match="runs inside a `.*` trace \\(a scan or loop\\).*rngs"):
        bang_jax.sample_dropout_masks(ScanDrop().apply, variables, x, rngs={"dropout": jax.random.key(0)})

    variables = init_linen(LinenStack(), x[:1])
    per_slice = bang_jax.BangConfig(epsilon={"stem": 0.8, "cells": jnp.array([0.1, 0.5, 0.9]), "head": 0.8})
    with pytest.raises(ValueError, match="one number per parameter leaf.*Per-slice values"):
        bang_jax.bang_grad(LinenStack().apply, variables, x, y, config=per_slice)


def test_weights_used_outside_their_layer_call_are_refused_for_per_example_grads():
    """A hand-tied decoder: the layer call is balanced and the other use stays ordinary (bang_grad, checked against
    a reference); per_example_grads cannot separate the two uses and refuses, pointing to bang_grad."""
    x, y = data((3,), n=5, seed=90)

    class HandTied(nn.Module):
        @nn.compact
        def __call__(self, x):
            d = nn.Dense(4, name="enc")
            h = jnp.tanh(d(x))
            return h @ d.variables["params"]["kernel"].T

    variables = init_linen(HandTied(), x[:1])
    with pytest.raises(ValueError, match="enc/kernel also reach the outputs outside their layer's call.*bang_grad"):
        bang_jax.per_example_grads(HandTied().apply, variables, x, y)
    p = variables["params"]["enc"]

    def f(ps, xi, perts):
        h = jnp.tanh(xi @ ps[("enc", 0)]["kernel"] + ps[("enc", 0)]["bias"][None] + perts[("enc", 0)])
        return h @ ps[("tie", 0)].T

    ref, _ = per_call_reference(f, {("enc", 0): p, ("tie", 0): p["kernel"]}, x, y, {("enc", 0): (1, 4)})
    got = bang_jax.bang_grad(HandTied().apply, variables, x, y, epsilon=EPS, beta=BETA, ratio=RATIO)
    assert _rel_err(got["enc"]["kernel"], ref[("enc", 0)]["kernel"] + ref[("tie", 0)]) <= TOL
    assert _rel_err(got["enc"]["bias"], ref[("enc", 0)]["bias"]) <= TOL

    class NNXHandTied(nnx.Module):
        def __init__(self, rngs):
            self.enc = nnx.Linear(3, 4, rngs=rngs)

        def __call__(self, x):
            return jnp.tanh(self.enc(x)) @ self.enc.kernel[...].T

    with pytest.raises(ValueError, match="enc/kernel also reach the outputs outside"):
        bnnx.per_example_grads(make(NNXHandTied), x, y)
