"""BANG's per-example balancing factors and the optax transformation that applies them.

BANG (Rozsa, Günther, Boult, WACV 2018, eq. 6) replaces each weighted layer's batch gradient

    (1/N) Σ_i ∂E_i/∂w      by      β · (1/N) Σ_i η_i · ∂E_i/∂w,

    η_i = (m / n_i) ^ (ε_i · (1 − n_i / m)),   n_i = ‖κ_i‖₂,  m = max_i n_i,

where κ_i is the gradient of the loss with respect to the layer's (pre-activation) output for example i,
ε_i = ε for a correctly classified example and ε·ratio otherwise. Examples with n_i = 0 keep η_i = 1 (the
authors' Caffe code skips them), so a batch whose norms are all zero is left unchanged.

η is unbounded: with a saturated softmax n_i / m can be 1e-18 and η reaches 1e15 while η_i·n_i stays ≤ m.
:func:`eta` therefore works in log space, and :func:`safe_norm` rescales before squaring so that norms of
tiny cotangents do not underflow to zero in float32.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bang_jax.per_example import PerExampleGrad, per_example_fingerprint

__all__ = [
    "BangConfig",
    "BangState",
    "apply_beta",
    "bang",
    "broadcast_to_params",
    "check_hyperparameter",
    "eta",
    "eta_groups",
    "eta_settings",
    "safe_norm",
]


def safe_norm(x: jax.Array, batch_axis: int = 0) -> jax.Array:
    """Per-example L2 norm over every axis but the batch axis, without underflow.

    Args:
      x: ``[N, ...]`` array (for instance κ, the loss gradient w.r.t. a layer's output), or any array whose
        ``batch_axis`` carries the batch.
      batch_axis: the axis that indexes the examples (default 0).

    Returns:
      ``[N]`` array of ‖x_i‖₂. Computed as ``a·‖x/a‖`` with ``a = max|x_i|`` so that values around 1e-20,
      whose squares underflow in float32, still give the right norm; an all-zero row gives exactly 0, and so
      does a row whose largest entry is subnormal (below ``finfo.tiny``, ≈1.2e-38 in float32). Reductions only,
      no reshape, so a sharded ``x`` keeps its sharding.
    """
    if x.ndim == 0:
        raise ValueError("safe_norm needs an array with a batch axis, got a scalar")
    batch_axis = batch_axis % x.ndim
    axes = tuple(a for a in range(x.ndim) if a != batch_axis)
    scale = jnp.max(jnp.abs(x), axis=axes)
    # Rows whose largest entry is subnormal count as zero: XLA on CPU flushes subnormals to zero inside
    # arithmetic, so dividing by such a scale would give 0/0.
    usable = scale >= jnp.finfo(x.dtype).tiny
    safe_scale = jnp.where(usable, scale, 1.0)
    norm = scale * jnp.sqrt(jnp.sum(jnp.square(x / jnp.expand_dims(safe_scale, axes)), axis=axes))
    return jnp.where(usable, norm, jnp.zeros_like(norm))


def eta(kappa_norms: jax.Array, correct: jax.Array, epsilon: Any, ratio: Any = 1.0) -> jax.Array:
    """BANG's balancing factors η for one layer (paper eq. 5, docs/semantics.md).

    Args:
      kappa_norms: ``[N]`` norms n_i ≥ 0 of the layer-output gradients κ_i (any common scale: only ratios
        n_i / m enter).
      correct: ``[N]`` booleans, whether example i was classified correctly by the training forward pass.
      epsilon: ε ≥ 0 (scalar).
      ratio: factor on ε for misclassified examples (scalar, ≥ 0).

    Returns:
      ``[N]`` float array η ≥ 1; η_i = 1 where n_i = 0 (and everywhere when all norms are 0). Computed in
      log space (log r = log n_i − log m), so ratios down to 1e-38 give finite η (≤ ~1e31 for ε ≤ 1).

    Raises:
      ValueError: concrete norms with a NaN, infinite or negative entry. Traced norms (inside ``jit``) cannot be
        checked: then every η of the layer is NaN, so the fault shows rather than rescaling the other examples.
    """
    n = jnp.asarray(kappa_norms)
    if _is_concrete(kappa_norms):
        bad = ~np.isfinite(np.asarray(n)) | (np.asarray(n) < 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"kappa_norms must be finite and non-negative, got kappa_norms[{i}] = {float(n[i])} "
                             "(a norm is never negative; a NaN or infinite one means the loss or the model diverged)")
    # Under jit the values cannot be inspected: a layer with any NaN, infinite or negative norm gets η = NaN for
    # every example (docs/semantics.md), so the fault shows in the gradient instead of silently rescaling the rest.
    invalid = jnp.any(~jnp.isfinite(n) | (n < 0))
    n = jnp.where(invalid, jnp.zeros_like(n), n)
    m = jnp.max(n)
    # Norms below the smallest normal number count as zero (subnormals are flushed to zero in XLA CPU
    # arithmetic, which would turn log(n) into −inf and η into inf).
    nonzero = n >= jnp.finfo(n.dtype).tiny
    log_r = jnp.where(nonzero, jnp.log(jnp.where(nonzero, n, 1.0)) - jnp.log(jnp.where(m > 0, m, 1.0)), 0.0)
    eps_i = jnp.where(correct, epsilon, epsilon * ratio).astype(n.dtype)
    log_eta = eps_i * (1.0 - jnp.exp(log_r)) * (-log_r)
    out = jnp.where(nonzero, jnp.exp(log_eta), jnp.ones_like(n))
    return jnp.where(invalid, jnp.full_like(out, jnp.nan), out)


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_hyperparameter(name: str, value: Any) -> None:
    """Raises ``ValueError`` if a (pytree of) hyperparameter(s) holds a negative or non-finite number.

    Traced values (inside ``jit``) cannot be inspected and are accepted as they are.
    """
    for leaf in jax.tree.leaves(value):
        if not _is_concrete(leaf):
            continue
        arr = np.asarray(leaf)
        if not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
            raise ValueError(f"BANG hyperparameter {name} must be a number, got {leaf!r}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"BANG hyperparameter {name} must be finite, got {leaf!r}")
        if np.any(arr < 0):
            raise ValueError(f"BANG hyperparameter {name} must be non-negative, got {leaf!r}")


def path_keys(path) -> tuple:
    out = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(k.key)
        elif isinstance(k, jax.tree_util.GetAttrKey):
            out.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(k.idx)
        else:  # pragma: no cover - other key kinds
            out.append(str(k))
    return tuple(out)


def broadcast_to_params(name: str, value: Any, tree: Any) -> Any:
    """Broadcasts a scalar or a per-layer pytree (a prefix of ``tree``) to ``tree``'s structure.

    ``value`` may be a number, or a nested mapping whose keys are a prefix of ``tree``'s keys, e.g.
    ``{'conv1': 0.8, 'ip1': {'kernel': 0.81, 'bias': 0.8}}`` for a params dict ``{'conv1': {...}, 'ip1': {...}}``.
    Every leaf of ``tree`` must be covered exactly once.
    """
    return jax.tree.map(lambda pair: pair[1], _broadcast_with_sources(name, value, tree),
                        is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple))


def _broadcast_with_sources(name: str, value: Any, tree: Any) -> Any:
    """``tree``'s structure, each leaf ``(source key, value)``: the key of the entry of ``value`` that covers it
    (``()`` for a number)."""
    if not isinstance(value, Mapping):
        return jax.tree.map(lambda _: ((), value), tree)
    flat_value = {path_keys(p): v for p, v in jax.tree_util.tree_flatten_with_path(value)[0]}

    def pick(path, _leaf):
        keys = path_keys(path)
        text = tuple(map(str, keys))  # as text: list indices (int keys) come back from JSON as strings
        matches = [(k, v) for k, v in flat_value.items() if text[: len(k)] == tuple(map(str, k))]
        if len(matches) != 1:
            raise ValueError(
                f"per-layer {name} does not cover parameter {'/'.join(map(str, keys))} exactly once "
                f"(its keys: {sorted('/'.join(map(str, k)) for k in flat_value)})"
            )
        return matches[0]

    return jax.tree_util.tree_map_with_path(pick, tree)


def eta_groups(config: BangConfig, params: Any) -> tuple:
    """One label per leaf of ``params`` (flatten order): leaves with the same label share ε and ratio by
    construction — they are covered by the same entries of the config's per-layer trees — so one η serves them
    all. Decided statically from the config's structure, never from the values, which may be traced. (A config
    :meth:`BangConfig.broadcast` to the params has one entry per leaf, so each leaf gets its own label.)"""
    return tuple(label for label, _, _ in eta_settings(config, params))


def eta_settings(config: BangConfig, params: Any) -> list[tuple]:
    """``(group label, ε, ratio)`` per leaf of ``params`` (flatten order): :func:`eta_groups` with the values."""
    def pairs(name):
        return jax.tree.leaves(_broadcast_with_sources(name, getattr(config, name), params),
                               is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple))

    return [((e[0], r[0]), e[1], r[1]) for e, r in zip(pairs("epsilon"), pairs("ratio"))]


_FIELDS = ("epsilon", "beta", "ratio")


@dataclasses.dataclass(frozen=True, eq=False)
class BangConfig:
    """BANG's hyperparameters, the one owner of their meaning and validation.

    Attributes:
      epsilon: ε ≥ 0, the balancing exponent (paper eq. 5). ``0`` makes every η exactly 1 (regular training).
      beta: β ≥ 0, a factor on every parameter's gradient, applied after balancing and before anything later
        in the optimiser chain (e.g. weight decay).
      ratio: ≥ 0, the factor on ε for misclassified examples (the paper's CIFAR runs use 0.5).

    Each field is a number or a per-layer pytree: a nested mapping whose keys are a prefix of the params tree,
    e.g. ``{"conv1": 0.8, "conv2": 0.8, "ip1": {"kernel": 0.81, "bias": 0.8}, "ip2": 0.8}``; every parameter
    must be covered exactly once. :func:`bang`, :func:`bang_jax.bang_grad`, training and the experiments' command
    line all take this type (or its fields by keyword), so the values are validated in one place
    (``__post_init__``: finite, non-negative numbers; traced values inside ``jit`` are not inspected).

    ``BangConfig`` is a pytree whose leaves are the numbers, so a config broadcast to a params tree
    (:meth:`broadcast`) can travel inside a train state: stacked over models, vmapped, sharded and checkpointed.
    """

    epsilon: Any = 0.0
    beta: Any = 1.0
    ratio: Any = 1.0

    def __post_init__(self):
        for name in _FIELDS:
            check_hyperparameter(name, getattr(self, name))

    @property
    def is_regular(self) -> bool:
        """True when this config leaves gradients unchanged (ε = 0 everywhere and β = 1 everywhere)."""
        leaves = lambda v: [np.asarray(x) for x in jax.tree.leaves(v)]  # noqa: E731
        return all(np.all(x == 0) for x in leaves(self.epsilon)) and all(np.all(x == 1) for x in leaves(self.beta))

    def broadcast(self, params: Any, dtype=jnp.float32) -> BangConfig:
        """This config with every field a full tree of ``dtype`` scalars in ``params``' structure (one per leaf)."""
        return BangConfig._unchecked(
            **{f: jax.tree.map(lambda v: jnp.asarray(v, dtype), broadcast_to_params(f, getattr(self, f), params))
               for f in _FIELDS}
        )

    def to_json(self) -> dict:
        """Plain Python numbers and dicts (for config files and results)."""
        def plain(v):
            if isinstance(v, Mapping):
                return {str(k): plain(x) for k, x in v.items()}
            return float(np.asarray(v))

        return {f: plain(getattr(self, f)) for f in _FIELDS}

    @classmethod
    def _unchecked(cls, **fields) -> BangConfig:
        obj = object.__new__(cls)
        for f in _FIELDS:
            object.__setattr__(obj, f, fields[f])
        return obj


jax.tree_util.register_pytree_with_keys(
    BangConfig,
    lambda c: (tuple((jax.tree_util.GetAttrKey(f), getattr(c, f)) for f in _FIELDS), None),
    lambda _, children: BangConfig._unchecked(**dict(zip(_FIELDS, children))),
    flatten_func=lambda c: (tuple(getattr(c, f) for f in _FIELDS), None),
)


def as_bang_config(config: BangConfig | None = None, **fields) -> BangConfig:
    """``config`` itself, or a :class:`BangConfig` built from ``epsilon=``, ``beta=``, ``ratio=`` (not both)."""
    given = {k: v for k, v in fields.items() if v is not None}
    if config is None:
        return BangConfig(**given)
    if not isinstance(config, BangConfig):
        raise TypeError(f"config must be a bang_jax.BangConfig, got {type(config).__name__}")
    if given:
        raise ValueError(f"pass either config= or {', '.join(given)}=, not both")
    return config


def apply_beta(grads: Any, beta: Any) -> Any:
    """β times every gradient leaf (β a number or a prefix tree): the one place β is applied."""
    beta_tree = broadcast_to_params("beta", beta, grads)
    return jax.tree.map(lambda g, b: (g * b).astype(g.dtype), grads, beta_tree)


def _is_marker_or_masked(x) -> bool:
    return isinstance(x, (PerExampleGrad, optax.MaskedNode))


def _raise_if_touched(paths: tuple[str, ...], bad) -> None:
    bad = np.asarray(bad).reshape(-1, len(paths)) if len(paths) else np.zeros((1, 0), bool)
    hit = [p for p, b in zip(paths, np.any(bad, axis=0)) if b]
    if hit:
        raise ValueError(
            f"bang() received per-example gradients that were changed after they were computed (leaf {hit[0]}"
            + (f" and {len(hit) - 1} more" if len(hit) > 1 else "")
            + "): a transformation placed before bang() in the optax chain (clip_by_global_norm, scale, "
            "add_noise, …) touched them. bang() must come first: it balances the per-example gradients into "
            "one batch gradient, which everything after it then sees."
        )


class BangState(NamedTuple):
    """State of :func:`bang`: nothing is carried between steps."""


def bang(
    epsilon: Any = None, beta: Any = None, ratio: Any = None, *, config: BangConfig | None = None
) -> optax.GradientTransformationExtraArgs:
    """Aggregates per-example gradients into BANG's balanced batch gradient (paper eq. 6, docs/semantics.md).

    For every parameter leaf g of shape ``[N, ...]`` (per-example gradients of the per-example losses E_i,
    batch on axis 0) this returns ``β · (1/N) Σ_i η_i g_i`` with η from :func:`eta`, computed from the κ norms
    of the layer the leaf belongs to. Leaves outside weighted layers have κ norms of zero, so η = 1 for them
    (the plain mean) and β still applies.

    Args:
      epsilon: ε ≥ 0, a scalar or a per-layer pytree (a prefix of the params tree).
      beta: β ≥ 0, applied after balancing (and before any weight decay later in the chain); default 1.
      ratio: factor on ε for misclassified examples (the paper's CIFAR runs use 0.5); default 1.
      config: a :class:`BangConfig` instead of the three keywords.

    The updates must be per-example gradients marked as :class:`PerExampleGrad` (what
    :func:`bang_jax.per_example_grads` and :func:`bang_jax.nnx.per_example_grads` return; use
    :func:`mark_per_example` for your own). The update takes keyword arguments ``kappa_norms`` (a pytree with the
    structure of the gradients, each leaf an ``[N]`` array of the norms of that leaf's layer-output gradients)
    and ``correct`` (``[N]`` bool), both as returned by ``per_example_grads``.

    .. warning::
      Like :func:`optax.contrib.differentially_private_aggregate`, this transformation expects per-example
      gradients, so it must come **first** in a chain; everything after it sees the balanced mean. Misuse
      raises: unmarked or batch-mean gradients, gradients a transformation before it changed (checked with a
      fingerprint; under ``jit`` the error surfaces when the step runs), and per-example gradients that reach
      an optimiser's state, ``apply_updates`` or ``optax.MultiSteps``' accumulator. Inside ``optax.masked`` or
      ``optax.multi_transform`` every partition must start with ``bang()`` (masked-out leaves pass through).
      For gradient accumulation put it before the accumulator:
      ``optax.chain(bang(...), optax.MultiSteps(solver, k).gradient_transformation())``.

    Example::

      pe = bang_jax.per_example_grads(model.apply, variables, images, labels, rngs={'dropout': key}, train=True)
      tx = optax.chain(bang_jax.bang(epsilon=0.815), bang_jax.caffe_sgd(...))
      updates, opt_state = tx.update(pe.grads, opt_state, params,
                                     kappa_norms=pe.kappa_norms, correct=pe.correct)
    """
    if config is None and epsilon is None:
        raise TypeError("bang() needs epsilon= (or config=bang_jax.BangConfig(...))")
    config = as_bang_config(config, epsilon=epsilon, beta=beta, ratio=ratio)

    def init_fn(params):
        del params
        return BangState()

    def update_fn(updates, state, params=None, *, kappa_norms=None, correct=None, **extra_args):
        del extra_args
        flat, treedef = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_marker_or_masked)
        if not flat:
            return updates, state
        paths = [jax.tree_util.keystr(p) for p, _ in flat]
        leaves = [g for _, g in flat]
        for path, g in zip(paths, leaves):
            if not _is_marker_or_masked(g):
                shape = getattr(g, "shape", type(g).__name__)
                raise ValueError(
                    f"bang() must be the first transformation of the optax chain and receive the per-example "
                    f"gradients of bang_jax.per_example_grads(...).grads (or bang_jax.mark_per_example(...) of "
                    f"your own); leaf {path} is a plain array of shape {shape} — a batch-mean gradient, or one a "
                    "transformation before bang() (or a wrapper such as optax.MultiSteps) already produced"
                )
        if kappa_norms is None or correct is None:
            raise ValueError(
                "bang() needs the keyword arguments kappa_norms= and correct= in tx.update(...) (both come from "
                "per_example_grads); a wrapper that does not forward extra arguments cannot hold bang()"
            )
        correct = jnp.asarray(correct)
        if correct.ndim != 1:
            raise ValueError(f"correct must be a [N] array, got shape {correct.shape}")
        n = correct.shape[0]
        try:
            norm_leaves = treedef.flatten_up_to(kappa_norms)
        except (ValueError, TypeError) as err:
            raise ValueError(
                "kappa_norms must have the structure of the gradients (one [N] array per leaf): " + str(err)
            ) from None
        param_leaves = [None] * len(leaves)
        if params is not None:
            try:
                param_leaves = treedef.flatten_up_to(params)
            except (ValueError, TypeError):
                param_leaves = [None] * len(leaves)
        checked_paths, mismatch = [], []
        for path, g, k, p in zip(paths, leaves, norm_leaves, param_leaves):
            if isinstance(g, optax.MaskedNode):
                continue
            v_shape, v_dtype = g._shape_dtype()
            if len(v_shape) == 0 or v_shape[0] != n:
                raise ValueError(
                    f"bang() expects per-example gradients with the batch (N={n}, from correct) on axis 0, but "
                    f"the leaf {path} has shape {v_shape}"
                )
            if p is not None and hasattr(p, "shape") and tuple(v_shape[1:]) != tuple(p.shape):
                raise ValueError(
                    f"bang() got per-example gradients of shape {v_shape} for the parameter {path} of shape "
                    f"{tuple(p.shape)}; expected ({n}, *{tuple(p.shape)}): bang() must come first in the chain"
                )
            if jnp.shape(k) != (n,):
                raise ValueError(f"kappa_norms leaf {path} must have shape ({n},), got {jnp.shape(k)}")
            if g.fingerprint is None:
                continue
            tol = 3e-2 if jnp.finfo(v_dtype).bits <= 16 else 1e-3
            now = per_example_fingerprint(g.value)
            was = jnp.asarray(g.fingerprint, jnp.float32)
            mismatch.append(jnp.any(jnp.abs(now - was) > tol * jnp.maximum(now, was)))
            checked_paths.append(path)
        if mismatch:
            bad = jnp.stack(mismatch)
            if _is_concrete(bad):
                _raise_if_touched(tuple(checked_paths), bad)
            else:  # only a touched step pays for the host callback (an unconditional one cost 20% on CPU)
                report = functools.partial(_raise_if_touched, tuple(checked_paths))
                jax.lax.cond(jnp.any(bad), lambda b: jax.debug.callback(report, b), lambda b: None, bad)

        shapes = treedef.unflatten([g if isinstance(g, optax.MaskedNode) else jax.ShapeDtypeStruct(*g._shape_dtype())
                                    for g in leaves])
        eps_leaves = treedef.flatten_up_to(broadcast_to_params("epsilon", config.epsilon, shapes))
        ratio_leaves = treedef.flatten_up_to(broadcast_to_params("ratio", config.ratio, shapes))

        def balance(g, k, e, r):
            if isinstance(g, optax.MaskedNode):
                return g
            dtype = g._shape_dtype()[1]
            w = eta(k, correct, e, r).astype(dtype)
            return (g.weighted_sum(w) / n).astype(dtype)

        out = treedef.unflatten([balance(*a) for a in zip(leaves, norm_leaves, eps_leaves, ratio_leaves)])
        return apply_beta(out, config.beta), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
