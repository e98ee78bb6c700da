"""Robustness evaluation of a model on the paper's attacks, from the command line.

    python -m bang_jax.evaluate --caffe-weights $BANG_DATA_DIR/bang_caffe/lenet_bang.caffemodel.h5 \\
        --dataset mnist [--attacks fgs,hc1] [--limit N] [--json OUT] [--data-dir DIR]
    python -m bang_jax.evaluate ... --attacks fgs,pgd,square --curves --plot curves.png --json out.json
    python -m bang_jax.evaluate --run-dir runs/mnist-default [--models B1] [--attacks ...]   # models trained here

Attacks the correctly classified test images (the first ``--limit`` of the test set) with FGS in the paper's
protocol (blank when float32 p_true == 1), FGS with the exact gradient, and HC1, each with the minimal-step line
search of docs/semantics.md (FGS up to t = 255, HC1 up to ``--hc1-max-step``, default 1020), and prints a
Table-1 style row.
More attacks (``--attacks``, comma-separated): ``pgd`` — L∞ PGD (margin and cross-entropy losses) at the budgets
of ``--pgd-budgets`` (alias ``--pgd-eps``); ``pgd_min`` — the smallest budget at which PGD on the margin succeeds,
per image (bisection up to ``--pgd-min-max-budget``), reported like the paper's minimal perturbations; ``square``
— the gradient-free Square attack at the budgets of ``--square-budgets`` with ``--square-queries`` queries per
image; ``autoattack`` — the standard AutoAttack ensemble (APGD-CE, APGD-T, FAB-T, Square-5000;
:mod:`bang_jax.autoattack`) at the budgets of ``--autoattack-budgets`` (default: the PGD budgets), with which
attack fooled each image first. ``--curves`` adds robust accuracy vs budget (``--curve-budgets``) for FGS,
FGS-exact, PGD-CE, PGD-margin and Square (``--curve-attacks`` adds ``autoattack``), and the gradient-masking
report (:mod:`bang_jax.robustness`); ``--plot`` draws the curves. The
evaluation flags are :class:`EvalConfig`'s fields; with ``--run-dir`` the run's recorded settings are their
defaults, and ``--json`` then writes exactly what the experiments' ``evaluate`` stage writes as
``results.json`` (one evaluation path for a run directory).
Rates are percent of attacked images, L∞ in pixels, PASS over successes, blanks as counts; robust accuracy is
percent of all evaluated images. Every argument is checked before data is loaded; a user error prints one line
and exits with status 2 (``--debug`` shows the traceback). The header and the JSON name the data source.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bang_jax import settings
from bang_jax.attacks import (
    fgs_direction,
    hot_cold_direction,
    line_search_attack,
    minimal_pgd_attack,
    pgd_attack,
    square_attack,
)
from bang_jax.autoattack import autoattack, check_classes
from bang_jax.balance import BangConfig
from bang_jax.caffe import check_caffe_weights, load_caffe_weights
from bang_jax.checkpoint import CheckpointError, atomic_write, load_params, load_variables, read_run_config
from bang_jax.core import check_finite
from bang_jax.data import DataError, load_dataset, load_run_data, mean_image, source_kind
from bang_jax.metrics import pass_scores
from bang_jax.models import CifarQuick, LeNet, build, eval_apply, warn_if_unit_range
from bang_jax.robustness import (
    DEFAULT_ATTACKS as CURVE_ATTACKS,
    DEFAULT_EPSILONS,
    masking_report,
    plot_curves,
    robustness_curves,
    validate_curve_args,
)

__all__ = [
    "ATTACKS",
    "model_health",
    "EvalConfig",
    "evaluate_accuracy",
    "evaluate_model",
    "evaluate_run",
    "main",
    "predict",
    "results_bytes",
    "run_models",
]

ATTACKS = ("fgs", "hc1", "pgd", "pgd_min", "square", "autoattack")


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
    return jax.jit(eval_apply(model))


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


def _budgets(values, name, *, allow_empty=False) -> tuple[float, ...]:
    try:
        budgets = tuple(float(e) for e in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers of pixels, got {values!r}") from None
    if not all(np.isfinite(e) and e >= 0 for e in budgets):
        raise ValueError(f"{name} must be finite non-negative numbers of pixels, got {list(values)}")
    if not budgets and not allow_empty:
        raise ValueError(f"{name} is empty: give at least one budget (pixels)")
    return budgets


def _positive_int(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Every setting of a robustness evaluation: the one definition, validated once (on creation).

    Budgets are L∞ perturbation sizes in pixels (0..255 images); they are called *budgets* (``--eval.pgd-budgets``)
    so as not to be confused with BANG's exponent ε.

    Attributes:
      attacks: of :data:`ATTACKS`: ``fgs`` (paper protocol and exact gradient), ``hc1``, ``pgd`` (L∞ PGD on the
        logit margin and on the cross-entropy at each of ``pgd_budgets``), ``pgd_min`` (the smallest budget up to
        ``pgd_min_max_budget`` at which PGD on the margin succeeds), ``square`` (gradient-free, at each of
        ``square_budgets``), ``autoattack`` (the standard AutoAttack ensemble, :mod:`bang_jax.autoattack`, at
        each of ``autoattack_budgets``).
      hc1_max_step: the largest step (pixels) of HC1's line search (the paper: 1020).
      pgd_budgets: the budgets of ``pgd`` (and of ``square`` when ``square_budgets`` is None).
      pgd_steps: PGD iterations (``pgd``, ``pgd_min``, the curves).
      pgd_min_max_budget: the largest budget ``pgd_min`` tries.
      square_budgets: the budgets of ``square`` (None: ``pgd_budgets``).
      square_queries: Square's queries per image and budget.
      autoattack_budgets: the budgets of ``autoattack`` (None: ``pgd_budgets``).
      curve_budgets: budgets of the robust-accuracy curves and the gradient-masking report (empty: none).
      curve_attacks: the attacks of the curves (of :data:`bang_jax.robustness.ATTACKS`; default all but
        ``autoattack``).
      seed: the attacks' randomness (PGD's random start, Square), recorded with the results.
    """

    attacks: tuple[str, ...] = ("fgs", "hc1")
    hc1_max_step: int = 1020
    pgd_budgets: tuple[float, ...] = (16.0, 32.0, 64.0)
    pgd_steps: int = 40
    pgd_min_max_budget: float = 64.0
    square_budgets: tuple[float, ...] | None = None
    square_queries: int = 1000
    autoattack_budgets: tuple[float, ...] | None = None
    curve_budgets: tuple[float, ...] = ()
    curve_attacks: tuple[str, ...] = CURVE_ATTACKS
    seed: int = 0

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        attacks = tuple(self.attacks)
        unknown = [a for a in attacks if a not in ATTACKS]
        if unknown:
            raise ValueError(
                f"attacks: unknown attack(s) {', '.join(map(str, unknown))}; choose from {', '.join(ATTACKS)}"
            )
        if len(set(attacks)) != len(attacks):
            raise ValueError(f"attacks: an attack is listed twice: {list(attacks)}")
        set_("attacks", attacks)
        set_("hc1_max_step", _positive_int("hc1_max_step", self.hc1_max_step))
        set_("pgd_steps", _positive_int("pgd_steps", self.pgd_steps))
        set_("square_queries", _positive_int("square_queries", self.square_queries))
        set_(
            "pgd_budgets",
            _budgets(
                self.pgd_budgets,
                "pgd_budgets",
                allow_empty="pgd" not in attacks and not ("square" in attacks and self.square_budgets is None)
                and not ("autoattack" in attacks and self.autoattack_budgets is None),
            ),
        )
        if self.square_budgets is not None:
            set_("square_budgets", _budgets(self.square_budgets, "square_budgets", allow_empty="square" not in attacks))
        if self.autoattack_budgets is not None:
            set_("autoattack_budgets", _budgets(self.autoattack_budgets, "autoattack_budgets",
                                                allow_empty="autoattack" not in attacks))
        if not (
            isinstance(self.pgd_min_max_budget, (int, float, np.floating))
            and np.isfinite(self.pgd_min_max_budget)
            and self.pgd_min_max_budget > 0
        ):
            raise ValueError(f"pgd_min_max_budget must be a positive number of pixels, got {self.pgd_min_max_budget!r}")
        set_("pgd_min_max_budget", float(self.pgd_min_max_budget))
        set_("curve_budgets", _budgets(self.curve_budgets, "curve_budgets", allow_empty=True))
        set_("curve_attacks", tuple(self.curve_attacks))
        if self.curve_budgets:
            validate_curve_args(
                self.curve_budgets, self.curve_attacks, square_queries=self.square_queries, pgd_steps=self.pgd_steps
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @property
    def square_budgets_or_pgd(self) -> tuple[float, ...]:
        return self.pgd_budgets if self.square_budgets is None else self.square_budgets

    @property
    def autoattack_budgets_or_pgd(self) -> tuple[float, ...]:
        return self.pgd_budgets if self.autoattack_budgets is None else self.autoattack_budgets

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, d: dict) -> EvalConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown evaluation setting(s) {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# The keyword names of earlier releases, still accepted by evaluate_model.
_LEGACY_NAMES = {
    "pgd_epsilons": "pgd_budgets",
    "square_epsilons": "square_budgets",
    "pgd_min_max_epsilon": "pgd_min_max_budget",
}


def evaluate_model(
    model, variables, images, labels, config: EvalConfig | None = None, *, progress=True, label="", **settings
):
    """Accuracy and attack statistics (a JSON-able dict) of ``model`` on ``images`` (pixels) with integer ``labels``.

    ``config`` (an :class:`EvalConfig`, validated before anything runs) says which attacks run and how; instead of
    it, its fields may be given as keywords (``attacks=("fgs", "pgd"), pgd_budgets=(8.0,)``; the older names
    ``pgd_epsilons``, ``square_epsilons``, ``pgd_min_max_epsilon`` and ``curves=`` (budgets, or True for
    :data:`bang_jax.robustness.DEFAULT_EPSILONS`) are accepted too). Rates are % of attacked (correctly
    classified) images: ``fgs_rate``, ``pgd_margin_rate_eps16``, ``square_rate_eps16``, ``pgd_min_rate`` …;
    with curve budgets ``row["curves"]`` (:func:`bang_jax.robustness.robustness_curves`; robust accuracy is %
    of all evaluated images) and ``row["masking"]`` (:func:`bang_jax.robustness.masking_report`, with a
    ``verdict``). ``label`` (e.g. the model's name) prefixes the progress bars.
    """
    config = _eval_config(config, settings)
    check_finite(images, "images")
    health, logits = _health(model, variables, images, labels)
    if health["status"] != "ok":  # no attack numbers for a model whose numbers would mean nothing
        return health
    wants_autoattack = "autoattack" in config.attacks or (config.curve_budgets and "autoattack" in config.curve_attacks)
    if wants_autoattack:
        check_classes(logits.shape[1])  # before any attack runs
    forward = eval_apply(model)
    logits_fn = jax.jit(lambda x: forward(variables, x))
    correct = np.argmax(logits, axis=1) == np.asarray(labels)
    x = np.asarray(images, np.float32)[correct]
    y = np.asarray(labels, np.int32)[correct]
    row = {"status": "ok", "accuracy": float(100 * correct.mean()), "test_images": int(len(labels)),
           "attacked": int(correct.sum())}
    seed = config.seed
    for attack in config.attacks:
        t0 = time.perf_counter()
        if attack == "fgs":
            d, blank = fgs_direction(logits_fn, x, y)
            row |= _summary(
                "fgs",
                line_search_attack(
                    logits_fn,
                    x,
                    y,
                    d,
                    blank=blank,
                    max_step=255,
                    progress=progress and f"{label} FGS (paper rule)".strip(),
                ),
                x,
            )
            d, blank = fgs_direction(logits_fn, x, y, exact=True)
            row |= _summary(
                "fgs_exact",
                line_search_attack(
                    logits_fn, x, y, d, blank=blank, max_step=255, progress=progress and f"{label} FGS (exact)".strip()
                ),
                x,
            )
        elif attack == "pgd":
            for eps in config.pgd_budgets:
                for loss in ("margin", "ce"):
                    res = pgd_attack(logits_fn, x, y, epsilon=float(eps), steps=config.pgd_steps, loss=loss, seed=seed)
                    row[f"pgd_{loss}_rate_eps{eps:g}"] = res.rate
        elif attack == "pgd_min":
            res = minimal_pgd_attack(
                logits_fn, x, y, max_epsilon=config.pgd_min_max_budget, steps=config.pgd_steps, seed=seed
            )
            row |= _summary("pgd_min", res, x)
        elif attack == "square":
            row["square_queries"] = config.square_queries
            for eps in config.square_budgets_or_pgd:
                res = square_attack(logits_fn, x, y, epsilon=float(eps), queries=config.square_queries, seed=seed)
                row[f"square_rate_eps{eps:g}"] = res.rate
                row[f"square_queries_mean_eps{eps:g}"] = (
                    float(res.queries[res.success].mean()) if res.success.any() else None
                )
        elif attack == "autoattack":
            for eps in config.autoattack_budgets_or_pgd:
                res = autoattack(logits_fn, x, y, float(eps), seed=seed,
                                 progress=bool(progress) and f"{label} AutoAttack ε {eps:g}".strip())
                row[f"autoattack_rate_eps{eps:g}"] = float(100.0 * np.mean(~res.robust)) if len(x) else None
                row[f"autoattack_robust_accuracy_eps{eps:g}"] = float(100.0 * res.robust.sum() / len(labels))
                row[f"autoattack_fooled_by_eps{eps:g}"] = res.fooled_by()  # "clean": wrong on AutoAttack's own check
        elif attack == "hc1":
            d, blank = hot_cold_direction(logits_fn, x, y)
            res = line_search_attack(
                logits_fn,
                x,
                y,
                d,
                blank=blank,
                max_step=config.hc1_max_step,
                progress=progress and f"{label} HC1".strip(),
            )
            row |= _summary("hc1", res, x)
        row[f"{attack}_seconds"] = time.perf_counter() - t0
    if config.curve_budgets:
        t0 = time.perf_counter()
        budgets, curve_attacks = validate_curve_args(config.curve_budgets, config.curve_attacks)
        row["curves"] = robustness_curves(
            logits_fn,
            images,
            labels,
            budgets,
            attacks=curve_attacks,
            pgd_steps=config.pgd_steps,
            square_queries=config.square_queries,
            seed=seed,
            progress=progress,
        )
        row["masking"] = masking_report(logits_fn, images, labels, curves=row["curves"])
        row["curves_seconds"] = time.perf_counter() - t0
    return row


def model_health(model, variables, images, labels) -> dict:
    """Whether a model's numbers can mean anything, checked before any attack: ``{"status": "ok"}`` or a row with
    ``status`` ``"non-finite weights"``, ``"non-finite logits"`` or ``"no better than chance"`` (accuracy not above
    chance, 100/classes %, by three standard errors of a guesser on this many images), its accuracy where it has
    one, and no attack statistics."""
    return _health(model, variables, images, labels)[0]


def _health(model, variables, images, labels) -> tuple[dict, np.ndarray | None]:
    """:func:`model_health` and the test logits it computed (None when the weights are not finite)."""
    n = int(len(labels))
    base = {"test_images": n, "attacked": 0}
    bad = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_flatten_with_path(variables)[0]
           if hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.inexact) and not np.isfinite(np.asarray(v)).all()]
    if bad:
        return {"status": "non-finite weights", "status_detail": f"NaN or infinite values in {', '.join(bad)}",
                "accuracy": None} | base, None
    logits = predict(model, variables, images)
    if not np.isfinite(logits).all():
        rows = int((~np.isfinite(logits)).any(axis=1).sum())
        return {"status": "non-finite logits", "status_detail": f"NaN or infinite logits on {rows} of {n} images",
                "accuracy": None} | base, logits
    accuracy = float(100 * np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))
    p = 1.0 / logits.shape[1]
    threshold = 100 * (p + 3 * np.sqrt(p * (1 - p) / max(n, 1)))
    if accuracy <= threshold:
        return {"status": "no better than chance", "accuracy": accuracy,
                "status_detail": f"accuracy {accuracy:.2f}% ≤ {threshold:.2f}% (chance {100 * p:.1f}% + 3 standard "
                                 f"errors on {n} images)"} | base, logits
    return {"status": "ok"}, logits


def _eval_config(config: EvalConfig | None, settings: dict) -> EvalConfig:
    """``config``, or an :class:`EvalConfig` from keyword settings (older names accepted)."""
    if config is not None and settings:
        raise TypeError("give evaluate_model either config= or keyword settings, not both")
    if config is not None:
        if not isinstance(config, EvalConfig):
            raise TypeError(f"config must be a bang_jax.evaluate.EvalConfig, got {type(config).__name__}")
        return config
    fields = {_LEGACY_NAMES.get(k, k): v for k, v in settings.items()}
    if "curves" in fields:
        curves = fields.pop("curves")
        fields["curve_budgets"] = (
            DEFAULT_EPSILONS if curves is True else () if curves is None or curves is False else tuple(curves)
        )
    known = {f.name for f in dataclasses.fields(EvalConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"evaluate_model() got unknown setting(s) {unknown}; the settings are {sorted(known)}")
    return EvalConfig(**fields)


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
    probe = folder / f".write-probe-{os.getpid()}"
    try:  # a real write, not a permission guess: the results must not be lost after all the attacks ran
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"{flag} {path}: the folder {folder} is not writable ({err.strerror or err})") from None


def _positive(flag: str, value, allow_none=False):
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise UsageError(f"{flag} must be a positive integer, got {value}")


def _final_losses(run_dir: Path, steps: int) -> dict[str, float | None]:
    losses = {}
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            d = json.loads(line)
            if d["iteration"] == steps:
                losses[d["model"]] = d.get("loss")
    return losses


def run_models(run_dir, data, *, models=None, allow_unfinished=False):
    """``(run description, [(model spec dict, module, variables)], iteration)`` of the models trained in a run
    directory of ``python -m experiments.*`` — the one reader of a run's final weights.

    ``models`` (names) picks some; ``data`` is the run's :class:`bang_jax.data.Dataset` (CIFAR-quick takes its
    training images' mean). A checkpoint short of the run's last iteration is an error unless
    ``allow_unfinished``. Weights with NaN or infinite entries are returned as they are; :func:`evaluate_model`
    marks such a model (``status``) instead of reporting numbers for it.
    """
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    recorded = config.get("data_source")
    if recorded and source_kind(recorded) != source_kind(data.source):
        raise DataError(f"{run_dir} was made with {recorded}, not {data.source}: evaluate it on its own data "
                        "(bang_jax.data.load_run_data)")
    names, stacked, info = load_variables(run_dir)
    unknown = [n for n in models or [] if n not in names]
    if unknown:
        raise ValueError(f"models {', '.join(unknown)} not in {run_dir} (it has {', '.join(names)})")
    steps = config["train"]["steps"]
    if info.get("iteration") != steps:
        message = f"training in {run_dir} stopped at iteration {info.get('iteration')} of {steps}"
        if not allow_unfinished:
            raise CheckpointError(message + ": finish it with --resume")
        print(f"note: {message}; evaluating the weights of its last checkpoint", file=sys.stderr)
    module, variables = build(config["model"], data.train_images)
    consts = {k: v for k, v in variables.items() if k not in stacked}
    specs = {m["name"]: m for m in config["models"]}
    out = []
    for i, name in enumerate(names):
        if models and name not in models:
            continue
        picked = jax.tree.map(lambda x, i=i: np.asarray(x[i]), stacked)
        out.append((specs.get(name, {"name": name}), module, {**consts, **picked}))
    return config, out, info.get("iteration")


def evaluate_run(
    run_dir, config: EvalConfig, data, *, models=None, test_limit=None, allow_unfinished=False, progress=True
) -> tuple[list[dict], dict[str, float]]:
    """Evaluates the models of a run directory: ``(results rows, seconds per attack)`` — the one evaluation of a
    run, used by the ``evaluate`` stage of the experiments and by ``python -m bang_jax.evaluate --run-dir``.

    Each row is the model's id, BANG hyperparameters, seed, whether it is regular, its final training loss, the
    data source and iteration, then :func:`evaluate_model`'s statistics (timings are returned apart, so that the
    same settings give the same rows). Evaluated on the first ``test_limit`` test images (None: all).
    """
    run_dir = Path(run_dir)
    run_config, entries, iteration = run_models(run_dir, data, models=models, allow_unfinished=allow_unfinished)
    n = len(data.test_images) if test_limit is None else min(test_limit, len(data.test_images))
    x, y = data.test_images[:n], data.test_labels[:n]
    losses = _final_losses(run_dir, run_config["train"]["steps"])
    rows, seconds = [], {}
    for spec, module, variables in entries:
        name = spec["name"]
        row = evaluate_model(module, variables, x, y, config, progress=progress, label=name)
        for key in [k for k in row if k.endswith("_seconds")]:
            seconds[f"{name}_{key}"] = row.pop(key)
        bang = {k: spec[k] for k in ("epsilon", "beta", "ratio") if k in spec}
        rows.append(
            {
                "id": name,
                **bang,
                "seed": spec.get("seed"),
                "regular": BangConfig(**bang).is_regular,
                "final_train_loss": losses.get(name),
                "data_source": data.source,
                "iteration": iteration,
                "eval": config.to_json(),
            }
            | row
        )
    return rows, seconds


def results_bytes(rows: list[dict]) -> bytes:
    """The bytes of a ``results.json`` (what both doors to a run directory write)."""
    return (json.dumps(rows, indent=2) + "\n").encode()


# The evaluate command's flags come from EvalConfig's fields; these spellings of earlier releases stay.
EVAL_FLAG_ALIASES = {
    "pgd_budgets": ("--pgd-eps",),
    "square_budgets": ("--square-eps",),
    "pgd_min_max_budget": ("--pgd-min-max-eps",),
    "curve_budgets": ("--curve-eps",),
}


def _eval_flags():
    return settings.flag_fields(EvalConfig, aliases=EVAL_FLAG_ALIASES)


def main(argv=None):
    """``python -m bang_jax.evaluate``: user errors print one line and exit with status 2 (``--debug``: traceback)."""
    p = argparse.ArgumentParser(
        prog="python -m bang_jax.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--caffe-weights", help="a .caffemodel.h5 file of the authors (LeNet or CIFAR-10 quick)")
    what.add_argument("--run-dir", help="a run directory of python -m experiments.mnist|cifar10")
    p.add_argument("--models", help="with --run-dir: comma-separated model names (default: all)")
    p.add_argument("--dataset", choices=["mnist", "cifar10"], help="needed with --caffe-weights")
    p.add_argument(
        "--curves",
        action="store_true",
        help="robust accuracy vs budget curves and the gradient-masking report (budgets: "
        "--curve-budgets, default " + ",".join(f"{e:g}" for e in DEFAULT_EPSILONS) + ")",
    )
    p.add_argument("--plot", help="write the curves as a PNG (needs --curves)")
    p.add_argument("--limit", type=int, help="use the first N test images (--run-dir: default the run's own)")
    p.add_argument("--data-dir", help="dataset directory (default: $BANG_DATA_DIR; --run-dir: the run's own)")
    p.add_argument(
        "--json", help="write the results as JSON to this file (--run-dir: exactly the run's results.json layout)"
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    settings.add_flags(
        p,
        _eval_flags(),
        "evaluation settings (bang_jax.evaluate.EvalConfig; with --run-dir the "
        "run's recorded settings are the defaults)",
    )
    args = p.parse_args(argv)
    try:
        return _main(args)
    except (UsageError, DataError, CheckpointError, ValueError) as err:  # ValueError: the library's checks
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("\ninterrupted: nothing was written", file=sys.stderr)
        raise SystemExit(130) from None
    except OSError as err:  # disk full, a vanished folder, …
        if args.debug:
            raise
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        raise SystemExit(1) from None


def _config_from_args(args, base: EvalConfig) -> EvalConfig:
    given = settings.given_flags(args, _eval_flags())
    if ("curve_budgets",) in given and not args.curves:
        raise UsageError("--curve-budgets (--curve-eps) needs --curves")
    if args.curves and not given.get(("curve_budgets",), base.curve_budgets):
        given[("curve_budgets",)] = DEFAULT_EPSILONS
    if not args.curves:
        given[("curve_budgets",)] = ()
    return settings.apply_flags(base, given, _eval_flags(), error=UsageError)


def _main(args):
    # Every argument is checked before any data is loaded or any attack runs.
    if args.plot and not args.curves:
        raise UsageError("--plot needs --curves")
    _positive("--limit", args.limit, allow_none=True)
    _check_output("--json", args.json)
    _check_output("--plot", args.plot)
    if args.caffe_weights:
        if args.dataset is None:
            raise UsageError("--caffe-weights needs --dataset mnist|cifar10")
        if args.models:
            raise UsageError("--models goes with --run-dir")
        if not Path(args.caffe_weights).is_file():
            raise UsageError(f"--caffe-weights {args.caffe_weights} does not exist")
        config = _config_from_args(args, EvalConfig())
        dataset = args.dataset
        check_caffe_weights(args.caffe_weights, dataset)  # the right model for the dataset, before loading data
        limit = args.limit
    else:
        run_dir = Path(args.run_dir)
        run_config = read_run_config(run_dir)
        config = _config_from_args(args, EvalConfig.from_json(run_config.get("eval", {})))
        dataset = run_config["dataset"]
        if args.dataset and args.dataset != dataset:
            raise UsageError(f"--dataset {args.dataset} does not match the run's dataset {dataset}")
        names = [n.strip() for n in args.models.split(",") if n.strip()] if args.models else None
        if args.models is not None and not names:
            raise UsageError("--models is empty; name the models or leave the flag out")
        trained = load_params(run_dir)[0]
        unknown = [n for n in names or [] if n not in trained]
        if unknown:
            raise UsageError(f"--models: {', '.join(unknown)} not in {run_dir} (it has {', '.join(trained)})")
        if args.data_dir is None and not os.environ.get("BANG_DATA_DIR") and run_config.get("data_dir"):
            args.data_dir = run_config["data_dir"]  # the data the run was made with, not a fallback
            print(f"data: using the run's data directory {args.data_dir}", file=sys.stderr)
        limit = run_config.get("test_limit") if args.limit is None else args.limit
    if args.run_dir:  # the data the run was made with, or an error saying how to point at it
        ds = load_run_data(dataset, run_config.get("data_source"), args.data_dir)
    else:
        ds = load_dataset(dataset, args.data_dir, knob="--data-dir")
    n = len(ds.test_images) if limit is None else min(limit, len(ds.test_images))
    if args.caffe_weights:
        mean = mean_image(ds.train_images) if dataset == "cifar10" else None
        model, variables = load_caffe_weights(args.caffe_weights, mean_image=mean, dataset=dataset)
        label, source = Path(args.caffe_weights).stem, str(args.caffe_weights)
        print(
            f"{source}: 1 model on {n} {dataset} test images; data: {ds.source}"
            + ("" if ds.comparable_to_paper else " (NOT comparable to the paper)"),
            file=sys.stderr,
        )
        row = evaluate_model(
            model, variables, ds.test_images[:n], ds.test_labels[:n], config, progress=not args.no_progress, label=label
        )
        row = {"weights": source, "model": label, "dataset": dataset, "data_source": ds.source} | row
        rows, result = [row], row
    else:
        print(
            f"{run_dir}: models {', '.join(names or trained)} on {n} {dataset} test images; data: {ds.source}"
            + ("" if ds.comparable_to_paper else " (NOT comparable to the paper)"),
            file=sys.stderr,
        )
        rows, _ = evaluate_run(
            run_dir, config, ds, models=names, test_limit=limit, allow_unfinished=True, progress=not args.no_progress
        )
        result = rows
    for row in rows:
        _print_row(config, row.get("id", row.get("model")), n, dataset, row)
    if args.plot:
        curves = {r.get("id", r.get("model")): r["curves"] for r in rows if "curves" in r}
        if curves:
            print(f"wrote {plot_curves(curves, args.plot, title=f'{dataset}: robust accuracy vs L∞ budget')}",
                  file=sys.stderr)
        else:  # every model diverged: nothing was attacked
            print(f"WARNING: no curves to plot; {args.plot} not written", file=sys.stderr)
    if args.json:
        atomic_write(
            args.json, results_bytes(result) if args.run_dir else (json.dumps(result, indent=2) + "\n").encode()
        )
        print(f"wrote {args.json}", file=sys.stderr)
    return result


def _print_row(config: EvalConfig, label, n, dataset, row):
    if row.get("status", "ok") != "ok":
        print(f"\n{label} on {n} {dataset} test images: {row['status'].upper()} — {row.get('status_detail', '')}; "
              "no attack numbers are reported for it")
        return
    print(f"\n{label} on {n} {dataset} test images ({row['attacked']} attacked; data: {row['data_source']})")
    print("accuracy | FGS rate  PASS    L∞ (blank) | FGS-exact rate  L∞ (blank) | HC1 rate  PASS    L∞")
    print(
        f"{_fmt(row['accuracy'], True)} | "
        f"{_fmt(row.get('fgs_rate'), True)} {_fmt(row.get('fgs_pass_mean'))} {_fmt(row.get('fgs_linf_mean'))}"
        f"±{_fmt(row.get('fgs_linf_std'))} ({row.get('fgs_blank', '-')}) | "
        f"{_fmt(row.get('fgs_exact_rate'), True)} {_fmt(row.get('fgs_exact_linf_mean'))} "
        f"({row.get('fgs_exact_blank', '-')}) | "
        f"{_fmt(row.get('hc1_rate'), True)} {_fmt(row.get('hc1_pass_mean'))} {_fmt(row.get('hc1_linf_mean'))}"
        f"±{_fmt(row.get('hc1_linf_std'))}"
    )
    pgd = {k: v for k, v in row.items() if k.startswith("pgd_") and "_rate_" in k}
    if pgd:
        print(f"PGD ({config.pgd_steps} steps) success: " + ", ".join(f"{k[4:]} {v:.2f}%" for k, v in pgd.items()))
    if "pgd_min_rate" in row:
        print(
            f"PGD-margin minimal budget: success {_fmt(row['pgd_min_rate'], True)} within "
            f"{config.pgd_min_max_budget:g}, L∞ {_fmt(row['pgd_min_linf_mean'])}±{_fmt(row['pgd_min_linf_std'])}, "
            f"PASS {_fmt(row['pgd_min_pass_mean'])}"
        )
    square = {k: v for k, v in row.items() if k.startswith("square_rate_")}
    if square:
        print(
            f"Square ({config.square_queries} queries) success: "
            + ", ".join(f"{k[12:]} {v:.2f}%" for k, v in square.items())
        )
    aa = {k.removeprefix("autoattack_rate_eps"): v for k, v in row.items() if k.startswith("autoattack_rate_eps")}
    for eps, rate in aa.items():
        by = ", ".join(f"{a} {n}" for a, n in row[f"autoattack_fooled_by_eps{eps}"].items())
        print(f"AutoAttack (standard) at ε {eps}: success {_fmt(rate, True)}, robust accuracy "
              f"{_fmt(row[f'autoattack_robust_accuracy_eps{eps}'], True)} of all images (fooled first by: {by})")
    if "curves" in row:
        c = row["curves"]
        print("robust accuracy (% of all images) | ε = " + " ".join(f"{e:>5g}" for e in c["epsilons"]))
        for name, data in list(c["attacks"].items()) + [("best", c["best"])]:
            print(f"  {name:<32} | " + " ".join(f"{a:5.1f}" for a in data["robust_accuracy"]))
        m = row["masking"]
        print(
            f"masking: CE loss == 0 (float32) on {_fmt(m['ce_loss_zero_share'])}%, CE input gradient all zero on "
            f"{_fmt(m['ce_grad_zero_share'])}%, median logit margin {_fmt(m['margin_median'])}"
        )
        print(f"verdict: {m['verdict']}")


if __name__ == "__main__":
    main()
