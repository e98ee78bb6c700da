"""BANG gradients of unmodified Flax linen models (the linen adapter of :mod:`bang_jax.core` and the linen API).

Three ways to get a batch gradient from ``apply_fn(variables, inputs, rngs=..., **apply_kwargs) -> outputs``
(a Flax ``model.apply``) and labels; the loss is the batch mean of a per-example ``loss_fn(outputs, labels) ->
[N]`` (default: softmax cross-entropy with integer labels):

* :func:`plain_grad` — the ordinary mean gradient (regular training).
* :func:`per_example_grads` — ``vmap(grad)``: per-example parameter gradients of the per-example losses,
  the per-example κ norms of every weighted layer, and per-example correctness. Feed these to
  :func:`bang_jax.bang` in an optax chain (the reference path of paper eq. 6).
* :func:`bang_grad` — the same balanced gradient from one ordinary backward pass, the authors' way: each
  weighted layer scales only the cotangent it uses for its own weight and bias gradients by η, while the
  unscaled gradient flows on to the layers below. No per-example parameter gradient is ever formed.

:mod:`bang_jax.nnx` offers the same three for Flax NNX modules through the same core.

**What is balanced.** Weighted layers — by default ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv``,
``nn.ConvTranspose``, ``nn.ConvLocal``, ``nn.Einsum`` (and so the projections inside
``nn.MultiHeadDotProductAttention``) — are found with :func:`flax.linen.intercept_methods`. κ of a layer is the
gradient of the loss w.r.t. that layer's output (before any activation that follows it, docs/semantics.md). All other
parameters (biases of LayerNorm/BatchNorm, embeddings, free ``self.param``\\ s) get their ordinary gradient:
η = 1, and β still applies. ``aux.layer_kappa_norms`` and :func:`weighted_layers` list the balanced layers.

**Examples that interact** (BatchNorm in training mode). ``bang_grad`` then uses the definition of the authors'
Caffe code, which is also the natural one: κ_i is example i's row of the gradient of the *batch* loss w.r.t. the
layer's output (including the paths through the batch statistics), η_i comes from those rows, and the layer's
weight gradient is formed from the η-scaled rows. Pass ``mutable=['batch_stats']`` as for ``model.apply``; the
updated collections come back in ``aux.model_state``. Per-example gradients do not exist for such a model, so
:func:`per_example_grads` refuses it (naming the BatchNorm layer) and points to :func:`bang_grad`.

**Batch axis, calls, scans, sharding.** Each weighted layer's batch axis is found by tracing the model at batch
sizes N and 2N (the one output axis that follows), never assumed to be axis 0; a layer with no unique batch axis is
refused. A layer called more than once (reused, a head applied twice, an unrolled RNN cell, ``Embed.attend`` of a
tied embedding, every step of ``nn.scan``/``nnx.scan``/``lax.scan``) is balanced per call in :func:`bang_grad`:
each call has its own κ and η and the layer's gradient sums the balanced calls (docs/semantics.md), so slice l of a
scanned stack is balanced like an unrolled layer l. :func:`per_example_grads` refuses these and points to
:func:`bang_grad`. Layers inside ``nn.remat``/``nnx.remat`` (and ``jit``, ``cond``) work; a layer applied under
``vmap`` is refused. Under ``jax.set_mesh`` with Explicit axes both routes work on sharded batches and parameters.

**Dropout.** With ``rngs`` the batched forward of :func:`bang_grad` and the per-example forwards of
:func:`per_example_grads` draw different masks (different shapes). To compare the two exactly, draw the masks
once with :func:`sample_dropout_masks` and pass them to both as ``dropout_masks=``. The masks cover every
``nn.Dropout`` layer; a model that draws other dropout randomness (attention dropout inside
``MultiHeadDotProductAttention``, or a custom ``make_rng('dropout')``) is refused when masks are given.

**Inputs.** ``inputs`` may be any pytree of arrays with the batch on axis 0 of every leaf. Call arguments with a
batch axis (an attention mask ``[N, 1, L, L]``, per-example conditioning) reach each per-example forward as that
example's slice: by default every array argument whose axis 0 has length N is sliced; name them explicitly with
``batch_kwargs=``. A per-example forward whose outputs do not have batch 1 raises. With the default loss,
labels must be integers in ``[0, classes)``; concrete labels are checked, traced ones (inside ``jit``) cannot be,
and an out-of-range label then gives a NaN or wrong loss exactly as in ``optax``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import flax.linen as nn
import jax

from bang_jax.balance import BangConfig, as_bang_config, path_keys
from bang_jax.core import (
    BangAux,
    LayerPath,
    PerExampleGrads,
    Tap,
    batch_size,
    check_default_outputs,
    check_finite,
    check_labels,
    default_correct,
    default_loss,
    discover,
    has_array,
    loss_fns,
    mean_loss,
    run_bang,
    run_per_example,
    run_sample_masks,
)

__all__ = [
    "WEIGHTED_LAYER_TYPES",
    "BangAux",
    "PerExampleGrads",
    "bang_grad",
    "default_correct",
    "default_loss",
    "per_example_grads",
    "plain_grad",
    "sample_dropout_masks",
    "weighted_layers",
]

WEIGHTED_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dense,
    nn.DenseGeneral,
    nn.Conv,
    nn.ConvTranspose,
    nn.ConvLocal,
    nn.Einsum,
)

# --------------------------------------------------------------------------------------------------------
# The linen adapter: nn.intercept_methods dispatches every module call to the tap.


def _merge_param(name, attr, call_value):
    return nn.merge_param(name, attr, call_value)


def linen_interceptor(tap: Tap, layer_types: tuple, *, inside_nnx: bool = False):
    """The ``nn.intercept_methods`` interceptor that routes linen module calls to ``tap``."""

    def interceptor(next_fun, args, kwargs, context):
        module, method = context.module, context.method_name
        if tap.passthrough:
            return next_fun(*args, **kwargs)
        path = tap.prefix + tuple(module.path)
        kind = type(module).__name__
        if isinstance(module, nn.Embed) and method == "attend":
            variables = dict(module.variables)
            p = variables.pop("params", {})
            clone = module.clone(parent=None)

            def attend_fn(p, x, extra):
                with tap.inside_layer():
                    return clone.apply({**extra, "params": p}, x, method="attend")

            return tap.tied_output(path, "nn.Embed.attend", lambda: next_fun(*args, **kwargs), attend_fn, p,
                                   args[0], variables)
        if method != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(module, layer_types):
            if len(args) != 1 or has_array(kwargs):
                raise ValueError(f"{tap._where(path, kind)} is called with more than one array argument; BANG "
                                 "balances a layer applied to one array input. Pass the other arrays through "
                                 "the module's attributes or fold them into the input (e.g. concatenate), or "
                                 "leave this type out of layer_types= so that its parameters get the "
                                 "ordinary gradient.")
            x = args[0]
            variables = dict(module.variables)
            p = variables.pop("params", {})
            clone = module.clone(parent=None)

            def layer_fn(p, x, extra):
                with tap.inside_layer():
                    return clone.apply({**extra, "params": p}, x, **kwargs)

            return tap.layer(path, kind, lambda: next_fun(*args, **kwargs), layer_fn, p, x, variables)
        if isinstance(module, nn.Dropout):
            deterministic = kwargs.get("deterministic", args[1] if len(args) > 1 else None)
            if _merge_param("deterministic", module.deterministic, deterministic) or module.rate == 0.0:
                return next_fun(*args, **kwargs)
            return tap.dropout(path, kind, module.rate, args[0], lambda z: next_fun(z, *args[1:], **kwargs))
        if isinstance(module, nn.BatchNorm):
            use_ra = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
            if not _merge_param("use_running_average", module.use_running_average, use_ra):
                tap.batch_coupled(path, kind)
        if isinstance(module, nn.MultiHeadDotProductAttention) and module.dropout_rate > 0.0:
            det = _merge_param("deterministic", module.deterministic, kwargs.get("deterministic"))
            if not det and kwargs.get("dropout_rng") is None:
                tap.other_dropout(path, kind)
        if not inside_nnx and _is_to_linen(module) and not isinstance(module, layer_types):
            tap.refuse(
                f"{tap._where(path, kind, 'module')} is an NNX module wrapped with nnx.bridge.to_linen; BANG "
                "cannot see its layers from linen. Use bang_jax.nnx.bang_grad / per_example_grads on the NNX "
                "model instead."
            )
        return next_fun(*args, **kwargs)

    return interceptor


def _is_to_linen(module) -> bool:
    try:
        from flax.nnx import bridge
    except Exception:  # pragma: no cover
        return False
    return isinstance(module, bridge.ToLinen)


class _Linen:
    """The linen adapter for the drivers above: ``apply_fn`` with :func:`linen_interceptor`."""

    def __init__(self, apply_fn, variables, rngs, layer_types):
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise ValueError("variables must be a Flax variables dict with a 'params' collection")
        self.apply_fn, self.layer_types = apply_fn, tuple(layer_types)
        self.params = variables["params"]
        self.consts = {k: v for k, v in variables.items() if k != "params"}
        self.state = rngs
        self.no_layers_hint = (
            "no call of " + ", ".join(t.__name__ for t in self.layer_types) + " was seen in a forward pass (for a "
            "Flax NNX model use bang_jax.nnx.bang_grad(model, ...); other layer types can be named with "
            "layer_types=)"
        )

    def run(self, params, rngs, inputs, kwargs, tap):
        masks_given = tap.dropout_masks is not None
        if masks_given and rngs is not None:  # dropout then comes only from the masks; other draws must fail
            rngs = {k: v for k, v in rngs.items() if k != "dropout"} or None
        with tap.running(), nn.intercept_methods(linen_interceptor(tap, self.layer_types)):
            try:
                result = self.apply_fn({**self.consts, "params": params}, inputs, rngs=rngs, **kwargs)
            except Exception as err:
                if masks_given and type(err).__name__ == "InvalidRngError" and "dropout" in str(err):
                    raise ValueError(
                        "with dropout_masks the model still draws 'dropout' randomness outside nn.Dropout layers "
                        "(e.g. attention dropout or a custom make_rng('dropout')), which the masks cannot share: "
                        + str(err).splitlines()[0]
                    ) from None
                raise
        if kwargs.get("mutable", False) is not False:
            outputs, updates = result
            return outputs, dict(updates)
        return result, {}

    def leaf_key(self, path):
        return path_keys(path)

    def per_example_state(self, rngs, n):
        if rngs is None:
            return None, None
        return {k: jax.random.split(v, n) for k, v in rngs.items()}, 0

    def after_per_example(self, updates):
        del updates


def _no_mutable_for_per_example(apply_kwargs):
    if apply_kwargs.get("mutable", False) is not False:
        raise ValueError(
            "per_example_grads cannot return updated collections (mutable=...): each example runs its own forward "
            "pass. For BatchNorm in training mode (examples interact) use bang_grad(..., mutable=['batch_stats'])."
        )


# --------------------------------------------------------------------------------------------------------
# Public linen functions.


def sample_dropout_masks(apply_fn, variables, inputs, *, rngs, **apply_kwargs) -> dict[LayerPath, jax.Array]:
    """The dropout masks a batched forward of ``apply_fn`` draws with these ``rngs`` (True = kept).

    Returns ``{dropout layer path: bool [N, ...] mask}`` for every ``nn.Dropout`` in training mode; pass it as
    ``dropout_masks=`` to :func:`per_example_grads` and :func:`bang_grad` to make both use exactly these masks.
    A model with other dropout randomness (attention dropout) raises: the masks could not cover it.
    """
    adapter = _Linen(apply_fn, variables, rngs, WEIGHTED_LAYER_TYPES)
    return run_sample_masks(adapter, inputs, apply_kwargs)


def weighted_layers(apply_fn, variables, inputs, *, rngs=None, layer_types=WEIGHTED_LAYER_TYPES, **apply_kwargs):
    """``{layer path: output shape}`` of the layers BANG balances (no computation, shapes only)."""
    adapter = _Linen(apply_fn, variables, rngs, layer_types)
    layers, _ = discover(adapter, inputs, apply_kwargs, n=batch_size(inputs))
    return {path: tuple(r.out.shape) for path, r in layers.items()}


def plain_grad(apply_fn, variables, inputs, labels, *, rngs=None, loss_fn=None, correct_fn=None, return_aux=False,
               **apply_kwargs):
    """The ordinary gradient of the batch-mean loss w.r.t. ``variables['params']``.

    ``loss_fn``/``correct_fn`` and ``mutable=`` as in :func:`bang_grad`; the updated collections are in
    ``aux.model_state``.
    """
    n = batch_size(inputs)
    check_finite(inputs, "inputs")
    check_labels(labels, n, loss_fn is None)
    default = loss_fn is None
    loss_fn, correct_fn = loss_fns(loss_fn, correct_fn)
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables must be a Flax variables dict with a 'params' collection")
    mutable = apply_kwargs.get("mutable", False) is not False

    def loss_of(params):
        result = apply_fn({**variables, "params": params}, inputs, rngs=rngs, **apply_kwargs)
        outputs, updates = result if mutable else (result, {})
        if default:
            check_default_outputs(outputs, labels, n)
        return mean_loss(loss_fn, outputs, labels, n), (outputs, dict(updates))

    (loss, (outputs, updates)), grads = jax.value_and_grad(loss_of, has_aux=True)(variables["params"])
    if not return_aux:
        return grads
    return grads, BangAux(loss, outputs, correct_fn(outputs, labels), {}, {}, updates)


def per_example_grads(
    apply_fn,
    variables,
    inputs,
    labels,
    *,
    rngs=None,
    loss_fn: Callable | None = None,
    correct_fn: Callable | None = None,
    dropout_masks=None,
    batch_kwargs: Collection[str] | None = None,
    layer_types=WEIGHTED_LAYER_TYPES,
    factor_layers: bool = False,
    **apply_kwargs,
) -> PerExampleGrads:
    """Per-example parameter gradients, κ norms and correctness by ``vmap`` over ``grad``.

    Args:
      apply_fn: ``apply_fn(variables, inputs, rngs=..., **apply_kwargs) -> outputs`` (e.g. ``model.apply``).
      variables: Flax variables with a ``'params'`` collection (other collections pass through unchanged).
      inputs: a pytree of arrays with the batch on axis 0 (for the bundled models: ``[N, H, W, C]`` pixels
        0..255, float32).
      labels: ``[N]`` integer labels for the default loss; any pytree with the batch on axis 0 otherwise.
      rngs: Flax rngs (e.g. ``{'dropout': key}``); each example gets its own keys (split along the batch).
      loss_fn: per-example loss ``loss_fn(outputs, labels) -> [N]`` (default softmax cross-entropy with
        integer labels); called on each example with batch 1.
      correct_fn: ``correct_fn(outputs, labels) -> [N]`` bool (default argmax == label).
      dropout_masks: optional masks from :func:`sample_dropout_masks` used instead of drawing new ones.
      batch_kwargs: names of the ``apply_kwargs`` sliced per example; default: every argument whose array
        leaves all have the batch size on axis 0.
      layer_types: the module types treated as weighted layers.
      factor_layers: hand a weighted layer's large leaves (over 4,096 entries per example) to ``bang()`` in the
        layer-factored form (:class:`bang_jax.PerExampleGrad`): much faster for large dense layers (LeNet's
        per-example step 1.4× plain instead of 4×). Exact only if each weighted layer's parameters reach the loss
        through that one call alone: not for weights tied to another use (``x @ dense.kernel.T``, one Param
        assigned to two layers), whose other use would be dropped without an error. Layers that see a
        transformed copy of their parameters (``nn.map_variables``, ``WeightNorm``, ``SpectralNorm``, frozen with
        ``stop_gradient``) or run inside ``remat``/``cond``/an inner ``jit`` are detected and keep the stored
        form. Default ``False``: every gradient stored, as computed by ``vmap`` over ``grad``.
      **apply_kwargs: passed to ``apply_fn`` (e.g. ``train=True``, ``mask=...``).

    Returns:
      :class:`PerExampleGrads`, ready for ``bang()``: ``tx.update(pe.grads, state, params,
      kappa_norms=pe.kappa_norms, correct=pe.correct)``.

    A per-example gradient is the sum of all uses of a parameter, so a model whose weighted-layer weights also
    reach the outputs outside the layer's call (a hand-written tied decoder ``h @ kernel.T``) is refused: use
    :func:`bang_grad`, which balances the call only.

    Raises:
      ValueError: for a model whose examples interact (BatchNorm in training mode; use :func:`bang_grad`),
        layers under ``scan``/``vmap``, shared layers, ``Embed.attend``, per-example outputs without batch 1,
        bad labels, and ``mutable=``.
    """
    _no_mutable_for_per_example(apply_kwargs)
    adapter = _Linen(apply_fn, variables, rngs, layer_types)
    return run_per_example(adapter, inputs, labels, loss_fn=loss_fn, correct_fn=correct_fn,
                            dropout_masks=dropout_masks, batch_kwargs=batch_kwargs, kwargs=apply_kwargs,
                            factor_layers=factor_layers)


def bang_grad(
    apply_fn,
    variables,
    inputs,
    labels,
    *,
    epsilon=None,
    beta=None,
    ratio=None,
    config: BangConfig | None = None,
    rngs=None,
    loss_fn: Callable | None = None,
    correct_fn: Callable | None = None,
    dropout_masks=None,
    layer_types=WEIGHTED_LAYER_TYPES,
    return_aux=False,
    **apply_kwargs,
):
    """BANG's balanced gradient from one ordinary backward pass (the authors' Caffe way, docs/semantics.md).

    The result equals ``bang(epsilon, beta, ratio)`` applied to :func:`per_example_grads` (paper eq. 6),
    but costs about one plain forward and backward pass: each weighted layer runs under a custom VJP that
    forms the layer's weight and bias gradients from η·κ (κ = its output cotangent, η from κ's rows) and sends
    the unscaled gradient on down. Correctness comes from the same training forward pass (XLA merges the two
    identical forward computations under ``jit``).

    Args:
      apply_fn, variables, inputs, labels, rngs, loss_fn, correct_fn, dropout_masks, layer_types,
        **apply_kwargs: as in :func:`per_example_grads`. ``mutable=['batch_stats']`` (BatchNorm in training
        mode) is supported: κ rows are then those of the batch loss (see the module docstring) and the updated
        collections are in ``aux.model_state``.
      epsilon: ε ≥ 0, scalar or per-layer pytree (a prefix of the params tree, as for :func:`bang_jax.bang`;
        a layer whose kernel and bias get different ε has one η per leaf).
      beta: β ≥ 0, scalar or pytree prefix; multiplies every parameter's gradient (default 1).
      ratio: factor on ε for misclassified examples (default 1).
      config: a :class:`bang_jax.BangConfig` instead of the three keywords.
      return_aux: also return a :class:`BangAux`.

    Returns:
      The balanced gradient with the structure of ``variables['params']`` (and the aux if asked).
    """
    if config is None and epsilon is None:
        raise TypeError("bang_grad() needs epsilon= (or config=bang_jax.BangConfig(...))")
    config = as_bang_config(config, epsilon=epsilon, beta=beta, ratio=ratio)
    if apply_kwargs.get("mutable", False) is not False and not return_aux:
        raise ValueError("with mutable=..., pass return_aux=True: the updated collections are in aux.model_state")
    adapter = _Linen(apply_fn, variables, rngs, layer_types)
    grads, aux = run_bang(adapter, inputs, labels, config=config, loss_fn=loss_fn, correct_fn=correct_fn,
                           dropout_masks=dropout_masks, kwargs=apply_kwargs)
    return (grads, aux) if return_aux else grads
