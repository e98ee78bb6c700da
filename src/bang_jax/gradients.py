"""Gradients for BANG on an unmodified Flax (linen) model.

Three ways to get a batch gradient from ``apply_fn(variables, images, rngs=..., **apply_kwargs) -> logits``
(a Flax ``model.apply``) and integer labels, all with the batch-mean softmax cross-entropy as the loss:

* :func:`plain_grad` — the ordinary mean gradient (regular training).
* :func:`per_example_grads` — ``vmap(grad)``: per-example parameter gradients of the per-example losses,
  the per-example κ norms of every weighted layer, and per-example correctness. Feed these to
  :func:`bang_jax.bang` in an optax chain (the reference path of paper eq. 6).
* :func:`bang_grad` — the same balanced gradient from one ordinary backward pass, the authors' way: each
  weighted layer scales only the cotangent it uses for its own weight and bias gradients by η, while the
  unscaled gradient flows on to the layers below. No per-example parameter gradient is ever formed.

Weighted layers (``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv``, ``nn.ConvTranspose``, ``nn.ConvLocal`` by
default) are found with :func:`flax.linen.intercept_methods`; κ of a layer is the gradient of the loss w.r.t.
that layer's output (before any activation that follows it, SPEC §1.2), read through a zero perturbation
added to the output. Parameters outside such layers get their ordinary gradient (η = 1; β still applies).

Dropout: with ``rngs`` the batched forward of :func:`bang_grad` and the per-example forwards of
:func:`per_example_grads` draw different masks (different shapes). To compare the two exactly, draw the masks
once with :func:`sample_dropout_masks` and pass them to both as ``dropout_masks=``.

Limitations: each weighted layer must be called once per forward pass with a single positional input whose
axis 0 is the batch; layers inside lifted transforms (``nn.scan``, ``nn.remat``, …) are not supported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from bang_jax.balance import BangConfig, apply_beta, as_bang_config, broadcast_to_params, eta, path_keys, safe_norm

__all__ = [
    "WEIGHTED_LAYER_TYPES",
    "BangAux",
    "PerExampleGrads",
    "bang_grad",
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
)

LayerPath = tuple[str, ...]


class PerExampleGrads(NamedTuple):
    """What :func:`per_example_grads` returns.

    Attributes:
      grads: per-example gradients of the per-example losses E_i, the structure of ``variables['params']``
        with the batch on axis 0 of every leaf.
      kappa_norms: the same structure, each leaf an ``[N]`` array: ‖∂E_i/∂(output of the layer the leaf
        belongs to)‖₂. Leaves outside any weighted layer hold zeros (BANG then leaves them unscaled).
      correct: ``[N]`` bool, argmax of the training forward pass equals the label.
      loss: scalar, the batch-mean loss.
      logits: ``[N, classes]`` logits of the training forward pass.
    """

    grads: Any
    kappa_norms: Any
    correct: jax.Array
    loss: jax.Array
    logits: jax.Array


class BangAux(NamedTuple):
    """Auxiliary output of :func:`bang_grad` / :func:`plain_grad` with ``return_aux=True``.

    Attributes:
      loss: scalar batch-mean loss.
      logits: ``[N, classes]`` logits of the training forward pass.
      correct: ``[N]`` bool.
      layer_kappa_norms: ``{layer path: [N]}`` norms of κ of the batch-mean loss (1/N of the per-example
        ones) for every weighted layer; empty for :func:`plain_grad`.
      layer_eta: ``{layer path: [N]}`` the η used for each layer; empty for :func:`plain_grad`.
    """

    loss: jax.Array
    logits: jax.Array
    correct: jax.Array
    layer_kappa_norms: dict
    layer_eta: dict


# --------------------------------------------------------------------------------------------------------
# Running a model with taps on its weighted layers.


def _check_batch(images: Any, labels: Any) -> int:
    images = jnp.asarray(images) if not hasattr(images, "shape") else images
    labels = jnp.asarray(labels) if not hasattr(labels, "shape") else labels
    if images.ndim < 2:
        raise ValueError(f"images must have a leading batch axis, got shape {images.shape}")
    n = images.shape[0]
    if n < 1:
        raise ValueError("the batch is empty")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match images {images.shape}, got {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    return n


def _is_deterministic(module: nn.Dropout, args: tuple, kwargs: dict) -> bool:
    deterministic = kwargs.get("deterministic", args[1] if len(args) > 1 else None)
    deterministic = nn.merge_param("deterministic", module.deterministic, deterministic)
    return bool(deterministic) or module.rate == 0.0


def _run(
    apply_fn,
    variables,
    images,
    *,
    rngs,
    apply_kwargs,
    layer_types,
    perturbations=None,
    dropout_masks=None,
    record_dropout=False,
):
    """Runs ``apply_fn`` with an interceptor; returns (logits, taps) where taps holds per-layer records."""
    inputs: dict[LayerPath, jax.Array] = {}
    modules: dict[LayerPath, nn.Module] = {}
    outputs: dict[LayerPath, jax.Array] = {}
    masks: dict[LayerPath, jax.Array] = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(module, nn.Dropout) and (dropout_masks is not None or record_dropout):
            if _is_deterministic(module, args, kwargs):
                return next_fun(*args, **kwargs)
            path = tuple(module.path)
            x = args[0]
            if record_dropout:
                # Flax's own mask, drawn from the same rng stream: 1/keep where kept, 0 where dropped.
                masks[path] = next_fun(jnp.ones_like(x), *args[1:], **kwargs) != 0
                return next_fun(*args, **kwargs)
            if path not in dropout_masks:
                raise ValueError(f"dropout_masks has no mask for dropout layer {'/'.join(path)}")
            keep = 1.0 - module.rate
            mask = jnp.broadcast_to(dropout_masks[path], x.shape)
            return jnp.where(mask, x / keep, jnp.zeros_like(x))
        if not isinstance(module, layer_types):
            return next_fun(*args, **kwargs)
        path = tuple(module.path)
        name = "/".join(path) or "<root>"
        if path in inputs:
            raise ValueError(
                f"weighted layer {name} is called more than once in one forward pass; BANG needs one κ per "
                "layer (shared layers are not supported)"
            )
        if len(args) != 1 or kwargs:
            raise ValueError(f"weighted layer {name} must be called with a single positional input")
        y = next_fun(*args, **kwargs)
        inputs[path] = args[0]
        modules[path] = module.clone(parent=None)
        outputs[path] = y
        if perturbations is not None:
            y = y + perturbations[path]
        return y

    with nn.intercept_methods(interceptor):
        logits = apply_fn(variables, images, rngs=rngs, **apply_kwargs)
    return logits, {"inputs": inputs, "modules": modules, "outputs": outputs, "masks": masks}


def _discover(apply_fn, variables, images, *, rngs, apply_kwargs, layer_types, dropout_masks=None):
    """Finds the weighted layers: returns ({path: unbound module}, {path: ShapeDtypeStruct of the output})."""
    found: dict[str, Any] = {}

    def shapes_fn(variables, images, rngs):
        logits, taps = _run(
            apply_fn,
            variables,
            images,
            rngs=rngs,
            apply_kwargs=apply_kwargs,
            layer_types=layer_types,
            dropout_masks=dropout_masks,
        )
        found["modules"] = taps["modules"]
        return logits, taps["outputs"]

    logits_shape, out_shapes = jax.eval_shape(shapes_fn, variables, images, rngs)
    modules = found["modules"]
    if not modules:
        raise ValueError(
            "the model has no weighted layer BANG can balance: no call of "
            + ", ".join(t.__name__ for t in layer_types)
            + " was seen in a forward pass"
        )
    n = images.shape[0]
    for path, s in out_shapes.items():
        if s.ndim == 0 or s.shape[0] != n:
            raise ValueError(f"weighted layer {'/'.join(path)} output {s.shape} has no batch axis of size {n}")
    if len(logits_shape.shape) != 2 or logits_shape.shape[0] != n:
        raise ValueError(f"apply_fn must return [N, classes] logits, got shape {logits_shape.shape}")
    return modules, out_shapes


def _split_params(params, layer_paths):
    """Splits a params dict into {layer path: that layer's params} and the flat rest {key tuple: leaf}."""
    flat = traverse_util.flatten_dict(params)
    layer_params, owner = {}, {}
    for path in layer_paths:
        sub = {k[len(path):]: v for k, v in flat.items() if k[: len(path)] == path}
        if not sub:
            raise ValueError(f"weighted layer {'/'.join(path)} has no entry in variables['params']")
        layer_params[path] = traverse_util.unflatten_dict(sub)
        for k in flat:
            if k[: len(path)] == path:
                owner[k] = path
    rest = {k: v for k, v in flat.items() if k not in owner}
    return layer_params, rest, owner


def _merge_params(layer_params, rest):
    flat = dict(rest)
    for path, sub in layer_params.items():
        for k, v in traverse_util.flatten_dict(sub).items():
            flat[path + k] = v
    return traverse_util.unflatten_dict(flat)


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _params_of(variables):
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables must be a Flax variables dict with a 'params' collection")
    return variables["params"]


# --------------------------------------------------------------------------------------------------------
# Public functions.


def sample_dropout_masks(apply_fn, variables, images, *, rngs, **apply_kwargs) -> dict[LayerPath, jax.Array]:
    """The dropout masks a batched forward of ``apply_fn`` draws with these ``rngs`` (True = kept).

    Returns ``{dropout layer path: bool [N, ...] mask}``; pass it as ``dropout_masks=`` to
    :func:`per_example_grads` and :func:`bang_grad` to make both use exactly these masks.
    """
    _, taps = _run(
        apply_fn,
        variables,
        images,
        rngs=rngs,
        apply_kwargs=apply_kwargs,
        layer_types=(),
        record_dropout=True,
    )
    return taps["masks"]


def weighted_layers(apply_fn, variables, images, *, rngs=None, layer_types=WEIGHTED_LAYER_TYPES, **apply_kwargs):
    """``{layer path: output shape}`` of the layers BANG balances (no computation, shapes only)."""
    _, shapes = _discover(apply_fn, variables, images, rngs=rngs, apply_kwargs=apply_kwargs, layer_types=layer_types)
    return {path: tuple(s.shape) for path, s in shapes.items()}


def plain_grad(apply_fn, variables, images, labels, *, rngs=None, return_aux=False, **apply_kwargs):
    """The ordinary gradient of the batch-mean cross-entropy w.r.t. ``variables['params']``."""
    _check_batch(images, labels)
    params = _params_of(variables)

    def loss_fn(params):
        logits = apply_fn({**variables, "params": params}, images, rngs=rngs, **apply_kwargs)
        return jnp.mean(_cross_entropy(logits, labels)), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if not return_aux:
        return grads
    correct = jnp.argmax(logits, axis=-1) == labels
    return grads, BangAux(loss, logits, correct, {}, {})


def per_example_grads(
    apply_fn,
    variables,
    images,
    labels,
    *,
    rngs=None,
    dropout_masks=None,
    layer_types=WEIGHTED_LAYER_TYPES,
    **apply_kwargs,
) -> PerExampleGrads:
    """Per-example parameter gradients, κ norms and correctness by ``vmap`` over ``grad``.

    Args:
      apply_fn: ``apply_fn(variables, images, rngs=..., **apply_kwargs) -> [N, classes]`` logits.
      variables: Flax variables with a ``'params'`` collection (other collections pass through unchanged).
      images: ``[N, ...]`` inputs (for the bundled models: pixels 0..255, NHWC float32).
      labels: ``[N]`` integer labels.
      rngs: Flax rngs (e.g. ``{'dropout': key}``); each example gets its own keys (split along the batch).
      dropout_masks: optional masks from :func:`sample_dropout_masks` used instead of drawing new ones.
      layer_types: the module types treated as weighted layers.
      **apply_kwargs: passed to ``apply_fn`` (e.g. ``train=True``).

    Returns:
      :class:`PerExampleGrads`, ready for ``bang()``: ``tx.update(pe.grads, state, params,
      kappa_norms=pe.kappa_norms, correct=pe.correct)``.
    """
    n = _check_batch(images, labels)
    params = _params_of(variables)
    modules, out_shapes = _discover(
        apply_fn,
        variables,
        images,
        rngs=rngs,
        apply_kwargs=apply_kwargs,
        layer_types=layer_types,
        dropout_masks=dropout_masks,
    )
    layer_paths = list(modules)
    zero_perts = {p: jnp.zeros((1,) + s.shape[1:], s.dtype) for p, s in out_shapes.items()}
    example_rngs = None if rngs is None else {k: jax.random.split(v, n) for k, v in rngs.items()}

    def one(x, y, key_i, masks_i):
        masks_1 = None if masks_i is None else {p: m[None] for p, m in masks_i.items()}

        def loss_fn(params, perts):
            logits, _ = _run(
                apply_fn,
                {**variables, "params": params},
                x[None],
                rngs=key_i,
                apply_kwargs=apply_kwargs,
                layer_types=layer_types,
                perturbations=perts,
                dropout_masks=masks_1,
            )
            return _cross_entropy(logits, y[None])[0], logits[0]

        (loss, logits), (g, kappa) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, zero_perts)
        norms = {p: safe_norm(kappa[p])[0] for p in layer_paths}
        return g, norms, logits, loss

    grads, norms, logits, losses = jax.vmap(one)(images, labels, example_rngs, dropout_masks)
    _, _, owner = _split_params(params, layer_paths)
    zeros = jnp.zeros((n,), losses.dtype)
    kappa_norms = jax.tree_util.tree_map_with_path(
        lambda path, _: norms[owner[path_keys(path)]] if path_keys(path) in owner else zeros, params
    )
    correct = jnp.argmax(logits, axis=-1) == labels
    return PerExampleGrads(grads, kappa_norms, correct, jnp.mean(losses), logits)


def bang_grad(
    apply_fn,
    variables,
    images,
    labels,
    *,
    epsilon=None,
    beta=None,
    ratio=None,
    config: BangConfig | None = None,
    rngs=None,
    dropout_masks=None,
    layer_types=WEIGHTED_LAYER_TYPES,
    return_aux=False,
    **apply_kwargs,
):
    """BANG's balanced gradient from one ordinary backward pass (the authors' Caffe way, SPEC §1).

    The result equals ``bang(epsilon, beta, ratio)`` applied to :func:`per_example_grads` (paper eq. 6),
    but costs about one plain forward and backward pass: the backward pass runs once w.r.t. each weighted
    layer's output (giving κ for the whole batch), then each layer's weight and bias gradients are formed from
    η·κ by that layer's own VJP on its recorded input. What flows down the network is never scaled.

    Args:
      apply_fn, variables, images, labels, rngs, dropout_masks, layer_types, **apply_kwargs: as in
        :func:`per_example_grads`.
      epsilon: ε ≥ 0, scalar or per-layer pytree (a prefix of the params tree, as for :func:`bang_jax.bang`;
        a layer whose kernel and bias get different ε has one η per leaf).
      beta: β ≥ 0, scalar or pytree prefix; multiplies every parameter's gradient (default 1).
      ratio: factor on ε for misclassified examples (default 1).
      config: a :class:`bang_jax.BangConfig` instead of the three keywords.
      return_aux: also return a :class:`BangAux` (its ``layer_eta`` is keyed by layer path, or by leaf path
        for a layer whose leaves have different ε or ratio).

    Returns:
      The balanced gradient with the structure of ``variables['params']`` (and the aux if asked).
    """
    if config is None and epsilon is None:
        raise TypeError("bang_grad() needs epsilon= (or config=bang_jax.BangConfig(...))")
    config = as_bang_config(config, epsilon=epsilon, beta=beta, ratio=ratio)
    _check_batch(images, labels)
    params = _params_of(variables)
    modules, out_shapes = _discover(
        apply_fn,
        variables,
        images,
        rngs=rngs,
        apply_kwargs=apply_kwargs,
        layer_types=layer_types,
        dropout_masks=dropout_masks,
    )
    layer_params, rest, owner = _split_params(params, list(modules))
    zero_perts = {p: jnp.zeros(s.shape, s.dtype) for p, s in out_shapes.items()}

    def loss_fn(perts, rest):
        logits, taps = _run(
            apply_fn,
            {**variables, "params": _merge_params(layer_params, rest)},
            images,
            rngs=rngs,
            apply_kwargs=apply_kwargs,
            layer_types=layer_types,
            perturbations=perts,
            dropout_masks=dropout_masks,
        )
        return jnp.mean(_cross_entropy(logits, labels)), (logits, taps["inputs"])

    (loss, (logits, inputs)), (kappas, rest_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True
    )(zero_perts, rest)
    correct = jnp.argmax(logits, axis=-1) == labels

    eps_leaves = traverse_util.flatten_dict(broadcast_to_params("epsilon", config.epsilon, params))
    ratio_leaves = traverse_util.flatten_dict(broadcast_to_params("ratio", config.ratio, params))
    layer_grads, norms, etas = {}, {}, {}
    for path, module in modules.items():
        kappa = kappas[path]
        norms[path] = safe_norm(kappa)
        sub = traverse_util.flatten_dict(layer_params[path])
        # Leaves sharing the same ε and ratio objects share one η and one VJP (the usual case); a per-leaf
        # config (e.g. inside a train state) gives one VJP per leaf, whose unused parts XLA removes under jit.
        groups: dict[tuple[int, int], list] = {}
        for k in sub:
            groups.setdefault((id(eps_leaves[path + k]), id(ratio_leaves[path + k])), []).append(k)
        grads_of_layer = {}
        for keys in groups.values():
            e = eta(norms[path], correct, eps_leaves[path + keys[0]], ratio_leaves[path + keys[0]])
            etas[path if len(groups) == 1 else path + keys[0]] = e
            scaled = kappa * e.astype(kappa.dtype).reshape((-1,) + (1,) * (kappa.ndim - 1))

            def layer_out(selected, module=module, x=inputs[path], keys=keys, sub=sub):
                p = {**sub, **dict(zip(keys, selected))}
                return module.apply({"params": traverse_util.unflatten_dict(p)}, x)

            _, vjp = jax.vjp(layer_out, [sub[k] for k in keys])
            grads_of_layer.update(zip(keys, vjp(scaled)[0]))
        layer_grads[path] = traverse_util.unflatten_dict(grads_of_layer)

    grads = apply_beta(_merge_params(layer_grads, rest_grads), config.beta)
    if not return_aux:
        return grads
    return grads, BangAux(loss, logits, correct, norms, etas)
