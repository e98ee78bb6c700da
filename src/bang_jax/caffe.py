"""Loading the BANG authors' released Caffe weights (HDF5 ``.caffemodel.h5``) into the Flax models.

The files (see ``docs/data.md`` for where the authors publish them) hold ``data/<layer>/0`` (weights) and
``data/<layer>/1``
(bias). Convolution weights are (out, in, kh, kw) → Flax HWIO; inner-product weights (out, in) → (in, out)
with the input flattened in (C, H, W) order, which is how :class:`~bang_jax.models.LeNet` and
:class:`~bang_jax.models.CifarQuick` flatten, so no permutation is needed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from bang_jax.models import build, set_mean_image

__all__ = ["RELEASED_WEIGHTS", "check_caffe_weights", "load_caffe_weights"]

# SHA-256 of the authors' released files and what they are.
RELEASED_WEIGHTS = {
    "lenet.caffemodel.h5": ("90a639d81e70fa18a6e63a3accbe47895c843fa0d80f70aa4696da72e91f844d", "LeNet R0"),
    "lenet_bang.caffemodel.h5": ("dafb21e500eb0932af9df3e06f50064ecd6cec9bf008b30eb0f0271fe4cd3422", "LeNet B1"),
    "cifar10.caffemodel.h5": ("6a7f0ed0c357381093a853a50912c4520b55cf5d15e343cf9b0e812ed6ea658b", "CIFAR-quick R0"),
    "cifar10_bang.caffemodel.h5": (
        "b606d6cbcbdb3fccba4a7c71bc1cbea34721999915ad709202412c63ecdd41db",
        "CIFAR-quick B0",
    ),
}

_LAYERS = {"lenet": ("conv1", "conv2", "ip1", "ip2"), "cifar_quick": ("conv1", "conv2", "conv3", "ip1", "ip2")}


def _read_blobs(path: Path) -> dict[str, list[np.ndarray]]:
    import h5py  # noqa: PLC0415

    try:
        with h5py.File(path, "r") as f:
            if "data" not in f:
                raise ValueError(f"{path} is not a Caffe HDF5 model (no 'data' group)")
            group = f["data"]
            return {name: [np.asarray(group[name][k]) for k in sorted(group[name].keys())] for name in group}
    except (OSError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a readable HDF5 Caffe model (truncated or another format?): {err}") from None


def check_caffe_weights(path: str | os.PathLike, dataset: str | None = None, *, blobs=None) -> str:
    """The model a Caffe weights file holds (``'lenet'`` or ``'cifar_quick'``), checked against ``dataset``.

    Cheap enough to call before loading any data; raises ``ValueError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Caffe weights file {path} does not exist")
    blobs = _read_blobs(path) if blobs is None else blobs
    kind = "cifar_quick" if "conv3" in blobs else "lenet"
    if dataset is not None:
        want = {"mnist": "lenet", "fashion_mnist": "lenet", "cifar10": "cifar_quick"}.get(dataset)
        if want is None:
            raise ValueError(f"unknown dataset {dataset!r} (mnist, fashion_mnist or cifar10)")
        if kind != want:
            raise ValueError(
                f"{path} holds {'CIFAR-quick' if kind == 'cifar_quick' else 'LeNet'} weights, which do "
                f"not fit {dataset} (its model is {'CIFAR-quick' if want == 'cifar_quick' else 'LeNet'})"
            )
    return kind


def load_caffe_weights(path: str | os.PathLike, *, mean_image=None, dataset: str | None = None):
    """Reads a Caffe HDF5 model into ``(model, variables)`` for :class:`LeNet` or :class:`CifarQuick`.

    Args:
      path: the ``.caffemodel.h5`` file. A file named like one of :data:`RELEASED_WEIGHTS` is checked against
        its published SHA-256.
      mean_image: ``[32, 32, 3]`` training-set mean image for CIFAR-quick (``bang_jax.data.mean_image``);
        required for CIFAR models, which subtract it.
      dataset: if given (``'mnist'`` or ``'cifar10'``), the weights must be of that dataset's model.

    Raises:
      ValueError: the file is not a readable HDF5 Caffe model, lacks a layer the model needs, holds non-finite
        numbers, a shape does not match, or the model is not ``dataset``'s (every message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Caffe weights file {path} does not exist")
    if path.name in RELEASED_WEIGHTS:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != RELEASED_WEIGHTS[path.name][0]:
            raise ValueError(f"{path} has SHA-256 {digest}, not that of the authors' {path.name}")
    blobs = _read_blobs(path)
    kind = check_caffe_weights(path, dataset, blobs=blobs)
    bad = [name for name, arrays in blobs.items() if not all(np.all(np.isfinite(a)) for a in arrays)]
    if bad:
        raise ValueError(f"{path} holds NaN or infinite numbers in layer(s) {bad}")
    missing = [name for name in _LAYERS[kind] if len(blobs.get(name, [])) != 2]
    if missing:
        raise ValueError(f"{path} lacks weights and bias for layer(s) {missing} of the {kind} model")
    model, variables = build(kind)
    params = {}
    for name in _LAYERS[kind]:
        w, b = blobs[name]
        kernel = np.transpose(w, (2, 3, 1, 0)) if w.ndim == 4 else w.T
        expected = variables["params"][name]["kernel"].shape
        if kernel.shape != expected or b.shape != variables["params"][name]["bias"].shape:
            raise ValueError(f"{path}: layer {name} has weights {w.shape} / bias {b.shape}; the model needs {expected}")
        params[name] = {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(b, jnp.float32)}
    variables = {**variables, "params": params}
    if kind == "cifar_quick":
        if mean_image is None:
            raise ValueError("CIFAR-quick weights need mean_image= (bang_jax.data.mean_image(train_images))")
        variables = set_mean_image(variables, mean_image)
    return model, variables
