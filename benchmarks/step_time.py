"""Step time of plain, BANG single-pass and BANG per-example training steps, measured side by side.

    python benchmarks/step_time.py [--repeats 30] [--models lenet,cifar_quick,nnx_cnn,scanned_transformer]

For LeNet (batch 64) and CIFAR-quick (batch 100) it times one full jitted training step (gradient + Caffe SGD
update) for each gradient method; for ``nnx_cnn``, a CIFAR-quick-sized Flax NNX CNN (batch 100), it times a
``jax.jit`` step of ``bang_jax.nnx.bang_grad`` + ``nnx.Optimizer.update`` against the same step with plain
``nnx.grad``; for ``scanned_transformer``, a 4-block pre-LayerNorm NNX transformer whose blocks are one
``nnx.vmap``-built stack applied with ``nnx.scan`` (batch 64, 32 tokens, width 64, 4 heads), the same two steps
(every block of the stack balanced on its own), with ratio 1 and, as ``scanned_transformer_ratio0.5``, ratio 0.5
(then η needs each example's correctness, which takes a second forward pass: XLA does not merge two scans).
Methods are interleaved round by round so that machine load affects all alike; it prints medians,
the ratios to the plain step, and one final JSON line. Compilation is excluded (warm-up), timings wait for the
device (block_until_ready). Targets: single pass ≤ 1.10× plain (linen and NNX), ≤ 1.15× for the scanned
transformer, per-example ≤ 2.5× plain.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bang_jax.nnx
from bang_jax import BangState, bang, bang_grad, per_example_grads, plain_grad
from bang_jax.models import CifarQuick, LeNet
from bang_jax.solvers import CIFAR_QUICK_SOLVER, LENET_SOLVER

SETUPS = {
    "lenet": (LeNet(), (64, 28, 28, 1), LENET_SOLVER, dict(epsilon=0.815, beta=1.0, ratio=1.0)),
    "cifar_quick": (CifarQuick(), (100, 32, 32, 3), CIFAR_QUICK_SOLVER, dict(epsilon=0.855, beta=0.4, ratio=0.5)),
}


def make_steps(model, solver, hp):
    tx = solver.optimizer()

    def finish(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def plain(params, opt_state, consts, x, y, key):
        g = plain_grad(model.apply, {**consts, "params": params}, x, y, rngs={"dropout": key}, train=True)
        return finish(params, opt_state, g)

    def single_pass(params, opt_state, consts, x, y, key):
        g = bang_grad(model.apply, {**consts, "params": params}, x, y, rngs={"dropout": key}, train=True, **hp)
        return finish(params, opt_state, g)

    def per_example(params, opt_state, consts, x, y, key):
        pe = per_example_grads(
            model.apply,
            {**consts, "params": params},
            x,
            y,
            rngs={"dropout": key},
            train=True,
            factor_layers=getattr(model, "untied_weighted_layers", False),
        )
        g, _ = bang(**hp).update(pe.grads, BangState(), kappa_norms=pe.kappa_norms, correct=pe.correct)
        return finish(params, opt_state, g)

    return tx, {"plain": jax.jit(plain), "single_pass": jax.jit(single_pass), "per_example": jax.jit(per_example)}


class NNXCifarCNN(nnx.Module):
    """A CIFAR-quick-sized NNX CNN: conv 32/32/64 5×5 with pooling, linear 64, dropout 0.5, linear 10."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 32, (5, 5), padding=2, rngs=rngs)
        self.conv2 = nnx.Conv(32, 32, (5, 5), padding=2, rngs=rngs)
        self.conv3 = nnx.Conv(32, 64, (5, 5), padding=2, rngs=rngs)
        self.ip1 = nnx.Linear(64 * 4 * 4, 64, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.ip2 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(nnx.max_pool(self.conv1(x / 255.0), (3, 3), (2, 2), padding="SAME"))
        h = nnx.avg_pool(nnx.relu(self.conv2(h)), (3, 3), (2, 2), padding="SAME")
        h = nnx.avg_pool(nnx.relu(self.conv3(h)), (3, 3), (2, 2), padding="SAME")
        return self.ip2(self.dropout(self.ip1(h.reshape((x.shape[0], -1)))))


class ScannedBlock(nnx.Module):
    """Pre-LayerNorm transformer block: self-attention and a GELU MLP, each with a residual connection."""

    def __init__(self, width: int, heads: int, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=width, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 2 * width, rngs=rngs)
        self.down = nnx.Linear(2 * width, width, rngs=rngs)

    def __call__(self, h):
        h = h + self.attn(self.norm1(h))
        return h + self.down(nnx.gelu(self.up(self.norm2(h))))


class ScannedTransformer(nnx.Module):
    """A token-sequence classifier whose ``depth`` blocks are one stacked module applied with ``nnx.scan``."""

    def __init__(self, rngs: nnx.Rngs, depth: int = 4, width: int = 64, heads: int = 4, features: int = 16):
        self.embed = nnx.Linear(features, width, rngs=rngs)
        self.blocks = nnx.vmap(lambda r: ScannedBlock(width, heads, r))(rngs.fork(split=depth))
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, x):
        h = nnx.scan(lambda h, block: block(h), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(self.embed(x), self.blocks)
        return self.head(self.norm(h).mean(axis=1))


def make_nnx_steps(hp, model_cls=None):
    """(state, {method: jitted step(state, x, y) -> state}) for an NNX model with SGD + momentum."""
    model = (model_cls or NNXCifarCNN)(nnx.Rngs(0, dropout=1))
    optimizer = nnx.Optimizer(model, optax.sgd(1e-3, momentum=0.9), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def plain(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        grads = nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer))

    def single_pass(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        grads = bang_jax.nnx.bang_grad(model, x, y, **hp)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer))

    return state, {"plain": jax.jit(plain), "single_pass": jax.jit(single_pass)}


def _interleaved(steps, args, repeats):
    times = {m: [] for m in steps}
    for fn in steps.values():  # warm-up: compile
        jax.block_until_ready(fn(*args))
    for _ in range(repeats):
        for m, fn in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[m].append(time.perf_counter() - t0)
    return {m: float(np.median(t)) for m, t in times.items()}


def time_model(name, repeats):
    rng = np.random.default_rng(0)
    if name.startswith("scanned_transformer"):
        x = jnp.asarray(rng.normal(size=(64, 32, 16)), jnp.float32)
        y = jnp.asarray(rng.integers(0, 10, 64), jnp.int32)
        ratio = 0.5 if name.endswith("ratio0.5") else 1.0
        state, steps = make_nnx_steps(dict(epsilon=0.8, beta=1.0, ratio=ratio), ScannedTransformer)
        return _interleaved(steps, (state, x, y), repeats)
    if name == "nnx_cnn":
        x = jnp.asarray(rng.integers(0, 256, (100, 32, 32, 3)), jnp.float32)
        y = jnp.asarray(rng.integers(0, 10, 100), jnp.int32)
        state, steps = make_nnx_steps(SETUPS["cifar_quick"][3])
        return _interleaved(steps, (state, x, y), repeats)
    model, shape, solver, hp = SETUPS[name]
    tx, steps = make_steps(model, solver, hp)
    x = jnp.asarray(rng.integers(0, 256, shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, shape[0]), jnp.int32)
    variables = model.init(jax.random.PRNGKey(0), x[:1], train=False)
    params = variables["params"]
    consts = {k: v for k, v in variables.items() if k != "params"}
    return _interleaved(steps, (params, tx.init(params), consts, x, y, jax.random.PRNGKey(1)), repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--models", default="lenet,cifar_quick,nnx_cnn,scanned_transformer,scanned_transformer_ratio0.5"
    )
    parser.add_argument("--json", help="also write the JSON summary to this file (python -m experiments.docs_tables "
                        "collect FILE NAME --benchmark … makes it a docs results file)")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    summary = {}
    for name in args.models.split(","):
        t = time_model(name, args.repeats)
        per_example = f"   per-example BANG {1e3 * t['per_example']:8.2f} ms" if "per_example" in t else ""
        print(
            f"{name:30s} plain {1e3 * t['plain']:8.2f} ms   single-pass BANG {1e3 * t['single_pass']:8.2f} ms"
            f"{per_example}   (median of {args.repeats})"
        )
        summary[f"{name}_plain_ms"] = round(1e3 * t["plain"], 3)
        summary[f"{name}_single_pass_over_plain"] = round(t["single_pass"] / t["plain"], 3)
        if "per_example" in t:
            summary[f"{name}_per_example_over_plain"] = round(t["per_example"] / t["plain"], 3)
    summary["repeats"] = args.repeats
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
