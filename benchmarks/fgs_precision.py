"""How the FGS direction depends on the precision of the loss gradient, on a very confident model.

    python benchmarks/fgs_precision.py [--weights PATH] [--limit 1000] [--json OUT]

On the authors' BANG LeNet (default ``$BANG_DATA_DIR/bang_caffe/lenet_bang.caffemodel.h5``) and the first
``--limit`` MNIST test images that it classifies correctly, it computes the FGS direction sign(∂L/∂x) five ways and
runs the paper's minimal-step line search (t ≤ 255) along each:

* ``paper``: the float32 softmax gradient with the paper's blank rule (no direction when p_true rounds to 1.0);
* ``float64_softmax``: softmax − onehot computed in float64 from the float32 logits, then pulled back to the
  image in float32 — "compute the loss gradient in higher precision" on a float32 model. Two things go wrong:
  from a logit margin of about ln 2⁵³ ≈ 37, 1 − p_true rounds to 0 in float64 and the true-class term is lost;
  and the other classes' terms (≈ e^−margin) underflow to 0 in float32 beyond a margin of about 87-103, leaving
  no direction at all;
* ``float64``: the same in float64 throughout (model, cotangent and pull-back): the true-class term is still lost,
  but nothing underflows to a blank direction;
* ``exact``: the library's ``fgs_direction(exact=True)`` — (softmax − onehot)/(1 − p_true) in log space;
* ``exact_float64_model``: the library's log-space cotangent (as ``exact`` computes it) pulled back through the
  model run in float64 — what is left of ``exact``'s difference from the reference once the model's own float32
  rounding (a ReLU input or a max-pool near-tie that falls the other way) is taken out;
* ``float64_reference``: the sign of a float64 gradient (model and input in float64) of the stable loss
  softplus(logsumexp_{j≠y} z_j − z_y), which has the cross-entropy's gradient direction and underflows only
  beyond margins of about 745.

It reports, per way, how many directions are blank, the share (%) of pixels whose sign equals the reference's and
how many pixels and images differ from it, and the line search's success rate and mean L∞; and the logit margins
z_y − max_{j≠y} z_j of the attacked (correctly classified) images. The data must be the real MNIST files
(``--data-dir`` or ``$BANG_DATA_DIR``); the report records their source.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bang_jax.attacks import _ce_cotangent_exact, fgs_direction, line_search_attack
from bang_jax.caffe import load_caffe_weights
from bang_jax.data import load_mnist

BATCH = 250


def float64_softmax_direction(model, variables, x, y):
    """sign of the input gradient with softmax − onehot formed in float64, pulled back in float32."""
    logits, vjp = jax.vjp(lambda a: model.apply(variables, a), jnp.asarray(x, jnp.float32))
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    cot = p - np.eye(z.shape[1])[y]
    return np.sign(np.asarray(vjp(jnp.asarray(cot, jnp.float32))[0]))


def float64_direction(model, variables, x, y):
    """sign of (softmax − onehot) pulled back, everything in float64."""
    with jax.enable_x64(True):
        v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        logits, vjp = jax.vjp(lambda a: model.apply(v64, a), jnp.asarray(x, jnp.float64))
        cot = jax.nn.softmax(logits, axis=-1) - jax.nn.one_hot(jnp.asarray(y), logits.shape[-1], dtype=jnp.float64)
        return np.sign(np.asarray(vjp(cot)[0])).astype(np.float32)


def exact_float64_model_direction(model, variables, x, y):
    """sign of the library's log-space cotangent pulled back through the model in float64."""
    with jax.enable_x64(True):
        v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        logits, vjp = jax.vjp(lambda a: model.apply(v64, a), jnp.asarray(x, jnp.float64))
        cot = _ce_cotangent_exact(logits, jnp.asarray(y)).astype(jnp.float64)
        return np.sign(np.asarray(vjp(cot)[0])).astype(np.float32)


def reference_direction(model, variables, x, y):
    """sign ∇ softplus(lse_{j≠y} z_j − z_y), everything in float64."""
    with jax.enable_x64(True):
        v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        onehot = jax.nn.one_hot(jnp.asarray(y), 10, dtype=bool)

        def loss(a):
            z = model.apply(v64, a)
            z_true = jnp.sum(jnp.where(onehot, z, 0.0), axis=1)
            return jnp.sum(jax.nn.softplus(jax.nn.logsumexp(jnp.where(onehot, -jnp.inf, z), axis=1) - z_true))

        g = np.asarray(jax.grad(loss)(jnp.asarray(x, jnp.float64)))  # float64: its values can be far below float32's
        return np.sign(g).astype(np.float32)


def batched(fn, x, y):
    return np.concatenate([fn(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(x), BATCH)])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="LeNet .caffemodel.h5 (default: the released B1 under $BANG_DATA_DIR)")
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--json", help="also write the JSON report to this file (for experiments.docs_tables collect)")
    args = p.parse_args()
    if args.limit < 1:
        raise SystemExit(f"--limit must be at least 1, got {args.limit}")
    data_dir = args.data_dir or os.environ.get("BANG_DATA_DIR")
    weights = args.weights or (Path(data_dir) / "bang_caffe" / "lenet_bang.caffemodel.h5" if data_dir else None)
    if weights is None or not Path(weights).is_file():
        raise SystemExit("need LeNet weights: --weights PATH or BANG_DATA_DIR with bang_caffe/lenet_bang.caffemodel.h5")
    ds = load_mnist(data_dir, source="files")
    model, variables = load_caffe_weights(weights, dataset="mnist")
    logits_fn = jax.jit(lambda a: model.apply(variables, a))
    x = ds.test_images[: args.limit].astype(np.float32)
    y = ds.test_labels[: args.limit].astype(np.int32)
    z = np.asarray(logits_fn(x), np.float64)
    ok = z.argmax(axis=1) == y
    x, y, z = x[ok], y[ok], z[ok]
    others = np.where(np.eye(10, dtype=bool)[y], -np.inf, z)
    margin = z[np.arange(len(y)), y] - others.max(axis=1)
    print(f"{Path(weights).name}: {len(x)} of the first {args.limit} MNIST test images correctly classified; "
          f"median logit margin {np.median(margin):.1f}")

    def library(exact):
        return lambda a, b: np.asarray(fgs_direction(logits_fn, a, b, exact=exact)[0])

    directions = {
        "paper": batched(library(False), x, y),
        "float64_softmax": batched(lambda a, b: float64_softmax_direction(model, variables, a, b), x, y),
        "float64": batched(lambda a, b: float64_direction(model, variables, a, b), x, y),
        "exact": batched(library(True), x, y),
        "exact_float64_model": batched(lambda a, b: exact_float64_model_direction(model, variables, a, b), x, y),
        "float64_reference": batched(lambda a, b: reference_direction(model, variables, a, b), x, y),
    }
    ref = directions["float64_reference"]
    ways = {}
    for name, d in directions.items():
        blank = np.all(d.reshape(len(d), -1) == 0, axis=1)
        res = line_search_attack(logits_fn, x, y, d, blank=blank, max_step=255)
        ways[name] = {
            "blank": int(blank.sum()),
            "sign_agreement": round(float(100 * np.mean(d == ref)), 2),
            "pixels_differing": int(np.sum(d != ref)),
            "images_differing": int(np.sum(np.any((d != ref).reshape(len(d), -1), axis=1))),
            "sign_agreement_nonblank": (round(float(100 * np.mean(d[~blank] == ref[~blank])), 2)
                                        if (~blank).any() else None),
            "rate": round(float(res.rate), 2),
            "linf_mean": round(float(res.linf[res.success].mean()), 2) if res.success.any() else None,
        }
        print(f"  {name:18s} blank {ways[name]['blank']:5d}  same sign as reference on "
              f"{ways[name]['sign_agreement']:.1f}% of pixels  FGS {ways[name]['rate']:.2f}% "
              f"(mean L∞ {ways[name]['linf_mean']})")
    report = {
        "weights": Path(weights).name,
        "dataset": "mnist",
        "data_source": ds.source,
        "images": args.limit,
        "pixels": int(ref.size),
        "attacked": int(len(x)),
        "margin_median": round(float(np.median(margin)), 2),
        "margin_share_above_90": round(float(100 * np.mean(margin > 90)), 2),
        "ways": ways,
    }
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
