"""Per-example gradients marked for :func:`bang_jax.bang`: :class:`PerExampleGrad` and how it is made.

A per-example gradient leaf (``[N, *param.shape]``, batch on axis 0) travels through an optax chain as a
:class:`PerExampleGrad` marker that only :func:`bang_jax.bang` accepts, so that a transformation placed before it
fails loudly instead of averaging, clipping or accumulating per-example values. A marker holds either the stored
gradients or, for a weighted layer's large leaves, the *layer-factored* form (each example's layer input and κ, the
gradient is the layer's vector–Jacobian product), plus a fingerprint that lets :func:`bang_jax.bang` detect a
transformation that changed the values before it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["PerExampleGrad", "mark_per_example", "per_example_fingerprint"]


class _PerExampleGradType(type):
    """Metaclass whose only job is a class repr that names the misuse in JAX's pytree-mismatch errors.

    An optax transformation placed before :func:`bang` that combines the updates with its own state (Adam's
    moments, momentum, weight decay, ``MultiSteps``' accumulator) fails inside ``jax.tree.map`` with "the
    prefix pytree has a subtree of type <…>"; this repr is what appears between the brackets.
    """

    def __repr__(cls):
        return (
            "<per-example gradients (bang_jax.PerExampleGrad): only bang_jax.bang(), placed FIRST in the optax "
            "chain, accepts them>"
        )


_MISUSE = (
    "per-example gradients (bang_jax.PerExampleGrad) reached {what}; only bang_jax.bang() accepts them, and it "
    "must be the first transformation of the optax chain (under optax.masked / multi_transform every partition "
    "must start with bang(); for gradient accumulation use optax.chain(bang(...), "
    "optax.MultiSteps(solver, k).gradient_transformation()))"
)


class PerExampleGrad(metaclass=_PerExampleGradType):
    """One parameter's per-example gradients, marked for :func:`bang` (the only transformation that accepts them).

    Attributes:
      value: ``[N, *param.shape]`` per-example gradients, batch on axis 0.
      fingerprint: ``[N]`` float32 taken at creation — each example's sum of squares over at most 16 fixed entries
        of ``value`` — or ``None``. :func:`bang` recomputes it and raises if a transformation before it changed
        the gradients (``clip_by_global_norm`` or ``scale`` placed first in the chain). Only small leaves (at most
        4,096 entries per example, and the smallest leaf of a tree in any case) carry one: reading a large
        per-example gradient would force XLA to materialise what it otherwise fuses into BANG's weighted sum (on
        LeNet that made the per-example step 20% slower), while any transformation that touches every leaf is
        caught on the small ones.

    A leaf can be held in one of two forms. *Stored*: ``value`` itself (what :func:`mark_per_example` makes).
    *Layer-factored* (what :func:`bang_jax.per_example_grads` makes for the large leaves of weighted layers): the
    layer's function and parameters, each example's input to the layer (batch 1) and κ_i, the gradient of E_i with
    respect to the layer's output. The per-example gradient is then the layer's own vector-Jacobian product,
    ``∂E_i/∂θ = (∂layer(θ, x_i)/∂θ)ᵀ κ_i`` (chain rule; exact, since the layer's parameters enter the loss through
    that one call). ``value`` computes it on access (``vmap`` of that product), and :func:`bang` forms its
    weighted sum ``Σ_i η_i ∂E_i/∂θ`` as the same products with ``η_i κ_i`` summed over the batch, which XLA turns
    into one matrix product instead of writing ``[N, *param.shape]`` to memory and reading it back.

    A pytree node (children ``value`` and ``fingerprint``, or the factors and ``fingerprint``), so it crosses
    ``jit``/``vmap`` boundaries and ``nnx.Optimizer.update``. Arithmetic on it raises, so per-example gradients
    that reach ``apply_updates`` or an optimiser unbalanced fail loudly instead of being averaged or broadcast
    silently.
    """

    __slots__ = ("_value", "fingerprint", "_factors", "_layer")

    def __init__(self, value, fingerprint):
        self._value, self.fingerprint = value, fingerprint
        self._factors, self._layer = None, None

    @classmethod
    def from_layer(cls, layer_fn, leaf: int, params, inputs, extra, kappa, fingerprint=None) -> PerExampleGrad:
        """The layer-factored form: leaf ``leaf`` (``jax.tree.leaves`` order) of ``layer_fn(params, x, extra)``'s
        parameter gradient, for inputs ``[N, 1, ...]`` (each example with batch 1), ``extra`` batched on axis 0
        and κ ``[N, 1, ...]`` (the gradient of each example's loss with respect to the layer's output)."""
        g = cls.__new__(cls)
        g._value, g.fingerprint = None, fingerprint
        g._factors, g._layer = (params, inputs, extra, kappa), (layer_fn, leaf)
        return g

    @property
    def factored(self) -> bool:
        return self._factors is not None

    @property
    def value(self):
        return self._value if self._factors is None else self._layer_grads(None)

    def _layer_grads(self, weights):
        """``[N, *param.shape]`` per-example layer VJPs, with κ_i scaled by ``weights[i]`` when given."""
        layer_fn, leaf = self._layer
        params, inputs, extra, kappa = self._factors

        def one(x1, e1, k1, w1):
            _, pullback = jax.vjp(lambda q: layer_fn(q, x1, e1), params)
            if w1 is not None:
                k1 = k1 * w1.astype(k1.dtype)
            return jax.tree.leaves(pullback(k1)[0])[leaf]

        if weights is None:
            return jax.vmap(lambda x1, e1, k1: one(x1, e1, k1, None))(inputs, extra, kappa)
        return jax.vmap(one)(inputs, extra, kappa, weights)

    def _shape_dtype(self) -> tuple[tuple, Any]:
        """``value``'s shape and dtype, without forming it (a factored leaf: ``[N, *param.shape]``, param dtype)."""
        if self._factors is None:
            v = jnp.asarray(self._value) if not hasattr(self._value, "shape") else self._value
            return tuple(v.shape), v.dtype
        params, inputs = self._factors[:2]
        param = jax.tree.leaves(params)[self._layer[1]]
        return (inputs.shape[0], *param.shape), param.dtype

    def weighted_sum(self, weights: jax.Array) -> jax.Array:
        """``Σ_i weights[i] · value[i]`` (``param.shape``), without materialising ``value`` for a factored leaf."""
        if self._factors is None:
            v = self._value
            w = jnp.asarray(weights).astype(v.dtype)
            if _explicitly_sharded(v):  # a sharded contraction needs its output sharding: reduce instead
                return jnp.sum(jnp.expand_dims(w, tuple(range(1, v.ndim))) * v, axis=0)
            return jnp.tensordot(w, v, axes=1)
        return jnp.sum(self._layer_grads(weights), axis=0)

    def __repr__(self):
        shape = self._shape_dtype()[0] if self._factors is not None else getattr(self._value, "shape", self._value)
        form = ", layer-factored" if self._factors is not None else ""
        return f"PerExampleGrad(value={shape}{form}, fingerprint=…)"

    def _refuse(self, *_args, **_kwargs):
        raise TypeError(_MISUSE.format(what="arithmetic"))

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _refuse
    __neg__ = __pow__ = __matmul__ = __rmatmul__ = _refuse

    def __jax_array__(self):
        raise TypeError(_MISUSE.format(what="a jax.numpy function"))


_FACTOR_KEYS = tuple(jax.tree_util.GetAttrKey(k) for k in ("params", "inputs", "extra", "kappa", "fingerprint"))


def _flatten_with_keys(m):
    if m._factors is None:
        return (((jax.tree_util.GetAttrKey("value"), m._value), (jax.tree_util.GetAttrKey("fingerprint"),
                                                                 m.fingerprint)), None)
    return tuple(zip(_FACTOR_KEYS, (*m._factors, m.fingerprint))), m._layer


def _unflatten(layer, children):
    if layer is None:
        return PerExampleGrad(*children)
    return PerExampleGrad.from_layer(layer[0], layer[1], *children)


jax.tree_util.register_pytree_with_keys(PerExampleGrad, _flatten_with_keys, _unflatten)


_FINGERPRINT_MAX_SIZE = 4096


def _sharding_spec(value) -> tuple:
    """The explicit sharding spec of ``value``'s type (``()`` when it has none)."""
    try:
        return tuple(jax.typeof(value).sharding.spec)
    except Exception:  # pragma: no cover - no sharding type
        return ()


def _explicitly_sharded(value) -> bool:
    return any(_sharding_spec(value))


def _examples_flat(value: jax.Array) -> jax.Array:
    """``[N, -1]`` view of ``value``; with an explicit sharding type the batch axis keeps its mesh axes (JAX asks
    for the output sharding of a reshape that merges sharded axes)."""
    shape = (value.shape[0], int(np.prod(value.shape[1:])))
    spec = _sharding_spec(value)
    if any(spec):
        return jax.lax.reshape(value, shape, out_sharding=jax.sharding.PartitionSpec(spec[0], None))
    return jnp.reshape(value, shape)


def per_example_fingerprint(value: jax.Array) -> jax.Array:
    """``[N]`` float32 sum of squares of each example's entries at (at most) 16 evenly spaced flat positions."""
    flat = _examples_flat(value)
    step = max(1, flat.shape[1] // 16)
    sample = flat[:, ::step][:, :16].astype(jnp.promote_types(value.dtype, jnp.float32))
    return jnp.sum(jnp.square(sample), axis=1).astype(jnp.float32)


def mark_per_example(grads: Any) -> Any:
    """Marks a pytree of per-example gradients you computed yourself (batch on axis 0 of every leaf) for :func:`bang`.

    :func:`bang_jax.per_example_grads` already returns marked gradients; this is for your own ``vmap(grad)``.
    """

    leaves, treedef = jax.tree.flatten(grads)
    leaves = [jnp.asarray(g) for g in leaves]
    if any(g.ndim == 0 for g in leaves):
        raise ValueError("per-example gradients need a leading batch axis; got a scalar leaf")
    return treedef.unflatten(_mark_leaves(leaves))


def _mark_leaves(leaves: list) -> list[PerExampleGrad]:
    """Markers for per-example gradient leaves: arrays, or ``(layer_fn, leaf, params, inputs, extra, kappa)``
    tuples for the layer-factored form, which is used only for leaves too large to fingerprint (others, and the
    smallest leaf, are stored: their fingerprint reads them)."""
    shapes = [g.shape if hasattr(g, "shape") else PerExampleGrad.from_layer(*g)._shape_dtype()[0] for g in leaves]
    sizes = [int(np.prod(s[1:])) for s in shapes]
    smallest = int(np.argmin(sizes)) if sizes else -1
    out = []
    for i, (g, size) in enumerate(zip(leaves, sizes)):
        fingerprinted = size <= _FINGERPRINT_MAX_SIZE or i == smallest
        if not hasattr(g, "shape"):
            if not fingerprinted:
                out.append(PerExampleGrad.from_layer(*g))
                continue
            g = PerExampleGrad.from_layer(*g).value
        out.append(PerExampleGrad(g, per_example_fingerprint(g) if fingerprinted else None))
    return out
