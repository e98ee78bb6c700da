"""BANG for Flax NNX models: the same gradients as :mod:`bang_jax.gradients`, through the same core.

NNX modules are Python objects holding ``nnx.Param``\\ s; these functions take the model itself and call it as
``model(inputs, **call_kwargs)``, like ``nnx.grad`` does::

    import optax, bang_jax, bang_jax.nnx
    from flax import nnx

    optimizer = nnx.Optimizer(model, optax.sgd(0.01, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, images, labels):
        grads, aux = bang_jax.nnx.bang_grad(model, images, labels, epsilon=0.815, return_aux=True)
        optimizer.update(model, grads)          # grads: an nnx.State of the model's Params, as nnx.grad gives
        return aux.loss

The per-example route keeps ``bang()`` first in the optimiser's chain::

    optimizer = nnx.Optimizer(model, optax.chain(bang_jax.bang(epsilon=0.815), optax.sgd(0.01)), wrt=nnx.Param)
    pe = bang_jax.nnx.per_example_grads(model, images, labels)
    optimizer.update(model, pe.grads, kappa_norms=pe.kappa_norms, correct=pe.correct)

**Weighted layers** (balanced): ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv``, ``nnx.ConvTranspose``,
``nnx.Einsum`` — so also the query/key/value/output projections inside ``nnx.MultiHeadAttention`` — and linen
weighted layers wrapped with ``nnx.bridge.ToNNX``. Every other ``nnx.Param`` (norm scales, embeddings, free
parameters) gets its ordinary gradient (η = 1; β still applies).

**State and randomness.** Non-parameter state (``nnx.BatchStat``, RNG counts of ``nnx.Rngs`` held by the model
or passed as a call argument) is updated in the model exactly as a plain ``model(x)`` call would update it, so
``nnx.jit`` sees the changes. :func:`bang_grad` supports BatchNorm in training mode (the batch-loss definition of
:mod:`bang_jax.gradients`); :func:`per_example_grads` refuses it. In the per-example path each example draws its
dropout from its own split of every RNG key (as ``nnx.split_rngs`` does); the keys are left as they were and the
counts advance once; other state changes of the per-example forwards are discarded.

How it works: the model is split into ``(graphdef, params, state)`` and merged into a private copy for each
traced forward pass; the copy's weighted layers, dropout, BatchNorm, attention and embedding modules get a
subclass whose ``__call__`` reports to the forward pass's hooks — the same hooks the linen interceptor of
:mod:`bang_jax.gradients` calls, so both APIs share one implementation of BANG (the custom-VJP balanced layer, the
per-example perturbations, the checks). The user's model is never modified except for the state write-back above.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Collection
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from bang_jax.balance import BangConfig, as_bang_config
from bang_jax.core import (
    PerExampleGrads,
    batch_size,
    discover,
    has_array,
    run_bang,
    run_per_example,
    run_sample_masks,
)
from bang_jax.linen import WEIGHTED_LAYER_TYPES as LINEN_WEIGHTED_LAYER_TYPES, linen_interceptor

__all__ = [
    "WEIGHTED_LAYER_TYPES",
    "Functional",
    "bang_grad",
    "per_example_grads",
    "sample_dropout_masks",
    "weighted_layers",
]

WEIGHTED_LAYER_TYPES: tuple[type[nnx.Module], ...] = (
    nnx.Linear,
    nnx.LinearGeneral,
    nnx.Conv,
    nnx.ConvTranspose,
    nnx.Einsum,
)

_ACTIVE_TAP: contextvars.ContextVar = contextvars.ContextVar("bang_jax_nnx_tap", default=None)
_HOOKED: dict[type, type] = {}
_ORIGINAL: dict[type, type] = {}


def _to_nnx_type():
    try:
        from flax.nnx import bridge

        return bridge.ToNNX
    except Exception:  # pragma: no cover
        return ()


def _hooked_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` (and ``attend``) report to the active tap (cached per class)."""
    if cls in _ORIGINAL:
        return cls
    if cls not in _HOOKED:
        attrs = {"__call__": _hooked_call, "__module__": __name__}
        if issubclass(cls, nnx.Embed):
            attrs["attend"] = _hooked_attend
        hooked = type(f"BangTapped{cls.__name__}", (cls,), attrs)
        _HOOKED[cls], _ORIGINAL[hooked] = hooked, cls
    return _HOOKED[cls]


def _set_path(node, path) -> None:
    # ToNNX hands every attribute not prefixed 'to_nnx__' to its linen module as a variable.
    setattr(node, "to_nnx__bang_path" if _to_nnx_type() and isinstance(node, _to_nnx_type()) else "_bang_path",
            tuple(path))


def _where(self) -> tuple:
    return self._bang_path if hasattr(self, "_bang_path") else self.to_nnx__bang_path


def _hooked_attend(self, *args, **kwargs):
    original = _ORIGINAL[type(self)]
    tap = _ACTIVE_TAP.get()
    if tap is None or tap.passthrough:
        return original.attend(self, *args, **kwargs)
    if not args or has_array((args[1:], kwargs)):
        raise ValueError(f"{tap._where(_where(self), 'nnx.Embed.attend')} is called with more than one array "
                         "argument; call attend with the query array alone")
    graphdef, p, others = nnx.split(self, nnx.Param, ...)

    def attend_fn(p, x, others):
        with tap.inside_layer():
            return original.attend(nnx.merge(graphdef, p, others), x, *args[1:], **kwargs)

    return tap.tied_output(_where(self), "nnx.Embed.attend", lambda: original.attend(self, *args, **kwargs),
                           attend_fn, p, args[0], others)


def _hooked_call(self, *args, **kwargs):
    original = _ORIGINAL[type(self)]
    tap = _ACTIVE_TAP.get()
    if tap is None or tap.passthrough:
        return original.__call__(self, *args, **kwargs)
    path, kind = _where(self), original.__name__
    if isinstance(self, tap.layer_types):
        if not args or has_array((args[1:], kwargs)):
            raise ValueError(f"{tap._where(path, kind)} is called with more than one array argument; BANG "
                             "balances a layer applied to one array input. Fold the other arrays into the input "
                             "(e.g. concatenate), or leave this type out of layer_types= so that its parameters "
                             "get the ordinary gradient.")
        graphdef, p, others = nnx.split(self, nnx.Param, ...)

        def layer_fn(p, x, others):
            with tap.inside_layer():
                return original.__call__(nnx.merge(graphdef, p, others), x, *args[1:], **kwargs)

        return tap.layer(path, kind, lambda: original.__call__(self, *args, **kwargs), layer_fn, p, args[0], others)
    if isinstance(self, nnx.Dropout):
        deterministic = kwargs.get("deterministic")
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic or self.rate == 0.0:
            return original.__call__(self, *args, **kwargs)
        rest = {k: v for k, v in kwargs.items() if k != "deterministic"}
        return tap.dropout(path, kind, self.rate, args[0],
                           lambda z: original.__call__(self, z, deterministic=False, **rest))
    if isinstance(self, nnx.BatchNorm):
        use_ra = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
        if not (self.use_running_average if use_ra is None else use_ra):
            tap.batch_coupled(path, kind)
    if isinstance(self, nnx.MultiHeadAttention) and self.dropout_rate > 0.0:
        deterministic = kwargs.get("deterministic")
        if not (self.deterministic if deterministic is None else deterministic):
            tap.other_dropout(path, kind)
    to_nnx = _to_nnx_type()
    if to_nnx and isinstance(self, to_nnx):  # linen layers inside: the linen interceptor sees them
        outer, tap.prefix = tap.prefix, tuple(path)
        try:
            return original.__call__(self, *args, **kwargs)
        finally:
            tap.prefix = outer
    return original.__call__(self, *args, **kwargs)


def _hook_types(layer_types) -> tuple:
    return tuple(layer_types) + (nnx.Dropout, nnx.BatchNorm, nnx.MultiHeadAttention, nnx.Embed) + (
        (_to_nnx_type(),) if _to_nnx_type() else ())


def _is_graph_node(x) -> bool:
    return isinstance(x, (nnx.Pytree, nnx.Variable))


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


@contextlib.contextmanager
def _active(tap):
    token = _ACTIVE_TAP.set(tap)
    try:
        yield
    finally:
        _ACTIVE_TAP.reset(token)


class _NNX:
    """The NNX adapter for the drivers in :mod:`bang_jax.gradients`."""

    def __init__(self, model, call_kwargs, layer_types):
        if not isinstance(model, nnx.Module):
            raise TypeError(f"bang_jax.nnx functions take an nnx.Module, got {type(model).__name__} (for linen "
                            "use bang_jax.bang_grad(model.apply, variables, ...))")
        self.model, self.layer_types = model, tuple(layer_types)
        self.graph_kwargs = {k: v for k, v in call_kwargs.items() if _is_graph_node(v)}
        self.kwargs = {k: v for k, v in call_kwargs.items() if k not in self.graph_kwargs}
        self.graphdef, self.params, rest = nnx.split(model, nnx.Param, ...)
        self.kw_graphdef, kw_state = nnx.split(self.graph_kwargs)
        self.state = (rest, kw_state)
        self.no_layers_hint = (
            "no call of " + ", ".join(t.__name__ for t in self.layer_types) + " was seen in a forward pass "
            "(other layer types can be named with layer_types=)"
        )

    def run(self, params, state, inputs, kwargs, tap):
        # Fresh Variable objects at this trace level (merge reuses the ones it is given, and NNX forbids
        # mutating a Variable created outside the current trace, e.g. an RNG count inside grad).
        params, (rest, kw_state) = jax.tree.map(lambda a: a, (params, state))
        model = nnx.merge(self.graphdef, params, rest)
        graph_kwargs = nnx.merge(self.kw_graphdef, kw_state)
        hook_types = _hook_types(self.layer_types)
        for path, node in nnx.iter_graph(model):
            if isinstance(node, hook_types) and type(node) not in _ORIGINAL:
                _set_path(node, path)
                node.__class__ = _hooked_class(type(node))
        interceptor = linen_interceptor(tap, LINEN_WEIGHTED_LAYER_TYPES, inside_nnx=True)
        with tap.running(), _active(tap), nn.intercept_methods(interceptor):
            outputs = model(inputs, **kwargs, **graph_kwargs)
        return outputs, (nnx.state(model, nnx.Not(nnx.Param)), nnx.state(graph_kwargs))

    def leaf_key(self, path) -> tuple:
        keys = []
        for i, k in enumerate(path):
            if i == len(path) - 1 and isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
                break  # an nnx.Variable's own value, not part of the parameter's name
            keys.append(k.key if isinstance(k, jax.tree_util.DictKey) else
                        k.name if isinstance(k, jax.tree_util.GetAttrKey) else
                        k.idx if isinstance(k, jax.tree_util.SequenceKey) else str(k))
        return tuple(keys)

    def per_example_state(self, state, n):
        def split(v):
            return v.copy(jax.random.split(v.get_value(), n)) if isinstance(v, nnx.RngKey) else v

        batched = jax.tree.map(split, state, is_leaf=_is_variable)
        axes = jax.tree.map(lambda v: 0 if isinstance(v, nnx.RngKey) else None, state, is_leaf=_is_variable)
        return batched, axes

    def after_per_example(self, updates):
        """Writes back the RNG counts the per-example forwards advanced (identical for every example)."""
        def pick(old, new):
            return old.copy(new.get_value()[0]) if isinstance(old, nnx.RngCount) else old

        self.commit(jax.tree.map(pick, self.state, updates, is_leaf=_is_variable))

    def commit(self, state):
        rest, kw_state = state
        nnx.update(self.model, rest)
        if self.graph_kwargs:
            nnx.update(self.graph_kwargs, kw_state)


def _check_masks_path_type(dropout_masks):
    if dropout_masks is not None and not isinstance(dropout_masks, dict):
        raise TypeError("dropout_masks must be the dict returned by bang_jax.nnx.sample_dropout_masks")


def sample_dropout_masks(model, inputs, **call_kwargs) -> dict[tuple, jax.Array]:
    """The dropout masks the model's next forward pass would draw (True = kept), without advancing its RNGs.

    Returns ``{nnx.Dropout path: bool [N, ...] mask}``; pass it as ``dropout_masks=`` to :func:`per_example_grads`
    and :func:`bang_grad` to make both use exactly these masks. Attention dropout inside
    ``nnx.MultiHeadAttention`` cannot be covered and raises.
    """
    adapter = _NNX(model, call_kwargs, WEIGHTED_LAYER_TYPES)
    return run_sample_masks(adapter, inputs, adapter.kwargs)


def weighted_layers(model, inputs, *, layer_types=WEIGHTED_LAYER_TYPES, **call_kwargs):
    """``{layer path: output shape}`` of the layers BANG balances in ``model(inputs, **call_kwargs)``."""
    adapter = _NNX(model, call_kwargs, layer_types)
    layers, _ = discover(adapter, inputs, adapter.kwargs, n=batch_size(inputs))
    return {path: tuple(r.out.shape) for path, r in layers.items()}


def per_example_grads(
    model,
    inputs,
    labels,
    *,
    loss_fn: Callable | None = None,
    correct_fn: Callable | None = None,
    dropout_masks=None,
    batch_kwargs: Collection[str] | None = None,
    layer_types=WEIGHTED_LAYER_TYPES,
    factor_layers: bool = False,
    **call_kwargs,
) -> PerExampleGrads:
    """Per-example gradients of an NNX model's Params, κ norms and correctness (``vmap`` over ``grad``).

    Args:
      model: an ``nnx.Module`` called as ``model(inputs, **call_kwargs)``.
      inputs, labels, loss_fn, correct_fn, dropout_masks, batch_kwargs: as in
        :func:`bang_jax.per_example_grads` (masks from :func:`sample_dropout_masks`).
      layer_types: the NNX module types treated as weighted layers.
      factor_layers: the layer-factored form for large leaves, as in :func:`bang_jax.per_example_grads` (exact
        only without tied weights; default ``False``).
      **call_kwargs: passed to the model (``nnx.Rngs`` objects included; array arguments with the batch on
        axis 0 are sliced per example unless ``batch_kwargs`` says otherwise).

    Returns:
      :class:`bang_jax.PerExampleGrads` whose ``grads`` is an ``nnx.State`` of the model's Params holding
      :class:`bang_jax.PerExampleGrad` markers and whose ``kappa_norms`` has the same structure with ``[N]``
      norms: ``optimizer.update(model, pe.grads, kappa_norms=pe.kappa_norms, correct=pe.correct)`` with
      ``bang()`` first in the optimiser's chain.
    """
    _check_masks_path_type(dropout_masks)
    adapter = _NNX(model, call_kwargs, layer_types)
    return run_per_example(adapter, inputs, labels, loss_fn=loss_fn, correct_fn=correct_fn,
                            dropout_masks=dropout_masks, batch_kwargs=batch_kwargs, kwargs=adapter.kwargs,
                            factor_layers=factor_layers)


def bang_grad(
    model,
    inputs,
    labels,
    *,
    epsilon: Any = None,
    beta: Any = None,
    ratio: Any = None,
    config: BangConfig | None = None,
    loss_fn: Callable | None = None,
    correct_fn: Callable | None = None,
    dropout_masks=None,
    layer_types=WEIGHTED_LAYER_TYPES,
    return_aux: bool = False,
    **call_kwargs,
):
    """BANG's balanced gradient of an NNX model from one ordinary backward pass (docs/semantics.md).

    Equals ``bang(epsilon, beta, ratio)`` applied to :func:`per_example_grads` where per-example gradients
    exist, and gives the batch-loss definition of :mod:`bang_jax.gradients` for BatchNorm in training mode.

    Args:
      model: an ``nnx.Module`` called as ``model(inputs, **call_kwargs)``.
      epsilon, beta, ratio, config: as in :func:`bang_jax.bang_grad`; per-layer values are keyed by the
        model's attribute paths (e.g. ``{"conv1": 0.8, "head": 0.81}``).
      inputs, labels, loss_fn, correct_fn, dropout_masks, layer_types, return_aux: as in
        :func:`bang_jax.bang_grad`.
      **call_kwargs: passed to the model (``nnx.Rngs`` objects included).

    Returns:
      The balanced gradient as an ``nnx.State`` of the model's ``nnx.Param``\\ s (what ``nnx.grad`` returns;
      ready for ``nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads)``), and a
      :class:`bang_jax.BangAux` if ``return_aux``. The model's non-parameter state (batch statistics, RNG
      counts) is updated in place as by a plain call.
    """
    if config is None and epsilon is None:
        raise TypeError("bang_grad() needs epsilon= (or config=bang_jax.BangConfig(...))")
    config = as_bang_config(config, epsilon=epsilon, beta=beta, ratio=ratio)
    _check_masks_path_type(dropout_masks)
    adapter = _NNX(model, call_kwargs, layer_types)
    grads, aux = run_bang(adapter, inputs, labels, config=config, loss_fn=loss_fn, correct_fn=correct_fn,
                           dropout_masks=dropout_masks, kwargs=adapter.kwargs)
    adapter.commit(aux.model_state)
    aux = aux._replace(model_state=aux.model_state[0])
    return (grads, aux) if return_aux else grads



# ------------------------------------------------------------------------------------------------------------
# An NNX model behind linen's functional interface, for bang_jax.train, the experiments and the evaluation.


class Functional:
    """An NNX model seen through linen's functional interface, so that :func:`bang_jax.train.train`, run
    directories, checkpoints, :func:`bang_jax.evaluate.evaluate_model` and the attacks treat it like a linen module.

    ``Functional(make_model)`` takes a **factory** called as ``make_model(rngs=nnx.Rngs(key))`` (each trained
    model's seed then sets its own initial weights), or a built ``nnx.Module`` (every trained model then starts
    from its weights; seeds change the dropout draws only). The model is called as ``model(images)``; training
    mode is set with Flax's ``model.train()`` / ``model.eval()`` (Dropout's ``deterministic``, BatchNorm's
    ``use_running_average``), and ``train=`` is passed on too when ``__call__`` takes it.

    * ``init(key, images, train=False)`` returns ``{'params': ..., 'state': ...}``: the ``nnx.Param`` values and
      every other variable (``nnx.BatchStat``, custom variables) as plain nested dicts of arrays; RNG streams are
      not part of it (they are reseeded from the ``rngs`` of each training call).
    * ``apply(variables, images, train=False, rngs=None, mutable=False)``: the outputs; with ``mutable`` also
      ``{'state': ...}`` after the call (BatchNorm's running statistics in training mode).
    * ``model(variables)``: the ``nnx.Module`` itself, built from ``variables`` (for your own code).

    Training with BANG uses :func:`bang_grad` on the rebuilt module (BatchNorm in training mode supported).
    """

    def __init__(self, model):
        if isinstance(model, Functional):
            model = model.instance if model.factory is None else model.factory
        if isinstance(model, nnx.Module):
            self.factory, self.instance = None, model
        elif callable(model):
            self.factory, self.instance = model, None
        else:
            raise TypeError(f"Functional takes an nnx.Module or a function returning one, got {type(model).__name__}")
        self._graphdef = self._templates = None
        self._takes_train = None

    def __repr__(self) -> str:
        what = self.factory if self.instance is None else type(self.instance)
        return f"Functional({getattr(what, '__qualname__', what)})"

    def build(self, key) -> nnx.Module:
        """A fresh module with initial weights drawn from ``key`` (the instance itself for a built model)."""
        if self.factory is None:
            return self.instance
        try:
            model = self.factory(rngs=nnx.Rngs(key))
        except TypeError as err:
            if "rngs" not in str(err):
                raise
            raise TypeError(f"the NNX model factory {getattr(self.factory, '__qualname__', self.factory)} must take "
                            "rngs= (an nnx.Rngs), so that each trained model's seed sets its initial weights") from err
        if not isinstance(model, nnx.Module):
            raise TypeError(f"the NNX model factory returned {type(model).__name__}, not an nnx.Module")
        return model

    def _split(self, model: nnx.Module) -> dict:
        graphdef, params, rngs, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
        if self._graphdef is None:
            self._graphdef, self._templates = graphdef, (params, rngs, rest)
            self._paths = (set(_paths(nnx.to_pure_dict(params))), set(_paths(nnx.to_pure_dict(rest))))
            self._takes_train = _takes_keyword(model, "train")
        elif graphdef != self._graphdef:
            raise ValueError("the NNX model factory built models of different structure for different seeds")
        variables = {"params": nnx.to_pure_dict(params)}
        if jax.tree.leaves(rest):
            variables["state"] = nnx.to_pure_dict(rest)
        return variables

    def init(self, rngs, *args, train: bool = False, **kwargs) -> dict:
        """``{'params': ..., 'state': ...}`` of a model built with ``rngs`` (a key, or linen's ``{'params': key}``).
        The other arguments (linen's sample input) are not needed: an NNX model is built with its shapes."""
        del args, kwargs, train
        key = rngs.get("params") if isinstance(rngs, dict) else rngs
        return self._split(self.build(key))

    def model(self, variables: dict) -> nnx.Module:
        """The ``nnx.Module`` holding ``variables`` (a new object; RNG streams as built)."""
        if self._graphdef is None:
            self._split(self.build(jax.random.PRNGKey(0)))
        params_t, rngs_t, rest_t = self._templates
        for what, given, want in (("params", variables.get("params", {}), self._paths[0]),
                                  ("state", variables.get("state", {}), self._paths[1])):
            missing = sorted(want - set(_paths(given)))
            if missing:  # replace_by_pure_dict would keep the template's values for them, without a word
                raise ValueError(f"these variables do not fit {self!r}: {what} lacks "
                                 f"{', '.join('/'.join(p) for p in missing[:3])}{' …' if len(missing) > 3 else ''}"
                                 + (" (the BatchNorm statistics are in variables['state'])" if what == "state" else ""))
        try:
            params = _from_pure(params_t, variables["params"])
            rest = _from_pure(rest_t, variables.get("state", {}))
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"these variables do not fit {self!r}: {err}") from err
        return nnx.merge(self._graphdef, params, jax.tree.map(lambda a: a, rngs_t), rest)

    def apply(self, variables, *args, train: bool = False, rngs=None, mutable=False, **kwargs):
        """The model's outputs on ``args`` (and ``{'state': ...}`` after the call when ``mutable``)."""
        model = self.prepare(variables, train=train, rngs=rngs)
        if self._takes_train:
            kwargs = {"train": train, **kwargs}
        outputs = model(*args, **kwargs)
        return (outputs, self.state_of(model)) if mutable is not False else outputs

    def prepare(self, variables, *, train: bool, rngs=None) -> nnx.Module:
        """The module for one call: built from ``variables``, in training or evaluation mode, its RNG streams
        reseeded from ``rngs`` (``{'dropout': key}`` or a key)."""
        model = self.model(variables)
        model.train() if train else model.eval()
        if rngs is not None:
            key = rngs.get("dropout", next(iter(rngs.values()))) if isinstance(rngs, dict) else rngs
            if not jax.dtypes.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
                key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
            tags = sorted({node.tag for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)})
            if tags:
                nnx.reseed(model, policy="match_shape", **{t: jax.random.fold_in(key, i) for i, t in enumerate(tags)})
        return model

    def state_of(self, model: nnx.Module) -> dict:
        """``{'state': ...}`` of the model after a call: the variables it was built with (what a call adds, e.g.
        ``sow``-n intermediates, is left out)."""
        rest = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Any(nnx.Param, nnx.RngState))))
        kept = _restrict(rest, self._paths[1])
        return {"state": kept} if jax.tree.leaves(kept) else {}

    def call_kwargs(self, train: bool) -> dict:
        return {"train": train} if self._takes_train else {}


def _takes_keyword(model, name: str) -> bool:
    try:
        params = inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _paths(tree, prefix=()):
    """The leaf paths of a nested dict, keys as text."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, prefix + (str(k),))
    else:
        yield prefix


def _restrict(tree, paths, prefix=()):
    """``tree`` with only the leaves at ``paths``."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for k, v in tree.items():
        p = prefix + (str(k),)
        if any(q[: len(p)] == p for q in paths):
            out[k] = _restrict(v, paths, p)
    return out


def _from_pure(template, pure):
    state = jax.tree.map(lambda a: a, template)  # new Variable objects: the template is shared by every call
    nnx.replace_by_pure_dict(state, pure)
    return state
