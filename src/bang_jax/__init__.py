"""bang-jax: Batch Adjusted Network Gradients (Rozsa, Günther, Boult, WACV 2018) for JAX/Flax."""

from bang_jax import nnx  # noqa: E402  (bang_jax.nnx: the same API for Flax NNX models)
from bang_jax.balance import BangConfig, BangState, bang, eta, safe_norm
from bang_jax.caffe import load_caffe_weights
from bang_jax.data import Dataset, load_cifar10, load_dataset, load_fashion_mnist, load_mnist
from bang_jax.linen import (
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
from bang_jax.models import CifarQuick, LeNet, set_mean_image
from bang_jax.per_example import PerExampleGrad, mark_per_example
from bang_jax.solvers import CIFAR_QUICK_SOLVER, LENET_SOLVER, SolverConfig, caffe_sgd, inv_schedule, multistep_schedule

__version__ = "0.1.0"

__all__ = [
    "CIFAR_QUICK_SOLVER",
    "LENET_SOLVER",
    "SolverConfig",
    "WEIGHTED_LAYER_TYPES",
    "BangAux",
    "BangConfig",
    "BangState",
    "CifarQuick",
    "Dataset",
    "LeNet",
    "PerExampleGrad",
    "PerExampleGrads",
    "bang",
    "bang_grad",
    "caffe_sgd",
    "default_correct",
    "default_loss",
    "eta",
    "inv_schedule",
    "load_caffe_weights",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "load_mnist",
    "mark_per_example",
    "multistep_schedule",
    "nnx",
    "per_example_grads",
    "plain_grad",
    "safe_norm",
    "sample_dropout_masks",
    "set_mean_image",
    "weighted_layers",
]
