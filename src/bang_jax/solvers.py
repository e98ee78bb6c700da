"""Caffe's SGD solver as an optax chain (docs/semantics.md).

Caffe updates ``v ← μ·v + lr·lr_mult·(g + wd·w); w ← w − v``: the learning rate sits **inside** the momentum
buffer, so ``optax.sgd`` (which applies lr after the trace) differs whenever lr changes. Biases have
``lr_mult`` 2 and are decayed too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from bang_jax.balance import path_keys

__all__ = [
    "CIFAR_QUICK_SOLVER",
    "LENET_SOLVER",
    "SolverConfig",
    "caffe_sgd",
    "cosine_schedule",
    "inv_schedule",
    "multistep_schedule",
]


def _check_positive(name: str, value: float, allow_zero: bool = True) -> None:
    value = float(value)
    if not (value == value and abs(value) != float("inf")) or value < 0 or (not allow_zero and value == 0):
        raise ValueError(f"{name} must be a finite {'non-negative' if allow_zero else 'positive'} number, got {value}")


def inv_schedule(base_lr: float, gamma: float = 1e-4, power: float = 0.75) -> optax.Schedule:
    """Caffe's "inv" policy: ``lr(it) = base_lr · (1 + gamma·it) ^ (−power)`` (LeNet: 0.01, 1e-4, 0.75)."""
    for name, v in (("base_lr", base_lr), ("gamma", gamma), ("power", power)):
        _check_positive(name, v)

    def schedule(count):
        return base_lr * (1.0 + gamma * jnp.asarray(count, jnp.float32)) ** (-power)

    return schedule


def multistep_schedule(base_lr: float, steps: Sequence[int], gamma: float = 0.1) -> optax.Schedule:
    """Caffe's "multistep" policy: ``base_lr · gamma^k`` with k = number of step values ≤ it."""
    _check_positive("base_lr", base_lr)
    _check_positive("gamma", gamma)
    boundaries = jnp.asarray(sorted(int(s) for s in steps), jnp.int32)

    def schedule(count):
        k = jnp.sum(jnp.asarray(count, jnp.int32) >= boundaries)
        return base_lr * gamma ** k.astype(jnp.float32)

    return schedule


def cosine_schedule(base_lr: float, decay_steps: int) -> optax.Schedule:
    """``base_lr · ½(1 + cos(π·min(it, decay_steps)/decay_steps))``: from ``base_lr`` down to 0 at ``decay_steps``."""
    _check_positive("base_lr", base_lr)
    if isinstance(decay_steps, bool) or not isinstance(decay_steps, int) or decay_steps < 1:
        raise ValueError(f"decay_steps must be a positive integer for the cosine policy, got {decay_steps!r}")

    def schedule(count):
        t = jnp.minimum(jnp.asarray(count, jnp.float32), decay_steps) / decay_steps
        return base_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * t))

    return schedule


def caffe_sgd(
    learning_rate: float | optax.Schedule,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    bias_lr_mult: float = 2.0,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """Caffe's SGD: weight decay on every parameter, lr (× lr_mult, 2 for leaves named ``bias``) inside momentum.

    Put it after :func:`bang_jax.bang` (or feed it a batch gradient from :func:`bang_jax.bang_grad`); the
    decay is added after BANG's balancing, so neither η nor β scales it (docs/semantics.md).
    """
    _check_positive("momentum", momentum)
    _check_positive("weight_decay", weight_decay)
    _check_positive("bias_lr_mult", bias_lr_mult)
    if not callable(learning_rate):
        _check_positive("learning_rate", learning_rate)

    def lr_mult(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: bias_lr_mult if path_keys(path)[-1:] == ("bias",) else 1.0, params
        )

    def scale_by_lr_mult():
        def init_fn(params):
            del params
            return optax.EmptyState()

        def update_fn(updates, state, params=None):
            del params
            return jax.tree.map(lambda u, m: u * m, updates, lr_mult(updates)), state

        return optax.GradientTransformation(init_fn, update_fn)

    schedule = learning_rate if callable(learning_rate) else (lambda count: learning_rate)
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        scale_by_lr_mult(),
        optax.scale_by_schedule(schedule),
        optax.trace(decay=momentum, nesterov=bool(nesterov)),
        optax.scale(-1.0),
    )


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """A Caffe SGD solver (docs/semantics.md). ``policy`` is ``'inv'``, ``'multistep'``, ``'fixed'`` or
    ``'cosine'`` (down to 0 at ``decay_steps``); ``nesterov`` uses Nesterov momentum."""

    base_lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    policy: str = "fixed"
    gamma: float = 0.0
    power: float = 0.0
    stepvalues: tuple[int, ...] = ()
    bias_lr_mult: float = 2.0
    nesterov: bool = False
    decay_steps: int = 0  # the cosine policy's length in iterations

    def __post_init__(self):
        _check_positive("base_lr", self.base_lr, allow_zero=False)
        for name in ("momentum", "weight_decay", "gamma", "power", "bias_lr_mult"):
            _check_positive(name, getattr(self, name))
        if self.policy not in ("inv", "multistep", "fixed", "cosine"):
            raise ValueError(f"unknown lr policy {self.policy!r} (inv, multistep, fixed or cosine)")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov must be true or false, got {self.nesterov!r}")
        if isinstance(self.decay_steps, bool) or not isinstance(self.decay_steps, int) or self.decay_steps < 0:
            raise ValueError(f"decay_steps must be a non-negative integer, got {self.decay_steps!r}")
        if self.policy == "cosine" and self.decay_steps < 1:
            raise ValueError("the cosine policy needs decay_steps ≥ 1 (usually the run's steps)")
        object.__setattr__(self, "stepvalues", tuple(int(v) for v in self.stepvalues))

    def schedule(self) -> optax.Schedule:
        if self.policy == "inv":
            return inv_schedule(self.base_lr, self.gamma, self.power)
        if self.policy == "multistep":
            return multistep_schedule(self.base_lr, self.stepvalues, self.gamma)
        if self.policy == "fixed":
            return lambda count: jnp.asarray(self.base_lr, jnp.float32)
        if self.policy == "cosine":
            return cosine_schedule(self.base_lr, self.decay_steps)
        raise ValueError(f"unknown lr policy {self.policy!r} (inv, multistep, fixed or cosine)")

    def optimizer(self) -> optax.GradientTransformation:
        return caffe_sgd(self.schedule(), self.momentum, self.weight_decay, self.bias_lr_mult, self.nesterov)


# The paper's Caffe solvers: lenet_solver.prototxt and the BANG variant of cifar10_quick_solver.prototxt.
LENET_SOLVER = SolverConfig(base_lr=0.01, momentum=0.9, weight_decay=5e-4, policy="inv", gamma=1e-4, power=0.75)
CIFAR_QUICK_SOLVER = SolverConfig(
    base_lr=0.001, momentum=0.9, weight_decay=0.004, policy="multistep", gamma=0.1, stepvalues=(18000, 19000)
)
