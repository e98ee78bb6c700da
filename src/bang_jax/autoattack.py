"""AutoAttack in JAX: APGD on the cross-entropy and the DLR loss, targeted APGD, targeted FAB, and the ensemble.

Croce & Hein (2020), "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks". APGD is L∞ PGD without a step-size to tune: it starts at step 2ε, adds momentum (α = 0.75), and at
checkpoints (after 22% of the iterations, then at ever shorter intervals, at least 6%) halves an image's step and
restarts it from its best point when its loss rose in fewer than 75% of the steps since the last checkpoint, or
when neither its step was halved nor its best loss improved since then. The losses:

* ``'ce'`` — the cross-entropy;
* ``'dlr'`` — the Difference of Logits Ratio ``−(z_y − max_{i≠y} z_i) / (z_π1 − z_π3)`` (π: logits sorted
  descending), invariant to shifting and scaling the logits, so a saturated softmax cannot hide the gradient;
* ``'dlr_targeted'`` — ``−(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2)`` towards a target class ``t``.

:func:`apgd_targeted` runs the targeted loss against the 2nd, 3rd, … highest-scoring classes of the clean image in
turn (AutoAttack's standard: 9 targets, 100 iterations each), attacking only the images still robust.

:func:`fab_targeted` is FAB (Croce & Hein 2020, "Minimally distorted adversarial examples with a fast adaptive
boundary attack") towards the same targets: it projects onto the linearised decision boundary (L∞, inside the
pixel box: :func:`project_linf_box`), stopping an image once it has an adversarial within ε (``minimise=True``:
every iteration, keeping the smallest). :func:`autoattack` runs the standard
sequence (APGD-CE, APGD-T, FAB-T, Square with 5,000 queries) on the images each earlier attack left robust.

Every image has its own PRNG stream (the seed folded with its index in the input), so results do not depend on
batching. Images are ``[N, H, W, C]`` in the model's pixel units, clipped to ``bounds`` (default 0..255); ε is in
the same units. Success means misclassified (any class but the label), as in AutoAttack.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bang_jax.attacks import (
    PGD_CPU_CHUNK,
    AttackResult,
    _image_keys,
    _padded,
    _per_image_budget,
    _per_pixel,
    steps_loop,
)

__all__ = ["APGD_LOSSES", "AUTOATTACK_STANDARD", "AutoAttackResult", "apgd", "apgd_checkpoints", "apgd_targeted",
           "autoattack", "check_classes", "dlr_loss", "dlr_targeted_loss", "fab_targeted", "project_linf_box"]

APGD_LOSSES = ("ce", "dlr", "dlr_targeted")


def dlr_loss(logits, labels):
    """Per-example DLR loss ``−(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e-12)`` (positive iff misclassified)."""
    srt = jnp.sort(logits, axis=-1)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
    z_y = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    z_other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
    return -(z_y - z_other) / (srt[..., -1] - srt[..., -3] + 1e-12)


def dlr_targeted_loss(logits, labels, targets):
    """Per-example targeted DLR loss ``−(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e-12)``."""
    srt = jnp.sort(logits, axis=-1)
    z_y = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    z_t = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return -(z_y - z_t) / (srt[..., -1] - 0.5 * (srt[..., -3] + srt[..., -4]) + 1e-12)


def apgd_checkpoints(n_iter: int) -> np.ndarray:
    """Booleans ``[n_iter]``: True at the iterations after which APGD checks its step size (the reference
    implementation's schedule: first after ``max(⌊0.22·n⌋, 1)`` iterations, each interval ``max(⌊0.03·n⌋, 1)``
    shorter than the last, never below ``max(⌊0.06·n⌋, 1)``)."""
    flags = np.zeros(n_iter, bool)
    k, counter = max(int(0.22 * n_iter), 1), 0
    decr, k_min = max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
    for i in range(n_iter):
        counter += 1
        if counter == k:
            flags[i], counter, k = True, 0, max(k - decr, k_min)
    return flags


def _interval_lengths(flags: np.ndarray) -> np.ndarray:
    """For each checkpoint iteration, the number of iterations since the previous one (else 0)."""
    out, last = np.zeros(len(flags), np.int32), -1
    for i in np.flatnonzero(flags):
        out[i], last = i - last, i
    return out


@functools.lru_cache(maxsize=32)
def _make_apgd_fns(logits_fn: Callable, loss: str, n_iter: int, bounds: tuple[float, float]):
    """Jitted ``start`` and ``steps`` of APGD for ``logits_fn`` (cached per model, loss, iterations, bounds)."""
    lo, hi = bounds
    flags = jnp.asarray(apgd_checkpoints(n_iter))
    lengths = jnp.asarray(_interval_lengths(apgd_checkpoints(n_iter)))

    def losses(x, labels, targets):
        z = logits_fn(x)
        if loss == "ce":
            per = -jnp.take_along_axis(jax.nn.log_softmax(z), labels[:, None], axis=1)[:, 0]
        elif loss == "dlr":
            per = dlr_loss(z, labels)
        else:
            per = dlr_targeted_loss(z, labels, targets)
        return jnp.sum(per), (per, z)

    value_and_grad = jax.value_and_grad(losses, has_aux=True)

    def evaluate(x, labels, targets):
        (_, (per, z)), g = value_and_grad(x, labels, targets)
        return per, g, jnp.argmax(z, axis=-1) != labels

    @jax.jit
    def start(seed, index, x0, labels, targets, epsilon):
        keys = _image_keys(seed, index)
        t = jax.vmap(lambda k: jax.random.uniform(k, x0.shape[1:], jnp.float32, -1.0, 1.0))(keys)
        t = t / jnp.max(jnp.abs(t).reshape(t.shape[0], -1), axis=1).reshape((-1,) + (1,) * (x0.ndim - 1))
        x = jnp.clip(x0 + epsilon * t, lo, hi)
        per, g, fooled = evaluate(x, labels, targets)
        b = x0.shape[0]
        return {
            "x": x, "x_prev": x, "grad": g, "step": 2.0 * epsilon * jnp.ones_like(x[:, :1, :1, :1]),
            "x_best": x, "grad_best": g, "loss_best": per, "loss_prev": per, "increases": jnp.zeros(b, jnp.int32),
            "loss_best_check": per, "reduced_check": jnp.ones(b, bool), "x_adv": x, "fooled": fooled,
        }

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def steps(k, unroll, i0, state, x0, labels, targets, epsilon):
        def body(j, s):
            i = i0 + j
            alpha = jnp.where(i > 0, 0.75, 1.0)
            x, x_prev = s["x"], s["x_prev"]
            z = jnp.clip(jnp.clip(x + s["step"] * jnp.sign(s["grad"]), x0 - epsilon, x0 + epsilon), lo, hi)
            x_new = x + (z - x) * alpha + (x - x_prev) * (1.0 - alpha)
            x_new = jnp.clip(jnp.clip(x_new, x0 - epsilon, x0 + epsilon), lo, hi)
            per, g, fooled = evaluate(x_new, labels, targets)
            wide = lambda m: m.reshape((-1,) + (1,) * (x0.ndim - 1))  # noqa: E731
            x_adv = jnp.where(wide(fooled), x_new, s["x_adv"])
            better = per > s["loss_best"]
            x_best = jnp.where(wide(better), x_new, s["x_best"])
            grad_best = jnp.where(wide(better), g, s["grad_best"])
            loss_best = jnp.where(better, per, s["loss_best"])
            increases = s["increases"] + (per > s["loss_prev"]).astype(jnp.int32)
            # the step-size check (only at checkpoint iterations)
            check = flags[i]
            oscillating = increases <= 0.75 * lengths[i]
            no_gain = ~s["reduced_check"] & (s["loss_best_check"] >= loss_best)
            halve = check & (oscillating | no_gain)
            step = jnp.where(wide(halve), s["step"] / 2.0, s["step"])
            x_next = jnp.where(wide(halve), x_best, x_new)
            grad_next = jnp.where(wide(halve), grad_best, g)
            return {
                "x": x_next, "x_prev": x, "grad": grad_next, "step": step, "x_best": x_best, "grad_best": grad_best,
                "loss_best": loss_best, "loss_prev": per,
                "increases": jnp.where(check, 0, increases),
                "loss_best_check": jnp.where(check, loss_best, s["loss_best_check"]),
                "reduced_check": jnp.where(check, halve, s["reduced_check"]),
                "x_adv": x_adv, "fooled": s["fooled"] | fooled,
            }

        return steps_loop(k, body, state, unroll)

    return start, steps


def _check(images, labels, epsilon, n_iter, bounds):
    x = np.asarray(images, np.float32)
    y = np.asarray(labels)
    if x.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {x.shape}")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be [N] = [{len(x)}] integers, got {y.dtype} {y.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("images hold NaN or infinite values")
    if isinstance(n_iter, bool) or not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
        raise ValueError(f"n_iter must be a positive integer, got {n_iter!r}")
    lo, hi = (float(b) for b in bounds)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"bounds must be two finite numbers, low < high, got {bounds}")
    if x.size and (x.min() < lo or x.max() > hi):
        raise ValueError(f"images lie outside bounds {bounds} ([{x.min()}, {x.max()}]); pass the model's pixel range")
    eps = _per_image_budget(epsilon, len(x), "epsilon")
    return x, y.astype(np.int32), eps, (lo, hi)


def _run(logits_fn, x_all, y_all, t_all, eps_all, loss, n_iter, bounds, seed, batch_size, active):
    start, steps = _make_apgd_fns(logits_fn, loss, int(n_iter), bounds)
    cpu = jax.default_backend() == "cpu"
    adv, fooled = x_all.copy(), np.zeros(len(x_all), bool)

    def emit(real, state, rows):
        f = np.asarray(state["fooled"])[rows]
        x_adv = np.asarray(state["x_adv"])[rows]
        adv[real] = np.where(f.reshape((-1,) + (1,) * (x_all.ndim - 1)), x_adv, x_all[real])
        fooled[real] = f

    for real, ids in _batches(np.flatnonzero(active), _batch(batch_size)):
        x0, y, t = jnp.asarray(x_all[ids]), jnp.asarray(y_all[ids]), jnp.asarray(t_all[ids])
        eps = jnp.asarray(_per_pixel(eps_all[ids], x0.ndim))
        state = start(seed, jnp.asarray(ids, jnp.int32), x0, y, t, eps)
        _until_done(lambda k, i0, s, c: steps(k, cpu, jnp.int32(i0), s, *c), state, (x0, y, t, eps), real, n_iter,
                    _chunk(n_iter, cpu), lambda s: s["fooled"], emit)
    return adv, fooled


def _batches(ids_all: np.ndarray, batch_size: int):
    """``(real, padded)`` index batches of at most ``batch_size`` (see :func:`_padded`)."""
    for b in range(0, len(ids_all), batch_size):
        real = ids_all[b : b + batch_size]
        yield real, _padded(real, batch_size)


def _until_done(step, state, consts, real, n_iter, chunk, finished, emit):
    """Run ``state = step(k, i0, state, consts)`` for ``n_iter`` iterations, ``k`` at a time (``chunk``: see
    :func:`_chunk`), on a batch whose first ``len(real)`` rows are the images ``real`` (the rest: padding). After
    each check interval the images for which
    ``finished(state)`` holds are handed to ``emit(images, state, rows)`` and leave the batch, which shrinks to the
    next padded size (:func:`_padded`) — an image already fooled costs nothing more. The rest are emitted at the
    end. Every image's trajectory is its own (per-image keys, steps and checks), so dropping others changes
    nothing for it (up to the rounding of XLA kernels, which can differ between batch shapes)."""
    per_call, every = chunk
    rows = np.arange(len(real))  # batch row of each image still running
    size = len(consts[0])
    done = 0
    while rows.size:
        until = min(done + every, n_iter)
        while done < until:
            k = min(per_call, until - done)
            state = step(k, done, state, consts)
            done += k
        stop = np.asarray(finished(state))[rows] if done < n_iter else np.ones(rows.size, bool)
        if stop.any():
            emit(real[stop], state, rows[stop])
            real, rows = real[~stop], rows[~stop]
            take = _padded(rows, size) if rows.size else rows
            if rows.size and len(take) < size:
                size = len(take)
                state, consts = jax.tree_util.tree_map(lambda a: a[jnp.asarray(take)], (state, consts))
                rows = np.arange(rows.size)
    return state


def _batch(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def _chunk(n_iter: int, cpu: bool) -> tuple[int, int]:
    """``(iterations per dispatch, iterations between the checks for finished images)``. The check interval is the
    largest divisor of ``n_iter`` up to 8 (100 → 5), or 8 (and a remainder) when ``n_iter`` has none from 4 up;
    on GPU/TPU a dispatch runs a whole interval (one compiled length), on the CPU one iteration
    (``PGD_CPU_CHUNK``)."""
    every = max(d for d in range(1, min(8, n_iter) + 1) if n_iter % d == 0)
    every = every if every >= 4 or n_iter <= 8 else 8
    return (min(PGD_CPU_CHUNK, every) if cpu else every), every


def _result(x_all, adv, success, eps_all) -> AttackResult:
    delta = (adv - x_all).reshape(len(x_all), int(np.prod(x_all.shape[1:])))
    return AttackResult(
        success=success,
        adversarial=adv,
        step=np.zeros(len(x_all), np.int64),
        linf=np.where(success, np.abs(delta).max(axis=1, initial=0.0), 0.0),
        l2=np.where(success, np.sqrt((delta.astype(np.float64) ** 2).sum(axis=1)), 0.0),
        blank=np.zeros(len(x_all), bool),
        still_changing=np.zeros(len(x_all), bool),
        max_step=int(round(float(eps_all.max(initial=0.0)))),
    )


def _logits(logits_fn, x, batch_size) -> np.ndarray:
    """``logits_fn`` on ``x`` in batches, each padded to the next size of :func:`bang_jax.attacks._padded`'s
    series (at most ``batch_size``): a few compiled shapes instead of one per set size."""
    size = _batch(batch_size)
    out = []
    for i in range(0, len(x), size):
        part = x[i : i + size]
        ids = _padded(np.arange(len(part)), size)
        out.append(np.asarray(logits_fn(jnp.asarray(part[ids])))[: len(part)])
    return np.concatenate(out)


def _clean_wrong(logits_fn, x, y, batch_size):
    if not len(x):
        return np.zeros(0, bool)
    return np.argmax(_logits(logits_fn, x, batch_size), axis=-1) != y


def apgd(logits_fn, images, labels, *, epsilon, loss: str = "ce", n_iter: int = 100, seed: int = 0,
         bounds=(0.0, 255.0), batch_size: int = 500) -> AttackResult:
    """Untargeted L∞ APGD on ``loss`` (``'ce'`` or ``'dlr'``) at budget ``epsilon`` (a scalar or one per image).

    Images misclassified when clean are successes without an attack. An image leaves the batch at the first check
    (every few iterations, :func:`_chunk`) after it is misclassified. Returns an
    :class:`bang_jax.attacks.AttackResult`: success (misclassified at some iterate), the last misclassified
    iterate before it left as ``adversarial`` (the original where it failed) and its norms.
    """
    if loss not in ("ce", "dlr"):
        raise ValueError(f"loss must be 'ce' or 'dlr' (apgd_targeted runs the targeted DLR), got {loss!r}")
    x, y, eps, bounds = _check(images, labels, epsilon, n_iter, bounds)
    wrong = _clean_wrong(logits_fn, x, y, batch_size)
    adv, fooled = _run(logits_fn, x, y, y, eps, loss, n_iter, bounds, seed, batch_size, ~wrong)
    return _result(x, adv, fooled | wrong, eps)


def _class_order(logits_fn, x, n_targets, batch_size) -> np.ndarray:
    """The clean images' classes from least to most likely ``[N, classes]`` (targets are taken from its end)."""
    if isinstance(n_targets, bool) or not isinstance(n_targets, (int, np.integer)) or n_targets < 1:
        raise ValueError(f"n_targets must be a positive integer, got {n_targets!r}")
    if not len(x):
        return np.zeros((0, 0), np.int64)
    return np.argsort(_logits(logits_fn, x, batch_size), axis=-1, kind="stable")


def check_classes(classes: int) -> None:
    """AutoAttack's targeted DLR loss reads the 4th-highest logit: a model with fewer classes is refused."""
    if classes < 4:
        raise ValueError(f"autoattack needs a model with at least 4 classes (its targeted DLR loss), this one has "
                         f"{classes}")


def apgd_targeted(logits_fn, images, labels, *, epsilon, n_targets: int = 9, n_iter: int = 100, seed: int = 0,
                  bounds=(0.0, 255.0), batch_size: int = 500) -> AttackResult:
    """APGD on the targeted DLR loss against the 2nd, 3rd, …, (n_targets+1)-th highest-scoring classes of each
    clean image in turn, each run on the images still robust (AutoAttack's APGD-T; standard: 9 targets, 100
    iterations). Success = misclassified (any class)."""
    x, y, eps, bounds = _check(images, labels, epsilon, n_iter, bounds)
    order = _class_order(logits_fn, x, n_targets, batch_size)
    if not len(x):
        return _result(x, x.copy(), np.zeros(0, bool), eps)
    classes = order.shape[1]
    check_classes(classes)
    success = order[:, -1] != y
    adv = x.copy()
    for rank in range(2, min(n_targets, classes - 1) + 2):
        targets = order[:, -rank].astype(np.int32)
        a, f = _run(logits_fn, x, y, targets, eps, "dlr_targeted", n_iter, bounds, seed + 1000 * rank, batch_size,
                    ~success)
        adv = np.where(f.reshape((-1,) + (1,) * (x.ndim - 1)), a, adv)
        success |= f
        if success.all():
            break
    return _result(x, adv, success, eps)


# ------------------------------------------------------------------------------------------------------------
# FAB, targeted (Croce & Hein 2020, "Minimally distorted adversarial examples with a fast adaptive boundary
# attack"), L∞.


def project_linf_box(x, w, c, lo, hi):
    """The smallest-L∞ step ``d`` with ``w·(x + d) + c = 0`` and ``x + d`` inside ``[lo, hi]`` (one image, flat).

    Moving towards the hyperplane, each pixel can move by at most its room to the box in the direction of
    ``−sign(r)·sign(w)`` (``r = w·x + c``); with every pixel moved by ``min(λ, room)`` the hyperplane value changes
    by ``f(λ) = Σ |w_i| min(λ, room_i)``, piecewise linear and increasing in λ. Bisection on λ (64 halvings:
    down to adjacent float32 numbers unless λ is below ~1e-9, where the error is negligible) finds the linear piece
    that reaches ``|r|``, and λ is then solved in closed form on it — the same λ as sorting the rooms, without a
    sort of every pixel (which cost XLA's CPU backend more than the model's gradient). Where even the whole box
    cannot reach the hyperplane, every pixel goes to its bound (the closest the box allows).
    """
    r = jnp.dot(w, x) + c
    direction = -jnp.sign(r) * jnp.sign(w)  # the way each pixel moves
    room = jnp.where(direction > 0, hi - x, jnp.where(direction < 0, x - lo, 0.0))
    aw = jnp.abs(w) * (direction != 0)
    need = jnp.abs(r)
    reach = lambda lam: jnp.sum(aw * jnp.minimum(lam, room))  # noqa: E731

    def halve(_, bounds):
        below, above = bounds
        mid = 0.5 * (below + above)
        short = reach(mid) < need
        return jnp.where(short, mid, below), jnp.where(short, above, mid)

    top = jnp.max(room, initial=0.0)
    below, _ = jax.lax.fori_loop(0, 64, halve, (jnp.zeros_like(top), top))
    full = room <= below  # pixels at their bound on the piece that reaches |r|
    rest_w = jnp.sum(jnp.where(full, 0.0, aw))
    lam = (need - jnp.sum(jnp.where(full, aw * room, 0.0))) / jnp.maximum(rest_w, 1e-30)
    lam = jnp.where(reach(top) >= need, lam, jnp.inf)
    lam = jnp.where(need <= 0, 0.0, lam)
    return direction * jnp.minimum(lam, room)


@functools.lru_cache(maxsize=32)
def _make_fab_fns(logits_fn: Callable, n_iter: int, bounds: tuple[float, float], alpha_max: float, eta: float,
                  beta: float):
    lo, hi = bounds

    def diff(x, labels, targets):
        z = logits_fn(x)
        pick = lambda c: jnp.take_along_axis(z, c[:, None], axis=-1)[:, 0]  # noqa: E731
        return jnp.sum(pick(targets) - pick(labels)), z

    grad_diff = jax.value_and_grad(diff, has_aux=True)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def steps(k, unroll, state, x0, labels, targets):
        b = x0.shape[0]
        flat0 = x0.reshape(b, -1)
        project = jax.vmap(project_linf_box, in_axes=(0, 0, 0, None, None))

        def body(_, s):
            x1, best, best_norm = s
            flat1 = x1.reshape(b, -1)
            (_, z), g = grad_diff(x1, labels, targets)
            pick = lambda c: jnp.take_along_axis(z, c[:, None], axis=-1)[:, 0]  # noqa: E731
            f = pick(targets) - pick(labels)  # > 0: the target class wins
            w = g.reshape(b, -1)
            # the linearised boundary f(x1) + w·(u − x1) = 0, written w·u + c = 0
            c = f - jnp.sum(w * flat1, axis=1)
            d1 = project(flat1, w, c, lo, hi)
            d2 = project(flat0, w, c, lo, hi)
            a1 = jnp.maximum(jnp.max(jnp.abs(d1), axis=1), 1e-8)
            a2 = jnp.maximum(jnp.max(jnp.abs(d2), axis=1), 1e-8)
            alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
            new = jnp.clip((flat1 + eta * d1) * (1 - alpha) + (flat0 + eta * d2) * alpha, lo, hi)
            fooled = jnp.argmax(logits_fn(new.reshape(x0.shape)), axis=-1) != labels
            norm = jnp.max(jnp.abs(new - flat0), axis=1)
            better = fooled & (norm < best_norm)
            best = jnp.where(better[:, None], new, best)
            best_norm = jnp.where(better, norm, best_norm)
            new = jnp.where(fooled[:, None], flat0 + (new - flat0) * beta, new)  # back towards the original
            return new.reshape(x0.shape), best, best_norm

        return steps_loop(k, body, state, unroll)

    return steps


def fab_targeted(logits_fn, images, labels, *, epsilon, n_targets: int = 9, n_iter: int = 100,
                 alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9, bounds=(0.0, 255.0),
                 batch_size: int = 500, minimise: bool = False) -> AttackResult:
    """Targeted FAB, L∞ (AutoAttack's FAB-T): for the 2nd … (n_targets+1)-th most likely classes in turn, walk
    from the clean image along projections onto the linearised boundary towards the target (overshoot ``eta``,
    a pull ``alpha ≤ alpha_max`` towards the projection of the original, ``beta`` back once fooled), keeping the
    smallest L∞ adversarial. Success = an adversarial within ``epsilon`` (a scalar or one per image); images still
    robust are attacked with the next target. Deterministic (no random start, as AutoAttack's first restart).

    An image stops at the first chunk of iterations after which it has an adversarial within ``epsilon`` (all
    AutoAttack needs; the success flags are those of running every iteration); ``minimise=True`` runs all
    ``n_iter`` iterations and returns the smallest adversarial found."""
    x, y, eps, bounds = _check(images, labels, epsilon, n_iter, bounds)
    order = _class_order(logits_fn, x, n_targets, batch_size)
    if not len(x):
        return _result(x, x.copy(), np.zeros(0, bool), eps)
    success = order[:, -1] != y
    adv = x.copy()
    steps = _make_fab_fns(logits_fn, int(n_iter), bounds, float(alpha_max), float(eta), float(beta))
    cpu = jax.default_backend() == "cpu"

    def emit(real, state, rows):
        norm = np.asarray(state[0][2])[rows]
        ok = norm <= eps[real] + 1e-4
        adv[real[ok]] = np.asarray(state[0][1]).reshape((-1,) + x.shape[1:])[rows[ok]]
        success[real[ok]] = True

    # an image stops once it has an adversarial within its budget, unless the smallest one is asked for
    finished = (lambda s: jnp.zeros(len(s[1]), bool)) if minimise else (lambda s: s[0][2] <= s[1] + 1e-4)
    for rank in range(2, min(n_targets, order.shape[1] - 1) + 2):
        for real, ids in _batches(np.flatnonzero(~success), _batch(batch_size)):
            x0, yb = jnp.asarray(x[ids]), jnp.asarray(y[ids])
            tb = jnp.asarray(order[ids, -rank].astype(np.int32))
            state = ((x0, x0.reshape(len(ids), -1), jnp.full(len(ids), jnp.inf, jnp.float32)),
                     jnp.asarray(eps[ids], jnp.float32))
            _until_done(lambda k, i0, s, c: (steps(k, cpu, s[0], *c), s[1]), state, (x0, yb, tb), real, n_iter,
                        _chunk(n_iter, cpu), finished, emit)
        if success.all():
            break
    return _result(x, adv, success, eps)


# ------------------------------------------------------------------------------------------------------------
# The ensemble.

AUTOATTACK_STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")


@dataclasses.dataclass
class AutoAttackResult:
    """Per image (numpy, length N): ``robust`` (still correct after every attack), ``adversarial`` (the first
    attack's adversarial; the original where robust), ``attack`` (which attack fooled it: ``'clean'`` for a clean
    error, ``''`` where robust), ``linf``; and ``seconds`` per attack, ``epsilon``."""

    robust: np.ndarray
    adversarial: np.ndarray
    attack: np.ndarray
    linf: np.ndarray
    epsilon: float
    seconds: dict

    @property
    def robust_accuracy(self) -> float:
        """% of all images still classified correctly."""
        return float(100.0 * self.robust.mean()) if self.robust.size else float("nan")

    def fooled_by(self) -> dict[str, int]:
        """How many images each attack fooled first (and how many were wrong when clean)."""
        return {name: int(np.sum(self.attack == name)) for name in ("clean", *AUTOATTACK_STANDARD)}


def autoattack(logits_fn, images, labels, epsilon: float, version: str = "standard", *, seed: int = 0,
               bounds=(0.0, 255.0), batch_size: int = 500, progress: bool | str = False) -> AutoAttackResult:
    """AutoAttack's standard L∞ evaluation (Croce & Hein 2020): APGD-CE (100 iterations), APGD-T (9 targets ×
    100 iterations), FAB-T (9 targets × 100 iterations) and Square (5,000 queries, p_init 0.8), each run on the
    images every earlier attack left robust. ``epsilon`` in the model's pixel units (MNIST/CIFAR here: 0..255).

    ``progress`` (True or a label) prints one line per attack: what it fooled, the time, the robust accuracy.
    Only ``version='standard'`` exists: the ``rand`` version (EOT over randomised defences) is for models whose
    evaluation is random, which the models of this project are not.
    """
    if version != "standard":
        raise ValueError(f"version must be 'standard' (the models here are deterministic in evaluation), got "
                         f"{version!r}")
    from bang_jax.attacks import square_attack  # noqa: PLC0415

    x, y, eps_all, bounds = _check(images, labels, epsilon, 1, bounds)
    if eps_all.size and np.ptp(eps_all) > 0:
        raise ValueError("autoattack takes one epsilon for all images")
    eps = float(eps_all[0]) if eps_all.size else float(epsilon)
    attack = np.full(len(x), "", dtype=object)
    attack[_clean_wrong(logits_fn, x, y, batch_size)] = "clean"
    adv = x.copy()
    seconds = {}
    runs = {
        "apgd-ce": lambda xs, ys: apgd(logits_fn, xs, ys, epsilon=eps, loss="ce", seed=seed, bounds=bounds,
                                       batch_size=batch_size),
        "apgd-t": lambda xs, ys: apgd_targeted(logits_fn, xs, ys, epsilon=eps, seed=seed, bounds=bounds,
                                               batch_size=batch_size),
        "fab-t": lambda xs, ys: fab_targeted(logits_fn, xs, ys, epsilon=eps, bounds=bounds, batch_size=batch_size),
        "square": lambda xs, ys: square_attack(logits_fn, xs, ys, epsilon=eps, queries=5000, p_init=0.8, seed=seed,
                                               batch_size=batch_size),
    }
    for name in AUTOATTACK_STANDARD:
        left = np.flatnonzero(attack == "")
        if not left.size:
            break
        t0 = time.perf_counter()
        res = runs[name](x[left], y[left])
        seconds[name] = time.perf_counter() - t0
        # keep only adversarials that are misclassified and within the budget (a check independent of the attack)
        cand = res.adversarial[res.success]
        ok = np.zeros(left.size, bool)
        if cand.size:
            pred = np.argmax(_logits(logits_fn, cand, batch_size), axis=-1)
            within = np.abs(cand - x[left][res.success]).reshape(len(cand), -1).max(axis=1) <= eps + 1e-3
            ok[np.flatnonzero(res.success)] = (pred != y[left][res.success]) & within
        adv[left[ok]] = res.adversarial[ok]
        attack[left[ok]] = name
        if progress:
            what = progress if isinstance(progress, str) else f"autoattack ε {eps:g}"
            print(f"{what}: {name} fooled {ok.sum()} of {left.size} "
                  f"({seconds[name]:.1f} s); robust {100 * np.mean(attack == ''):.2f}%", flush=True)
    linf = np.abs(adv - x).reshape(len(x), int(np.prod(x.shape[1:]))).max(axis=1, initial=0.0)
    return AutoAttackResult(robust=attack == "", adversarial=adv, attack=attack.astype(str), linf=linf, epsilon=eps,
                            seconds=seconds)
