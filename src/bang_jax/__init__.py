"""bang-jax: Batch Adjusted Network Gradients (Rozsa, Günther, Boult, WACV 2018) for JAX/Flax."""

from bang_jax.balance import BangState, bang, eta, safe_norm
from bang_jax.gradients import (
    WEIGHTED_LAYER_TYPES,
    BangAux,
    PerExampleGrads,
    bang_grad,
    per_example_grads,
    plain_grad,
    sample_dropout_masks,
    weighted_layers,
)

__version__ = "0.1.0"

__all__ = [
    "WEIGHTED_LAYER_TYPES",
    "BangAux",
    "BangState",
    "PerExampleGrads",
    "bang",
    "bang_grad",
    "eta",
    "per_example_grads",
    "plain_grad",
    "safe_norm",
    "sample_dropout_masks",
    "weighted_layers",
]
