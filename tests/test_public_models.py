"""Public model definitions, rewritten here in our own words, against independent references, in float32 and float64.

* a Vision Transformer whose encoder blocks are one ``nn.scan`` stack (as big_vision's ViT with ``scan=True``),
  checked against the same network unrolled into separate blocks (per-example reference of ``test_zoo``);
* a Gemma-style NNX attention block: q/k/v from one ``Einsum('BTD,SNDH->SBTNH')`` whose output carries the batch on
  axis 1, an ``Einsum`` output projection, RMS normalisation (per-example reference of ``test_zoo``);
* a ResNet with BatchNorm in training mode (the Flax examples' ResNet, small): the batch-loss definition;
* an LSTM classifier (``nn.RNN(nn.LSTMCell)``, a scan over time): every time step is a call of the cell's gates,
  balanced on its own; checked against a per-call reference of the Python-unrolled cell.

Every reference uses Flax and JAX only (interceptors, ``jax.vjp``, loops over examples) and computes η in float64
numpy from docs/semantics.md; none calls bang_jax.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_zoo import (
    BETA,
    EPS,
    LINEN_WEIGHTED,
    RATIO,
    argmax_correct,
    assert_close,
    eta64,
    flat,
    linen_reference,
    nnx_reference,
    xent,
)

import bang_jax
import bang_jax.nnx as bnnx

TOLS = {"float32": 1e-5, "float64": 1e-9}
CFG = dict(epsilon=EPS, beta=BETA, ratio=RATIO)


@contextlib.contextmanager
def precision(dtype):
    with jax.enable_x64(dtype == "float64"):
        yield jnp.dtype(dtype)


def nest(flat_dict):
    """``{key tuple: leaf}`` back into nested dicts (what ``assert_close`` flattens)."""
    out = {}
    for key, value in flat_dict.items():
        node = out
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = value
    return out


def draw(shape, dtype, seed, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), dtype)


def fill(abstract, dtype, seed):
    """Random values for an abstract variables tree: weights ~ N(0, 1/fan_in), 1-d leaves ~ N(0, 0.1²) (LayerNorm
    scales 1 + that), BatchNorm statistics 0 / 1."""
    rng = np.random.default_rng(seed)

    def one(path, leaf):
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", "")))
        if name == "var":
            return jnp.ones(leaf.shape, dtype)
        if name == "mean":
            return jnp.zeros(leaf.shape, dtype)
        if len(leaf.shape) >= 2:
            fan_in = int(np.prod(leaf.shape[:-1])) if name != "kernel" else int(np.prod(leaf.shape[-2:-1]))
            return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(max(fan_in, 1)), dtype)
        base = 1.0 if name == "scale" else 0.0
        return jnp.asarray(base + 0.1 * rng.normal(size=leaf.shape), dtype)

    return jax.tree_util.tree_map_with_path(one, abstract)


def labels_with_both_outcomes(logits, n, classes, seed):
    """Labels that make some examples correct and some wrong (both ε and ε·ratio exercised)."""
    pred = np.asarray(jnp.argmax(logits, -1))
    y = (pred + 1 + np.random.default_rng(seed).integers(0, classes - 1, n)) % classes
    y[: n // 2] = pred[: n // 2]
    return jnp.asarray(y, jnp.int32)


# --------------------------------------------------------------------------------------------------------
# ViT with a scanned encoder.


class EncoderBlock(nn.Module):
    width: int
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, h, _=None):
        y = nn.LayerNorm(name="ln1", dtype=h.dtype, param_dtype=h.dtype)(h)
        y = nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn", dtype=h.dtype,
                                            param_dtype=h.dtype)(y, y)
        h = h + y
        y = nn.LayerNorm(name="ln2", dtype=h.dtype, param_dtype=h.dtype)(h)
        y = nn.Dense(self.width, name="mlp_out", param_dtype=h.dtype)(
            nn.gelu(nn.Dense(self.mlp, name="mlp_in", param_dtype=h.dtype)(y)))
        return h + y, None


class ViT(nn.Module):
    """Patch embedding (a strided Conv), a class token, learned positions, ``depth`` pre-LN blocks, a linear head."""

    depth: int = 2
    width: int = 8
    heads: int = 2
    mlp: int = 16
    classes: int = 3
    patch: int = 4
    scan: bool = True

    @nn.compact
    def __call__(self, images):
        dt = images.dtype
        x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch, padding="VALID", name="embedding",
                    param_dtype=dt)(images)
        n, gh, gw, _ = x.shape
        x = x.reshape((n, gh * gw, self.width))
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width), dt)
        x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, self.width)), x], axis=1)
        x = x + self.param("pos", nn.initializers.normal(0.02), (1, gh * gw + 1, self.width), dt)
        if self.scan:
            stack = nn.scan(EncoderBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                            length=self.depth)
            x, _ = stack(self.width, self.heads, self.mlp, name="encoder")(x, None)
        else:
            for i in range(self.depth):
                x, _ = EncoderBlock(self.width, self.heads, self.mlp, name=f"block{i}")(x)
        x = nn.LayerNorm(name="final_ln", dtype=dt, param_dtype=dt)(x)
        return nn.Dense(self.classes, name="head", param_dtype=dt)(x[:, 0])


def unrolled_vit_params(params, depth):
    out = {k: v for k, v in params.items() if k != "encoder"}
    for i in range(depth):
        out[f"block{i}"] = jax.tree.map(lambda a, i=i: a[i], params["encoder"])
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_vit_with_scanned_encoder(dtype):
    with precision(dtype) as dt:
        x = draw((6, 8, 8, 1), dt, 70)
        model = ViT()
        abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1]))
        variables = fill(abstract, dt, 70)
        y = labels_with_both_outcomes(model.apply(variables, x), 6, 3, 70)
        unrolled = {"params": unrolled_vit_params(variables["params"], 2)}
        ref, correct = linen_reference(ViT(scan=False).apply, unrolled, x, y)
        assert 0 < sum(correct) < 6
        got = jax.jit(lambda v: bang_jax.bang_grad(model.apply, v, x, y, **CFG))(variables)
        assert jax.tree.leaves(got)[0].dtype == dt
        stacked = flat(got)
        regrouped = {}
        for key, value in stacked.items():
            if key[0] == "encoder":
                for i in range(2):
                    regrouped[(f"block{i}",) + key[1:]] = value[i]
            else:
                regrouped[key] = value
        assert_close(nest(regrouped), ref, tol=TOLS[dtype])


# --------------------------------------------------------------------------------------------------------
# Gemma-style attention (NNX): one Einsum for q, k, v with the batch on axis 1 of its output.


class RMSNorm(nnx.Module):
    def __init__(self, width, dtype):
        self.scale = nnx.Param(jnp.zeros((width,), dtype))

    def __call__(self, x):
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(var + 1e-6) * (1 + self.scale[...])[None, None]


class GemmaAttention(nnx.Module):
    def __init__(self, width, heads, head_dim, classes, dtype, rngs):
        self.norm = RMSNorm(width, dtype)
        self.qkv = nnx.Einsum("BTD,SNDH->SBTNH", (3, heads, width, head_dim), param_dtype=dtype, rngs=rngs)
        self.out = nnx.Einsum("BTNH,NHD->BTD", (heads, head_dim, width), param_dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(width, classes, param_dtype=dtype, rngs=rngs)
        self.head_dim = head_dim

    def __call__(self, x):
        q, k, v = self.qkv(self.norm(x))  # each [B, T, N, H]
        logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(self.head_dim)
        mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(logits.dtype).min), axis=-1)
        h = x + self.out(jnp.einsum("BNTS,BSNH->BTNH", probs, v))
        return self.head(h.mean(axis=1))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n", [3, 4])  # n = 3: the trap (axis 0 of the q/k/v output, S = 3, has the batch's length)
def test_gemma_style_einsum_attention(dtype, n):
    with precision(dtype) as dt:
        x = draw((n, 5, 6), dt, 71)
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GemmaAttention(6, 2, 4, 3, dt, nnx.Rngs(0))))
        model = nnx.merge(graphdef, fill(abstract, dt, 71))
        y = labels_with_both_outcomes(model(x), n, 3, 71)
        assert bnnx.weighted_layers(model, x)[("qkv",)] == (3, n, 5, 2, 4)
        ref, _ = nnx_reference(model, x, y)
        single = nnx.jit(lambda m: bnnx.bang_grad(m, x, y, **CFG))(model)
        assert_close(single, ref, tol=TOLS[dtype])
        pe = bnnx.per_example_grads(model, x, y)
        via_tx = bang_jax.bang(**CFG).update(pe.grads, None, kappa_norms=pe.kappa_norms, correct=pe.correct)[0]
        assert_close(via_tx, ref, tol=TOLS[dtype])


# --------------------------------------------------------------------------------------------------------
# ResNet with BatchNorm in training mode.


class ResidualBlock(nn.Module):
    width: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train):
        norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name,  # noqa: E731
                                         param_dtype=x.dtype, dtype=x.dtype)
        y = nn.relu(norm("bn1")(nn.Conv(self.width, (3, 3), self.strides, use_bias=False, name="conv1",
                                        param_dtype=x.dtype)(x)))
        y = norm("bn2")(nn.Conv(self.width, (3, 3), use_bias=False, name="conv2", param_dtype=x.dtype)(y))
        if x.shape != y.shape:
            x = norm("bn_proj")(nn.Conv(self.width, (1, 1), self.strides, use_bias=False, name="proj",
                                        param_dtype=x.dtype)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn_stem", param_dtype=x.dtype,
                                 dtype=x.dtype)(nn.Conv(4, (3, 3), use_bias=False, name="stem",
                                                        param_dtype=x.dtype)(x)))
        x = ResidualBlock(4, name="block1")(x, train)
        x = ResidualBlock(6, 2, name="block2")(x, train)
        return nn.Dense(3, name="head", param_dtype=x.dtype)(x.mean(axis=(1, 2)))


def batch_loss_reference(model, variables, x, y, **kw):
    """BatchNorm couples the examples: κ_i is example i's row of the batch loss's gradient at each weighted layer's
    output; each layer's weight gradient is its VJP of the η-scaled rows (docs/semantics.md)."""
    modules, inputs, shapes = {}, {}, {}

    def record(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        if ctx.method_name == "__call__" and isinstance(ctx.module, LINEN_WEIGHTED):
            path = tuple(ctx.module.path)
            modules[path], inputs[path], shapes[path] = ctx.module.clone(parent=None), args[0], out.shape
        return out

    with nn.intercept_methods(record):
        model.apply(variables, x, mutable=["batch_stats"], **kw)

    def run(params, perts):
        def add(next_fun, args, kwargs, ctx):
            out = next_fun(*args, **kwargs)
            if ctx.method_name == "__call__" and isinstance(ctx.module, LINEN_WEIGHTED):
                out = out + perts[tuple(ctx.module.path)]
            return out

        with nn.intercept_methods(add):
            out, _ = model.apply({**variables, "params": params}, x, mutable=["batch_stats"], **kw)
        return jnp.mean(xent(out, y)), out

    perts = {p: jnp.zeros(s, x.dtype) for p, s in shapes.items()}
    (_, out), (g, kappa) = jax.value_and_grad(run, argnums=(0, 1), has_aux=True)(variables["params"], perts)
    correct = np.asarray(argmax_correct(out, y))
    ref = {k: BETA * np.asarray(v, np.float64) for k, v in flat(g).items()}
    for path, k in kappa.items():
        e = eta64([float(np.linalg.norm(np.asarray(r, np.float64))) for r in k], correct)
        scaled = jnp.asarray(np.asarray(k, np.float64) * e.reshape((-1,) + (1,) * (k.ndim - 1)), x.dtype)
        p = variables["params"]
        for step in path:
            p = p[step]
        module, inp = modules[path], inputs[path]
        layer_grad = jax.vjp(lambda p: module.apply({"params": p}, inp), p)[1](scaled)[0]
        for leaf, v in flat(layer_grad).items():
            ref[path + leaf] = BETA * np.asarray(v, np.float64)
    return ref, correct


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_resnet_with_batchnorm_in_training_mode(dtype):
    with precision(dtype) as dt:
        x = draw((6, 8, 8, 2), dt, 72)
        model = ResNet()
        variables = fill(jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1])), dt, 72)
        logits, _ = model.apply(variables, x, mutable=["batch_stats"])
        y = labels_with_both_outcomes(logits, 6, 3, 72)
        ref, correct = batch_loss_reference(model, variables, x, y)
        assert 0 < sum(correct) < 6
        got, aux = jax.jit(lambda v: bang_jax.bang_grad(model.apply, v, x, y, mutable=["batch_stats"],
                                                        return_aux=True, **CFG))(variables)
        assert_close(got, ref, tol=TOLS[dtype])
        assert set(aux.model_state) == {"batch_stats"}


# --------------------------------------------------------------------------------------------------------
# LSTM: nn.RNN(nn.LSTMCell) scans the cell over time; every step is a call of each gate's Dense.


class LSTMClassifier(nn.Module):
    hidden: int = 5
    classes: int = 3
    unrolled: bool = False

    @nn.compact
    def __call__(self, x):
        if self.unrolled:
            cell = nn.LSTMCell(self.hidden, name="cell", param_dtype=x.dtype)
            carry = cell.initialize_carry(jax.random.key(0), x[:, 0].shape)
            for t in range(x.shape[1]):
                carry, h = cell(carry, x[:, t])
        else:
            h = nn.RNN(nn.LSTMCell(self.hidden, param_dtype=x.dtype, name="cell"))(x)[:, -1]
        return nn.Dense(self.classes, name="head", param_dtype=x.dtype)(h)


def per_call_reference(model, variables, x, y):
    """Each call c of a weighted layer balanced on its own: Σ_c Σ_i η_{i,c} · VJP_c(κ_{i,c}) for its leaves (η_{i,c}
    from the κ of that call), the plain per-example sum for every other leaf; one example at a time."""
    n = x.shape[0]
    per_example = []
    for i in range(n):
        xi, yi = x[i:i + 1], y[i:i + 1]
        calls = []  # (path, module clone, input, output shape) in call order

        def record(next_fun, args, kwargs, ctx):
            out = next_fun(*args, **kwargs)
            if ctx.method_name == "__call__" and isinstance(ctx.module, LINEN_WEIGHTED):
                calls.append((tuple(ctx.module.path), ctx.module.clone(parent=None), args[0], out.shape))
            return out

        with nn.intercept_methods(record):
            model.apply(variables, xi)

        def run(params, perts):
            count = [0]

            def add(next_fun, args, kwargs, ctx):
                out = next_fun(*args, **kwargs)
                if ctx.method_name == "__call__" and isinstance(ctx.module, LINEN_WEIGHTED):
                    out = out + perts[count[0]]
                    count[0] += 1
                return out

            with nn.intercept_methods(add):
                out = model.apply({**variables, "params": params}, xi)
            return xent(out, yi)[0], out

        perts = [jnp.zeros(c[3], x.dtype) for c in calls]
        (_, out), (g, kappa) = jax.value_and_grad(run, argnums=(0, 1), has_aux=True)(variables["params"], perts)
        per_example.append((flat(g), calls, kappa, bool(argmax_correct(out, yi)[0])))
    correct = [c for *_, c in per_example]
    weighted = {call[0] for call in per_example[0][1]}
    ref = {}
    for key in per_example[0][0]:
        if not any(key[: len(p)] == p for p in weighted):
            ref[key] = BETA * sum(np.asarray(g[key], np.float64) for g, *_ in per_example) / n
    for c in range(len(per_example[0][1])):
        path = per_example[0][1][c][0]
        e = eta64([float(np.linalg.norm(np.asarray(k[c], np.float64))) for _, _, k, _ in per_example], correct)
        for i, (_, calls, kappa, _) in enumerate(per_example):
            _, module, inp, _ = calls[c]
            p = variables["params"]
            for step in path:
                p = p[step]
            g = jax.vjp(lambda p: module.apply({"params": p}, inp), p)[1](kappa[c])[0]
            for leaf, v in flat(g).items():
                ref[path + leaf] = ref.get(path + leaf, 0.0) + BETA * e[i] * np.asarray(v, np.float64) / n
    return ref, correct


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lstm_scanned_over_time_is_balanced_per_step(dtype):
    with precision(dtype) as dt:
        x = draw((6, 4, 3), dt, 73)
        unrolled = LSTMClassifier(unrolled=True)
        variables = fill(jax.eval_shape(lambda: unrolled.init(jax.random.key(0), x[:1])), dt, 73)
        y = labels_with_both_outcomes(unrolled.apply(variables, x), 6, 3, 73)
        ref, correct = per_call_reference(unrolled, variables, x, y)
        assert 0 < sum(correct) < 6
        # the Python-unrolled cell: every gate called 4 times
        got = jax.jit(lambda v: bang_jax.bang_grad(unrolled.apply, v, x, y, **CFG))(variables)
        assert_close(got, ref, tol=TOLS[dtype])
        # the same weights scanned with nn.RNN
        scanned = LSTMClassifier()
        assert jax.tree.structure(jax.eval_shape(lambda: scanned.init(jax.random.key(0), x[:1]))) == \
            jax.tree.structure(variables)
        got = jax.jit(lambda v: bang_jax.bang_grad(scanned.apply, v, x, y, **CFG))(variables)
        assert_close(got, ref, tol=TOLS[dtype])
        with pytest.raises(ValueError, match="Use bang_grad"):
            bang_jax.per_example_grads(scanned.apply, variables, x, y)
