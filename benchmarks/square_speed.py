"""Square attack speed on the released weights: images per second at a query budget, and the loop layout.

    python benchmarks/square_speed.py [--dataset mnist|cifar10] [--limit 500] [--queries 1000] [--eps 4,32]

Attacks the correctly classified images among the first ``--limit`` test images of the authors' R0 model
(``$BANG_DATA_DIR/bang_caffe/lenet.caffemodel.h5`` or ``cifar10.caffemodel.h5``) at each budget of ``--eps``
(pixels) with ``--queries`` queries, after a warm-up that compiles every shape, once for each loop layout:
one jitted ``lax.while_loop`` over the whole budget (``chunk_queries=None``) and Python loops over jitted
chunks of 100 and 25 queries that drop the images already fooled. A small budget (ε = 4) fools almost no
image, so every image spends the whole budget: that is the per-query throughput; a large one shows what
stopping per image saves. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from bang_jax.attacks import square_attack
from bang_jax.caffe import load_caffe_weights
from bang_jax.data import load_dataset, mean_image


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=["mnist", "cifar10"])
    p.add_argument("--weights", help="default: $BANG_DATA_DIR/bang_caffe/{lenet,cifar10}.caffemodel.h5")
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--eps", default="4,32")
    p.add_argument("--chunks", default="none,100,25", help="chunk_queries values to compare ('none': one loop)")
    p.add_argument("--json", help="also write the runs as a JSON list to this file (for experiments.docs_tables)")
    args = p.parse_args()
    data_dir = args.data_dir or os.environ.get("BANG_DATA_DIR")
    name = "lenet" if args.dataset == "mnist" else "cifar10"
    weights = args.weights or (Path(data_dir) / "bang_caffe" / f"{name}.caffemodel.h5" if data_dir else None)
    if weights is None or not Path(weights).is_file():
        raise SystemExit("need the weights: --weights PATH or BANG_DATA_DIR with bang_caffe/")
    ds = load_dataset(args.dataset, data_dir)
    mean = mean_image(ds.train_images) if args.dataset == "cifar10" else None
    model, variables = load_caffe_weights(weights, mean_image=mean)
    logits_fn = jax.jit(lambda x: model.apply(variables, x))
    x = ds.test_images[: args.limit].astype(np.float32)
    y = ds.test_labels[: args.limit].astype(np.int32)
    ok = np.argmax(np.asarray(logits_fn(x)), axis=1) == y
    x, y = x[ok], y[ok]
    print(f"device {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; {len(x)} attacked {args.dataset} images")
    chunks = [None if c == "none" else int(c) for c in args.chunks.split(",")]
    runs = []
    for eps in (float(e) for e in args.eps.split(",")):
        for chunk in chunks:
            square_attack(logits_fn, x, y, epsilon=eps, queries=args.queries, chunk_queries=chunk)  # warm-up
            t0 = time.perf_counter()
            res = square_attack(logits_fn, x, y, epsilon=eps, queries=args.queries, chunk_queries=chunk)
            seconds = time.perf_counter() - t0
            runs.append({
                "dataset": args.dataset, "epsilon": eps, "queries": args.queries, "chunk_queries": chunk,
                "images": len(x), "seconds": round(seconds, 2), "images_per_second": round(len(x) / seconds, 1),
                "forward_passes_per_second": round(float(res.queries.sum()) / seconds, 0),
                "success_rate": round(res.rate, 2), "mean_queries": round(float(res.queries.mean()), 1),
            })
            print(json.dumps(runs[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
