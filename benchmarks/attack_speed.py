"""Attack speed: our FGS + HC1 minimal-step searches and PASS against Foolbox 3, side by side in one run.

    python benchmarks/attack_speed.py [--weights PATH] [--limit 10000] [--foolbox-limit 300]

On the authors' LeNet R0 weights (``$BANG_DATA_DIR/bang_caffe/lenet.caffemodel.h5``) and the MNIST test set it
times (after a warm-up that compiles everything): the FGS line search (t ≤ 255), the HC1 line search
(t ≤ 1020), and PASS of all successful FGS and HC1 examples. Then it runs the same FGS minimal-step search with
Foolbox 3 (``FGSM`` over ε = 1..255 on the same JAX model; Foolbox has no minimal-step mode, so every ε is
evaluated) on the first ``--foolbox-limit`` images, times ours on exactly those images, checks that both find
the same minimal step (exact-gradient FGS; Foolbox also differentiates the float32 loss), and prints the ratio.
Targets: FGS + HC1 on 10,000 images under 60 s on this CPU; at least 10× faster than Foolbox.

``--pgd N`` also times L∞ PGD on the logit margin (40 steps, budget 32 pixels) on the first N attacked images: the
jitted steps (``bang_jax.attacks.PGD_CPU_CHUNK`` per dispatch on the CPU, one rolled ``lax.fori_loop`` on
GPU/TPU) with per-image JAX keys for the random start.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bang_jax.attacks import fgs_direction, hot_cold_direction, line_search_attack, pgd_attack
from bang_jax.caffe import load_caffe_weights
from bang_jax.data import load_mnist
from bang_jax.metrics import pass_scores


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def ours_fgs(logits_fn, x, y, exact):
    d, blank = fgs_direction(logits_fn, x, y, exact=exact)
    return line_search_attack(logits_fn, x, y, d, blank=blank, max_step=255)


def ours_hc1(logits_fn, x, y):
    d, blank = hot_cold_direction(logits_fn, x, y)
    return line_search_attack(logits_fn, x, y, d, blank=blank, max_step=1020)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="LeNet .caffemodel.h5 (default: $BANG_DATA_DIR/bang_caffe/lenet.caffemodel.h5)")
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=int, default=10_000)
    p.add_argument("--foolbox-limit", type=int, default=300)
    p.add_argument("--pgd", type=int, default=0, metavar="N", help="also time PGD-margin on N images")
    p.add_argument("--json", help="also write the JSON summary to this file (for experiments.docs_tables collect)")
    args = p.parse_args()
    data_dir = args.data_dir or os.environ.get("BANG_DATA_DIR")
    weights = args.weights or (Path(data_dir) / "bang_caffe" / "lenet.caffemodel.h5" if data_dir else None)
    if weights is None or not Path(weights).is_file():
        raise SystemExit("need the LeNet weights: --weights PATH or BANG_DATA_DIR with bang_caffe/lenet.caffemodel.h5")
    ds = load_mnist(data_dir)
    model, variables = load_caffe_weights(weights)
    logits_fn = jax.jit(lambda x: model.apply(variables, x))
    x = ds.test_images[: args.limit].astype(np.float32)
    y = ds.test_labels[: args.limit]
    ok = np.argmax(np.asarray(logits_fn(x)), axis=1) == y
    x, y = x[ok], y[ok]
    print(f"device {jax.devices()[0].device_kind}; {len(x)} correctly classified test images attacked")

    ours_fgs(logits_fn, x[:64], y[:64], exact=False)  # warm-up: compile every padded batch shape used below
    ours_hc1(logits_fn, x[:64], y[:64])
    fgs, t_fgs = timed(ours_fgs, logits_fn, x, y, False)
    hc1, t_hc1 = timed(ours_hc1, logits_fn, x, y)
    (_, _), t_pass_fgs = timed(pass_scores, fgs.adversarial[fgs.success], x[fgs.success])
    (_, _), t_pass_hc1 = timed(pass_scores, hc1.adversarial[hc1.success], x[hc1.success])
    print(f"ours: FGS search {t_fgs:.1f} s ({fgs.rate:.2f}%), HC1 search {t_hc1:.1f} s ({hc1.rate:.2f}%), "
          f"PASS {t_pass_fgs + t_pass_hc1:.1f} s ({fgs.success.sum() + hc1.success.sum()} pairs)")
    print(
        f"ours: FGS + HC1 = {t_fgs + t_hc1:.1f} s; FGS + HC1 + PASS = {t_fgs + t_hc1 + t_pass_fgs + t_pass_hc1:.1f} s"
    )
    pgd_summary = {}
    if args.pgd:
        xp, yp = x[: args.pgd], y[: args.pgd]
        pgd_attack(logits_fn, xp[:8], yp[:8], epsilon=32.0, steps=40)  # warm-up: compile
        res, t_pgd = timed(pgd_attack, logits_fn, xp, yp, epsilon=32.0, steps=40)
        print(f"ours: PGD-margin (40 steps, budget 32) on {len(xp)} images {t_pgd:.1f} s ({res.rate:.2f}% fooled)")
        pgd_summary = {"pgd_images": int(len(xp)), "pgd_seconds": round(t_pgd, 2), "pgd_rate": round(res.rate, 2)}

    import foolbox as fb  # noqa: PLC0415

    n = min(args.foolbox_limit, len(x))
    xs, ys = x[:n], y[:n]
    fmodel = fb.JAXModel(lambda v: model.apply(variables, v), bounds=(0, 255))
    epsilons = [float(e) for e in range(1, 256)]
    attack = fb.attacks.FGSM()
    attack(fmodel, jnp.asarray(xs[:8]), jnp.asarray(ys[:8]), epsilons=epsilons[:2])  # warm-up
    (_, _, success), t_fb = timed(attack, fmodel, jnp.asarray(xs), jnp.asarray(ys), epsilons=epsilons)
    s = np.asarray(success)
    fb_step = np.where(s.any(axis=0), s.argmax(axis=0) + 1, 0)
    exact, t_ours_small = timed(ours_fgs, logits_fn, xs, ys, True)
    agree = float(np.mean(fb_step == exact.step))
    ratio = t_fb / t_ours_small
    print(
        f"Foolbox FGSM over ε = 1..255 on {n} images: {t_fb:.1f} s; ours (exact FGS search) on the same images: "
        f"{t_ours_small:.2f} s → {ratio:.1f}× faster; same minimal step on {100 * agree:.1f}% of images"
    )
    summary = (
            {
                "images": int(len(x)),
                "fgs_seconds": round(t_fgs, 2),
                "hc1_seconds": round(t_hc1, 2),
                "pass_seconds": round(t_pass_fgs + t_pass_hc1, 2),
                "fgs_plus_hc1_seconds": round(t_fgs + t_hc1, 2),
                "foolbox_images": n,
                "foolbox_fgs_seconds": round(t_fb, 2),
                "ours_fgs_seconds_same_images": round(t_ours_small, 3),
                "foolbox_over_ours": round(ratio, 1),
                "same_minimal_step_share": round(agree, 4),
            }
            | pgd_summary
    )
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
