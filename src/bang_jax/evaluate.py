"""Robustness evaluation of a model on the paper's attacks, from the command line.

    python -m bang_jax.evaluate --caffe-weights $BANG_DATA_DIR/bang_caffe/lenet_bang.caffemodel.h5 \\
        --dataset mnist [--attacks fgs,hc1] [--limit N] [--json OUT] [--data-dir DIR]
    python -m bang_jax.evaluate ... --attacks fgs,pgd,square --curves --plot curves.png --json out.json
    python -m bang_jax.evaluate --run-dir runs/mnist-default [--models B1] [--attacks ...]   # models trained here

Attacks the correctly classified test images (the first ``--limit`` of the test set) with FGS in the paper's
protocol (blank when float32 p_true == 1), FGS with the exact gradient, and HC1, each with the minimal-step line
search of docs/semantics.md (FGS up to t = 255, HC1 up to ``--hc1-max-step``, default 1020), and prints a Table-1 style row.
More attacks (``--attacks``, comma-separated): ``pgd`` — L∞ PGD (margin and cross-entropy losses) at the budgets
of ``--pgd-eps``; ``pgd_min`` — the smallest budget at which PGD on the margin succeeds, per image (bisection up
to ``--pgd-min-max-eps``), reported like the paper's minimal perturbations; ``square`` — the gradient-free
Square attack at the budgets of ``--square-eps`` with ``--square-queries`` queries per image.
``--curves`` adds robust accuracy vs ε (``--curve-eps``) for FGS, FGS-exact, PGD-CE, PGD-margin and Square, and
the gradient-masking report (:mod:`bang_jax.robustness`); ``--plot`` draws the curves.
Rates are percent of attacked images, L∞ in pixels, PASS over successes, blanks as counts; robust accuracy is
percent of all evaluated images. Every argument is checked before data is loaded; a user error prints one line
and exits with status 2 (``--debug`` shows the traceback). The header and the JSON name the data source.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bang_jax.attacks import (
    fgs_direction,
    hot_cold_direction,
    line_search_attack,
    minimal_pgd_attack,
    pgd_attack,
    square_attack,
)
from bang_jax.caffe import check_caffe_weights, load_caffe_weights
from bang_jax.checkpoint import CheckpointError, atomic_write, load_params
from bang_jax.data import DataError, load_dataset, mean_image
from bang_jax.models import MODELS, CifarQuick, LeNet, set_mean_image, warn_if_unit_range
from bang_jax.metrics import pass_scores
from bang_jax.robustness import (
    ATTACKS as CURVE_ATTACKS,
    DEFAULT_EPSILONS,
    masking_report,
    plot_curves,
    robustness_curves,
    validate_curve_args,
)

__all__ = ["ATTACKS", "evaluate_accuracy", "evaluate_model", "main", "predict"]

ATTACKS = ("fgs", "hc1", "pgd", "pgd_min", "square")


def predict(model: nn.Module, variables: dict, images, *, batch_size: int = 1000) -> np.ndarray:
    """Test-mode logits ``[N, classes]`` of ``images`` (pixels 0..255), in batches."""
    if isinstance(model, (LeNet, CifarQuick)):
        warn_if_unit_range(images, type(model).__name__)
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


def _budgets(values, name):
    eps = tuple(float(e) for e in values)
    if not all(np.isfinite(e) and e >= 0 for e in eps):
        raise ValueError(f"{name} must be finite non-negative numbers of pixels, got {list(values)}")
    return eps


def _validate(attacks, *, pgd_epsilons, square_epsilons, square_queries, pgd_steps, pgd_min_max_epsilon, curves,
              curve_attacks):
    """All argument checks of :func:`evaluate_model`, done before any attack runs."""
    attacks = tuple(attacks)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}: choose from {', '.join(ATTACKS)}")
    pgd_epsilons = _budgets(pgd_epsilons, "pgd_epsilons")
    square_epsilons = pgd_epsilons if square_epsilons is None else _budgets(square_epsilons, "square_epsilons")
    if int(square_queries) != square_queries or square_queries < 1:
        raise ValueError(f"square_queries must be a positive integer, got {square_queries}")
    if int(pgd_steps) != pgd_steps or pgd_steps < 1:
        raise ValueError(f"pgd_steps must be a positive integer, got {pgd_steps}")
    if not (np.isfinite(pgd_min_max_epsilon) and pgd_min_max_epsilon > 0):
        raise ValueError(f"pgd_min_max_epsilon must be a positive number of pixels, got {pgd_min_max_epsilon}")
    if curves is True:
        curves = DEFAULT_EPSILONS
    if curves is not None and curves is not False:
        curves, curve_attacks = validate_curve_args(curves, curve_attacks, square_queries=square_queries,
                                                    pgd_steps=pgd_steps)
    else:
        curves = None
    return attacks, pgd_epsilons, square_epsilons, curves, tuple(curve_attacks)


def evaluate_model(model, variables, images, labels, *, attacks=("fgs", "hc1"), hc1_max_step=1020,
                   pgd_epsilons=(16.0, 32.0, 64.0), pgd_steps=40, pgd_min_max_epsilon=64.0, square_epsilons=None,
                   square_queries=1000, curves=None, curve_attacks=CURVE_ATTACKS, seed=0, progress=True, label=""):
    """Accuracy and attack statistics (a JSON-able dict) of ``model`` on ``images`` (pixels) with integer ``labels``.

    ``attacks`` (validated, with every other argument, before anything runs): ``"fgs"`` (paper protocol and
    exact gradient), ``"hc1"``, ``"pgd"`` (L∞ PGD on the logit margin and on the cross-entropy at each budget in
    ``pgd_epsilons``, giving ``pgd_margin_rate_eps16`` …), ``"pgd_min"`` (per image, the smallest budget up to
    ``pgd_min_max_epsilon`` at which PGD on the margin succeeds: ``pgd_min_rate``, ``pgd_min_linf_mean`` …, as the
    paper reports its minimal perturbations) and ``"square"`` (the gradient-free Square attack at each budget in
    ``square_epsilons``, default ``pgd_epsilons``: ``square_rate_eps16``, ``square_queries_mean_eps16`` over
    successes). Rates are % of attacked (correctly classified) images.

    ``curves``: a sequence of budgets ε (pixels), or True for :data:`bang_jax.robustness.DEFAULT_EPSILONS`, adds
    ``row["curves"]`` (:func:`bang_jax.robustness.robustness_curves` over ``curve_attacks``; robust accuracy is %
    of all evaluated images) and ``row["masking"]`` (:func:`bang_jax.robustness.masking_report`, with a
    ``verdict``). ``label`` (e.g. the model's name) prefixes the progress bars.
    """
    attacks, pgd_epsilons, square_epsilons, curves, curve_attacks = _validate(
        attacks, pgd_epsilons=pgd_epsilons, square_epsilons=square_epsilons, square_queries=square_queries,
        pgd_steps=pgd_steps, pgd_min_max_epsilon=pgd_min_max_epsilon, curves=curves, curve_attacks=curve_attacks)
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
            row |= _summary("fgs", line_search_attack(logits_fn, x, y, d, blank=blank, max_step=255,
                                                      progress=progress and f"{label} FGS (paper rule)".strip()), x)
            d, blank = fgs_direction(logits_fn, x, y, exact=True)
            row |= _summary(
                "fgs_exact", line_search_attack(logits_fn, x, y, d, blank=blank, max_step=255,
                                                progress=progress and f"{label} FGS (exact)".strip()), x
            )
        elif attack == "pgd":
            for eps in pgd_epsilons:
                for loss in ("margin", "ce"):
                    res = pgd_attack(logits_fn, x, y, epsilon=float(eps), steps=pgd_steps, loss=loss, seed=seed)
                    row[f"pgd_{loss}_rate_eps{eps:g}"] = res.rate
        elif attack == "pgd_min":
            res = minimal_pgd_attack(logits_fn, x, y, max_epsilon=pgd_min_max_epsilon, steps=pgd_steps, seed=seed)
            row |= _summary("pgd_min", res, x)
        elif attack == "square":
            row["square_queries"] = int(square_queries)
            for eps in square_epsilons:
                res = square_attack(logits_fn, x, y, epsilon=float(eps), queries=square_queries, seed=seed)
                row[f"square_rate_eps{eps:g}"] = res.rate
                row[f"square_queries_mean_eps{eps:g}"] = (float(res.queries[res.success].mean())
                                                         if res.success.any() else None)
        elif attack == "hc1":
            d, blank = hot_cold_direction(logits_fn, x, y)
            res = line_search_attack(logits_fn, x, y, d, blank=blank, max_step=hc1_max_step,
                                     progress=progress and f"{label} HC1".strip())
            row |= _summary("hc1", res, x)
        row[f"{attack}_seconds"] = time.perf_counter() - t0
    if curves is not None:
        t0 = time.perf_counter()
        row["curves"] = robustness_curves(logits_fn, images, labels, curves, attacks=curve_attacks,
                                          pgd_steps=pgd_steps, square_queries=square_queries, seed=seed,
                                          progress=progress)
        row["masking"] = masking_report(logits_fn, images, labels, curves=row["curves"])
        row["curves_seconds"] = time.perf_counter() - t0
    return row


def _parse_floats(text, flag="value"):
    try:
        values = tuple(float(e) for e in text.split(",") if e.strip())
    except ValueError:
        raise ValueError(f"{flag} expects comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not (0 <= v < float("inf"))]
    if bad:
        raise ValueError(f"{flag} expects finite non-negative numbers of pixels, got {list(bad)}")
    return values


def _fmt(v, pct=False):
    if v is None:
        return "-"
    return f"{v:.2f}%" if pct else f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"


class UsageError(ValueError):
    """A bad command-line argument (one line, exit status 2)."""


def _check_output(flag: str, path: str | None) -> None:
    """An output file must be creatable: its folder exists and is writable, and it is not a folder itself."""
    if path is None:
        return
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name")
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path}: the folder {folder} is not writable")


def _positive(flag: str, value, allow_none=False):
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise UsageError(f"{flag} must be a positive integer, got {value}")


def _run_dir_models(run_dir: Path, names: list[str] | None, ds):
    """[(label, model, variables)] of the models trained in an experiments run directory."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise UsageError(f"--run-dir {run_dir} has no config.json: not a run directory of python -m experiments.*")
    config = json.loads(config_path.read_text())
    all_names, params, info = load_params(run_dir)
    if info.get("iteration") != config.get("steps"):
        print(f"note: {run_dir} stopped training at iteration {info.get('iteration')} of {config.get('steps')}; "
              "evaluating the weights of its last checkpoint", file=sys.stderr)
    unknown = [n for n in names or [] if n not in all_names]
    if unknown:
        raise UsageError(f"--models: {', '.join(unknown)} not in {run_dir} (it has {', '.join(all_names)})")
    model = MODELS[config["model"]]()
    sample = np.zeros((1,) + ds.train_images.shape[1:], np.float32)
    variables = model.init(jax.random.PRNGKey(0), sample, train=False)
    if config["model"] == "cifar_quick":
        variables = set_mean_image(variables, mean_image(ds.train_images))
    consts = {k: v for k, v in variables.items() if k != "params"}
    out = []
    for i, name in enumerate(all_names):
        if names and name not in names:
            continue
        p = jax.tree.map(lambda x, i=i: np.asarray(x[i]), params)
        bad = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_flatten_with_path(p)[0] if not np.isfinite(v).all()]
        if bad:
            raise UsageError(f"model {name} in {run_dir} has NaN or infinite weights in {', '.join(bad)}")
        out.append((name, model, {**consts, "params": p}))
    return config["dataset"], out, info.get("iteration")


def main(argv=None):
    """``python -m bang_jax.evaluate``: user errors print one line and exit with status 2 (``--debug``: traceback)."""
    p = argparse.ArgumentParser(prog="python -m bang_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--caffe-weights", help="a .caffemodel.h5 file of the authors (LeNet or CIFAR-10 quick)")
    what.add_argument("--run-dir", help="a run directory of python -m experiments.mnist|cifar10")
    p.add_argument("--models", help="with --run-dir: comma-separated model names (default: all)")
    p.add_argument("--dataset", choices=["mnist", "cifar10"], help="needed with --caffe-weights")
    p.add_argument("--attacks", default="fgs,hc1",
                   help=f"comma-separated: {', '.join(ATTACKS)}; empty: none (default: %(default)s)")
    p.add_argument("--pgd-eps", default="16,32,64", help="L∞ budgets (pixels) of the pgd attack")
    p.add_argument("--pgd-steps", type=int, default=40, help="PGD steps (pgd, pgd_min, curves)")
    p.add_argument("--pgd-min-max-eps", type=float, default=64.0, help="largest budget of pgd_min (pixels)")
    p.add_argument("--square-eps", help="L∞ budgets (pixels) of the square attack (default: --pgd-eps)")
    p.add_argument("--square-queries", type=int, default=1000, help="Square queries per image and budget")
    p.add_argument("--curves", action="store_true",
                   help="robust accuracy vs ε curves and the gradient-masking report")
    p.add_argument("--curve-eps", default=",".join(f"{e:g}" for e in DEFAULT_EPSILONS),
                   help="budgets (pixels) of the curves (default: %(default)s)")
    p.add_argument("--curve-attacks", default=",".join(CURVE_ATTACKS), help="attacks of the curves")
    p.add_argument("--plot", help="write the curves as a PNG (needs --curves)")
    p.add_argument("--seed", type=int, default=0, help="seed of PGD's random start and Square")
    p.add_argument("--limit", type=int, help="use the first N test images")
    p.add_argument("--hc1-max-step", type=int, default=1020)
    p.add_argument("--data-dir", help="dataset directory (default: $BANG_DATA_DIR)")
    p.add_argument("--json", help="write the results as one JSON object to this file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = p.parse_args(argv)
    try:
        return _main(args)
    except (UsageError, DataError, CheckpointError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as err:  # the library's argument and file checks (weights, attack options)
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _main(args):
    # Every argument is checked before any data is loaded or any attack runs.
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    try:
        options = dict(
            pgd_epsilons=_parse_floats(args.pgd_eps, "--pgd-eps"), pgd_steps=args.pgd_steps,
            pgd_min_max_epsilon=args.pgd_min_max_eps, square_queries=args.square_queries,
            square_epsilons=None if args.square_eps is None else _parse_floats(args.square_eps, "--square-eps"),
            curves=_parse_floats(args.curve_eps, "--curve-eps") if args.curves else None,
            curve_attacks=tuple(a.strip() for a in args.curve_attacks.split(",") if a.strip()),
        )
        _validate(attacks, **options)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.plot and not args.curves:
        raise UsageError("--plot needs --curves")
    _positive("--limit", args.limit, allow_none=True)
    _positive("--hc1-max-step", args.hc1_max_step)
    _check_output("--json", args.json)
    _check_output("--plot", args.plot)
    if args.caffe_weights:
        if args.dataset is None:
            raise UsageError("--caffe-weights needs --dataset mnist|cifar10")
        if args.models:
            raise UsageError("--models goes with --run-dir")
        if not Path(args.caffe_weights).is_file():
            raise UsageError(f"--caffe-weights {args.caffe_weights} does not exist")
        dataset = args.dataset
        check_caffe_weights(args.caffe_weights, dataset)  # the right model for the dataset, before loading data
    else:
        run_dir = Path(args.run_dir)
        if not (run_dir / "config.json").is_file():
            raise UsageError(f"--run-dir {run_dir} has no config.json: not a run directory of python -m experiments.*")
        run_config = json.loads((run_dir / "config.json").read_text())
        dataset = run_config["dataset"]
        if args.dataset and args.dataset != dataset:
            raise UsageError(f"--dataset {args.dataset} does not match the run's dataset {dataset}")
        names = [n.strip() for n in args.models.split(",") if n.strip()] if args.models else None
        trained = load_params(run_dir)[0]
        unknown = [n for n in names or [] if n not in trained]
        if unknown:
            raise UsageError(f"--models: {', '.join(unknown)} not in {run_dir} (it has {', '.join(trained)})")
        if args.data_dir is None and not os.environ.get("BANG_DATA_DIR") and run_config.get("data_dir"):
            args.data_dir = run_config["data_dir"]  # the data the run was made with, not a fallback
            print(f"data: using the run's data directory {args.data_dir}", file=sys.stderr)
    ds = load_dataset(dataset, args.data_dir)
    if args.run_dir and run_config.get("data_source") and ds.source != run_config["data_source"]:
        print(f"note: the run was trained on {run_config['data_source']}; evaluating on {ds.source}", file=sys.stderr)
    if args.caffe_weights:
        mean = mean_image(ds.train_images) if dataset == "cifar10" else None
        model, variables = load_caffe_weights(args.caffe_weights, mean_image=mean, dataset=dataset)
        entries, source, iteration = [(Path(args.caffe_weights).stem, model, variables)], str(args.caffe_weights), None
    else:
        names = [n.strip() for n in args.models.split(",") if n.strip()] if args.models else None
        _, entries, iteration = _run_dir_models(Path(args.run_dir), names, ds)
        source = str(args.run_dir)
    n = len(ds.test_images) if args.limit is None else min(args.limit, len(ds.test_images))
    print(f"{source}: {len(entries)} model(s) on {n} {dataset} test images; data: {ds.source}"
          + ("" if ds.comparable_to_paper else " (NOT comparable to the paper)"), file=sys.stderr)
    rows = {}
    for label, model, variables in entries:
        row = evaluate_model(
            model, variables, ds.test_images[:n], ds.test_labels[:n], attacks=attacks,
            hc1_max_step=args.hc1_max_step, progress=not args.no_progress, seed=args.seed, label=label, **options,
        )
        meta = {"weights": source, "model": label, "dataset": dataset, "data_source": ds.source}
        if iteration is not None:
            meta["iteration"] = iteration
        rows[label] = row = meta | row
        _print_row(args, label, n, dataset, row)
    if args.plot:
        curves = {label: r["curves"] for label, r in rows.items() if "curves" in r}
        print(f"wrote {plot_curves(curves, args.plot)}", file=sys.stderr)
    result = next(iter(rows.values())) if args.caffe_weights else rows
    if args.json:
        atomic_write(args.json, (json.dumps(result, indent=2) + "\n").encode())
        print(f"wrote {args.json}", file=sys.stderr)
    return result


def _print_row(args, label, n, dataset, row):
    print(f"\n{label} on {n} {dataset} test images ({row['attacked']} attacked; data: {row['data_source']})")
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
        print(f"PGD ({args.pgd_steps} steps) success: " + ", ".join(f"{k[4:]} {v:.2f}%" for k, v in pgd.items()))
    if "pgd_min_rate" in row:
        print(f"PGD-margin minimal budget: success {_fmt(row['pgd_min_rate'], True)} within "
              f"{args.pgd_min_max_eps:g}, L∞ {_fmt(row['pgd_min_linf_mean'])}±{_fmt(row['pgd_min_linf_std'])}, "
              f"PASS {_fmt(row['pgd_min_pass_mean'])}")
    square = {k: v for k, v in row.items() if k.startswith("square_rate_")}
    if square:
        print(f"Square ({args.square_queries} queries) success: "
              + ", ".join(f"{k[12:]} {v:.2f}%" for k, v in square.items()))
    if "curves" in row:
        c = row["curves"]
        print("robust accuracy (% of all images) | ε = " + " ".join(f"{e:>5g}" for e in c["epsilons"]))
        for name, data in list(c["attacks"].items()) + [("best", c["best"])]:
            print(f"  {name:<32} | " + " ".join(f"{a:5.1f}" for a in data["robust_accuracy"]))
        m = row["masking"]
        print(f"masking: CE loss == 0 (float32) on {_fmt(m['ce_loss_zero_share'])}%, CE input gradient all zero on "
              f"{_fmt(m['ce_grad_zero_share'])}%, median logit margin {_fmt(m['margin_median'])}")
        print(f"verdict: {m['verdict']}")


if __name__ == "__main__":
    main()
