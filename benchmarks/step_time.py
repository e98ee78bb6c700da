"""Step time of plain, BANG single-pass and BANG per-example training steps, measured side by side.

    python benchmarks/step_time.py [--repeats 30] [--models lenet,cifar_quick]

For LeNet (batch 64) and CIFAR-quick (batch 100) it times one full jitted training step (gradient + Caffe SGD
update) for each gradient method, interleaving the methods round by round so that machine load affects all
alike, and prints medians, the ratios to the plain step, and one final JSON line. Compilation is excluded
(warm-up), timings wait for the device (block_until_ready). Targets: single pass ≤ 1.10× plain,
per-example ≤ 2.5× plain.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

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
        pe = per_example_grads(model.apply, {**consts, "params": params}, x, y, rngs={"dropout": key}, train=True)
        g, _ = bang(**hp).update(pe.grads, BangState(), kappa_norms=pe.kappa_norms, correct=pe.correct)
        return finish(params, opt_state, g)

    return tx, {"plain": jax.jit(plain), "single_pass": jax.jit(single_pass), "per_example": jax.jit(per_example)}


def time_model(name, repeats):
    model, shape, solver, hp = SETUPS[name]
    tx, steps = make_steps(model, solver, hp)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 256, shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, shape[0]), jnp.int32)
    variables = model.init(jax.random.PRNGKey(0), x[:1], train=False)
    params = variables["params"]
    consts = {k: v for k, v in variables.items() if k != "params"}
    opt_state = tx.init(params)
    key = jax.random.PRNGKey(1)
    times = {m: [] for m in steps}
    for fn in steps.values():  # warm-up: compile
        jax.block_until_ready(fn(params, opt_state, consts, x, y, key))
    for _ in range(repeats):
        for m, fn in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, opt_state, consts, x, y, key))
            times[m].append(time.perf_counter() - t0)
    return {m: float(np.median(t)) for m, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--models", default="lenet,cifar_quick")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    summary = {}
    for name in args.models.split(","):
        t = time_model(name, args.repeats)
        print(
            f"{name:12s} plain {1e3 * t['plain']:8.2f} ms   single-pass BANG {1e3 * t['single_pass']:8.2f} ms"
            f"   per-example BANG {1e3 * t['per_example']:8.2f} ms   (median of {args.repeats})"
        )
        summary[f"{name}_plain_ms"] = round(1e3 * t["plain"], 3)
        summary[f"{name}_single_pass_over_plain"] = round(t["single_pass"] / t["plain"], 3)
        summary[f"{name}_per_example_over_plain"] = round(t["per_example"] / t["plain"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
