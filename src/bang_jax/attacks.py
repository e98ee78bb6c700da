"""The paper's adversarial attacks: FGS and hot/cold (HC1) directions and the discrete line search (SPEC §4).

Every attack takes a ``logits_fn(images) -> [N, classes]`` on images in **pixel units 0..255** (for the bundled
models: ``lambda x: model.apply(variables, x)``). Build one and run the paper's protocol::

    logits_fn = lambda x: model.apply(variables, x)
    d, blank = fgs_direction(logits_fn, images, labels)                  # paper protocol
    d, blank = fgs_direction(logits_fn, images, labels, exact=True)      # exact gradient, no underflow
    d, blank = hot_cold_direction(logits_fn, images, labels)             # HC1
    res = line_search_attack(logits_fn, images, labels, d, blank=blank)  # minimal step t, first success wins

Any other direction (an ``[N, ...]`` array) can be passed to :func:`line_search_attack` or
:func:`fixed_step_attack`. Beyond the paper, :func:`pgd_attack` runs L∞ PGD at a fixed budget on the logit
margin, which a saturated softmax cannot mask.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "AttackResult",
    "fgs_direction",
    "fixed_step_attack",
    "hot_cold_direction",
    "line_search_attack",
    "pgd_attack",
]

LogitsFn = Callable[[jax.Array], jax.Array]


def _ce_cotangent_paper(logits, labels):
    """d(mean-free CE)/d(logits) in float32 as a framework computes it, and the paper's blank rule."""
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    p_true = jnp.sum(p * onehot, axis=-1)
    blank = p_true == 1.0  # float32 loss is exactly 0: the authors' tool drops the gradient
    return jnp.where(blank[:, None], 0.0, p - onehot), blank


def _ce_cotangent_exact(logits, labels):
    """(softmax − onehot) / (1 − p_true), computed in log space: never underflows to all zeros.

    For j ≠ true: exp(z_j − logsumexp_{k≠true} z_k); for the true class −1. Positive rescaling does not change
    the sign of the input gradient.
    """
    z = logits.astype(jnp.float32)
    onehot = jax.nn.one_hot(labels, z.shape[-1], dtype=bool)
    others = jnp.where(onehot, -jnp.inf, z)
    lse = jax.nn.logsumexp(others, axis=-1, keepdims=True)
    return jnp.where(onehot, -1.0, jnp.exp(others - lse))


def _input_vjp(logits_fn, images, cotangent_fn):
    images = jnp.asarray(images, jnp.float32)
    logits, vjp = jax.vjp(logits_fn, images)
    cot, *aux = cotangent_fn(jax.lax.stop_gradient(logits))
    return vjp(cot.astype(logits.dtype))[0], logits, aux


def fgs_direction(logits_fn: LogitsFn, images, labels, *, exact: bool = False):
    """FGS direction sign(∂L/∂x) of the softmax cross-entropy at the true label.

    Args:
      exact: False — the paper's protocol: blank (all zeros) whenever the float32 probability of the true
        class is exactly 1.0. True — the same direction from a cotangent computed in log space, blank only if
        the input gradient is truly zero.

    Returns:
      ``(direction [N, ...] in {−1, 0, 1}, blank [N] bool)``.
    """
    labels = jnp.asarray(labels)
    if exact:
        g, _, _ = _input_vjp(logits_fn, images, lambda z: (_ce_cotangent_exact(z, labels),))
        d = jnp.sign(g)
    else:
        g, _, (blank,) = _input_vjp(logits_fn, images, lambda z: _ce_cotangent_paper(z, labels))
        d = jnp.sign(g)
    blank = jnp.all(d.reshape(d.shape[0], -1) == 0, axis=1)
    return jax.lax.stop_gradient(d), blank


def hot_cold_direction(logits_fn: LogitsFn, images, labels):
    """HC1 (Rozsa, Rudd, Boult 2016): hot = best wrong class, cold = true class.

    The logit-layer cotangent w has w[hot] = |z_hot|, w[true] = −z_true, 0 elsewhere (held constant), pulled back
    to the image by a VJP. The raw direction (not its sign) is returned, with blank = all zeros.
    """
    labels = jnp.asarray(labels)

    def cot(z):
        onehot = jax.nn.one_hot(labels, z.shape[-1], dtype=bool)
        hot = jnp.argmax(jnp.where(onehot, -jnp.inf, z), axis=-1)
        hot_mask = jax.nn.one_hot(hot, z.shape[-1], dtype=bool)
        w = jnp.where(hot_mask, jnp.abs(z), 0.0) + jnp.where(onehot, -z, 0.0)
        return (w,)

    g, _, _ = _input_vjp(logits_fn, images, cot)
    blank = jnp.all(g.reshape(g.shape[0], -1) == 0, axis=1)
    return jax.lax.stop_gradient(g), blank


@dataclasses.dataclass
class AttackResult:
    """Per-image outcome of a line search (numpy arrays, length N; failures included).

    Attributes:
      success: found a step whose prediction differs from the label.
      adversarial: ``[N, ...]`` float32 pixels of the successful image (the original where it failed).
      step: the first successful t (0 where it failed).
      linf, l2: norms of the actual perturbation (pixels; 0 where it failed).
      blank: the direction was all zeros.
      still_changing: failed at the step cap while the image was still changing (the cap cut the search).
      max_step: the cap used.
    """

    success: np.ndarray
    adversarial: np.ndarray
    step: np.ndarray
    linf: np.ndarray
    l2: np.ndarray
    blank: np.ndarray
    still_changing: np.ndarray
    max_step: int

    @property
    def rate(self) -> float:
        """Success rate in percent over all attacked images."""
        return float(100.0 * self.success.mean()) if self.success.size else float("nan")


def _candidates(x, d, t):
    """clip(round(x + t·d), 0, 255) for steps t [C] → [C, N, ...]."""
    shape = (-1,) + (1,) * x.ndim
    return jnp.clip(jnp.round(x[None] + t.reshape(shape) * d[None]), 0.0, 255.0)


@functools.lru_cache(maxsize=32)
def _make_chunk_fn(logits_fn, evaluations: int, window: int):
    """The jitted search step for ``logits_fn`` (cached, so repeated searches do not recompile).

    For each image it looks at the ``window`` steps t_start … t_start+window−1, keeps those at which the clipped,
    rounded image differs from the one at t−1 (nothing new can happen in between), and runs the model on the
    first ``evaluations`` of them. Returns per image: hit, the first successful t, and where to continue.
    """
    @jax.jit
    def chunk(x, d, labels, t_start, max_step):
        p = x.shape[0]
        ts = t_start[None, :] + jnp.arange(-1, window, dtype=jnp.float32)[:, None]  # [W+1, P]
        cands = jnp.clip(jnp.round(x[None] + ts.reshape(ts.shape + (1,) * (x.ndim - 1)) * d[None]), 0.0, 255.0)
        axes = tuple(range(2, cands.ndim))
        changed = jnp.any(cands[1:] != cands[:-1], axis=axes) & (ts[1:] <= max_step)  # [W, P]
        pos = jnp.arange(window)[:, None]
        order = jnp.argsort(jnp.where(changed, pos, window + pos), axis=0)[:evaluations]  # first changed steps
        valid = jnp.take_along_axis(changed, order, axis=0)  # [E, P]
        t_eval = jnp.take_along_axis(ts[1:], order, axis=0)  # [E, P]
        sel = cands[1:][order, jnp.arange(p)[None, :]]  # [E, P, ...]
        logits = logits_fn(sel.reshape((evaluations * p,) + x.shape[1:]))
        wrong = (jnp.argmax(logits, axis=-1).reshape(evaluations, p) != labels[None]) & valid
        hit = jnp.any(wrong, axis=0)
        t_hit = jnp.take_along_axis(t_eval, jnp.argmax(wrong, axis=0)[None], axis=0)[0]
        full = jnp.sum(valid, axis=0) == evaluations
        next_start = jnp.where(full, t_eval[-1] + 1.0, t_start + window)
        return hit, t_hit, next_start, jnp.sum(valid)

    return chunk


def _normalise(direction):
    flat = direction.reshape(direction.shape[0], -1)
    m = np.max(np.abs(flat), axis=1)
    safe = np.where(m > 0, m, 1.0)
    return (flat / safe[:, None]).reshape(direction.shape)


def _saturation_step(x, d):
    """Per image, the last integer t at which clip(round(x + t·d)) can still change (inf-free)."""
    xf, df = x.reshape(x.shape[0], -1), d.reshape(d.shape[0], -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_up = np.where(df > 0, (255.5 - xf) / df, 0.0)
        t_down = np.where(df < 0, (xf + 0.5) / -df, 0.0)
    return np.ceil(np.max(np.maximum(t_up, t_down), axis=1))


def line_search_attack(
    logits_fn: LogitsFn,
    images,
    labels,
    directions,
    *,
    blank=None,
    max_step: int = 1020,
    chunk_steps: int = 16,
    batch_size: int = 256,
    progress: bool = False,
) -> AttackResult:
    """The paper's minimal-step line search along each direction (SPEC §4).

    With d = g / max|g|, tries x_t = clip(round(x + t·d), 0, 255) for t = 1, 2, … and returns the first t whose
    predicted label differs from ``labels`` — exactly the result of trying every step in order. It evaluates
    ``chunk_steps`` steps of all still-active images per call and drops images as soon as they succeed or their
    clipped image can no longer change (saturation), so directions whose largest component saturates at 255
    keep moving their other pixels until ``max_step``. Failures that were still changing at ``max_step`` are
    flagged in ``still_changing``. Steps at which the clipped, rounded image does not change are skipped
    (they cannot give a new prediction), so only images that change cost a forward pass.
    """
    x_all = np.asarray(images, np.float32)
    y_all = np.asarray(labels, np.int32)
    d_all = _normalise(np.asarray(directions, np.float32))
    n = x_all.shape[0]
    if d_all.shape != x_all.shape:
        raise ValueError(f"directions {d_all.shape} must have the shape of images {x_all.shape}")
    blank_all = np.zeros(n, bool) if blank is None else np.asarray(blank, bool)
    blank_all = blank_all | np.all(d_all.reshape(n, -1) == 0, axis=1)
    step = np.zeros(n, np.int64)
    t_sat = _saturation_step(x_all, d_all)
    window = 4 * chunk_steps
    chunk = _make_chunk_fn(logits_fn, chunk_steps, window)
    pixels = int(np.prod(x_all.shape[1:]))
    # bound the (window+1)·P·pixels candidate tensor to about 128 MB
    batch_size = max(8, min(batch_size, 1 << int(np.log2(max(8, (1 << 25) // ((window + 1) * pixels))))))
    active = np.flatnonzero(~blank_all)
    t_start = np.ones(n, np.float32)
    evaluated = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        bar = tqdm(total=len(active), desc="line search", unit="img")
    while active.size:
        for start in range(0, active.size, batch_size):
            idx = active[start : start + batch_size]
            p = 1 << max(3, int(np.ceil(np.log2(len(idx)))))  # pad to a power of two: few recompilations
            idx_pad = np.pad(idx, (0, p - len(idx)), mode="edge")
            hit, t_hit, nxt, count = chunk(x_all[idx_pad], d_all[idx_pad], y_all[idx_pad], t_start[idx_pad],
                                           jnp.float32(max_step))
            hit, t_hit, nxt = (np.asarray(a)[: len(idx)] for a in (hit, t_hit, nxt))
            evaluated += int(count)
            step[idx[hit]] = t_hit[hit].astype(np.int64)
            t_start[idx] = nxt
        done = (step[active] > 0) | (t_start[active] > np.minimum(t_sat[active], max_step))
        if bar is not None:
            bar.update(int(done.sum()))
        active = active[~done]
    if bar is not None:
        bar.close()
    success = step > 0
    adv = x_all.copy()
    if success.any():
        s = np.flatnonzero(success)
        t_s = step[s].astype(np.float32).reshape((-1,) + (1,) * (x_all.ndim - 1))
        adv[s] = np.clip(np.round(x_all[s] + t_s * d_all[s]), 0, 255)
    delta = (adv - x_all).reshape(n, -1)
    still = ~success & ~blank_all & (t_sat > max_step)
    return AttackResult(
        success=success,
        adversarial=adv,
        step=step,
        linf=np.abs(delta).max(axis=1),
        l2=np.sqrt((delta.astype(np.float64) ** 2).sum(axis=1)),
        blank=blank_all,
        still_changing=still,
        max_step=max_step,
    )


def fixed_step_attack(logits_fn: LogitsFn, images, labels, directions, step: float, *, blank=None) -> AttackResult:
    """One step of size ``step`` (pixels, along d = g / max|g|): x' = clip(round(x + step·d)); success if misclassified."""
    x = np.asarray(images, np.float32)
    d = _normalise(np.asarray(directions, np.float32))
    adv = np.clip(np.round(x + step * d), 0, 255).astype(np.float32)
    pred = np.argmax(np.asarray(jax.jit(logits_fn)(jnp.asarray(adv))), axis=-1)
    n = x.shape[0]
    blank_all = (np.zeros(n, bool) if blank is None else np.asarray(blank, bool)) | np.all(d.reshape(n, -1) == 0, axis=1)
    success = (pred != np.asarray(labels)) & ~blank_all
    adv = np.where(success.reshape((-1,) + (1,) * (x.ndim - 1)), adv, x)
    delta = (adv - x).reshape(n, -1)
    return AttackResult(
        success=success,
        adversarial=adv,
        step=np.where(success, step, 0),
        linf=np.abs(delta).max(axis=1),
        l2=np.sqrt((delta.astype(np.float64) ** 2).sum(axis=1)),
        blank=blank_all,
        still_changing=np.zeros(n, bool),
        max_step=int(step),
    )


def _margin_loss(logits, labels):
    """max_{j≠y} z_j − z_y per example: positive iff misclassified; no softmax, so it never saturates."""
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
    z_true = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    z_other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
    return z_other - z_true


@functools.lru_cache(maxsize=32)
def _make_pgd_step(logits_fn, loss: str):
    def total_loss(x, labels):
        z = logits_fn(x)
        if loss == "margin":
            return jnp.sum(_margin_loss(z, labels))
        return jnp.sum(-jnp.take_along_axis(jax.nn.log_softmax(z), labels[:, None], axis=1))

    @jax.jit
    def step(x, x0, labels, epsilon, step_size, best, best_margin):
        g = jax.grad(total_loss)(x, labels)
        x = jnp.clip(jnp.clip(x + step_size * jnp.sign(g), x0 - epsilon, x0 + epsilon), 0.0, 255.0)
        margin = _margin_loss(logits_fn(x), labels)
        better = margin > best_margin
        keep = better.reshape((-1,) + (1,) * (x.ndim - 1))
        return x, jnp.where(keep, x, best), jnp.where(better, margin, best_margin)

    return step


def pgd_attack(
    logits_fn: LogitsFn,
    images,
    labels,
    *,
    epsilon: float,
    steps: int = 50,
    step_size: float | None = None,
    loss: str = "margin",
    random_start: bool = True,
    seed: int = 0,
    batch_size: int = 1000,
) -> AttackResult:
    """L∞ PGD (Madry et al. 2018) at a fixed budget ``epsilon`` (pixels), a modern check of the paper's attacks.

    With ``loss='margin'`` (default) it ascends max_{j≠y} z_j − z_y on the logits, which does not saturate, so a
    model whose softmax is saturated (as BANG's are) cannot hide behind a zero loss gradient the way it does
    from the paper's FGS. ``loss='ce'`` uses the cross-entropy. Keeps, per image, the iterate with the largest
    margin; success = that iterate is misclassified. Images are not rounded (continuous pixels in 0..255).
    """
    if loss not in ("margin", "ce"):
        raise ValueError(f"loss must be 'margin' or 'ce', got {loss!r}")
    if not (epsilon >= 0 and np.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite non-negative number of pixels, got {epsilon}")
    step_size = epsilon / 4 if step_size is None else step_size
    step = _make_pgd_step(logits_fn, loss)
    x_all = np.asarray(images, np.float32)
    y_all = np.asarray(labels, np.int32)
    adv = x_all.copy()
    rng = np.random.default_rng(seed)
    for start in range(0, len(x_all), batch_size):
        x0 = jnp.asarray(x_all[start : start + batch_size])
        y = jnp.asarray(y_all[start : start + batch_size])
        x = x0
        if random_start:
            x = jnp.clip(x0 + rng.uniform(-epsilon, epsilon, x0.shape).astype(np.float32), 0.0, 255.0)
        best, best_margin = x0, _margin_loss(logits_fn(x0), y)
        for _ in range(steps):
            x, best, best_margin = step(x, x0, y, jnp.float32(epsilon), jnp.float32(step_size), best, best_margin)
        adv[start : start + batch_size] = np.asarray(best)
    pred = np.concatenate([np.asarray(jnp.argmax(logits_fn(jnp.asarray(adv[i : i + batch_size])), axis=-1))
                           for i in range(0, len(adv), batch_size)])
    success = pred != y_all
    delta = (adv - x_all).reshape(len(x_all), -1)
    n = len(x_all)
    return AttackResult(
        success=success,
        adversarial=adv,
        step=np.zeros(n, np.int64),
        linf=np.where(success, np.abs(delta).max(axis=1), 0.0),
        l2=np.where(success, np.sqrt((delta.astype(np.float64) ** 2).sum(axis=1)), 0.0),
        blank=np.zeros(n, bool),
        still_changing=np.zeros(n, bool),
        max_step=int(round(epsilon)),
    )
