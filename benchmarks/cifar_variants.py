"""Does a plausible difference in the authors' CIFAR-10 pipeline explain a gap to the paper? Six variants, side by side.

    python benchmarks/cifar_variants.py [--weights PATH] [--limit 1000] [--json OUT]

On one of the authors' CIFAR-10-quick models (default: the regular R0,
``$BANG_DATA_DIR/bang_caffe/cifar10.caffemodel.h5``) it measures, for each variant, the accuracy on the whole test
set and — on the first ``--limit`` test images (0: accuracy only) — the paper's FGS (float32 blank rule, t ≤ 255)
and HC1 (t ≤ 1020): success rate over the images the variant classifies correctly (each variant its own set; the
report counts them) and mean L∞ of the successful ones. The data must be the real CIFAR-10 files (``--data-dir`` or
``$BANG_DATA_DIR``); the report records their source.

* ``caffe``: the evaluation as the library does it (docs/semantics.md): RGB input minus the per-pixel training
  mean image, average pooling that divides border windows by their in-image size, dropout off;
* ``dropout_gradients``: the attack directions (FGS and HC1) taken with dropout active (the same mask draw, key 0,
  for every batch); predictions without dropout;
* ``bgr_input``: the model sees the image's channels in B, G, R order (mean image unchanged);
* ``bgr_mean``: the mean image's channels in B, G, R order;
* ``channel_mean``: the per-channel mean of the training set instead of the per-pixel mean image;
* ``avg_pool_full_window``: average pooling that divides every window, border ones too, by 9.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
from unittest import mock

import jax
import numpy as np
from jax import lax

from bang_jax import models
from bang_jax.attacks import fgs_direction, hot_cold_direction, line_search_attack
from bang_jax.caffe import load_caffe_weights
from bang_jax.data import load_cifar10, mean_image
from bang_jax.models import set_mean_image

BATCH = 250
VARIANTS = ("caffe", "dropout_gradients", "bgr_input", "bgr_mean", "channel_mean", "avg_pool_full_window")


def full_window_avg_pool(x, window, stride):
    """AVE pooling with ceil-mode size that divides every window by window², border windows included."""
    pad = models._pool_padding(x, window, stride)
    total = lax.reduce_window(x, 0.0, lax.add, (1, window, window, 1), (1, stride, stride, 1), pad)
    return total / (window * window)


def variant_fns(name, model, variables, mean):
    """(predict_fn, direction_fn) of a variant: jitted functions of images in RGB pixels."""
    v = variables
    if name == "bgr_mean":
        v = set_mean_image(variables, mean[..., ::-1])
    elif name == "channel_mean":
        v = set_mean_image(variables, np.broadcast_to(mean.mean(axis=(0, 1)), mean.shape))
    if name == "bgr_input":
        def predict(a):
            return model.apply(v, a[..., ::-1])
    else:
        def predict(a):
            return model.apply(v, a)
    predict = jax.jit(predict)
    if name == "dropout_gradients":
        key = jax.random.key(0)
        return predict, jax.jit(lambda a: model.apply(v, a, train=True, rngs={"dropout": key}))
    return predict, predict


def batched(fn, x, y):
    """The outputs of ``fn(images, labels)`` (a tuple of arrays) over batches of BATCH, concatenated."""
    parts = [[np.asarray(a) for a in fn(x[i:i + BATCH], y[i:i + BATCH])] for i in range(0, len(x), BATCH)]
    return tuple(np.concatenate(p) for p in zip(*parts))


def measure(name, model, variables, mean, x_all, y_all, limit):
    predict, direction_fn = variant_fns(name, model, variables, mean)
    (logits,) = batched(lambda a, _: (predict(a),), x_all, y_all)
    pred = logits.argmax(axis=1)
    row = {"accuracy": round(float(100 * np.mean(pred == y_all)), 2)}
    if not limit:
        return row
    x, y = x_all[:limit], y_all[:limit]
    ok = pred[:limit] == y
    x, y = x[ok], y[ok]
    row["attacked"] = int(len(x))
    directions = {"fgs": (batched(lambda a, b: fgs_direction(direction_fn, a, b), x, y), 255),
                  "hc1": (batched(lambda a, b: hot_cold_direction(direction_fn, a, b), x, y), 1020)}
    for attack, ((d, blank), cap) in directions.items():  # the searches predict with the variant's model
        res = line_search_attack(predict, x, y, d, blank=blank, max_step=cap)
        row[f"{attack}_rate"] = round(res.rate, 2)
        row[f"{attack}_linf_mean"] = round(float(res.linf[res.success].mean()), 2) if res.success.any() else None
        row[f"{attack}_blank"] = int(blank.sum())
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="CIFAR-quick .caffemodel.h5 (default: the released R0 under $BANG_DATA_DIR)")
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=int, default=1000, help="images attacked (0: accuracy only)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--json", help="also write the JSON report to this file (for experiments.docs_tables collect)")
    args = p.parse_args()
    variants = [s.strip() for s in args.variants.split(",") if s.strip()]
    unknown = [s for s in variants if s not in VARIANTS]
    if unknown or not variants:
        raise SystemExit(f"--variants: unknown {unknown or 'empty'}; choose from {', '.join(VARIANTS)}")
    if args.limit < 0:
        raise SystemExit(f"--limit must be 0 or more, got {args.limit}")
    data_dir = args.data_dir or os.environ.get("BANG_DATA_DIR")
    weights = args.weights or (Path(data_dir) / "bang_caffe" / "cifar10.caffemodel.h5" if data_dir else None)
    if weights is None or not Path(weights).is_file():
        raise SystemExit("need CIFAR-quick weights: --weights PATH or BANG_DATA_DIR (bang_caffe/cifar10.caffemodel.h5)")
    ds = load_cifar10(data_dir, source="files")
    mean = mean_image(ds.train_images)
    model, variables = load_caffe_weights(weights, mean_image=mean, dataset="cifar10")
    x_all = ds.test_images.astype(np.float32)
    y_all = ds.test_labels.astype(np.int32)
    report = {"weights": Path(weights).name, "dataset": "cifar10", "data_source": ds.source,
              "test_images": int(len(x_all)),
              "images": min(args.limit, len(x_all)), "variants": {}}
    for name in variants:
        # full_window_avg_pool replaces the model's pooling while this variant's functions are traced
        patch = (mock.patch.object(models, "caffe_avg_pool", full_window_avg_pool) if name == "avg_pool_full_window"
                 else contextlib.nullcontext())
        with patch:
            row = measure(name, model, variables, mean, x_all, y_all, args.limit)
        report["variants"][name] = row
        print(f"  {name:22s} " + "  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
