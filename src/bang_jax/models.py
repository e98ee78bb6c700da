"""Caffe-faithful LeNet and CIFAR-10 "quick" models (docs/semantics.md), taking images in pixel units.

Both modules take ``[N, H, W, C]`` float32 images with values in 0..255 and do their own preprocessing, so
attacks and noise work in pixel space:

* :class:`LeNet` scales by 1/256 (Caffe's ``scale: 0.00390625``), no mean subtraction.
* :class:`CifarQuick` subtracts the per-pixel mean image of the 50,000 training images, no scaling. The
  mean image lives in the ``'constants'`` collection (``variables['constants']['mean_image']``, ``[32, 32, 3]``),
  zeros after ``init``; set it with :func:`set_mean_image` (``bang_jax.data.mean_image`` computes it).

Pooling follows Caffe: output sizes round **up** (ceil mode), max pooling pads with −∞, average pooling
divides each window by the number of its in-image elements. Flattening before ``ip1`` is in (C, H, W) order,
as in Caffe, so the authors' weights load without permuting ``ip1``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bang_jax.data import mean_image

__all__ = ["DATASET_SHAPES", "INPUT_SHAPES", "MODELS", "NNX_MODELS", "CifarQuick", "LeNet", "build",
           "caffe_avg_pool", "caffe_max_pool", "eval_apply", "get", "load_model", "set_mean_image"]


def _ceil_pool_padding(size: int, window: int, stride: int) -> tuple[int, int]:
    """(0, extra) padding that makes a VALID pool produce Caffe's ceil-mode output size."""
    out = int(math.ceil((size - window) / stride)) + 1
    return 0, max(0, (out - 1) * stride + window - size)


def _pool_padding(x: jax.Array, window: int, stride: int):
    return [
        (0, 0),
        _ceil_pool_padding(x.shape[1], window, stride),
        _ceil_pool_padding(x.shape[2], window, stride),
        (0, 0),
    ]


def caffe_max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
    """Caffe MAX pooling of ``[N, H, W, C]`` with ceil-mode output size (pad 0). Its derivative (XLA's
    select-and-scatter) goes, in each window, to the first maximal element in scan order, as Caffe's backward does.

    (A derivative written on the window's strided views made CIFAR-quick's input gradients 1.8× faster on the CPU
    but its training step 16% slower, so the library keeps select-and-scatter.)"""
    pad = _pool_padding(x, window, stride)
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1), pad)


def caffe_avg_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
    """Caffe AVE pooling of ``[N, H, W, C]``: ceil-mode size, border windows divided by their in-image size."""
    pad = _pool_padding(x, window, stride)
    dims, strides = (1, window, window, 1), (1, stride, stride, 1)
    total = lax.reduce_window(x, 0.0, lax.add, dims, strides, pad)
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
    count = lax.reduce_window(ones, 0.0, lax.add, dims, strides, pad)
    return total / count


def _flatten_chw(x: jax.Array) -> jax.Array:
    """Flattens ``[N, H, W, C]`` in Caffe's (C, H, W) order."""
    return jnp.reshape(jnp.transpose(x, (0, 3, 1, 2)), (x.shape[0], -1))


def _check_images(name: str, x: jax.Array, hw: tuple[int, int], channels: int) -> None:
    if x.ndim != 4 or tuple(x.shape[1:3]) != hw or x.shape[3] != channels:
        raise ValueError(
            f"{name} expects images of shape [N, {hw[0]}, {hw[1]}, {channels}] (NHWC, pixels 0..255), "
            f"got {tuple(x.shape)}"
        )
    if not isinstance(x, jax.core.Tracer):
        warn_if_unit_range(x, name)


def warn_if_unit_range(images, name: str = "the bundled models") -> None:
    """Warns when a concrete batch looks like 0..1 data: the bundled models take pixel units 0..255.

    (Images scaled to 0..1 drop a trained LeNet from 99.4% to 13.4% without any error.) Traced batches inside
    ``jit`` cannot be looked at; :func:`bang_jax.evaluate.predict` and training check their concrete inputs.
    """
    x = np.asarray(images)
    if x.size and np.issubdtype(x.dtype, np.floating) and 0.0 < float(x.max()) <= 1.0 and float(x.min()) >= 0.0:
        warnings.warn(
            f"{name} take pixel units 0..255, but these images lie in 0..1; multiply them by 255",
            UserWarning,
            stacklevel=3,
        )


_xavier = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")  # Caffe "xavier": U(±sqrt(3/fan_in))


class LeNet(nn.Module):
    """Caffe's MNIST LeNet with the paper's dropout layer (docs/semantics.md).

    conv1 20@5×5 → max 2×2/2 → conv2 50@5×5 → max 2×2/2 → ip1 500 → ReLU → dropout 0.5 → ip2 10.
    Input ``[N, 28, 28, 1]`` pixels 0..255; output ``[N, 10]`` logits. 431,080 parameters.
    """

    # Every weighted layer's parameters reach the loss only through that layer's own call (no tied weights), so
    # the per-example training method may use layer-factored gradients (bang_jax.per_example_grads(factor_layers=)).
    untied_weighted_layers = True

    num_classes: int = 10
    dropout_rate: float = 0.5
    param_dtype: Any = jnp.float32  # float64 (with jax_enable_x64) for reference computations

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        _check_images("LeNet", images, (28, 28), 1)
        x = images.astype(jnp.promote_types(images.dtype, jnp.float32)) * 0.00390625
        pd = {"param_dtype": self.param_dtype}
        x = nn.Conv(20, (5, 5), padding="VALID", kernel_init=_xavier, name="conv1", **pd)(x)
        x = caffe_max_pool(x, 2, 2)
        x = nn.Conv(50, (5, 5), padding="VALID", kernel_init=_xavier, name="conv2", **pd)(x)
        x = caffe_max_pool(x, 2, 2)
        x = _flatten_chw(x)
        x = nn.Dense(500, kernel_init=_xavier, name="ip1", **pd)(x)
        x = nn.relu(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="drop1")(x)
        return nn.Dense(self.num_classes, kernel_init=_xavier, name="ip2", **pd)(x)


class CifarQuick(nn.Module):
    """Caffe's CIFAR-10 "quick" model with the paper's dropout layer (docs/semantics.md).

    conv1 32@5×5 p2 → max 3×3/2 → ReLU → conv2 32@5×5 p2 → ReLU → ave 3×3/2 → conv3 64@5×5 p2 → ReLU →
    ave 3×3/2 → ip1 64 → dropout 0.5 → ip2 10. Spatial sizes 32 → 16 → 8 → 4 (ceil mode), ip1 input 1024.
    Input ``[N, 32, 32, 3]`` RGB pixels 0..255; the training-set mean image is subtracted inside.
    """

    # Every weighted layer's parameters reach the loss only through that layer's own call (no tied weights), so
    # the per-example training method may use layer-factored gradients (bang_jax.per_example_grads(factor_layers=)).
    untied_weighted_layers = True

    num_classes: int = 10
    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        _check_images("CifarQuick", images, (32, 32), 3)
        mean = self.variable("constants", "mean_image", lambda: jnp.zeros((32, 32, 3), jnp.float32))
        x = images.astype(jnp.promote_types(images.dtype, jnp.float32)) - mean.value[None]
        gauss = nn.initializers.normal
        x = nn.Conv(32, (5, 5), padding=2, kernel_init=gauss(1e-4), name="conv1")(x)
        x = caffe_max_pool(x, 3, 2)
        x = nn.relu(x)
        x = nn.Conv(32, (5, 5), padding=2, kernel_init=gauss(0.01), name="conv2")(x)
        x = nn.relu(x)
        x = caffe_avg_pool(x, 3, 2)
        x = nn.Conv(64, (5, 5), padding=2, kernel_init=gauss(0.01), name="conv3")(x)
        x = nn.relu(x)
        x = caffe_avg_pool(x, 3, 2)
        x = _flatten_chw(x)
        x = nn.Dense(64, kernel_init=gauss(0.1), name="ip1")(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="drop1")(x)
        return nn.Dense(self.num_classes, kernel_init=gauss(0.1), name="ip2")(x)


def set_mean_image(variables: dict, mean_image) -> dict:
    """Returns ``variables`` with ``constants/mean_image`` replaced (for :class:`CifarQuick`)."""
    if "constants" not in variables or "mean_image" not in variables["constants"]:
        raise ValueError("these variables have no constants/mean_image entry (is this a CifarQuick model?)")
    old = variables["constants"]["mean_image"]
    mean_image = jnp.asarray(mean_image, jnp.float32)
    if mean_image.shape != old.shape:
        raise ValueError(f"mean_image must have shape {old.shape}, got {mean_image.shape}")
    return {**variables, "constants": {**variables["constants"], "mean_image": mean_image}}


# The bundled models by the names the experiments' configs use, and the image shape each takes.
MODELS = {"lenet": LeNet, "cifar_quick": CifarQuick}
# Modern networks in NNX (bang_jax.resnet): name -> keyword arguments of PreActResNet.
NNX_MODELS = {"preact_resnet8": {"depth": 8, "width": 16}, "preact_resnet20": {"depth": 20, "width": 16}}
INPUT_SHAPES = {"lenet": (28, 28, 1), "cifar_quick": (32, 32, 3), "preact_resnet8": (32, 32, 3),
                "preact_resnet20": (32, 32, 3)}
DATASET_SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


@functools.cache
def get(name: str):
    """The model a run names, one object per name: a bundled linen model (:data:`MODELS`), a bundled NNX network
    (:data:`NNX_MODELS`, as a :class:`bang_jax.nnx.Functional`) or your own (:func:`load_model`)."""
    if name in MODELS:
        return MODELS[name]()
    if name in NNX_MODELS:
        from bang_jax.nnx import Functional  # noqa: PLC0415
        from bang_jax.resnet import PreActResNet  # noqa: PLC0415

        return Functional(functools.partial(PreActResNet, **NNX_MODELS[name]))
    return load_model(name)


@functools.cache
def load_model(target: str):
    """Your own model, named ``'package.module:function'`` (``--model`` of the experiments).

    The function (or class) is imported and:

    * if it takes ``rngs=``, it is an NNX factory: each trained model is built by ``function(rngs=nnx.Rngs(key))``
      from its own seed (returned as a :class:`bang_jax.nnx.Functional`);
    * otherwise it is called without arguments and must return a ``flax.linen.Module`` (initialised per seed by
      ``init``) or an ``nnx.Module`` (every trained model then starts from its weights).

    The model takes ``[N, H, W, C]`` float32 images in pixel units 0..255 (do your own scaling inside) and
    returns ``[N, classes]`` logits; a linen module's ``__call__`` takes ``train=`` (dropout, BatchNorm). The same
    object is returned for the same name (compiled steps are cached per model).
    """
    from flax import nnx  # noqa: PLC0415

    from bang_jax.nnx import Functional  # noqa: PLC0415

    module_name, _, attr = str(target).partition(":")
    if not module_name or not attr or not all(p.isidentifier() for p in module_name.split(".") + attr.split(".")):
        raise ValueError(f"unknown model {target!r}: name a bundled model ({', '.join([*MODELS, *NNX_MODELS])}) "
                         "or your own as package.module:function")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model {target!r}: cannot import {module_name} ({err}); run from the folder that holds "
                         "it or install it") from None
    except Exception as err:  # noqa: BLE001 - the user's module may raise anything while it is imported
        raise ValueError(f"model {target!r}: importing {module_name} failed: {type(err).__name__}: {err}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model {target!r}: {module_name} has no attribute {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model {target!r}: {attr} is not callable")
    try:
        takes_rngs = "rngs" in inspect.signature(obj).parameters
    except (TypeError, ValueError):
        takes_rngs = False
    if takes_rngs:
        return Functional(obj)
    try:
        built = obj()
    except Exception as err:  # noqa: BLE001 - the user's code
        raise ValueError(f"model {target!r}: {attr}() failed: {type(err).__name__}: {err}") from None
    if isinstance(built, nn.Module):
        params = inspect.signature(type(built).__call__).parameters
        if "train" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise ValueError(f"model {target!r}: {type(built).__name__}.__call__ must take train= (True in training: "
                             "dropout on, BatchNorm on batch statistics; False in evaluation)")
        return built
    if isinstance(built, nnx.Module):
        return Functional(built)
    raise ValueError(f"model {target!r}: {attr}() returned {type(built).__name__}, not a flax.linen Module or an "
                     "nnx.Module")


def eval_apply(model):
    """``f(variables, images) -> outputs`` in evaluation mode: ``model.apply(variables, images, train=False)``
    when the model takes ``train`` (dropout off, BatchNorm on its running statistics), else
    ``model.apply(variables, images)`` — the one way the evaluation, the noise study and the figures call a model."""
    if isinstance(model, nn.Module):
        params = inspect.signature(type(model).__call__).parameters
        takes = "train" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    else:
        params = inspect.signature(model.apply).parameters
        takes = "train" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    if takes:
        return lambda variables, images: model.apply(variables, images, train=False)
    return lambda variables, images: model.apply(variables, images)


def build(name: str, train_images=None, *, abstract: bool = False, input_shape=None) -> tuple[Any, dict]:
    """``(module, variables)`` of a run's model: the one place models are built.

    Args:
      name: ``'lenet'`` or ``'cifar_quick'`` (:data:`MODELS`), ``'preact_resnet8'`` / ``'preact_resnet20'``
        (:data:`NNX_MODELS`), or your own model as ``'package.module:function'`` (:func:`load_model`); an NNX model
        comes back as a :class:`bang_jax.nnx.Functional`.
      train_images: the training images (pixels); :class:`CifarQuick` then holds their mean image, which it
        subtracts. Without them its mean image is zero (enough for shapes, not for predictions).
      abstract: shapes and dtypes only (``jax.ShapeDtypeStruct`` leaves).
      input_shape: one image's shape ``(H, W, C)`` for your own linen model (default: the training images').

    The parameters are the model's initialisation with key 0; training draws its own per model.
    """
    module = get(name)
    shape = INPUT_SHAPES.get(name, input_shape)
    if shape is None and train_images is not None:
        shape = tuple(np.shape(train_images)[1:])
    if shape is None and isinstance(module, nn.Module):
        raise ValueError(f"model {name!r}: the input shape is needed to initialise it (input_shape=)")
    sample = jnp.zeros((1,) + tuple(shape), jnp.float32) if shape is not None else None

    def init():
        return module.init(jax.random.PRNGKey(0), sample, train=False)

    if abstract:
        if isinstance(module, nn.Module):
            return module, jax.eval_shape(init)
        return module, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), init())
    variables = init()
    if name == "cifar_quick" and train_images is not None:
        variables = set_mean_image(variables, mean_image(train_images))
    return module, variables
