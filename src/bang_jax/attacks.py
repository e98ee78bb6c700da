"""The paper's adversarial attacks: FGS and hot/cold (HC1) directions and the discrete line search (docs/semantics.md).

Every attack takes a ``logits_fn(images) -> [N, classes]`` on images in **pixel units 0..255** (for the bundled
models: ``lambda x: model.apply(variables, x)``). Build one and run the paper's protocol::

    logits_fn = lambda x: model.apply(variables, x)
    d, blank = fgs_direction(logits_fn, images, labels)                  # paper protocol
    d, blank = fgs_direction(logits_fn, images, labels, exact=True)      # exact gradient, no underflow
    d, blank = hot_cold_direction(logits_fn, images, labels)             # HC1
    res = line_search_attack(logits_fn, images, labels, d, blank=blank)  # minimal step t, first success wins

Any other direction (an ``[N, ...]`` array) can be passed to :func:`line_search_attack` or
:func:`fixed_step_attack`. Beyond the paper, :func:`pgd_attack` runs L∞ PGD at a fixed budget on the logit
margin, which a saturated softmax cannot mask; :func:`minimal_pgd_attack` bisects the budget per image, giving a
minimal L∞ to set beside the paper's line-search numbers; :func:`square_attack` (Andriushchenko et al. 2020) uses
no gradient at all, only the logits of queried images, so it is the check for gradient masking::

    res = pgd_attack(logits_fn, images, labels, epsilon=32.0)              # success at L∞ ≤ 32 pixels
    res = minimal_pgd_attack(logits_fn, images, labels, max_epsilon=64.0)  # res.linf: smallest budget found
    res = square_attack(logits_fn, images, labels, epsilon=32.0, queries=1000)  # res.queries: per image
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
    "minimal_pgd_attack",
    "pgd_attack",
    "square_attack",
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
      max_step: the cap used (for the fixed-budget attacks: the budget in pixels, rounded).
      queries: forward passes spent per image by a query attack (:func:`square_attack`), else None.
    """

    success: np.ndarray
    adversarial: np.ndarray
    step: np.ndarray
    linf: np.ndarray
    l2: np.ndarray
    blank: np.ndarray
    still_changing: np.ndarray
    max_step: int
    queries: np.ndarray | None = None

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
    """The paper's minimal-step line search along each direction (docs/semantics.md).

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

        bar = tqdm(total=len(active), desc=progress if isinstance(progress, str) else "line search", unit="img")
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
    """One step of size ``step`` (pixels, along d = g / max|g|): x' = clip(round(x + step·d)); success if
    misclassified."""
    x = np.asarray(images, np.float32)
    d = _normalise(np.asarray(directions, np.float32))
    adv = np.clip(np.round(x + step * d), 0, 255).astype(np.float32)
    pred = np.argmax(np.asarray(jax.jit(logits_fn)(jnp.asarray(adv))), axis=-1)
    n = x.shape[0]
    blank_all = (np.zeros(n, bool) if blank is None else np.asarray(blank, bool)) | np.all(
        d.reshape(n, -1) == 0, axis=1
    )
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


# Gradient steps per dispatch on the CPU. XLA's CPU backend runs a convolution's gradient inside a while loop about
# 4× slower than in a jitted function of its own (LeNet, 64 images: 61 vs 14 ms per gradient; 8 steps unrolled into
# one function: 18 ms), so there each step is its own dispatch (asynchronous: Python queues the next one while the
# last runs); on GPU/TPU the steps run in one rolled lax.fori_loop.
PGD_CPU_CHUNK = 1


def steps_loop(k: int, body, state, unroll: bool):
    """``k`` applications of ``body(j, state)``: the body itself when ``k == 1`` (no loop: see ``PGD_CPU_CHUNK``),
    else a ``lax.fori_loop`` (``unroll``: written out)."""
    if k == 1:
        return body(0, state)
    return jax.lax.fori_loop(0, k, body, state, unroll=unroll)


@functools.lru_cache(maxsize=32)
def _make_pgd_fns(logits_fn, loss: str, random_start: bool):
    """Jitted ``start(seed, index, x0, labels, epsilon)`` and ``steps(k, unroll, state, x0, labels, epsilon,
    step_size)`` of PGD for ``logits_fn``: the random start from per-image JAX keys (results do not depend on
    batching), ``k`` steps (:func:`steps_loop`; cached: no recompilation per call or budget)."""

    def total_loss(x, labels):
        z = logits_fn(x)
        if loss == "margin":
            return jnp.sum(_margin_loss(z, labels))
        return jnp.sum(-jnp.take_along_axis(jax.nn.log_softmax(z), labels[:, None], axis=1))

    @jax.jit
    def start(seed, index, x0, labels, epsilon):
        x = x0
        if random_start:
            keys = _image_keys(seed, index)
            noise = jax.vmap(lambda k: jax.random.uniform(k, x0.shape[1:], jnp.float32, -1.0, 1.0))(keys)
            x = jnp.clip(x0 + noise * epsilon, 0.0, 255.0)
        return x, x0, _margin_loss(logits_fn(x0), labels)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def steps(k, unroll, state, x0, labels, epsilon, step_size):
        def body(_, state):
            x, best, best_margin = state
            g = jax.grad(total_loss)(x, labels)
            x = jnp.clip(jnp.clip(x + step_size * jnp.sign(g), x0 - epsilon, x0 + epsilon), 0.0, 255.0)
            margin = _margin_loss(logits_fn(x), labels)
            better = margin > best_margin
            keep = better.reshape((-1,) + (1,) * (x.ndim - 1))
            return x, jnp.where(keep, x, best), jnp.where(better, margin, best_margin)

        return steps_loop(k, body, state, unroll)

    return start, steps


def _per_image_budget(value, n: int, name: str) -> np.ndarray:
    """A scalar or ``[n]`` budget in pixels as float32 ``[n]``; rejects negative, NaN and infinite values."""
    v = np.asarray(value, np.float64)
    if v.ndim > 1 or (v.ndim == 1 and v.shape[0] != n):
        raise ValueError(f"{name} must be a scalar or one value per image ({n}), got shape {v.shape}")
    if not np.all(np.isfinite(v) & (v >= 0)):
        raise ValueError(f"{name} must be a finite non-negative number of pixels, got {value}")
    return np.broadcast_to(v, (n,)).astype(np.float32)


def _per_pixel(v, ndim):
    """``[B]`` → ``[B, 1, …, 1]`` (rank ``ndim``) so it broadcasts against images without rank promotion."""
    return jnp.asarray(v).reshape((-1,) + (1,) * (ndim - 1))


def pgd_attack(
    logits_fn: LogitsFn,
    images,
    labels,
    *,
    epsilon,
    steps: int = 50,
    step_size=None,
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

    Args:
      epsilon: the L∞ budget in pixels, a scalar or one per image ``[N]``.
      step_size: pixels per step (scalar or ``[N]``); default ``epsilon / 4``.
    """
    if loss not in ("margin", "ce"):
        raise ValueError(f"loss must be 'margin' or 'ce', got {loss!r}")
    x_all = np.asarray(images, np.float32)
    y_all = np.asarray(labels, np.int32)
    n = len(x_all)
    eps_all = _per_image_budget(epsilon, n, "epsilon")
    size_all = eps_all / 4 if step_size is None else _per_image_budget(step_size, n, "step_size")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    begin, run_steps = _make_pgd_fns(logits_fn, loss, bool(random_start))
    cpu = jax.default_backend() == "cpu"
    chunk = min(PGD_CPU_CHUNK, steps) if cpu else steps
    adv = x_all.copy()
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        x0, y = jnp.asarray(x_all[sl]), jnp.asarray(y_all[sl])
        eps, size = jnp.asarray(_per_pixel(eps_all[sl], x0.ndim)), jnp.asarray(_per_pixel(size_all[sl], x0.ndim))
        state = begin(seed, jnp.arange(start, min(start + batch_size, n)), x0, y, eps)
        done = 0
        while done < steps:
            k = min(chunk, steps - done)
            state = run_steps(k, cpu, state, x0, y, eps, size)
            done += k
        adv[sl] = np.asarray(state[1])
    pred = (
        np.concatenate(
            [
                np.asarray(jnp.argmax(logits_fn(jnp.asarray(adv[i : i + batch_size])), axis=-1))
                for i in range(0, n, batch_size)
            ]
        )
        if n
        else np.zeros(0, np.int32)
    )
    success = pred != y_all
    delta = (adv - x_all).reshape(n, -1)
    return AttackResult(
        success=success,
        adversarial=adv,
        step=np.zeros(n, np.int64),
        linf=np.where(success, np.abs(delta).max(axis=1, initial=0.0), 0.0),
        l2=np.where(success, np.sqrt((delta.astype(np.float64) ** 2).sum(axis=1)), 0.0),
        blank=np.zeros(n, bool),
        still_changing=np.zeros(n, bool),
        max_step=int(round(float(eps_all.max(initial=0.0)))),
    )


def minimal_pgd_attack(
    logits_fn: LogitsFn,
    images,
    labels,
    *,
    max_epsilon: float = 64.0,
    search_steps: int = 8,
    steps: int = 40,
    loss: str = "margin",
    seed: int = 0,
    batch_size: int = 1000,
) -> AttackResult:
    """The smallest L∞ budget (pixels) at which PGD finds an adversarial, per image, by bisection.

    Runs :func:`pgd_attack` at ``max_epsilon``; for every image it fools, it bisects [0, L∞ found]
    ``search_steps`` times, all such images in one batch, each with its own budget: PGD at the midpoint;
    success → the upper end becomes the L∞ of that adversarial (kept), failure → the lower end becomes the
    midpoint. The result's ``linf`` is the L∞ of the smallest adversarial found, within
    ``max_epsilon / 2**search_steps`` of the smallest budget at which PGD succeeds; PGD is not monotone in the
    budget, so like the paper's line search this is an upper bound on the true minimal perturbation.
    Images misclassified when clean are successes with L∞ 0. ``success`` = fooled within ``max_epsilon``; rates
    are over the images passed in. Pixels are continuous (not rounded), unlike the paper's line search.
    """
    if not (np.isfinite(max_epsilon) and max_epsilon > 0):
        raise ValueError(f"max_epsilon must be a positive number of pixels, got {max_epsilon}")
    if int(search_steps) != search_steps or search_steps < 0:
        raise ValueError(f"search_steps must be a non-negative integer, got {search_steps}")
    x = np.asarray(images, np.float32)
    y = np.asarray(labels, np.int32)
    n = len(x)
    kw = dict(steps=steps, loss=loss, batch_size=batch_size)
    res = pgd_attack(logits_fn, x, y, epsilon=max_epsilon, seed=seed, **kw)
    clean_wrong = np.zeros(n, bool)
    for i in range(0, n, batch_size):
        clean_wrong[i : i + batch_size] = (
            np.asarray(jnp.argmax(logits_fn(jnp.asarray(x[i : i + batch_size])), -1)) != y[i : i + batch_size]
        )
    success = res.success | clean_wrong
    adv = np.where(clean_wrong.reshape((-1,) + (1,) * (x.ndim - 1)), x, res.adversarial)
    hi = np.where(clean_wrong, 0.0, res.linf).astype(np.float32)
    lo = np.zeros(n, np.float32)
    for k in range(int(search_steps)):
        idx = np.flatnonzero(success & ~clean_wrong)
        if not idx.size:
            break
        mid = (lo[idx] + hi[idx]) / 2
        r = pgd_attack(logits_fn, x[idx], y[idx], epsilon=mid, seed=seed + k + 1, **kw)
        ok = r.success & (r.linf <= hi[idx])
        hi[idx[ok]] = r.linf[ok]
        adv[idx[ok]] = r.adversarial[ok]
        lo[idx[~r.success]] = mid[~r.success]
    delta = (adv - x).reshape(n, -1)
    return AttackResult(
        success=success,
        adversarial=np.where(success.reshape((-1,) + (1,) * (x.ndim - 1)), adv, x),
        step=np.zeros(n, np.int64),
        linf=np.where(success, np.abs(delta).max(axis=1, initial=0.0), 0.0),
        l2=np.where(success, np.sqrt((delta.astype(np.float64) ** 2).sum(axis=1)), 0.0),
        blank=np.zeros(n, bool),
        still_changing=np.zeros(n, bool),
        max_step=int(round(max_epsilon)),
    )


# Square attack (Andriushchenko, Croce, Flammarion, Hein, ECCV 2020), L∞, untargeted, margin loss.
# p_init is halved after these iterations of a 10,000-query budget (the schedule is rescaled to the budget used).
SQUARE_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_fraction(p_init, iteration, queries):
    """p(i), the fraction of pixels a square covers at iteration ``iteration`` (0-based) of a ``queries`` budget.

    The paper's piecewise-constant schedule: i is rescaled to a 10,000-query budget, i' = floor(10,000·i/queries),
    and p_init is halved once for every threshold of :data:`SQUARE_SCHEDULE` that i' exceeds (p_init / 512
    after 8,000). jnp-traceable.
    """
    it = jnp.floor(jnp.asarray(iteration, jnp.float32) / queries * 10000.0)
    halvings = jnp.sum(it > jnp.asarray(SQUARE_SCHEDULE, jnp.float32))
    return p_init / 2.0 ** halvings.astype(jnp.float32)


def _square_init_one(key, x0, epsilon):
    """Vertical stripes: one random sign per column and channel, x = clip(x0 ± ε, 0, 255)."""
    _, w, c = x0.shape
    signs = jax.random.rademacher(key, (1, w, c), dtype=jnp.float32)
    return jnp.clip(x0 + signs * epsilon, 0.0, 255.0)


def _square_proposal_one(key, x0, x_best, iteration, epsilon, p_init, queries):
    """One image's candidate: a random s×s window of x_best set to clip(x0 ± ε) with one sign per channel.

    s = round(sqrt(p(i)·H·W)) clipped to [1, H−1]; the corner is uniform in [0, H−s) × [0, W−s). If the window
    would not change x_best, the signs are negated (which always changes it when ε > 0); the paper resamples
    until it changes, which for one channel is the same thing.
    """
    h, w, c = x0.shape
    p = square_fraction(p_init, iteration, queries)
    s = jnp.clip(jnp.round(jnp.sqrt(p * h * w)).astype(jnp.int32), 1, h - 1)
    k_h, k_w, k_s = jax.random.split(key, 3)
    top = jax.random.randint(k_h, (), 0, h - s)
    left = jax.random.randint(k_w, (), 0, w - s)
    rows, cols = jnp.arange(h), jnp.arange(w)
    in_rows = (rows >= top) & (rows < top + s)
    in_cols = (cols >= left) & (cols < left + s)
    window = (in_rows[:, None] & in_cols[None, :])[:, :, None]  # [H, W, 1]
    signs = jax.random.rademacher(k_s, (1, 1, c), dtype=jnp.float32)

    def propose(sg):
        return jnp.where(window, jnp.clip(x0 + sg * epsilon, 0.0, 255.0), x_best)

    cand = propose(signs)
    return jnp.where(jnp.all(cand == x_best), propose(-signs), cand)


def _image_keys(seed, index):
    """One PRNG key per image from its index in the full input, so results do not depend on batching."""
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(index)


def _padded(ids: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """``ids`` repeated at the end up to the next size of the series 8, 12, 16, 24, 32, 48, … (powers of two and
    the halfway points; at most ``batch_size`` when given): the shrinking sets of images still robust then reuse a few
    compiled shapes instead of compiling one per size, and carry at most a third of padding (from 8 up)."""
    size = 8
    while size < len(ids):
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    size = max(size if batch_size is None else min(batch_size, size), len(ids))
    return np.pad(ids, (0, size - len(ids)), mode="edge")


@functools.lru_cache(maxsize=32)
def _make_square_fns(logits_fn):
    """Jitted (init, run) of the Square attack for ``logits_fn`` (cached: no recompilation per call or budget)."""

    def evaluate(x, labels):
        z = logits_fn(x)
        return _margin_loss(z, labels), jnp.argmax(z, axis=-1) != labels

    @jax.jit
    def init(seed, index, x0, labels, epsilon):
        keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(_image_keys(seed, index))
        clean_loss, clean_wrong = evaluate(x0, labels)
        stripes = jax.vmap(_square_init_one, in_axes=(0, 0, None))(keys, x0, epsilon)
        loss, fooled = evaluate(stripes, labels)
        keep_clean = clean_wrong.reshape((-1,) + (1,) * (x0.ndim - 1))
        x_best = jnp.where(keep_clean, x0, stripes)
        # the stripes are the starting point even when they lower the margin (as in the paper)
        loss_best = jnp.where(clean_wrong, clean_loss, loss)
        done = clean_wrong | fooled
        used = jnp.where(clean_wrong, 0, 1).astype(jnp.int32)
        return x_best, loss_best, done, used

    @jax.jit
    def run(seed, index, x0, labels, x_best, loss_best, done, used, epsilon, p_init, queries, i_start, i_stop):
        keys = _image_keys(seed, index)
        propose = jax.vmap(_square_proposal_one, in_axes=(0, 0, 0, None, None, None, None))

        def cond(state):
            i, _, _, done, _ = state
            return (i < i_stop) & ~jnp.all(done)

        def body(state):
            i, x_best, loss_best, done, used = state
            keys_i = jax.vmap(lambda k: jax.random.fold_in(k, i + 1))(keys)
            cand = propose(keys_i, x0, x_best, i, epsilon, p_init, queries)
            loss, fooled = evaluate(cand, labels)
            active = ~done
            better = active & ((loss > loss_best) | fooled)
            x_best = jnp.where(better.reshape((-1,) + (1,) * (x0.ndim - 1)), cand, x_best)
            return i + 1, x_best, jnp.where(better, loss, loss_best), done | (active & fooled), used + active

        state = (i_start, x_best, loss_best, done, used)
        _, x_best, loss_best, done, used = jax.lax.while_loop(cond, body, state)
        return x_best, loss_best, done, used

    return init, run


def square_attack(
    logits_fn: LogitsFn,
    images,
    labels,
    *,
    epsilon: float,
    queries: int = 1000,
    p_init: float = 0.8,
    seed: int = 0,
    batch_size: int = 1000,
    chunk_queries: int | None = 25,
) -> AttackResult:
    """L∞ Square attack (Andriushchenko et al. 2020): random search on the logit margin, no gradients at all.

    Per image: start from vertical stripes x0 ± ε (1 query); then at each iteration i propose changing one
    random s×s square to clip(x0 ± ε) (one random sign per channel; s from the schedule p(i) of
    :func:`square_fraction`), query the model, and accept the proposal if the margin loss
    max_{j≠y} z_j − z_y increases. An image stops as soon as it is misclassified. Images misclassified when clean
    are successes with 0 queries. At most ``queries`` forward passes per image (the stripes included).
    Pixels stay in [x0 − ε, x0 + ε] ∩ [0, 255] (continuous; integer when x0 and ε are).

    ``p_init`` 0.8 is AutoAttack's setting for L∞ (the paper used 0.05 on ImageNet). Every image has its own
    PRNG stream (``seed`` folded with the image's index), so a result does not depend on ``batch_size`` or
    ``chunk_queries``. The queries run as a jitted ``lax.while_loop`` over chunks of ``chunk_queries``
    iterations for the still-active images of each batch (``None``: one loop for the whole budget; the loop
    stops early once a whole batch is fooled).

    Returns:
      :class:`AttackResult` with ``queries`` (forward passes used per image), ``linf``/``l2`` of the
      adversarial (0 where it failed), ``adversarial`` (the original where it failed).
    """
    eps = float(epsilon)
    if not (np.isfinite(eps) and eps >= 0):
        raise ValueError(f"epsilon must be a finite non-negative number of pixels, got {epsilon}")
    if int(queries) != queries or queries < 1:
        raise ValueError(f"queries must be a positive integer, got {queries}")
    if not 0 < p_init <= 1:
        raise ValueError(f"p_init must be in (0, 1], got {p_init}")
    if chunk_queries is not None and (int(chunk_queries) != chunk_queries or chunk_queries < 1):
        raise ValueError(f"chunk_queries must be a positive integer or None, got {chunk_queries}")
    x_all = np.asarray(images, np.float32)
    y_all = np.asarray(labels, np.int32)
    n = len(x_all)
    if x_all.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {x_all.shape}")
    init, run = _make_square_fns(logits_fn)
    iterations = int(queries) - 1
    chunk = iterations if chunk_queries is None else int(chunk_queries)
    x_best = x_all.copy()
    done = np.zeros(n, bool)
    used = np.zeros(n, np.int32)
    loss_best = np.zeros(n, np.float32)
    scalars = (jnp.float32(eps), jnp.float32(p_init), jnp.float32(queries))
    for start in range(0, n, batch_size):
        ids = np.arange(start, min(start + batch_size, n))
        xb, lb, db, ub = init(seed, jnp.asarray(ids, jnp.int32), x_all[ids], y_all[ids], scalars[0])
        x_best[ids], loss_best[ids] = np.asarray(xb), np.asarray(lb)
        done[ids], used[ids] = np.asarray(db), np.asarray(ub)
        i = 0
        while i < iterations:
            act = ids[~done[ids]]
            if not act.size:
                break
            pad = _padded(act)  # a few padded sizes: few recompilations
            i_stop = min(i + max(chunk, 1), iterations)
            xb, lb, db, ub = run(
                seed,
                jnp.asarray(pad, jnp.int32),
                x_all[pad],
                y_all[pad],
                x_best[pad],
                loss_best[pad],
                done[pad],
                used[pad],
                *scalars,
                jnp.int32(i),
                jnp.int32(i_stop),
            )
            k = act.size
            x_best[act], loss_best[act] = np.asarray(xb)[:k], np.asarray(lb)[:k]
            done[act], used[act] = np.asarray(db)[:k], np.asarray(ub)[:k]
            i = i_stop
    success = done
    adv = np.where(success.reshape((-1,) + (1,) * (x_all.ndim - 1)), x_best, x_all)
    delta = (adv - x_all).reshape(n, -1)
    return AttackResult(
        success=success,
        adversarial=adv,
        step=np.zeros(n, np.int64),
        linf=np.abs(delta).max(axis=1, initial=0.0),
        l2=np.sqrt((delta.astype(np.float64) ** 2).sum(axis=1)),
        blank=np.zeros(n, bool),
        still_changing=np.zeros(n, bool),
        max_step=int(round(eps)),
        queries=used.astype(np.int64),
    )
