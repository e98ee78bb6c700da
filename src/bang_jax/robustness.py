"""Robust accuracy over the budget, and the diagnostics that reveal gradient masking.

A defence that hides its gradient (Athalye, Carlini, Wagner 2018; Carlini et al. 2019, "On evaluating adversarial
robustness") looks robust to gradient attacks and not to an attack that never uses a gradient. This module puts
the paper's FGS beside attacks that a saturated softmax cannot fool — PGD on the logit margin and the
gradient-free Square attack — as curves over the L∞ budget, and turns the tell-tale numbers into a verdict::

    logits_fn = jax.jit(lambda x: model.apply(variables, x))
    curves = robustness_curves(logits_fn, images, labels, epsilons=(0, 8, 16, 32, 64))
    report = masking_report(logits_fn, images, labels, curves=curves)
    print(report["verdict"])
    plot_curves({"R0": curves_r0, "B1": curves_b1}, "curves.png")   # one panel per model, side by side

Everything returned is JSON-able (lists, floats, ints, strings, None).

Definitions (also written into the returned dicts):

* **Robust accuracy at ε** = % of **all** evaluated images that are classified correctly and for which the attack
  found no adversarial with L∞ ≤ ε (pixels 0..255). Images misclassified when clean count as not robust, so at
  ε = 0 it is the clean accuracy.
* **Success rate at ε** = % of the **attacked** images (those classified correctly when clean) fooled with
  L∞ ≤ ε — the convention of every ``rate`` in :mod:`bang_jax.attacks` and :mod:`bang_jax.evaluate`.
* An adversarial found at a smaller budget counts at every larger one, so every curve is monotone. The
  fixed-budget attacks (PGD, Square) therefore run at the budgets in increasing order, each on the images not
  fooled yet.
* FGS curves come from the paper's minimal-step line search (docs/semantics.md) along the FGS direction, searched up to
  the largest ε: success at ε iff the smallest successful step has L∞ ≤ ε. One search gives the whole curve, and
  it is the paper's own success criterion. (A single fixed step of size ε, :func:`~bang_jax.attacks.fixed_step_attack`,
  can miss where a smaller step would succeed.)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bang_jax.attacks import (
    _margin_loss,
    fgs_direction,
    line_search_attack,
    pgd_attack,
    square_attack,
)
from bang_jax.autoattack import AUTOATTACK_STANDARD, autoattack, check_classes

__all__ = [
    "ATTACKS",
    "DEFAULT_ATTACKS",
    "DEFAULT_EPSILONS",
    "GRADIENT_ATTACKS",
    "masking_report",
    "plot_curves",
    "robustness_curves",
    "validate_curve_args",
]

ATTACKS = ("fgs", "fgs_exact", "pgd_ce", "pgd_margin", "square", "autoattack")
DEFAULT_ATTACKS = ("fgs", "fgs_exact", "pgd_ce", "pgd_margin", "square")  # AutoAttack (minutes) is asked for by name
GRADIENT_ATTACKS = ("fgs", "fgs_exact", "pgd_ce", "pgd_margin")
# The iterative attack on the cross-entropy: Square beating it (but not PGD-margin) means the CE gradient is
# masked. One-step FGS is not compared this way: any iterative attack beats it, masked or not.
CE_ITERATIVE_ATTACK = "pgd_ce"
LOSS_ZERO_THRESHOLD = 10.0  # % of attacked images with a float32 CE loss of exactly 0 that counts as masking
DEFAULT_EPSILONS = (0.0, 2.0, 4.0, 8.0, 16.0, 24.0, 32.0, 48.0, 64.0)
ATTACK_LABELS = {
    "fgs": "FGS (paper rule)",
    "fgs_exact": "FGS (exact gradient)",
    "pgd_ce": "PGD cross-entropy",
    "pgd_margin": "PGD logit margin",
    "square": "Square (no gradient)",
    "autoattack": "AutoAttack (standard)",
    "best": "best of all",
}
# ln(2^24): above this logit margin the float32 softmax probability of the true class rounds to 1.0
FLOAT32_SATURATION_MARGIN = float(np.log(2.0**24))
_TOL = 1e-3  # pixels: float rounding of clip(x0 ± ε)

DEFINITIONS = {
    "robust_accuracy": "% of ALL evaluated images classified correctly with no adversarial found at L∞ ≤ ε "
                       "(pixels 0..255); clean errors count as not robust",
    "success_rate": "% of attacked images (correctly classified when clean) fooled at L∞ ≤ ε",
    "monotone": "an adversarial found at a smaller budget counts at every larger one",
    "fgs": "paper's minimal-step line search along sign ∇CE, searched to the largest ε (success at ε iff the "
           "smallest successful step has L∞ ≤ ε); 'fgs' blanks when float32 p_true == 1, 'fgs_exact' does not",
}

LogitsFn = Callable[[jax.Array], jax.Array]


def validate_curve_args(epsilons, attacks, *, square_queries: int = 1000, pgd_steps: int = 40):
    """Check the arguments of :func:`robustness_curves` (raises ``ValueError``); returns (epsilons, attacks).

    Call it before starting any long computation, so a typo fails at once and not after the first attack.
    """
    attacks = tuple(attacks)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}: choose from {', '.join(ATTACKS)}")
    if not attacks:
        raise ValueError("no attack given")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"attack listed twice: {attacks}")
    eps = [float(e) for e in epsilons]
    if not eps:
        raise ValueError("no epsilon given")
    if not all(math.isfinite(e) and e >= 0 for e in eps):
        raise ValueError(f"epsilons must be finite non-negative numbers of pixels, got {list(epsilons)}")
    if int(square_queries) != square_queries or square_queries < 1:
        raise ValueError(f"square_queries must be a positive integer, got {square_queries}")
    if int(pgd_steps) != pgd_steps or pgd_steps < 1:
        raise ValueError(f"pgd_steps must be a positive integer, got {pgd_steps}")
    return tuple(sorted(set(eps))), attacks


def _predict(logits_fn, x, batch_size):
    return np.concatenate([np.asarray(logits_fn(jnp.asarray(x[i : i + batch_size])))
                           for i in range(0, len(x), batch_size)])


def _min_linf(attack, logits_fn, x, y, epsilons, *, pgd_steps, square_queries, square_p_init, seed, batch_size,
              winners=None, first=None):
    """Per attacked image: L∞ of the smallest adversarial found at the budgets ``epsilons`` (inf: none).
    For AutoAttack, ``winners`` (a list) receives per budget how many images each of its attacks fooled there, and
    ``first`` (an object array, one per image) the attack that fooled each image."""
    n = len(x)
    found = np.full(n, np.inf)
    positive = [e for e in epsilons if e > 0]
    if not positive or not n:
        return found
    if attack in ("fgs", "fgs_exact"):
        d, blank = fgs_direction(logits_fn, x, y, exact=attack == "fgs_exact")
        res = line_search_attack(logits_fn, x, y, np.asarray(d), blank=np.asarray(blank),
                                 max_step=int(math.ceil(max(positive))), batch_size=batch_size)
        found[res.success] = res.linf[res.success]
        return found
    for k, eps in enumerate(positive):
        todo = np.flatnonzero(found > eps + _TOL)
        if not todo.size:
            break
        if attack == "autoattack":
            res = autoattack(logits_fn, x[todo], y[todo], eps, seed=seed + k, batch_size=batch_size)
            fooled = ~res.robust
            found[todo[fooled]] = res.linf[fooled]
            if winners is not None:
                winners.append({"epsilon": eps} | res.fooled_by())
            if first is not None:
                first[todo[fooled]] = res.attack[fooled]
            continue
        if attack == "square":
            res = square_attack(logits_fn, x[todo], y[todo], epsilon=eps, queries=square_queries,
                                p_init=square_p_init, seed=seed + k, batch_size=batch_size)
        else:
            res = pgd_attack(logits_fn, x[todo], y[todo], epsilon=eps, steps=pgd_steps, loss=attack[4:],
                             seed=seed + k, batch_size=batch_size)
        found[todo[res.success]] = res.linf[res.success]
    return found


def _curve(min_linf_all, correct, epsilons):
    fooled = [(min_linf_all <= e + _TOL) | ~correct for e in epsilons]
    n, k = len(correct), int(correct.sum())
    return {
        "robust_accuracy": [float(100.0 * np.mean(~f)) if n else None for f in fooled],
        "success_rate": [float(100.0 * np.mean(f[correct])) if k else None for f in fooled],
    }


def robustness_curves(
    logits_fn: LogitsFn,
    images,
    labels,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    *,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    pgd_steps: int = 40,
    square_queries: int = 1000,
    square_p_init: float = 0.8,
    seed: int = 0,
    batch_size: int = 500,
    progress: bool = False,
) -> dict:
    """Robust accuracy vs the L∞ budget ε (pixels) of ``logits_fn`` on ``images`` [N, H, W, C] (pixels 0..255).

    Attacks (names of :data:`ATTACKS`; default :data:`DEFAULT_ATTACKS`, all but AutoAttack): ``fgs`` (paper rule:
    blank when float32 p_true == 1) and ``fgs_exact`` by the minimal-step line search; ``pgd_ce`` and
    ``pgd_margin`` (:func:`~bang_jax.attacks.pgd_attack`, ``pgd_steps`` steps of ε/4, random start); ``square``
    (:func:`~bang_jax.attacks.square_attack`, ``square_queries`` queries per image and budget); ``autoattack``
    (:func:`bang_jax.autoattack.autoattack`, the standard ensemble; its entry also holds ``fooled_by``: per budget,
    how many images APGD-CE, APGD-T, FAB-T and Square each fooled first there). See the module docstring for the
    definitions.

    Returns a JSON-able dict: ``epsilons``; ``images``, ``attacked``, ``clean_accuracy``; ``attacks[name]`` with
    ``robust_accuracy`` and ``success_rate`` (lists over ``epsilons``), ``min_linf`` (per image: L∞ of the
    smallest adversarial found, 0 for clean errors, None where none was found up to the largest ε),
    ``seconds`` and ``settings``; ``best`` — per image the smallest L∞ over all attacks (the curve of the
    strongest combination); ``definitions``.
    """
    epsilons, attacks = validate_curve_args(epsilons, attacks, square_queries=square_queries, pgd_steps=pgd_steps)
    x_all = np.asarray(images, np.float32)
    y_all = np.asarray(labels, np.int32)
    if x_all.ndim != 4 or len(x_all) != len(y_all):
        raise ValueError(f"images must be [N, H, W, C] with one label each, got {x_all.shape} and {y_all.shape}")
    clean = _predict(logits_fn, x_all, batch_size)
    if "autoattack" in attacks:
        check_classes(clean.shape[1])
    correct = np.argmax(clean, axis=1) == y_all
    x, y = x_all[correct], y_all[correct]
    out = {
        "epsilons": list(epsilons),
        "images": int(len(y_all)),
        "attacked": int(correct.sum()),
        "clean_accuracy": float(100.0 * correct.mean()) if len(y_all) else None,
        "definitions": DEFINITIONS,
        "attacks": {},
    }
    best = np.where(correct, np.inf, 0.0)
    for attack in attacks:
        t0 = time.perf_counter()
        winners, first = [], np.full(len(x), None, dtype=object)
        found = _min_linf(attack, logits_fn, x, y, epsilons, pgd_steps=pgd_steps, square_queries=square_queries,
                          square_p_init=square_p_init, seed=seed, batch_size=batch_size, winners=winners, first=first)
        seconds = time.perf_counter() - t0
        min_linf = np.zeros(len(y_all))
        min_linf[correct] = found
        best = np.minimum(best, min_linf)
        settings = {}
        if attack.startswith("pgd"):
            settings = {"steps": pgd_steps, "step_size": "epsilon/4", "random_start": True, "seed": seed}
        elif attack == "square":
            settings = {"queries": square_queries, "p_init": square_p_init, "seed": seed}
        elif attack == "autoattack":
            settings = {"version": "standard", "attacks": list(AUTOATTACK_STANDARD), "iterations": 100,
                        "square_queries": 5000, "seed": f"{seed} + the budget's index among the positive budgets"}
        else:
            settings = {"line_search_max_step": int(math.ceil(max(epsilons)))}
        out["attacks"][attack] = _curve(min_linf, correct, epsilons) | {
            "min_linf": [None if not np.isfinite(v) else float(v) for v in min_linf],
            "seconds": round(seconds, 2),
            "settings": settings,
        }
        if attack == "autoattack":
            by_image = np.full(len(y_all), None, dtype=object)
            by_image[correct] = first
            out["attacks"][attack] |= {"fooled_by": winners, "fooled_first_by": [
                None if a is None else str(a) for a in by_image]}
        if progress:
            ra = ", ".join(f"{e:g}: {a:.1f}%" for e, a in zip(epsilons, out["attacks"][attack]["robust_accuracy"]))
            print(f"  {attack:<10} robust accuracy {ra}  ({seconds:.1f} s)", flush=True)
    out["best"] = _curve(best, correct, epsilons)
    return out


def _min_linf_array(curves, attack):
    return np.array([np.inf if v is None else v for v in curves["attacks"][attack]["min_linf"]], np.float64)


def _margins_and_gradients(logits_fn, x, y, batch_size):
    """Per image: logit margin z_y − max_{j≠y} z_j, float32 CE loss == 0, float32 CE input gradient all zero."""

    def ce(v, labels):
        z = logits_fn(v).astype(jnp.float32)
        return -jnp.take_along_axis(jax.nn.log_softmax(z), labels[:, None], axis=1)[:, 0]

    @jax.jit
    def stats(v, labels):
        loss, vjp = jax.vjp(lambda a: ce(a, labels), v)
        g = vjp(jnp.ones_like(loss))[0]
        margin = -_margin_loss(logits_fn(v), labels)
        return margin, loss == 0.0, jnp.all(g.reshape(g.shape[0], -1) == 0.0, axis=1)

    outs = [stats(jnp.asarray(x[i : i + batch_size]), jnp.asarray(y[i : i + batch_size]))
            for i in range(0, len(x), batch_size)]
    return tuple(np.concatenate([np.asarray(o[k]) for o in outs]) for k in range(3))


def _paired(square_linf, gradient_linf, epsilons, attacked: int) -> list[dict]:
    """Per ε: the images only Square fooled and only the gradient attacks fooled (L∞ of each one's smallest
    adversarial per image, inf: none), and whether Square's lead is beyond sampling noise (paired:
    only − other > 2·sqrt(only + other) and ≥ max(2, 1 % of the attacked images))."""
    rows = []
    for e in epsilons:
        s, g = square_linf <= e + _TOL, gradient_linf <= e + _TOL
        only_s, only_g = int(np.sum(s & ~g)), int(np.sum(g & ~s))
        rows.append({"epsilon": e, "square_only": only_s, "gradient_only": only_g,
                     "significant": bool(only_s - only_g > 2 * math.sqrt(only_s + only_g)
                                         and only_s - only_g >= max(2, 0.01 * attacked))})
    return rows


def masking_report(
    logits_fn: LogitsFn,
    images,
    labels,
    *,
    curves: Mapping | None = None,
    margin_edges: Sequence[float] = (0, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256),
    batch_size: int = 500,
    **curve_kwargs,
) -> dict:
    """Gradient-masking diagnostics of ``logits_fn`` on the correctly classified ``images`` (pixels 0..255).

    ``curves``: the output of :func:`robustness_curves` on the same images (computed with ``curve_kwargs`` when
    None); the gap needs ``square`` and at least one gradient attack in it.

    Returns a JSON-able dict over the attacked images (classified correctly when clean):

    * ``ce_loss_zero_share`` — % whose float32 cross-entropy is exactly 0 (p_true rounds to 1.0): the paper's
      FGS gives up on them ("blank gradient").
    * ``ce_grad_zero_share`` — % whose float32 autodiff input gradient of the cross-entropy is all zeros.
    * ``margin_median``, ``margin_quantiles`` (10/25/50/75/90 %), ``margin_histogram`` (``edges``, ``counts``;
      the last bin is open), ``margin_saturated_share`` — % with margin > ln 2²⁴ ≈ 16.6, where float32 p_true
      rounds to 1.
    * ``gap`` — per ε: success of ``square`` and of the union of the gradient attacks (% of attacked), their
      difference in points, the images fooled only by Square / only by a gradient attack, and whether Square's
      lead is beyond sampling noise (paired: only − other > 2·sqrt(only + other) and ≥ max(2, 1 % of attacked)).
      ``gap_vs`` gives Square's lead over each gradient attack alone, with the same test.
    * ``autoattack`` (when the curves hold AutoAttack) — ``fooled_by``: per ε, how many images each of its
      attacks fooled first; ``square_vs_gradient``: per ε, the images only AutoAttack's Square fooled (no
      gradient attack, AutoAttack's or the curves', did) against those only a gradient attack fooled, with the
      same significance test as ``gap``.
    * ``verdict`` — one line computed from these numbers: "gradient masking" when Square beats all gradient
      attacks together at some ε, or when AutoAttack's Square does so significantly; else "cross-entropy
      masking" when Square beats PGD on the cross-entropy (the iterative CE attack; one-step FGS is beaten by any
      iterative attack, so it is not the test) or when ≥ 10 % of the images have a float32 CE loss of exactly 0;
      else "no sign of gradient masking". It ends with the zero-loss share and the best attack's robust accuracy
      at the largest ε (Carlini et al.: it should reach 0 there).
    """
    x_all = np.asarray(images, np.float32)
    y_all = np.asarray(labels, np.int32)
    if curves is None:
        curves = robustness_curves(logits_fn, x_all, y_all, batch_size=batch_size, **curve_kwargs)
    if curves["images"] != len(y_all):
        raise ValueError(f"curves were computed on {curves['images']} images, got {len(y_all)}")
    correct = np.argmax(_predict(logits_fn, x_all, batch_size), axis=1) == y_all
    x, y = x_all[correct], y_all[correct]
    k = int(correct.sum())
    margin, loss_zero, grad_zero = _margins_and_gradients(logits_fn, x, y, batch_size) if k else (np.zeros(0),) * 3
    edges = [float(e) for e in margin_edges]
    counts = np.histogram(np.clip(margin, edges[0], None), bins=edges + [np.inf])[0] if k else np.zeros(len(edges))

    def pct(mask):
        return float(100.0 * np.mean(mask)) if k else None

    report = {
        "attacked": k,
        "ce_loss_zero_share": pct(loss_zero),
        "ce_grad_zero_share": pct(grad_zero),
        "margin_median": float(np.median(margin)) if k else None,
        "margin_quantiles": {str(q): float(np.percentile(margin, q)) for q in (10, 25, 50, 75, 90)} if k else None,
        "margin_histogram": {"edges": edges, "counts": [int(c) for c in counts]},
        "margin_saturated_share": pct(margin > FLOAT32_SATURATION_MARGIN),
        "definitions": {
            "shares": "% of attacked images (correctly classified when clean)",
            "gap": "Square success minus the success of the union of the gradient attacks, points of % attacked; "
                   "significant if square_only − gradient_only > 2·sqrt(square_only + gradient_only) and "
                   "≥ max(2, 1% of attacked)",
        },
    }
    eps = curves["epsilons"]
    grad_attacks = [a for a in GRADIENT_ATTACKS if a in curves["attacks"]]
    have_gap = "square" in curves["attacks"] and grad_attacks
    flags = []
    if have_gap:
        sq = _min_linf_array(curves, "square")[correct]
        union = np.min([_min_linf_array(curves, a)[correct] for a in grad_attacks], axis=0)

        def compare(other):
            rows = []
            for row in _paired(sq, other, eps, k):
                s, g = sq <= row["epsilon"] + _TOL, other <= row["epsilon"] + _TOL
                rows.append({"epsilon": row["epsilon"], "square": pct(s), "gradient": pct(g),
                             "gap": pct(s) - pct(g) if k else None} | row)
            return rows

        report["gap"] = {"gradient_attacks": grad_attacks, "rows": compare(union)}
        report["gap_vs"] = {a: compare(_min_linf_array(curves, a)[correct]) for a in grad_attacks}
        beats_all = [r for r in report["gap"]["rows"] if r["significant"]]
        beats_ce = {a: [r for r in report["gap_vs"][a] if r["significant"]] for a in grad_attacks
                    if a == CE_ITERATIVE_ATTACK}
        if beats_all:
            worst = max(beats_all, key=lambda r: r["gap"])
            where = ", ".join(f"{r['epsilon']:g}" for r in beats_all)
            flags.append(("gradient masking", f"gradient-free Square beats all gradient attacks together at "
                          f"ε = {where} (by up to {worst['gap']:.1f} points, ε = {worst['epsilon']:g})"))
        for a, rows in beats_ce.items():
            if rows and not beats_all:
                worst = max(rows, key=lambda r: r["gap"])
                flags.append(("cross-entropy masking", f"Square beats {ATTACK_LABELS[a]} by "
                              f"{worst['gap']:.1f} points at ε = {worst['epsilon']:g}"))
    else:
        report["gap"] = None
        report["gap_vs"] = None
    if "autoattack" in curves["attacks"]:
        # AutoAttack runs Square only on what APGD-CE, APGD-T and FAB-T left robust. Its Square wins that no
        # gradient attack found either (neither AutoAttack's nor the curves' own) are images only a gradient-free
        # search could fool: RobustBench's warning sign, tested like Square's gap above.
        entry = curves["attacks"]["autoattack"]
        aa = _min_linf_array(curves, "autoattack")[correct]
        first = np.array(entry.get("fooled_first_by", [None] * len(y_all)), dtype=object)[correct]
        by_square = np.where(first == "square", aa, np.inf)
        gradient = np.where((first != "square") & (first != None), aa, np.inf)  # noqa: E711 - object array
        for a in grad_attacks:
            gradient = np.minimum(gradient, _min_linf_array(curves, a)[correct])
        rows = _paired(by_square, gradient, eps, k)
        report["autoattack"] = {"fooled_by": entry.get("fooled_by", []), "square_vs_gradient": rows}
        wins = [r for r in rows if r["significant"]]
        if wins:
            where = ", ".join(f"{r['square_only']} at ε = {r['epsilon']:g}" for r in wins)
            flags.append(("gradient masking", "inside AutoAttack, gradient-free Square fooled images that no "
                          f"gradient attack (APGD-CE, APGD-T, FAB-T, nor the curves' own) could ({where})"))
    if k and report["ce_loss_zero_share"] >= LOSS_ZERO_THRESHOLD:
        flags.insert(0, ("cross-entropy masking", f"float32 cross-entropy exactly 0 on "
                         f"{report['ce_loss_zero_share']:.1f}% of attacked images (median logit margin "
                         f"{report['margin_median']:.1f}: blank gradient for the paper's FGS)"))
    best_last = curves["best"]["robust_accuracy"][-1]
    tail = []
    if k and report["ce_loss_zero_share"] < LOSS_ZERO_THRESHOLD:
        tail.append(f"float32 CE loss exactly 0 on {report['ce_loss_zero_share']:.1f}%")
    if best_last is not None:
        tail.append(f"best attack's robust accuracy at ε = {eps[-1]:g}: {best_last:.1f}%")
    tail = "; ".join(tail)
    if not flags:
        sq_note = "" if have_gap else " (no Square/gradient pair to compare)"
        verdict = f"no sign of gradient masking{sq_note}"
    else:
        kind = "gradient masking" if any(f[0] == "gradient masking" for f in flags) else "cross-entropy masking"
        verdict = kind + ": " + "; ".join(f[1] for f in flags)
        if kind == "cross-entropy masking" and have_gap:
            verdict += "; the logit-margin attacks are not masked (Square does not beat them together)"
    report["verdict"] = verdict + (f"; {tail}" if tail else "")
    return report


_CURVE_STYLES = {"fgs": ("tab:red", "o"), "fgs_exact": ("tab:orange", "s"), "pgd_ce": ("tab:purple", "v"),
                "pgd_margin": ("tab:blue", "^"), "square": ("tab:green", "D"), "autoattack": ("tab:brown", "*")}
_CURVE_DPI = 150
_PANEL_INCHES = (4.2, 3.3)  # one model's panel
_LEGEND_INCHES = 2.1  # the legend's column, right of the panels


def _curves_figure(curves_by_model: Mapping[str, Mapping], *, ncols: int | None = None, title: str | None = None,
                   attacks: Sequence[str] | None = None):
    """The figure of :func:`plot_curves` (not saved): panels in a grid, one legend to the right of them all."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    items = [(name, c.get("curves", c)) for name, c in curves_by_model.items()]
    if not items:
        raise ValueError("no curves to plot")
    # side by side up to three models, then rows of at most three (four models: 2 × 2)
    ncols = ncols or (len(items) if len(items) <= 3 else math.ceil(len(items) / math.ceil(len(items) / 3)))
    nrows = math.ceil(len(items) / ncols)
    size = (_PANEL_INCHES[0] * ncols + _LEGEND_INCHES, _PANEL_INCHES[1] * nrows + (0.4 if title else 0.0))
    fig, axes = plt.subplots(nrows, ncols, figsize=size, sharey=True, squeeze=False, layout="constrained")
    legend = {}  # label → handle, over every panel (models may have different attacks)
    for ax, (name, c) in zip(axes.flat, items):
        eps = c["epsilons"]
        for attack, data in c["attacks"].items():
            if attacks is not None and attack not in attacks:
                continue
            color, marker = _CURVE_STYLES.get(attack, (None, "."))
            ax.plot(eps, data["robust_accuracy"], marker=marker, ms=4, lw=1.4, color=color,
                    label=ATTACK_LABELS.get(attack, attack))
        ax.plot(eps, c["best"]["robust_accuracy"], "k--", lw=1.1, label=ATTACK_LABELS["best"])
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
        ax.set_title(f"{name} ({c['images']} images)", fontsize=10)
        ax.set_xlabel("L∞ budget ε (pixels of 255)", fontsize=9)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("robust accuracy (%)", fontsize=9)
    for ax in list(axes.flat)[len(items):]:
        ax.axis("off")
    best = legend.pop(ATTACK_LABELS["best"])  # the best of all last
    legend[ATTACK_LABELS["best"]] = best
    # outside the panels, right of them: the legend never covers a curve
    fig.legend(list(legend.values()), list(legend), loc="outside right center", fontsize=9, title="attack",
               title_fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_curves(curves_by_model: Mapping[str, Mapping], path, *, ncols: int | None = None, title: str | None = None,
                attacks: Sequence[str] | None = None):
    """Robust accuracy vs ε, one panel per model, side by side; writes ``path`` (PNG) and returns it.

    ``curves_by_model`` maps a panel title (e.g. "LeNet R0") to a :func:`robustness_curves` dict (or to a dict
    holding one under ``"curves"``, as :func:`bang_jax.evaluate.evaluate_model` returns). The dashed black line is
    the best of all attacks per image. Up to three models sit side by side, more wrap into rows (``ncols`` sets
    the columns); one legend sits right of the panels, never on a curve, and inside the saved image (150 dpi,
    cropped to its content: about 950 pixels wide for one model).
    """
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig = _curves_figure(curves_by_model, ncols=ncols, title=title, attacks=attacks)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_CURVE_DPI, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return path


def main(argv=None):
    """``python -m bang_jax.robustness OUT.png A.json B.json … [--names R0,B1] [--ncols 2]``: plot saved curves.

    Each JSON is a :func:`robustness_curves` dict, an ``evaluate --curves --json`` row (curves under ``"curves"``)
    or a list of such rows (a run's ``results.json``: one panel per row). Panels are named by ``--names`` (one per
    panel) or by the file stem (and the row's id or model for a list).
    """
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("out", help="PNG to write")
    p.add_argument("json", nargs="+", help="curves JSON files (robustness_curves or evaluate --curves --json)")
    p.add_argument("--names", help="comma-separated panel titles, one per panel")
    p.add_argument("--ncols", type=int)
    p.add_argument("--title")
    args = p.parse_args(argv)
    panels = []
    for f in args.json:
        try:
            obj = json.loads(Path(f).read_text())
        except (OSError, ValueError) as err:
            raise SystemExit(f"cannot read curves from {f}: {err}") from None
        rows = obj if isinstance(obj, list) else [obj]
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or "attacks" not in row.get("curves", row):
                raise SystemExit(f"no curves in {f}" + (f" (row {i})" if len(rows) > 1 else "")
                                 + ": run evaluate with --curves")
            label = row.get("id") or row.get("model") or str(i)
            panels.append((Path(f).stem if len(rows) == 1 else f"{Path(f).stem}/{label}", row))
    names = args.names.split(",") if args.names else [n for n, _ in panels]
    if len(names) != len(panels):
        raise SystemExit(f"{len(names)} names for {len(panels)} panels ({len(args.json)} files)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SystemExit(f"two panels would be called {', '.join(duplicates)}: name them with --names")
    print(plot_curves({n: row for n, (_, row) in zip(names, panels)}, args.out, ncols=args.ncols, title=args.title))


if __name__ == "__main__":
    main()
