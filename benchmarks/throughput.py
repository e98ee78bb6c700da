"""Training throughput (images/s) of plain, single-pass BANG and per-example BANG, measured side by side.

    python benchmarks/throughput.py                         # LeNet and CIFAR-quick, batches 64/256/1024, grid
    python benchmarks/throughput.py --quick                 # batch 64 only, grid of 16 models (a smoke check)
    python benchmarks/throughput.py --host-devices 4        # split the CPU into 4 XLA devices (exercises the mesh)

It times the jitted training step of ``bang_jax.train`` (``make_train_step``: batch gather, gradient, Caffe SGD
update, metrics) for one model, on one device and on all local devices (the batch split over the mesh's ``data``
axis), after a warm-up call (compilation excluded), with ``block_until_ready``. Methods are interleaved round by
round so that machine load hits all alike; the median of the rounds is reported. Then the 169-model grid of
Fig. 2 (LeNet, batch 64): all models vmapped in one program, against the same models trained one after another
(one model's step, timed on its own, × 169: they are identical programs). The last line is one JSON object with
every number (``--json PATH`` writes it to a file too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="lenet,cifar_quick")
    p.add_argument("--batches", default="64,256,1024")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds (median reported)")
    p.add_argument("--steps", type=int, default=5, help="steps per round")
    p.add_argument("--grid", type=int, default=169, help="models in the vmapped grid (0: skip)")
    p.add_argument("--quick", action="store_true", help="batch 64, 3 rounds, a 16-model grid")
    p.add_argument("--host-devices", type=int, default=0, help="on CPU, split the host into N XLA devices")
    p.add_argument("--json", help="also write the JSON report to this file (for python -m experiments.docs_tables "
                   "collect --benchmark)")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.rounds, args.grid = "64", 3, 16
    if args.host_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.host_devices}")
    import jax  # noqa: PLC0415  (after XLA_FLAGS)
    import numpy as np  # noqa: PLC0415

    from bang_jax import BangConfig  # noqa: PLC0415
    from bang_jax.distributed import make_mesh, put_batch, put_models, put_replicated  # noqa: PLC0415
    from bang_jax.models import CifarQuick, LeNet  # noqa: PLC0415
    from bang_jax.solvers import CIFAR_QUICK_SOLVER, LENET_SOLVER  # noqa: PLC0415
    from bang_jax.train import ModelSpec, TrainConfig, init_states, make_train_step  # noqa: PLC0415

    setups = {
        "lenet": (LeNet(), (28, 28, 1), LENET_SOLVER, BangConfig(epsilon=0.815)),
        "cifar_quick": (CifarQuick(), (32, 32, 3), CIFAR_QUICK_SOLVER, BangConfig(epsilon=0.855, beta=0.4, ratio=0.5)),
    }
    rng = np.random.default_rng(0)
    local = jax.local_device_count()
    print(f"backend {jax.default_backend()}, {local} local device(s): {jax.devices()[0].device_kind}", flush=True)
    report = {"backend": jax.default_backend(), "devices": local, "jax": jax.__version__, "throughput": {}}

    def prepare(model, shape, solver, bang, method, batch, n_models=1, device_mesh="one", batching="loop"):
        images = rng.integers(0, 256, (max(2 * batch, 1024),) + shape).astype(np.uint8)
        labels = rng.integers(0, 10, len(images)).astype(np.int32)
        specs = [ModelSpec(name=f"m{i}", seed=i, bang=bang if method != "plain" else BangConfig())
                 for i in range(n_models)]
        cfg = TrainConfig(solver=solver, steps=10, batch_size=batch, method=method, model_batching=batching)
        mesh = None if device_mesh == "one" else make_mesh(n_models, batch, shard_models=batching == "vmap")
        states, consts = init_states(model, images, specs, cfg)
        step = make_train_step(model, cfg, 1, mesh)
        state = {"s": put_models(states, mesh)}
        consts, images_d, labels_d = (put_replicated(x, mesh) for x in (consts, images, labels))
        idx = put_batch(np.arange(batch, dtype=np.int32)[None], mesh)

        def run(k):
            for _ in range(k):
                state["s"], _ = step(state["s"], consts, images_d, labels_d, idx)
            jax.block_until_ready(state["s"])

        run(1)  # compile
        return run

    def timed(runs: dict, rounds: int, steps: int) -> dict:
        times = {k: [] for k in runs}
        for _ in range(rounds):
            for k, run in runs.items():
                t0 = time.perf_counter()
                run(steps)
                times[k].append((time.perf_counter() - t0) / steps)
        return {k: float(np.median(v)) for k, v in times.items()}

    mesh_kinds = ["one"] + (["all"] if local > 1 else [])
    for name in args.models.split(","):
        model, shape, solver, bang = setups[name]
        for batch in (int(b) for b in args.batches.split(",")):
            for kind in mesh_kinds:
                runs = {m: prepare(model, shape, solver, bang, m, batch, device_mesh=kind)
                        for m in ("plain", "single_pass", "per_example")}
                med = timed(runs, args.rounds, args.steps)
                row = {m: {"step_ms": 1000 * t, "images_per_s": batch / t} for m, t in med.items()}
                for m in ("single_pass", "per_example"):
                    row[m]["ratio_to_plain"] = med[m] / med["plain"]
                report["throughput"][f"{name}/b{batch}/{kind}"] = row
                print(f"{name:11s} batch {batch:4d} {kind:3s} device(s): " + "  ".join(
                    f"{m} {row[m]['images_per_s']:8.0f} img/s ({row[m]['step_ms']:7.1f} ms"
                    + (f", {row[m]['ratio_to_plain']:.2f}× plain)" if m != "plain" else ")") for m in row), flush=True)
                del runs

    if args.grid:
        model, shape, solver, bang = setups["lenet"]
        # One model's step is timed on its own, before the grid exists: timed between grid steps (interleaved),
        # it read 6x slower on a 2-core CPU (105 ms against 17 ms), which made the vmapped grid look faster than it is.
        one = prepare(model, shape, solver, bang, "single_pass", 64)
        med = timed({"one": one}, args.rounds, args.steps)
        del one
        grid = prepare(model, shape, solver, bang, "single_pass", 64, n_models=args.grid,
                       device_mesh="all" if local > 1 else "one", batching="vmap")
        med.update(timed({"grid": grid}, max(2, args.rounds // 2), max(1, args.steps // 2)))
        seq = med["one"] * args.grid
        report["grid"] = {"models": args.grid, "vmapped_step_s": med["grid"], "sequential_step_s": seq,
                          "speedup": seq / med["grid"], "one_model_step_ms": 1000 * med["one"]}
        print(f"grid of {args.grid} LeNets (batch 64, single-pass BANG): vmapped {med['grid']:.2f} s per step, one "
              f"after another {seq:.2f} s ({1000 * med['one']:.1f} ms × {args.grid}); vmapped is "
              f"{seq / med['grid']:.2f}× the speed of one after another", flush=True)
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    sys.exit(main() is None)
