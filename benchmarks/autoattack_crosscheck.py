"""AutoAttack: ours (JAX) against the reference implementation (torchattacks 3.5.1, PyTorch), same weights, same
images, side by side: clean logits, robust accuracy of each attack alone and of the standard ensemble, and the
time each takes. Needs the crosscheck extra (pip install -e ".[crosscheck]") and the authors' weights.

    python benchmarks/autoattack_crosscheck.py --weights $BANG_DATA_DIR/bang_caffe/lenet_bang.caffemodel.h5 \\
        --dataset mnist --limit 200 --eps 32 --json out.json

Budgets are in pixels (0..255); torchattacks gets the same budget / 255 on images / 255. The reference ensemble is
torchattacks' four attacks at the protocol's settings (100 iterations); ``torchattacks-autoattack`` compares with
``torchattacks.AutoAttack`` as shipped, whose APGD, APGD-T and FAB-T run 10 steps (their default), not 100. The
last line is one JSON object with every number; for the ensembles it adds our time per attack and
``speedup_bound``: the reference's time over our Square's (Square's 5,000 forward passes on each image left
robust are paid by any implementation, so no speed-up of the gradient attacks can beat that ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True)
    p.add_argument("--dataset", choices=("mnist", "cifar10"), required=True)
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--eps", type=float, required=True, help="L∞ budget in pixels")
    p.add_argument("--attacks", default="apgd-ce,apgd-t,fab-t,square,autoattack")
    p.add_argument("--json")
    args = p.parse_args(argv)

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import torchattacks  # noqa: PLC0415

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from crosscheck_torch import TorchCifarQuick, TorchLeNet  # noqa: PLC0415

    import bang_jax.autoattack as aa  # noqa: PLC0415
    from bang_jax.attacks import square_attack  # noqa: PLC0415
    from bang_jax.caffe import load_caffe_weights  # noqa: PLC0415
    from bang_jax.data import load_dataset, mean_image  # noqa: PLC0415

    data = load_dataset(args.dataset, args.data_dir or os.environ.get("BANG_DATA_DIR"), knob="--data-dir")
    mean = mean_image(data.train_images) if args.dataset == "cifar10" else None
    model, variables = load_caffe_weights(args.weights, mean_image=mean, dataset=args.dataset)
    x = np.asarray(data.test_images[: args.limit], np.float32)
    y = np.asarray(data.test_labels[: args.limit], np.int64)
    logits_fn = jax.jit(lambda im: model.apply(variables, im))
    net = (TorchLeNet(variables["params"]) if args.dataset == "mnist" else TorchCifarQuick(variables)).eval()
    # contiguous NCHW: torchattacks' FAB .view()s input gradients, which follow the input's memory layout
    xt = torch.tensor(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))) / 255.0, dtype=torch.float32)
    yt = torch.tensor(y)
    with torch.no_grad():
        zt = net(xt).numpy()
    z = np.asarray(logits_fn(jnp.asarray(x)))
    report = {"dataset": args.dataset, "weights": Path(args.weights).name, "images": len(x), "eps": args.eps,
              "max_abs_logit_difference": float(np.abs(z - zt).max()), "same_predictions": bool(
                  np.array_equal(z.argmax(1), zt.argmax(1))), "clean_accuracy": float(100 * np.mean(z.argmax(1) == y)),
              "attacks": {}}
    print(f"clean logits: max |ours − torch| = {report['max_abs_logit_difference']:.2e}", flush=True)
    eps01 = args.eps / 255.0
    torch.manual_seed(0)
    theirs = {
        "apgd-ce": lambda: torchattacks.APGD(net, norm="Linf", eps=eps01, steps=100, n_restarts=1, loss="ce", seed=0),
        "apgd-t": lambda: torchattacks.APGDT(net, norm="Linf", eps=eps01, steps=100, n_restarts=1, n_classes=10,
                                             seed=0),
        "fab-t": lambda: torchattacks.FAB(net, norm="Linf", eps=eps01, steps=100, n_restarts=1, multi_targeted=True,
                                          n_classes=10, seed=0),
        "square": lambda: torchattacks.Square(net, norm="Linf", eps=eps01, n_queries=5000, n_restarts=1, p_init=0.8,
                                              seed=0),
        # The standard ensemble at the reference protocol's settings (Croce & Hein: 100 iterations for APGD, APGD-T
        # and FAB-T), built from torchattacks' attacks ...
        "autoattack": lambda: torchattacks.MultiAttack([
            torchattacks.APGD(net, norm="Linf", eps=eps01, steps=100, n_restarts=1, loss="ce", seed=0),
            torchattacks.APGDT(net, norm="Linf", eps=eps01, steps=100, n_restarts=1, n_classes=10, seed=0),
            torchattacks.FAB(net, norm="Linf", eps=eps01, steps=100, n_restarts=1, multi_targeted=True, n_classes=10,
                             seed=0),
            torchattacks.Square(net, norm="Linf", eps=eps01, n_queries=5000, n_restarts=1, p_init=0.8, seed=0)]),
        # ... and torchattacks.AutoAttack as shipped, whose APGD, APGD-T and FAB-T run their default 10 steps.
        "torchattacks-autoattack": lambda: torchattacks.AutoAttack(net, norm="Linf", eps=eps01, version="standard",
                                                                   n_classes=10, seed=0),
    }
    ours = {
        "apgd-ce": lambda: aa.apgd(logits_fn, x, y, epsilon=args.eps, loss="ce").success,
        "apgd-t": lambda: aa.apgd_targeted(logits_fn, x, y, epsilon=args.eps).success,
        "fab-t": lambda: aa.fab_targeted(logits_fn, x, y, epsilon=args.eps).success,
        "square": lambda: square_attack(logits_fn, x, y, epsilon=args.eps, queries=5000, p_init=0.8).success,
        "autoattack": lambda: ensemble(),
        "torchattacks-autoattack": lambda: ensemble(),
    }
    by_attack = {}

    def ensemble():
        res = aa.autoattack(logits_fn, x, y, args.eps, progress="ours")
        by_attack.clear()
        by_attack.update(seconds=res.seconds, fooled_by=res.fooled_by())
        return ~res.robust

    correct = z.argmax(1) == y
    for name in args.attacks.split(","):
        t0 = time.perf_counter()
        fooled = np.asarray(ours[name]()) | ~correct
        t_ours = time.perf_counter() - t0
        print(f"{name:10s} ours: robust {100 * np.mean(~fooled):.1f}% ({t_ours:.1f} s)", flush=True)
        t0 = time.perf_counter()
        attack = theirs[name]()
        attack.set_device(torch.device("cpu"))
        adv = attack(xt, yt).detach()
        with torch.no_grad():
            pred = net(adv).argmax(1).numpy()
        t_theirs = time.perf_counter() - t0
        linf = (adv - xt).abs().flatten(1).max(1)[0].numpy() * 255
        fooled_t = ((pred != y) & (linf <= args.eps + 1e-3)) | ~correct
        row = {"robust_ours": float(100 * np.mean(~fooled)), "robust_reference": float(100 * np.mean(~fooled_t)),
               "seconds_ours": t_ours, "seconds_reference": t_theirs}
        if name in ("autoattack", "torchattacks-autoattack"):
            # Square's 5,000 forward passes on every image left robust are a floor any implementation pays: the
            # reference's time over our Square's bounds the speed-up even if the gradient attacks cost nothing
            row["ours_by_attack"] = dict(by_attack)
            if "square" in by_attack["seconds"]:
                row["speedup_bound"] = t_theirs / by_attack["seconds"]["square"]
        report["attacks"][name] = row
        print(f"{name:10s} robust accuracy: ours {row['robust_ours']:.1f}%, torchattacks {row['robust_reference']:.1f}%"
              f"  ({t_ours:.1f} s vs {t_theirs:.1f} s: {t_theirs / max(t_ours, 1e-9):.1f}×)", flush=True)
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
