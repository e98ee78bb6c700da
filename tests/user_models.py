"""Small user models, linen and NNX, named by import path in the tests (``user_models:make_nnx``).

They take ``[N, 28, 28, 1]`` or ``[N, 32, 32, 3]`` images in pixel units 0..255 and return 10 logits, as the
experiments' ``--model`` expects; both carry BatchNorm and dropout, like the networks people write today.
"""

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx


class LinenNet(nn.Module):
    """conv → BatchNorm → ReLU → dropout → dense (linen; ``train=`` switches BatchNorm and dropout)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), strides=(2, 2), name="conv")(x / 255.0)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        x = nn.Dropout(0.2, deterministic=not train)(x)
        return nn.Dense(10, name="head")(x)


def make_linen():
    return LinenNet()


class NNXNet(nnx.Module):
    """The same network in NNX, built from ``rngs`` (each seed its own initial weights)."""

    def __init__(self, channels: int = 1, size: int = 28, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(channels, 8, (3, 3), strides=(2, 2), rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.head = nnx.Linear(8 * (size // 2) ** 2, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x / 255.0)))
        x = x.reshape(x.shape[0], -1)
        return self.head(self.drop(x))


def make_nnx(rngs: nnx.Rngs):
    return NNXNet(1, rngs=rngs)


def make_nnx_cifar(rngs: nnx.Rngs):
    return NNXNet(3, rngs=rngs)


class ThreeClasses(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def wrong_output():
    return ThreeClasses()


def no_train_argument():
    return nn.Dense(10)


def not_a_model():
    return jnp.zeros(3)
