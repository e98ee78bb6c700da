"""The linen API under its historical name: everything here is :mod:`bang_jax.linen` (see there).

Kept so that ``from bang_jax.gradients import bang_grad`` and the other names of earlier releases keep working.
"""

from bang_jax.linen import (  # noqa: F401  (re-exports)
    WEIGHTED_LAYER_TYPES,
    BangAux,
    PerExampleGrads,
    bang_grad,
    default_correct,
    default_loss,
    per_example_grads,
    plain_grad,
    sample_dropout_masks,
    weighted_layers,
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
