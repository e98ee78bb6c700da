"""Robustness evaluation of a model on the paper's attacks, from the command line.

    python -m bang_jax.evaluate --caffe-weights ../shared/data/bang_caffe/lenet_bang.caffemodel.h5 \\
        --dataset mnist [--attacks fgs,hc1] [--limit N] [--json OUT] [--data-dir DIR]

Attacks the correctly classified test images (the first ``--limit`` of the test set) with FGS in the paper's
protocol (blank when float32 p_true == 1), FGS with the exact gradient, and HC1, each with the minimal-step line
search of SPEC §4 (FGS up to t = 255, HC1 up to ``--hc1-max-step``, default 1020), and prints a Table-1 style row.
``--attacks fgs,hc1,pgd`` adds L∞ PGD (margin and cross-entropy losses) at the budgets of ``--pgd-eps``.
Rates are percent of attacked images, L∞ in pixels, PASS over successes, blanks as counts.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bang_jax.attacks import fgs_direction, hot_cold_direction, line_search_attack, pgd_attack
from bang_jax.caffe import load_caffe_weights
from bang_jax.data import load_dataset, mean_image
from bang_jax.metrics import pass_scores

__all__ = ["evaluate_accuracy", "evaluate_model", "main", "predict"]


def predict(model: nn.Module, variables: dict, images, *, batch_size: int = 1000) -> np.ndarray:
    """Test-mode logits ``[N, classes]`` of ``images`` (pixels 0..255), in batches."""
    fn = _predict_fn(model)
    outs = []
    for i in range(0, len(images), batch_size):
        outs.append(np.asarray(fn(variables, jnp.asarray(images[i : i + batch_size], jnp.float32))))
    return np.concatenate(outs)


@functools.lru_cache(maxsize=16)
def _predict_fn(model):
    """A jitted test-mode forward per model definition (cached: evaluating many checkpoints compiles once)."""
    return jax.jit(lambda v, x: model.apply(v, x, train=False))


def evaluate_accuracy(model: nn.Module, variables: dict, images, labels, *, batch_size: int = 1000) -> float:
    """Test accuracy in percent."""
    logits = predict(model, variables, images, batch_size=batch_size)
    return float(100.0 * np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))


def _summary(prefix, result, x, with_pass=True):
    s = result.success
    out = {
        f"{prefix}_rate": result.rate,
        f"{prefix}_linf_mean": float(result.linf[s].mean()) if s.any() else None,
        f"{prefix}_linf_std": float(result.linf[s].std()) if s.any() else None,
        f"{prefix}_l2_mean": float(result.l2[s].mean()) if s.any() else None,
        f"{prefix}_blank": int(result.blank.sum()),
        f"{prefix}_still_changing_at_cap": int(result.still_changing.sum()),
        f"{prefix}_max_step": result.max_step,
    }
    if with_pass:
        scores, ecc_failures = pass_scores(result.adversarial[s], x[s]) if s.any() else (np.zeros(0), 0)
        out[f"{prefix}_pass_mean"] = float(scores.mean()) if s.any() else None
        out[f"{prefix}_pass_std"] = float(scores.std()) if s.any() else None
        out[f"{prefix}_ecc_not_converged"] = int(ecc_failures)
    return out


def evaluate_model(model, variables, images, labels, *, attacks=("fgs", "hc1"), hc1_max_step=1020,
                   pgd_epsilons=(16.0, 32.0, 64.0), pgd_steps=40, progress=True):
    """Accuracy and attack statistics (a dict) of ``model`` on ``images`` (pixels) with integer ``labels``.

    ``attacks``: ``"fgs"`` (paper protocol and exact gradient), ``"hc1"``, and ``"pgd"`` (L∞ PGD on the logit
    margin and on the cross-entropy at each budget in ``pgd_epsilons``, giving ``pgd_margin_rate_eps16`` …).
    """
    logits_fn = jax.jit(lambda x: model.apply(variables, x))
    pred = np.argmax(predict(model, variables, images), axis=1)
    correct = pred == np.asarray(labels)
    x = np.asarray(images, np.float32)[correct]
    y = np.asarray(labels, np.int32)[correct]
    row = {"accuracy": float(100 * correct.mean()), "test_images": int(len(labels)), "attacked": int(correct.sum())}
    for attack in attacks:
        t0 = time.perf_counter()
        if attack == "fgs":
            d, blank = fgs_direction(logits_fn, x, y)
            row |= _summary("fgs", line_search_attack(logits_fn, x, y, d, blank=blank, max_step=255, progress=progress), x)
            d, blank = fgs_direction(logits_fn, x, y, exact=True)
            row |= _summary(
                "fgs_exact", line_search_attack(logits_fn, x, y, d, blank=blank, max_step=255, progress=progress), x
            )
        elif attack == "pgd":
            for eps in pgd_epsilons:
                for loss in ("margin", "ce"):
                    res = pgd_attack(logits_fn, x, y, epsilon=float(eps), steps=pgd_steps, loss=loss)
                    row[f"pgd_{loss}_rate_eps{eps:g}"] = res.rate
        elif attack == "hc1":
            d, blank = hot_cold_direction(logits_fn, x, y)
            res = line_search_attack(logits_fn, x, y, d, blank=blank, max_step=hc1_max_step, progress=progress)
            row |= _summary("hc1", res, x)
        else:
            raise ValueError(f"unknown attack {attack!r} (fgs, hc1, pgd)")
        row[f"{attack}_seconds"] = time.perf_counter() - t0
    return row


def _fmt(v, pct=False):
    if v is None:
        return "-"
    return f"{v:.2f}%" if pct else f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--caffe-weights", required=True, help="a .caffemodel.h5 file (LeNet or CIFAR-10 quick)")
    p.add_argument("--dataset", required=True, choices=["mnist", "cifar10"])
    p.add_argument("--attacks", default="fgs,hc1", help="comma-separated: fgs, hc1, pgd (default: %(default)s)")
    p.add_argument("--pgd-eps", default="16,32,64", help="L∞ budgets (pixels) of the pgd attack")
    p.add_argument("--limit", type=int, help="use the first N test images")
    p.add_argument("--hc1-max-step", type=int, default=1020)
    p.add_argument("--data-dir", help="dataset directory (default: $BANG_DATA_DIR)")
    p.add_argument("--json", help="write the results as one JSON object to this file")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    ds = load_dataset(args.dataset, args.data_dir)
    mean = mean_image(ds.train_images) if args.dataset == "cifar10" else None
    model, variables = load_caffe_weights(args.caffe_weights, mean_image=mean)
    n = len(ds.test_images) if args.limit is None else min(args.limit, len(ds.test_images))
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    row = evaluate_model(
        model, variables, ds.test_images[:n], ds.test_labels[:n], attacks=attacks,
        hc1_max_step=args.hc1_max_step, progress=not args.no_progress,
        pgd_epsilons=tuple(float(e) for e in args.pgd_eps.split(",") if e),
    )
    row = {"weights": str(args.caffe_weights), "dataset": args.dataset, "data_source": ds.source} | row
    print(f"\n{args.caffe_weights} on {n} {args.dataset} test images ({row['attacked']} attacked)")
    print("accuracy | FGS rate  PASS    L∞ (blank) | FGS-exact rate  L∞ (blank) | HC1 rate  PASS    L∞")
    print(
        f"{_fmt(row['accuracy'], True)} | "
        f"{_fmt(row.get('fgs_rate'), True)} {_fmt(row.get('fgs_pass_mean'))} {_fmt(row.get('fgs_linf_mean'))}"
        f"±{_fmt(row.get('fgs_linf_std'))} ({row.get('fgs_blank', '-')}) | "
        f"{_fmt(row.get('fgs_exact_rate'), True)} {_fmt(row.get('fgs_exact_linf_mean'))} ({row.get('fgs_exact_blank', '-')}) | "
        f"{_fmt(row.get('hc1_rate'), True)} {_fmt(row.get('hc1_pass_mean'))} {_fmt(row.get('hc1_linf_mean'))}"
        f"±{_fmt(row.get('hc1_linf_std'))}"
    )
    pgd = {k: v for k, v in row.items() if k.startswith("pgd_") and "_rate_" in k}
    if pgd:
        print("PGD (40 steps) success: " + ", ".join(f"{k[4:]} {v:.2f}%" for k, v in pgd.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return row


if __name__ == "__main__":
    main()
