"""The framework-free core of BANG's gradients, shared by the linen (:mod:`bang_jax.linen`) and NNX
(:mod:`bang_jax.nnx`) adapters.

A forward pass of the user's model runs with a :class:`Tap` that the adapter calls at every weighted layer, dropout
layer and batch-coupling layer. The tap's modes are ``discover`` (record the weighted layers' output shapes,
abstractly), ``plain``, ``perturb`` (add a zero perturbation to each weighted layer's output: κ is its gradient,
for the per-example route) and ``balance`` (run each weighted layer under the custom VJP :func:`_balanced`, whose
backward pass forms the layer's own parameter gradient from η·κ and sends the unscaled κ down). The drivers
:func:`discover`, :func:`run_per_example`, :func:`run_bang` and :func:`run_sample_masks` take any object that
satisfies :class:`Adapter`. What is computed is written out in docs/semantics.md: the batch axis of each layer's
output is found by tracing at two batch sizes, every call of a layer (and every step of a scan) is balanced on its
own, and the η of a layer's leaves is grouped by their (ε, ratio).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bang_jax import balance, per_example
from bang_jax.balance import BangConfig, apply_beta, eta, safe_norm

__all__ = ["Adapter", "BangAux", "PerExampleGrads", "Tap", "default_correct", "default_loss"]

LayerPath = tuple


class Adapter(Protocol):
    """What a framework adapter gives the drivers of this module (:class:`bang_jax.linen._Linen`,
    :class:`bang_jax.nnx._NNX`)."""

    params: Any  # the differentiated parameters (a pytree)
    state: Any  # everything else a forward pass reads (rngs, batch statistics, ...)
    layer_types: tuple  # the weighted layer types
    no_layers_hint: str  # the end of the "no weighted layer" message

    def run(self, params: Any, state: Any, inputs: Any, kwargs: dict, tap: Tap) -> tuple[Any, Any]:
        """One forward pass with ``tap`` active: ``(outputs, updated state)``."""

    def leaf_key(self, path: tuple) -> tuple:
        """The normalised key of a parameter leaf (NNX drops a Variable's ``.value``)."""

    def per_example_state(self, state: Any, n: int) -> tuple[Any, Any]:
        """``(state batched for n one-example forwards, its vmap in_axes)``."""

    def after_per_example(self, updates: Any) -> None:
        """Writes back what the one-example forwards changed (NNX RNG counts)."""


class PerExampleGrads(NamedTuple):
    """What :func:`per_example_grads` (and :func:`bang_jax.nnx.per_example_grads`) returns.

    Attributes:
      grads: per-example gradients of the per-example losses E_i, the structure of the parameters, each leaf a
        :class:`bang_jax.PerExampleGrad` marker holding ``[N, *param.shape]`` (batch on axis 0). Only
        :func:`bang_jax.bang`, first in an optax chain, accepts them.
      kappa_norms: the parameters' structure, each leaf an ``[N]`` array: ‖∂E_i/∂(output of the layer the leaf
        belongs to)‖₂. Leaves outside any weighted layer hold zeros (BANG then leaves them unscaled).
      correct: ``[N]`` bool, ``correct_fn`` of the training forward pass (default: argmax equals the label).
      loss: scalar, the batch-mean loss.
      logits: the model's outputs of the training forward pass, batch on axis 0 (``[N, classes]`` logits for
        the default loss).

    :func:`weighted_layers` lists the balanced layers (those whose leaves have non-zero ``kappa_norms``).
    """

    grads: Any
    kappa_norms: Any
    correct: jax.Array
    loss: jax.Array
    logits: Any


class BangAux(NamedTuple):
    """Auxiliary output of :func:`bang_grad` / :func:`plain_grad` with ``return_aux=True``.

    Attributes:
      loss: scalar batch-mean loss.
      logits: the model's outputs of the training forward pass (``[N, classes]`` logits for the default loss).
      correct: ``[N]`` bool.
      layer_kappa_norms: ``{layer path: [N]}`` norms of κ of the batch-mean loss (1/N of the per-example
        ones) for every balanced layer; empty for :func:`plain_grad`.
      layer_eta: ``{layer path: [N]}`` the η used for each layer (keyed by leaf path for a layer whose leaves
        have different ε or ratio); empty for :func:`plain_grad`.
      model_state: the updated mutable collections (linen, with ``mutable=``) or non-parameter state (NNX:
        batch statistics, RNG counts; already written back to the model); ``{}`` when nothing changed.
    """

    loss: jax.Array
    logits: Any
    correct: jax.Array
    layer_kappa_norms: dict
    layer_eta: dict
    model_state: Any = None


# --------------------------------------------------------------------------------------------------------
# Loss, correctness and input checks.


def default_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``[N]`` softmax cross-entropy of ``[N, classes]`` logits and ``[N]`` integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def default_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``[N]`` bool: argmax of the logits equals the integer label."""
    return jnp.argmax(logits, axis=-1) == labels


def batch_size(inputs: Any) -> int:
    leaves = jax.tree.leaves(inputs)
    if not leaves:
        raise ValueError("inputs has no arrays")
    sizes = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(inputs)[0]:
        shape = np.shape(leaf)
        if len(shape) < 1:
            raise ValueError(f"every input leaf needs a leading batch axis; inputs{jax.tree_util.keystr(path)} "
                             f"has shape {shape}")
        sizes.add(shape[0])
    if len(sizes) != 1:
        raise ValueError(f"input leaves disagree on the batch size (axis 0): {sorted(sizes)}")
    n = sizes.pop()
    if n < 1:
        raise ValueError("the batch is empty")
    return n


def check_finite(tree: Any, name: str) -> None:
    """Concrete floating-point leaves of ``tree`` must be finite (a NaN or infinite pixel would give a NaN loss, or
    worse, a finite but meaningless one). Traced values (inside ``jit``) cannot be checked."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.core.Tracer) or not hasattr(leaf, "dtype"):
            continue
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            bad = ~np.isfinite(np.asarray(leaf))
            if bad.any():
                where = np.unravel_index(int(np.argmax(bad)), np.shape(leaf))
                raise ValueError(f"{name}{jax.tree_util.keystr(path)} holds NaN or infinite values (first at index "
                                 f"{tuple(int(i) for i in where)}); BANG needs finite inputs")


def check_labels(labels: Any, n: int, default_loss_used: bool) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(labels)[0]:
        shape = np.shape(leaf)
        if len(shape) < 1 or shape[0] != n:
            raise ValueError(f"labels{jax.tree_util.keystr(path)} must have the batch (N={n}) on axis 0 to match "
                             f"the inputs, got shape {shape}")
    if default_loss_used:
        labels_arr = labels
        if not hasattr(labels_arr, "dtype") or np.shape(labels_arr) != (n,):
            raise ValueError(f"labels must have shape ({n},) to match the inputs, got {np.shape(labels_arr)} "
                             "(pass loss_fn= and correct_fn= for other labels, e.g. soft or sequence labels)")
        if not jnp.issubdtype(labels_arr.dtype, jnp.integer):
            raise ValueError(f"labels must be integer class indices, got dtype {labels_arr.dtype} (pass "
                             "loss_fn= and correct_fn= for soft labels)")


def check_default_outputs(outputs: Any, labels: Any, n: int) -> None:
    """With the default loss: outputs must be ``[N, classes]`` logits and concrete labels in range."""
    if not hasattr(outputs, "shape") or len(outputs.shape) != 2 or outputs.shape[0] != n:
        shape = getattr(outputs, "shape", jax.tree.map(np.shape, outputs))
        raise ValueError(f"the default loss needs [N, classes] logits from the model, got {shape}; pass "
                         "loss_fn=(outputs, labels) -> [N] and correct_fn=(outputs, labels) -> [N] bool for "
                         "other outputs (sequence models, several heads, ...)")
    classes = outputs.shape[1]
    if not isinstance(labels, jax.core.Tracer):
        lab = np.asarray(labels)
        bad = (lab < 0) | (lab >= classes)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"labels must lie in [0, {classes}) for {classes} output classes; labels[{i}] = "
                             f"{int(lab[i])}")


# --------------------------------------------------------------------------------------------------------
# The core: what happens at each weighted layer, dropout layer and batch-coupling layer of a forward pass.
# The linen interceptor below and the NNX hooks in bang_jax.nnx call the same Tap methods.

_ALLOWED_TRANSFORMS = frozenset({"jit", "pjit", "checkpoint / remat", "remat", "cond", "switch"})


def _is_loop(transform: str) -> bool:
    """A loop trace: scan (lax/nn/nnx), fori_loop, a while body, or flax's nn.scan pre-trace (``JaxprTrace``).
    A weighted layer inside one is called once per step, each step balanced on its own."""
    return any(w in transform for w in ("scan", "fori", "while", "JaxprTrace"))


def _current_trace():
    try:  # JAX's trace context (private; without it the check below is skipped)
        from jax._src import core as jax_core

        return jax_core.trace_ctx.trace
    except Exception:  # pragma: no cover - other JAX versions
        return None


def _transforms_between(entry) -> list[str]:
    """Names of the JAX transformations entered since ``entry`` (the trace when the model was called)."""
    t, names = _current_trace(), []
    while t is not None and entry is not None and t is not entry:
        frame = getattr(t, "frame", None)
        traced_for = getattr(getattr(frame, "debug_info", None), "traced_for", None)
        names.append(traced_for or {"BatchTrace": "vmap"}.get(type(t).__name__, type(t).__name__))
        t = getattr(t, "parent_trace", None)
    return names


def _kappa_norms(kappa: jax.Array, batch_axis: int = 0) -> jax.Array:
    """``[N]`` ‖κ_i‖₂ over every axis but ``batch_axis``, in at least float32 (so bfloat16 models get accurate η)."""
    return safe_norm(kappa.astype(jnp.promote_types(kappa.dtype, jnp.float32)), batch_axis=batch_axis)


def _along(values: jax.Array, like: jax.Array, batch_axis: int) -> jax.Array:
    """``[N]`` values shaped to broadcast against ``like`` along its ``batch_axis`` (no reshape: sharding-safe)."""
    return jnp.expand_dims(values.astype(like.dtype), tuple(a for a in range(like.ndim) if a != batch_axis))


def _same_sharding(x: jax.Array, like: jax.Array) -> jax.Array:
    """``x`` resharded to ``like``'s sharding type where they differ (explicit mesh axes; else a no-op)."""
    want, have = per_example._sharding_spec(like), per_example._sharding_spec(x)
    if want == have or (not any(want) and not any(have)):
        return x
    return jax.sharding.reshard(x, jax.sharding.PartitionSpec(*want))


def _float0_like(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _balanced(layer_fn, groups, batch_axis, p, x, extra, probe, correct, eps, ratio):
    """``layer_fn(p, x, extra)`` whose backward scales κ by η for the parameter gradient only (docs/semantics.md).

    ``groups`` is a tuple of tuples of leaf indices of ``p`` that share one (ε, ratio) pair (``eps[g]``,
    ``ratio[g]``). ``batch_axis`` is the axis of the layer's output that carries the batch (found by
    :func:`discover`). The cotangent of ``probe`` (``[1 + len(groups), N]``) carries the κ norms and each group's
    η out of the backward pass.
    """
    del groups, batch_axis, probe, correct, eps, ratio
    return layer_fn(p, x, extra)


def _balanced_fwd(layer_fn, groups, batch_axis, p, x, extra, probe, correct, eps, ratio):
    y, pullback = jax.vjp(lambda p, x: layer_fn(p, x, extra), p, x)
    return y, (pullback, extra, probe, correct, eps, ratio)


def _balanced_bwd(layer_fn, groups, batch_axis, res, kappa):
    del layer_fn
    pullback, extra, probe, correct, eps, ratio = res
    norms = _kappa_norms(kappa, batch_axis)
    _, dx = pullback(kappa)  # what flows down is never scaled
    dp_leaves, dp_def = None, None
    rows = [norms]
    for g, idx in enumerate(groups):
        e = eta(norms, correct, eps[g], ratio[g])
        rows.append(e)
        scaled = kappa * _along(e, kappa, batch_axis)
        dp_g, _ = pullback(scaled)
        leaves, treedef = jax.tree.flatten(dp_g)
        if dp_leaves is None:
            dp_leaves, dp_def = list(leaves), treedef
        for i in idx:
            dp_leaves[i] = leaves[i]
    dp = dp_def.unflatten(dp_leaves)
    probe_ct = _same_sharding(jnp.stack(rows).astype(probe.dtype), probe)
    return (dp, dx, jax.tree.map(_float0_like, extra), probe_ct, _float0_like(correct),
            tuple(jnp.zeros_like(e) for e in eps), tuple(jnp.zeros_like(r) for r in ratio))


_balanced.defvjp(_balanced_fwd, _balanced_bwd)


class LayerRecord(NamedTuple):
    kind: str
    out: jax.ShapeDtypeStruct
    leaf_keys: tuple  # relative key tuples of the layer's parameter leaves, in jax.tree.flatten order
    batch_axis: int = 0  # the output axis that carries the batch (found by discover, never assumed)
    layer: tuple = ()  # the layer's path (the record's key adds ('call{c}',) for its calls after the first)


def call_key(path, c: int) -> tuple:
    """The key of call ``c`` of the weighted layer at ``path``: the path itself for the first call (so a layer
    called once is keyed by its path), ``path + ('call{c}',)`` for the later ones."""
    return tuple(path) if c == 0 else tuple(path) + (f"call{c}",)


class Tap:
    """One forward pass's hooks. Modes: ``discover`` (record layers, abstract), ``plain``, ``perturb`` (add a
    zero perturbation to each weighted layer's output: κ is its gradient) and ``balance`` (:func:`_balanced`)."""

    def __init__(self, mode, *, adapter, per_example=False, perturbations=None, probes=None, correct=None,
                 groups=None, batch_axes=None, dropout_masks=None, record_dropout=False, shapes_only=False):
        self.mode, self.per_example, self.shapes_only = mode, per_example, shapes_only
        self.batch_axes = batch_axes
        self.leaf_key = adapter.leaf_key
        self.layer_types = getattr(adapter, "layer_types", ())
        self.perturbations, self.probes, self.correct, self.groups = perturbations, probes, correct, groups
        self.dropout_masks, self.record_dropout = dropout_masks, record_dropout
        self.layers: dict[LayerPath, LayerRecord] = {}  # keyed by call_key(layer path, call index)
        self.counts: dict[LayerPath, int] = {}
        self.calls: dict[LayerPath, tuple] = {}  # per-example perturb mode: (layer_fn, p, x, extra) per layer
        self.param_ids: set | None = None  # ids of the differentiated parameter leaves, when factoring layers
        self.masks: dict[LayerPath, jax.Array] = {}
        self.dropout_calls: dict[LayerPath, int] = {}
        self.live: dict = {}  # detect mode: each weighted layer's own copy of its parameters
        self.checked: set = set()  # detect mode: the parameter leaves that were given a copy
        self.entry = None
        self.passthrough = 0
        self.prefix: tuple = ()

    @contextlib.contextmanager
    def running(self):
        self.entry = _current_trace()
        yield self

    @contextlib.contextmanager
    def inside_layer(self):
        self.passthrough += 1
        try:
            yield
        finally:
            self.passthrough -= 1

    def _where(self, path, kind, what="weighted layer"):
        return f"{what} {'/'.join(map(str, path)) or '<root>'} ({kind})"

    def _check_context(self, path, kind):
        bad = [t for t in _transforms_between(self.entry) if t not in _ALLOWED_TRANSFORMS]
        loops = [t for t in bad if _is_loop(t)]
        if loops and self.per_example:
            raise ValueError(
                f"{self._where(path, kind)} runs inside a `{loops[0]}` trace (a scanned stack such as nn.scan / "
                "nnx.scan / lax.scan, or a loop): each step is a call of the layer with its own κ and η, which "
                "needs the single-pass route. Use bang_grad (bang_jax.nnx.bang_grad for NNX), which balances every "
                "step (every slice of a stacked layer) on its own."
            )
        others = [t for t in bad if not _is_loop(t)]
        if others:
            raise ValueError(
                f"{self._where(path, kind)} runs inside a `{others[0]}` trace (a vectorising transformation such "
                "as vmap / nn.vmap / nnx.vmap applied to the layer in the forward pass): the layer then sees a "
                "slice of its inputs, not the batch, and BANG cannot take one κ per example. Apply the layer to the "
                "whole batch; for a stack of layers with stacked weights use nn.scan / nnx.scan (balanced per "
                "slice); building stacked weights with nnx.vmap at construction time is fine."
            )

    def layer(self, path, kind, call, layer_fn, p, x, extra):
        """A weighted layer's call: ``call()`` runs it as the model would, ``layer_fn(p, x, extra)`` purely.

        Each call of a layer is balanced on its own (docs/semantics.md): the first call is keyed by the layer's
        path, call c ≥ 1 by ``path + ('call{c}',)``.
        """
        self._check_context(path, kind)
        c = self.counts.get(path, 0)
        self.counts[path] = c + 1
        key = call_key(path, c)
        if c and self.per_example:
            raise ValueError(
                f"{self._where(path, kind)} is called more than once in one forward pass (a shared or tied "
                "layer, a head applied twice, an unrolled RNN cell). BANG balances each call on its own, with its "
                "own κ and η, which needs the single-pass route: use bang_grad (bang_jax.nnx.bang_grad for NNX); "
                "per-example gradients hold only each example's sum over the calls."
            )
        leaf_keys = tuple(self.leaf_key(k) for k, _ in jax.tree_util.tree_flatten_with_path(p)[0])
        if self.mode == "balance":
            groups = self.groups[key]
            y = _balanced(layer_fn, tuple(g[0] for g in groups), self.batch_axes[key], p, x, extra,
                          self.probes[key], self.correct,
                          tuple(g[1] for g in groups), tuple(g[2] for g in groups))
        elif self.mode == "detect":  # the call reads its own copy of the parameters (see _check_single_use)
            leaves, treedef = jax.tree_util.tree_flatten(p)
            if self.param_ids is not None and all(id(leaf) in self.param_ids for leaf in leaves):
                keys = [tuple(path) + tuple(rel) for rel in leaf_keys]
                self.checked.update(keys)
                p = treedef.unflatten([self.live.get(k, leaf) for k, leaf in zip(keys, leaves)])
            y = layer_fn(p, x, extra)
        else:
            y = call()
        if not hasattr(y, "shape"):
            raise ValueError(f"{self._where(path, kind)} returned {type(y).__name__}, not an array; BANG balances "
                             "layers whose output is one array. Leave this type out of layer_types=.")
        self.layers[key] = LayerRecord(kind, jax.ShapeDtypeStruct(y.shape, y.dtype), leaf_keys, 0, tuple(path))
        if self.mode == "perturb":
            # Only a call made in the model's own trace (not inside remat, cond or an inner jit) can hand its
            # values out; the others keep the stored per-example gradient.
            # The layer must see the parameters themselves (not a transformed copy: map_variables, WeightNorm,
            # SpectralNorm, a stop_gradient that freezes them), or its VJP is not their gradient.
            untouched = self.param_ids is not None and all(id(leaf) in self.param_ids for leaf in jax.tree.leaves(p))
            if untouched and self.entry is not None and _current_trace() is self.entry:
                self.calls[path] = (layer_fn, p, x, extra)
            y = y + self.perturbations[path]
        return y

    def tied_output(self, path, kind, call, layer_fn, p, x, extra):
        """``Embed.attend``: the embedding used as an output projection, balanced as a call of a weighted layer
        (its lookup uses keep the ordinary gradient)."""
        if self.per_example:
            raise ValueError(
                f"{self._where(path, kind, 'layer')}: the embedding is shared between the input lookup and the "
                "output projection (tied embeddings). BANG balances the projection call and leaves the lookup's "
                "gradient as it is, which needs the single-pass route: use bang_grad (bang_jax.nnx.bang_grad for "
                "NNX); a per-example gradient holds each example's lookup and projection parts summed."
            )
        return self.layer(path, kind, call, layer_fn, p, x, extra)

    def dropout(self, path, kind, rate, x, draw):
        """A dropout layer in training mode; ``draw(z)`` applies the framework's own dropout to ``z``."""
        if self.shapes_only:  # the second discovery trace needs shapes only (masks have the first batch size)
            return x
        if self.record_dropout or self.dropout_masks is not None:
            # Shared masks are one per dropout layer and forward pass: a layer called twice or once per scan step
            # would need one per call, which the masks cannot hold.
            where = self._where(path, kind, "dropout layer")
            loops = [t for t in _transforms_between(self.entry) if _is_loop(t)]
            if loops:
                raise ValueError(f"{where} runs inside a `{loops[0]}` trace (a scan or loop): sample_dropout_masks / "
                                 "dropout_masks hold one mask per layer, not one per step. Compare the two BANG "
                                 "routes with dropout off, or draw dropout from rngs (bang_grad supports that).")
            self.dropout_calls[path] = self.dropout_calls.get(path, 0) + 1
            if self.dropout_calls[path] > 1:
                raise ValueError(f"{where} is called more than once in one forward pass: sample_dropout_masks / "
                                 "dropout_masks hold one mask per layer, not one per call. Use a separate dropout "
                                 "module per call, or draw dropout from rngs instead of shared masks.")
        if rate >= 1.0:
            return jnp.zeros_like(x)
        keep = 1.0 - rate
        if self.record_dropout:
            mask = draw(jnp.ones_like(x)) != 0  # Flax's own mask, drawn once from the model's rng stream
            self.masks[path] = mask
        elif self.dropout_masks is not None:
            if path not in self.dropout_masks:
                raise ValueError(f"dropout_masks has no mask for dropout layer {'/'.join(map(str, path))}: draw "
                                 "the masks with sample_dropout_masks for the same model, inputs and call "
                                 "arguments")
            mask = jnp.broadcast_to(self.dropout_masks[path], x.shape)
        else:
            return draw(x)
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))

    def other_dropout(self, path, kind):
        """Dropout randomness that dropout masks cannot share (e.g. attention dropout)."""
        if self.record_dropout or self.dropout_masks is not None:
            raise ValueError(
                f"{self._where(path, kind, 'layer')} applies its own dropout (attention dropout), which "
                "sample_dropout_masks / dropout_masks cannot share between the two BANG paths; set its "
                "dropout_rate to 0 (or make it deterministic) to compare the paths exactly, or draw dropout "
                "from rngs without dropout_masks"
            )

    def batch_coupled(self, path, kind):
        """A layer that couples the examples of a batch (BatchNorm in training mode)."""
        if self.per_example:
            raise ValueError(
                f"{self._where(path, kind, 'layer')} normalises over the batch (training mode), so the examples "
                "interact and per-example gradients do not exist: per_example_grads would normalise each example "
                "alone. Use bang_grad(..., mutable=['batch_stats']) (linen) / bang_jax.nnx.bang_grad, which "
                "balances each example's row of the batch loss's layer-output gradient (the authors' "
                "definition), or run the layer with running averages."
            )

    def refuse(self, message):
        raise ValueError(message)


# --------------------------------------------------------------------------------------------------------
# Drivers shared by linen and NNX. An adapter provides:
#   params, state            what is differentiated, and what else a forward pass reads
#   run(params, state, inputs, kwargs, tap) -> (outputs, updates)
#   leaf_key(path) -> tuple  the normalised key of a parameter leaf (NNX drops Variable's '.value')
#   layer_types              the weighted layer types
#   per_example_state(state, n) -> (batched state, in_axes); after_per_example(batched updates)
#   no_layers_hint           for the "no weighted layer" message


def _split_kwargs(kwargs: dict, n: int, batch_kwargs) -> tuple[dict, dict]:
    """(kwargs whose array leaves are sliced per example, kwargs passed whole)."""
    if batch_kwargs is not None:
        unknown = set(batch_kwargs) - set(kwargs)
        if unknown:
            raise ValueError(f"batch_kwargs names {sorted(unknown)}, which are not call arguments")
        return ({k: v for k, v in kwargs.items() if k in batch_kwargs},
                {k: v for k, v in kwargs.items() if k not in batch_kwargs})
    batched, whole = {}, {}
    for k, v in kwargs.items():
        leaves = jax.tree.leaves(v)
        arrays = [a for a in leaves if hasattr(a, "shape") and hasattr(a, "dtype")]
        if arrays and len(arrays) == len(leaves) and all(len(a.shape) >= 1 and a.shape[0] == n for a in arrays):
            batched[k] = v
        else:
            whole[k] = v
    return batched, whole


def _resized(tree, n: int, n2: int):
    """``tree``'s array leaves with axis 0 of length ``n`` as ShapeDtypeStructs of length ``n2`` (others as they
    are)."""

    def one(a):
        if hasattr(a, "shape") and hasattr(a, "dtype") and len(a.shape) >= 1 and a.shape[0] == n:
            shape = (n2,) + tuple(a.shape[1:])
            try:  # keep an explicit sharding type (an input sharded over the batch stays sharded)
                sharding = jax.typeof(a).sharding
                if any(sharding.spec):
                    return jax.ShapeDtypeStruct(shape, a.dtype, sharding=sharding)
            except Exception:  # pragma: no cover - no sharding type to keep
                pass
            return jax.ShapeDtypeStruct(shape, a.dtype)
        return a

    return jax.tree.map(one, tree)


def _batch_axis(path, rec: LayerRecord, shape2: tuple, n: int, n2: int) -> int:
    """The one output axis of a weighted layer whose length follows the batch size (``n`` → ``n2``), or an error."""
    where = f"weighted layer {'/'.join(map(str, path)) or '<root>'} ({rec.kind})"
    shape1 = tuple(rec.out.shape)
    changed = [a for a in range(len(shape1)) if a < len(shape2) and shape1[a] != shape2[a]]
    follows = [a for a in changed if shape1[a] == n and shape2[a] == n2]
    if len(shape1) == len(shape2) and len(follows) == 1 and changed == follows:
        return follows[0]
    remedy = (
        "BANG needs each weighted layer's output to carry the batch on exactly one axis, to take one κ_i per "
        "example. Keep the batch on its own axis through the layer (e.g. reshape [N·T, D] back to [N, T, D] "
        "before the layer), or leave this layer type out of layer_types= so that its parameters get the "
        "ordinary gradient."
    )
    if len(shape1) != len(shape2) or any(shape1[a] != shape2[a] for a in changed if a not in follows):
        found = (
            f"its output has shape {shape1} at batch {n} and {shape2} at batch {n2}: the batch is merged "
            "with other axes or changes the output's rank"
        )
    elif not changed:
        found = f"its output {shape1} does not depend on the batch size (traced at batch {n} and {n2})"
    else:
        found = (
            f"its output {shape1} has {len(follows)} axes ({', '.join(map(str, follows))}) whose length follows "
            f"the batch size (traced at batch {n} and {n2}), so which one is the batch is ambiguous"
        )
    raise ValueError(f"{where}: {found}. {remedy}")


def discover(adapter, inputs, kwargs, *, n, per_example=False, dropout_masks=None, batch_kwargs=None):
    """Abstract forward passes: ``(records {path: LayerRecord}, outputs ShapeDtypeStruct tree)``.

    The model is traced at the batch size ``n`` and again at ``2n`` (inputs and batch-carrying call arguments
    resized): the batch axis of each weighted layer's output is the one axis whose length follows. It is found,
    never assumed, so a layer whose output carries the batch on a later axis (``Einsum('bd,sdh->sbh')``) is
    balanced along that axis even when axis 0 happens to have length ``n``.
    """
    found = {}

    def shapes(params, state, inputs, kw, key, **tap_options):
        tap = Tap("discover", adapter=adapter, per_example=per_example, **tap_options)
        outputs, _ = adapter.run(params, state, inputs, {**kwargs, **kw}, tap)
        found[key] = tap.layers
        return outputs

    out_shapes = jax.eval_shape(
        functools.partial(shapes, key=1, dropout_masks=dropout_masks), adapter.params, adapter.state, inputs, {}
    )
    layers = found[1]
    if not layers:
        raise ValueError(f"the model has no weighted layer BANG can balance: {adapter.no_layers_hint}")
    n2 = 2 * n  # divisible wherever n is: a batch sharded over devices traces at both sizes
    # Call arguments resized for the second trace: those with the batch length on axis 0 (and, should that
    # fail, exactly those named in batch_kwargs).
    choices = [_split_kwargs(kwargs, n, None)[0]]
    if batch_kwargs is not None:
        choices.append(_split_kwargs(kwargs, n, batch_kwargs)[0])
    for attempt, batched_kw in enumerate(choices):
        try:
            jax.eval_shape(
                functools.partial(shapes, key=2, shapes_only=True),
                adapter.params,
                adapter.state,
                _resized(inputs, n, n2),
                _resized(batched_kw, n, n2),
            )
            break
        except Exception as e:
            err = e
            if attempt + 1 < len(choices):
                continue
            raise ValueError(
                f"BANG finds the batch axis of every weighted layer's output by tracing the model at two batch "
                f"sizes, and the model could not be traced at batch {n2} (inputs and every call argument with {n} "
                f"on axis 0 resized): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. Let the "
                "model's shapes follow the input batch (no batch size fixed in the model), and pass every call "
                "argument that carries the batch with the batch on axis 0."
            ) from err
    second = found[2]
    if set(second) != set(layers):
        raise ValueError(
            "the model calls different weighted layers at batch sizes "
            f"{n} and {n2} ({sorted('/'.join(map(str, p)) for p in set(second) ^ set(layers))}); BANG finds each "
            "layer's batch axis by tracing at two batch sizes and needs the same layers at both: make the model's "
            "structure independent of the batch size"
        )
    layers = {
        path: rec._replace(batch_axis=_batch_axis(path, rec, tuple(second[path].out.shape), n, n2))
        for path, rec in layers.items()
    }
    return layers, out_shapes


def _owners(adapter, layers) -> dict[tuple, LayerPath]:
    """``{parameter leaf key: layer path}`` for the leaves of weighted layers."""
    owner = {}
    keys = [adapter.leaf_key(p) for p, _ in jax.tree_util.tree_flatten_with_path(adapter.params)[0]]
    for path in dict.fromkeys(rec.layer for rec in layers.values()):
        mine = [k for k in keys if k[: len(path)] == tuple(path)]
        if not mine:
            raise ValueError(f"weighted layer {'/'.join(map(str, path))} has no entry in the parameters: its "
                             "weights live elsewhere (passed in, or owned by another module), so BANG cannot tell "
                             "which gradient is this layer's. Let the layer own its parameters, or leave its type "
                             "out of layer_types= (it then gets the ordinary gradient).")
        for k in mine:
            owner[k] = path
    present = set(keys)
    for rec in layers.values():
        foreign = [rel for rel in rec.leaf_keys if tuple(rec.layer) + tuple(rel) not in present]
        if foreign:
            raise ValueError(
                f"weighted layer {'/'.join(map(str, rec.layer))} ({rec.kind}) uses parameter(s) "
                f"{', '.join('/'.join(map(str, r)) for r in foreign)} that are not stored under it (shared with, or "
                "assigned from, another module), so BANG cannot tell which gradient is this layer's. Give the layer "
                "its own parameters, or leave its type out of layer_types= (it then gets the ordinary gradient)."
            )
    return owner


def _eta_groups(adapter, layers, config: BangConfig):
    """Per layer call: ((leaf indices, ε, ratio), ...), one entry per group of the layer's leaves that share ε and
    ratio by the config's structure (:func:`bang_jax.balance.eta_groups`, static): one η per layer unless its
    leaves were given different per-leaf values."""
    keys = [adapter.leaf_key(p) for p, _ in jax.tree_util.tree_flatten_with_path(adapter.params)[0]]
    settings = dict(zip(keys, balance.eta_settings(config, adapter.params)))  # {leaf key: (label, ε, ratio)}
    groups = {}
    for call, rec in layers.items():
        by_label: dict[Any, list] = {}
        for i, rel in enumerate(rec.leaf_keys):
            key = tuple(rec.layer) + tuple(rel)
            by_label.setdefault(settings[key][0], []).append((i, key))
        groups[call] = tuple(
            (tuple(i for i, _ in members), jnp.asarray(settings[members[0][1]][1]),
             jnp.asarray(settings[members[0][1]][2]))
            for members in by_label.values()
        )
        for _, e, r in groups[call]:
            if jnp.ndim(e) or jnp.ndim(r):
                raise ValueError(
                    f"epsilon and ratio must be one number per parameter leaf; layer {'/'.join(map(str, rec.layer))} "
                    f"got an array of shape {jnp.shape(e) if jnp.ndim(e) else jnp.shape(r)}. Per-slice values for a "
                    "scanned stack, or per-example values, are not supported: give one number per layer (a mapping "
                    "{layer: number})."
                )
    return groups


def loss_fns(loss_fn, correct_fn):
    return (default_loss if loss_fn is None else loss_fn), (default_correct if correct_fn is None else correct_fn)


def mean_loss(loss_fn, outputs, labels, n):
    losses = loss_fn(outputs, labels)
    if np.shape(losses) != (n,):
        raise ValueError(f"loss_fn must return [N] = ({n},) per-example losses, got shape {np.shape(losses)}")
    return jnp.mean(losses)


def _replicated(*trees):
    """``trees`` with every explicitly sharded array gathered (replicated); arrays without a sharding type as given."""

    def one(a):
        if a is not None and hasattr(a, "shape") and per_example._explicitly_sharded(a):
            return jax.sharding.reshard(a, jax.sharding.PartitionSpec())
        return a

    return jax.tree.map(one, trees)


def _is_sharding_error(err: Exception) -> bool:
    """Whether ``err`` is JAX's complaint about a sharding annotation (explicit mesh axes)."""
    text = f"{type(err).__name__} {err}"
    return any(w in text for w in ("ShardingTypeError", "DuplicateSpecError", "Sharding spec", "NamedSharding"))


def _check_single_use(adapter, inputs, kwargs, layers, dropout_masks) -> None:
    """Refuses per-example gradients when a weighted layer's parameters also reach the outputs other than through
    the layer's call (a hand-written tied decoder ``h @ kernel.T``): a per-example gradient is the sum of both uses,
    and ``bang()`` would scale all of it by the layer's η, while BANG balances the call only (:func:`run_bang`).

    Found from the program, not the values: the model is traced once with every weighted layer reading its own
    copy of its parameters; after dead-code elimination, a parameter that is still used reaches the outputs some
    other way. Layers that see a transformed copy of their parameters (``map_variables``, weight normalisation)
    or run inside a lifted transform are left out (their parameters reach the loss only through the call's
    transform, which the per-example gradient handles exactly).
    """
    try:
        from jax._src.interpreters import partial_eval as pe  # private: without it the check is skipped
    except Exception:  # pragma: no cover - other JAX versions
        return
    keys = [adapter.leaf_key(p) for p, _ in jax.tree_util.tree_flatten_with_path(adapter.params)[0]]
    weighted = {tuple(rec.layer) + tuple(rel) for rec in layers.values() for rel in rec.leaf_keys}
    flat = jax.tree.leaves(adapter.params)
    live = {k: v for k, v in zip(keys, flat) if k in weighted}
    checked: set = set()

    def forward(params, live):
        tap = Tap("detect", adapter=adapter, per_example=True, dropout_masks=dropout_masks)
        tap.param_ids = {id(leaf) for leaf in jax.tree.leaves(params)}
        tap.live, tap.checked = live, checked
        outputs, _ = adapter.run(params, adapter.state, inputs, kwargs, tap)
        return outputs

    try:
        closed = jax.make_jaxpr(forward)(adapter.params, live)
        _, used = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    except Exception:  # pragma: no cover - a tracing corner the check cannot handle: skip it, never block
        return
    both = sorted("/".join(map(str, keys[i])) for i in range(len(flat)) if used[i] and keys[i] in checked)
    if both:
        raise ValueError(
            f"per_example_grads: the weighted-layer parameter(s) {', '.join(both)} also reach the outputs outside "
            "their layer's call (weights tied by hand, e.g. `h @ kernel.T`). A per-example gradient holds both uses "
            "summed, and bang() would scale all of it by the layer's η, while BANG balances the call only. Use "
            "bang_grad (bang_jax.nnx.bang_grad for NNX), which balances the call and leaves the other use's "
            "gradient ordinary."
        )


def _one_example_shape(rec: LayerRecord) -> tuple:
    """The layer's output shape in a one-example forward pass (its batch axis of length 1)."""
    shape = list(rec.out.shape)
    shape[rec.batch_axis] = 1
    return tuple(shape)


def run_per_example(
    adapter, inputs, labels, *, loss_fn, correct_fn, dropout_masks, batch_kwargs, kwargs, factor_layers=False
):
    n = batch_size(inputs)
    check_finite(inputs, "inputs")
    check_labels(labels, n, loss_fn is None)
    layers, out_shapes = discover(
        adapter, inputs, kwargs, n=n, per_example=True, dropout_masks=dropout_masks, batch_kwargs=batch_kwargs
    )
    if loss_fn is None:
        check_default_outputs(out_shapes, labels, n)
    loss_fn, correct_fn = loss_fns(loss_fn, correct_fn)
    owner = _owners(adapter, layers)
    _check_single_use(adapter, inputs, kwargs, layers, dropout_masks)
    batched_kw, whole_kw = _split_kwargs(kwargs, n, batch_kwargs)
    state_b, state_axes = adapter.per_example_state(adapter.state, n)
    zero_perts = {p: jnp.zeros(_one_example_shape(r), r.out.dtype) for p, r in layers.items()}
    one_of = lambda t: jax.tree.map(lambda a: a[None], t)  # noqa: E731
    layer_fns = {}  # filled while tracing: each weighted layer's pure function, for the layer-factored gradients

    def one(x, y, kw, state, masks):
        x1, y1, kw1 = one_of(x), one_of(y), {**whole_kw, **one_of(kw)}
        masks1 = None if masks is None else one_of(masks)

        def loss_of(params, perts):
            tap = Tap("perturb", adapter=adapter, per_example=True, perturbations=perts, dropout_masks=masks1)
            if factor_layers:
                tap.param_ids = {id(leaf) for leaf in jax.tree.leaves(params)}
            outputs, updates = adapter.run(params, state, x1, kw1, tap)
            layer_fns.update({path: call[0] for path, call in tap.calls.items()})
            calls = (
                {path: call[1] for path, call in tap.calls.items()},
                {path: call[2:] for path, call in tap.calls.items()},
            )
            for path, o in jax.tree_util.tree_flatten_with_path(outputs)[0]:
                if np.ndim(o) == 0 or np.shape(o)[0] != 1:
                    raise ValueError(
                        f"a per-example forward pass (batch 1) returned outputs{jax.tree_util.keystr(path)} of "
                        f"shape {np.shape(o)}, not batch 1: some call argument carries the whole batch into each "
                        "example's forward. Pass it as a keyword argument with the batch on axis 0 (it is then "
                        "sliced per example), or name it in batch_kwargs=."
                    )
            losses = loss_fn(outputs, y1)
            if np.shape(losses) != (1,):
                raise ValueError(
                    f"loss_fn must return one loss per example ([N]); for one example it returned "
                    f"shape {np.shape(losses)}"
                )
            return losses[0], (outputs, updates, calls)

        (loss, (outputs, updates, calls)), (g, kappa) = jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=True)(
            adapter.params, zero_perts
        )
        norms = {p: _kappa_norms(kappa[p], layers[p].batch_axis)[0] for p in layers}
        return g, norms, jax.tree.map(lambda a: a[0], outputs), loss, updates, calls, kappa

    # The layers' parameters come out once (they do not depend on the example); inputs, extras and κ per example.
    out_axes = (0, 0, 0, 0, 0, (None, 0), 0)
    # A batch sharded over explicit mesh axes is gathered first: JAX's vmap of a sharded axis cannot run every
    # reshape a one-example forward needs (attention's head merge, flattening before a head).
    inputs, labels, batched_kw, dropout_masks = _replicated(inputs, labels, batched_kw, dropout_masks)
    try:
        grads, norms, outputs, losses, updates, (layer_params, layer_inputs), kappa = jax.vmap(
            one, in_axes=(0, 0, 0, state_axes, 0), out_axes=out_axes
        )(inputs, labels, batched_kw, state_b, dropout_masks)
    except Exception as err:
        if not _is_sharding_error(err):
            raise
        raise ValueError(
            "per_example_grads runs each example's forward pass at batch 1 under vmap, and a sharding annotation "
            "in the model (an out_sharding= or reshard that puts a mesh axis on the batch axis) cannot be applied "
            f"to a one-example forward: {type(err).__name__}: "
            f"{str(err).splitlines()[0]}. Use bang_grad (bang_jax.nnx.bang_grad), the single-pass route, which "
            "runs the batched forward exactly as written, or drop the batch axis from the layers' out_sharding."
        ) from err
    adapter.after_per_example(updates)
    marked = _mark_grads(adapter, layers, grads, layer_fns, layer_params, layer_inputs, kappa)
    zeros = jnp.zeros((n,), jnp.float32)
    kappa_norms = jax.tree_util.tree_map_with_path(
        lambda path, _: norms.get(owner.get(adapter.leaf_key(path)), zeros), adapter.params
    )
    correct = correct_fn(outputs, labels)
    return PerExampleGrads(marked, kappa_norms, correct, jnp.mean(losses), outputs)


def _mark_grads(adapter, layers, grads, layer_fns, layer_params, layer_inputs, kappa):
    """Marks per-example gradients for bang(); a weighted layer's leaves too large to fingerprint are passed in the
    layer-factored form (:class:`bang_jax.PerExampleGrad`), so that XLA never writes ``[N, *param.shape]`` for them
    in a jitted training step (the vmapped gradient above is then dead code for those leaves and is removed)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(grads)
    index = {}
    for path, rec in layers.items():
        for i, rel in enumerate(rec.leaf_keys):
            index[tuple(path) + tuple(rel)] = (path, i)
    leaves = []
    for key_path, g in flat:
        where = index.get(adapter.leaf_key(key_path))
        small = int(np.prod(g.shape[1:])) <= per_example._FINGERPRINT_MAX_SIZE
        if where is None or where[0] not in layer_fns or small:
            leaves.append(g)
            continue
        path, i = where
        extra, x = layer_inputs[path][1], layer_inputs[path][0]
        leaves.append((layer_fns[path], i, layer_params[path], x, extra, kappa[path]))
    return treedef.unflatten(per_example._mark_leaves(leaves))


def run_bang(adapter, inputs, labels, *, config, loss_fn, correct_fn, dropout_masks, kwargs):
    n = batch_size(inputs)
    check_finite(inputs, "inputs")
    check_labels(labels, n, loss_fn is None)
    layers, out_shapes = discover(adapter, inputs, kwargs, n=n, dropout_masks=dropout_masks)
    if loss_fn is None:
        check_default_outputs(out_shapes, labels, n)
    loss_fn, correct_fn = loss_fns(loss_fn, correct_fn)
    _owners(adapter, layers)
    groups = _eta_groups(adapter, layers, config)
    # "Correct" comes from the training forward pass; under jit XLA merges this pass with the one below (not
    # across a scan, so a scanned model would run its forward twice). η only reads it where ratio ≠ 1: with every
    # ratio statically 1 the extra pass is skipped and "correct" comes from the balanced pass's own outputs.
    needs_correct = not all(
        balance._is_concrete(g[2]) and bool(np.all(np.asarray(g[2]) == 1.0)) for call in groups.values() for g in call
    )
    if needs_correct:
        outputs0, _ = adapter.run(
            adapter.params, adapter.state, inputs, kwargs, Tap("plain", adapter=adapter, dropout_masks=dropout_masks)
        )
        correct = jax.lax.stop_gradient(correct_fn(outputs0, labels))
    else:
        correct = jnp.ones((n,), bool)  # unread: η_i uses ε whether or not example i is correct
    probes = {p: jnp.zeros((1 + len(groups[p]), n), jnp.float32) for p in layers}

    def loss_of(params, probes):
        tap = Tap(
            "balance",
            adapter=adapter,
            probes=probes,
            correct=correct,
            groups=groups,
            batch_axes={path: rec.batch_axis for path, rec in layers.items()},
            dropout_masks=dropout_masks,
        )
        outputs, updates = adapter.run(params, adapter.state, inputs, kwargs, tap)
        return mean_loss(loss_fn, outputs, labels, n), (outputs, updates)

    (loss, (outputs, updates)), (grads, probe_cts) = jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=True)(
        adapter.params, probes
    )
    grads = apply_beta(grads, config.beta)
    if not needs_correct:
        correct = jax.lax.stop_gradient(correct_fn(outputs, labels))
    norms, etas = {}, {}
    for path, rec in layers.items():
        norms[path] = probe_cts[path][0]
        for g, (idx, _, _) in enumerate(groups[path]):
            # η ≥ 1 always; a zero row means the call's output never reached the loss (its backward never ran)
            row = probe_cts[path][1 + g]
            etas[path if len(groups[path]) == 1 else tuple(path) + rec.leaf_keys[idx[0]]] = jnp.where(
                row == 0, 1.0, row
            )
    return grads, BangAux(loss, outputs, correct, norms, etas, updates)


def run_sample_masks(adapter, inputs, kwargs):
    tap = Tap("plain", adapter=adapter, record_dropout=True)
    adapter.run(adapter.params, adapter.state, inputs, kwargs, tap)
    return tap.masks


def has_array(tree) -> bool:
    return any(isinstance(a, (jax.Array, np.ndarray)) for a in jax.tree.leaves(tree))
