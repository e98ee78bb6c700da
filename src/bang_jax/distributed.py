"""Devices, meshes and processes for training: data-parallel and multi-host BANG on JAX's own distribution.

A run lays its devices out as a 2-D mesh ``(models, data)``: the models of a run (stacked on a leading axis and
``vmap``-ed in the step) are split over the ``models`` axis, and every model's batch over the ``data`` axis. BANG
couples the examples of a batch — η uses the maximum κ norm of the *global* batch — and the step is one jitted
program over the global batch, so XLA inserts the cross-device reductions (the maximum and the sums) itself and the
result is that of single-device training up to the order of floating-point additions.

Several processes (hosts) join with :func:`initialize` (``jax.distributed.initialize``; on CPU with gloo
collectives). Every process runs the same command, holds the same data and feeds its devices' share of every global
batch; only process 0 writes files (:func:`is_writer`).
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["initialize", "is_writer", "make_mesh", "put_batch", "put_models", "put_replicated"]


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins a multi-process run (all three arguments, or JAX's environment variables, or nothing: one process).

    Must be called before any other JAX call. On CPU, collectives between processes go through gloo.
    """
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("a multi-process run needs --coordinator HOST:PORT, --num-processes N and --process-id I "
                         "together")
    if all(given):
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id must be in [0, {num_processes}) and --num-processes positive, got "
                             f"{process_id} of {num_processes}")
        if ":" not in coordinator:
            raise ValueError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    elif not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only used by the CPU backend
    jax.distributed.initialize(coordinator, num_processes, process_id)


def is_writer() -> bool:
    """Whether this process writes the run directory (process 0)."""
    return jax.process_index() == 0


def make_mesh(num_models: int, batch_size: int, *, shard_models: bool, devices=None) -> Mesh | None:
    """The ``(models, data)`` mesh of a run, or ``None`` on a single device.

    The models axis takes the largest divisor of the device count that divides ``num_models`` (only when
    ``shard_models``, i.e. the models are vmapped, and only within one process); the data axis takes the largest
    divisor of the remaining devices that divides ``batch_size``. Devices that fit neither are left idle (a
    message says so).
    """
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) == 1:
        return None
    n = len(devices)
    models = math.gcd(num_models, n) if shard_models and jax.process_count() == 1 else 1
    data = math.gcd(batch_size, n // models)
    if models * data < n:
        print(f"note: using {models * data} of {n} devices ({models} for the models × {data} for the batch of "
              f"{batch_size}); the batch size must divide over the data axis", flush=True)
    return Mesh(np.asarray(devices[: models * data]).reshape(models, data), ("models", "data"))


def _put(x, mesh: Mesh, spec: PartitionSpec):
    x = np.asarray(x)
    sharding = NamedSharding(mesh, spec)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put_replicated(tree, mesh: Mesh | None):
    """Every leaf on every device of the mesh (e.g. the training set, the model's constants)."""
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, tree)
    return jax.tree.map(lambda x: _put(x, mesh, PartitionSpec()), tree)


def put_models(tree, mesh: Mesh | None):
    """Leaves with a leading model axis, split over the mesh's ``models`` axis (replicated over ``data``)."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda x: _put(jax.device_get(x), mesh, PartitionSpec("models")), tree)


def put_batch(idx: np.ndarray, mesh: Mesh | None):
    """Batch indices ``[..., B]`` split over the ``data`` axis along their last axis."""
    if mesh is None:
        return idx
    spec = PartitionSpec(*([None] * (np.ndim(idx) - 1)), "data")
    return _put(idx, mesh, spec)
