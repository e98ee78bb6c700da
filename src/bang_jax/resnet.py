"""A small pre-activation ResNet for CIFAR-10 in Flax NNX: the "modern network" of the experiments.

He et al. (2016), "Identity Mappings in Deep Residual Networks", CIFAR variant: a 3×3 stem convolution, three
stages of ``n`` pre-activation blocks (BatchNorm → ReLU → 3×3 conv, twice) with ``width``, ``2·width`` and
``4·width`` channels (the second and third stage start with stride 2; a 1×1 convolution on the pre-activated input
matches the shortcut's shape), then BatchNorm → ReLU → global average pooling → a linear classifier. Depth is
``6n + 2``: ResNet-8 (``n = 1``), ResNet-20 (``n = 3``).

Like the paper's models it takes ``[N, 32, 32, 3]`` float32 images in **pixel units 0..255** and normalises them
inside (CIFAR-10's per-channel mean and standard deviation), so attacks and budgets work in pixels. Build it from
``rngs`` (``PreActResNet(depth=8, width=16, rngs=nnx.Rngs(0))``); ``model.train()`` / ``model.eval()`` switch
BatchNorm between batch statistics and running averages. Every convolution and the classifier are weighted
layers BANG balances; BatchNorm scales and offsets get their ordinary gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "PreActBlock", "PreActResNet"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # per-channel mean of the training images, pixels / 255
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class PreActBlock(nnx.Module):
    """BN → ReLU → conv 3×3 (stride) → BN → ReLU → conv 3×3, plus the shortcut (1×1 conv when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.kaiming_normal()
        self.bn1 = nnx.BatchNorm(cin, momentum=0.9, rngs=rngs)
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=(stride, stride), padding=1, use_bias=False,
                              kernel_init=init, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), padding=1, use_bias=False, kernel_init=init, rngs=rngs)
        self.shortcut = (nnx.Conv(cin, cout, (1, 1), strides=(stride, stride), use_bias=False, kernel_init=init,
                                  rngs=rngs) if stride != 1 or cin != cout else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.relu(self.bn1(x))
        skip = self.shortcut(h) if self.shortcut is not None else x
        h = self.conv1(h)
        h = self.conv2(nnx.relu(self.bn2(h)))
        return h + skip


class PreActResNet(nnx.Module):
    """Pre-activation ResNet-(6n+2) for 32×32 RGB images in pixels 0..255; ``depth`` 8, 14, 20, …"""

    def __init__(self, depth: int = 8, width: int = 16, num_classes: int = 10, *, rngs: nnx.Rngs):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n ≥ 1 (8, 14, 20, …), got {depth!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive integer, got {width!r}")
        n = (depth - 2) // 6
        self.stem = nnx.Conv(3, width, (3, 3), padding=1, use_bias=False,
                             kernel_init=nnx.initializers.kaiming_normal(), rngs=rngs)
        blocks, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(PreActBlock(cin, cout, 2 if stage > 0 and i == 0 else 1, rngs=rngs))
                cin = cout
        self.blocks = nnx.List(blocks)
        self.bn = nnx.BatchNorm(cin, momentum=0.9, rngs=rngs)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        if images.ndim != 4 or tuple(images.shape[1:]) != (32, 32, 3):
            raise ValueError(f"PreActResNet expects images of shape [N, 32, 32, 3] (NHWC, pixels 0..255), got "
                             f"{tuple(images.shape)}")
        mean, std = jnp.asarray(CIFAR10_MEAN)[None, None, None], jnp.asarray(CIFAR10_STD)[None, None, None]
        x = (images.astype(jnp.float32) / 255.0 - mean) / std
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = nnx.relu(self.bn(x)).mean(axis=(1, 2))
        return self.head(x)
