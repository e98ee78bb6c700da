"""Training with Caffe's solver semantics, regular or BANG, several models in one jitted program.

A run trains a list of :class:`ModelSpec` (identity: name and seed; hyperparameters: a
:class:`bang_jax.BangConfig`, ``BangConfig()`` being regular training) under one :class:`TrainConfig`. Every model
goes through the same jitted step (the models unrolled or ``vmap``-ed inside it), dispatched once per iteration;
each model's BANG hyperparameters travel inside its :class:`TrainState`, so they are vmapped, sharded and
checkpointed with its weights. All models see the same batches (Caffe's sequential order by default) and draw their
own dropout masks.

The gradient methods:

* ``'single_pass'`` (default): :func:`bang_jax.bang_grad`, the authors' way, then the solver.
* ``'per_example'``: :func:`bang_jax.per_example_grads` fed to ``optax.chain(bang(config), solver)`` — exactly the
  chain the README teaches.
* ``'plain'``: :func:`bang_jax.plain_grad`, for regular models only (asking for it with BANG hyperparameters is
  an error).

Periodic work — logging, checkpoints, snapshots, stopping early — is done by callbacks (:class:`LogMetrics`,
:class:`Checkpoint`, :class:`Snapshots`, :class:`StopAfter`), in the spirit of CLU's periodic actions. Runs are
reproducible and resumable: initial weights come from ``seed``, dropout keys from ``fold_in(seed, it)`` and the
batch at iteration ``it`` from ``(order, data_seed, it)`` alone, so a run resumed from a checkpoint ends with the
same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bang_jax import checkpoint as ckpt_lib, data as data_lib, distributed
from bang_jax.balance import BangConfig, bang
from bang_jax.data import batch_indices
from bang_jax.gradients import bang_grad, per_example_grads, plain_grad
from bang_jax.solvers import SolverConfig

__all__ = [
    "GRADIENT_METHODS",
    "MUTABLE_COLLECTIONS",
    "Callback",
    "Checkpoint",
    "LogMetrics",
    "ModelSpec",
    "Snapshots",
    "StopAfter",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "TrainingDiverged",
    "check_models",
    "as_trainable",
    "init_states",
    "make_train_step",
    "snapshot_tree",
    "snapshot_variables",
    "train",
]

GRADIENT_METHODS = ("single_pass", "per_example", "plain")
MODEL_BATCHINGS = ("loop", "vmap")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One model of a run: its identity (``name``, ``seed`` of initial weights and dropout) and its BANG config."""

    name: str
    seed: int = 0
    bang: BangConfig = dataclasses.field(default_factory=BangConfig)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or any(c in self.name for c in ",:/\\ "):
            raise ValueError(f"model name must be a non-empty string without , : / \\ or spaces, got {self.name!r}")
        if not isinstance(self.bang, BangConfig):
            raise TypeError(f"model {self.name}: bang must be a bang_jax.BangConfig, got {type(self.bang).__name__}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"model {self.name}: seed must be a non-negative integer, got {self.seed!r}")

    @property
    def is_bang(self) -> bool:
        return not self.bang.is_regular

    def to_json(self) -> dict:
        return {"name": self.name, "seed": int(self.seed), **self.bang.to_json()}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How the models of a run are trained (Caffe's ``max_iter`` is ``steps``)."""

    solver: SolverConfig | None  # None: train() is given its own optax optimizer
    steps: int
    batch_size: int
    order: str = "sequential"
    data_seed: int = 0
    method: str = "single_pass"
    model_batching: str = "loop"
    augment: str = "none"  # "crop" / "crop_flip": random crops (+ flips) of every batch (data.augment_batch)
    augment_pad: int = 4

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.order not in ("sequential", "shuffled"):
            raise ValueError(f"order must be 'sequential' or 'shuffled', got {self.order!r}")
        if self.augment not in data_lib.AUGMENTATIONS:
            raise ValueError(f"augment must be one of {data_lib.AUGMENTATIONS}, got {self.augment!r}")
        if isinstance(self.augment_pad, bool) or not isinstance(self.augment_pad, (int, np.integer)) or \
                self.augment_pad < 0:
            raise ValueError(f"augment_pad must be a non-negative integer, got {self.augment_pad!r}")
        if self.method not in GRADIENT_METHODS:
            raise ValueError(f"method must be one of {GRADIENT_METHODS}, got {self.method!r}")
        if self.model_batching not in MODEL_BATCHINGS:
            raise ValueError(f"model_batching must be one of {MODEL_BATCHINGS}, got {self.model_batching!r}")
        if self.method == "per_example" and self.model_batching == "vmap":
            # vmap over models of vmap over examples hits JAX's missing batching rule for the weight gradient of
            # a batch-grouped convolution (NotImplementedError in conv_general_dilated, jax 0.10.2).
            raise ValueError("method 'per_example' cannot run with model_batching 'vmap' (JAX cannot batch the "
                             "per-example convolution weight gradients over models); use model_batching 'loop'")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class TrainingDiverged(RuntimeError):
    """A model's training loss became NaN or infinite; the run stopped before checkpointing it."""


def check_models(config: TrainConfig, models) -> None:
    """The rules tying a run's models to its train config (``ValueError``): unique names; BANG hyperparameters
    need a BANG gradient method. :func:`train` applies them; the experiments call this before any work."""
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    if config.method == "plain" and any(m.is_bang for m in models):
        bad = [m.name for m in models if m.is_bang]
        raise ValueError(f"method 'plain' ignores BANG hyperparameters, but {', '.join(bad)} have them; use "
                         "'single_pass' or 'per_example'")


class TrainState(NamedTuple):
    """Per-model training state (a leading model axis when several models train together)."""

    step: jax.Array
    params: Any
    opt_state: Any
    key: jax.Array  # raw uint32 PRNG key data: the model's dropout stream
    bang: BangConfig  # the model's BANG hyperparameters, one float32 scalar per parameter leaf
    model_state: Any = None  # what training updates besides the weights (BatchNorm statistics), {} if nothing


# ------------------------------------------------------------------------------------------------------------
# The jitted step.


class _GradNormState(NamedTuple):
    norm: jax.Array


def _record_grad_norm() -> optax.GradientTransformation:
    """A pass-through link of a chain that keeps the global norm of what flows through it in its state."""
    return optax.GradientTransformation(
        lambda params: _GradNormState(jnp.zeros((), jnp.float32)),
        lambda updates, state, params=None: (updates, _GradNormState(optax.tree.norm(updates).astype(jnp.float32))),
    )


def _optimizer(config: TrainConfig, bang_config: BangConfig | None,
               optimizer: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """The optimiser chain of a step: ``chain(bang(config), solver)`` for the per-example method, else the solver
    (``optimizer`` when given, else ``config.solver``'s Caffe SGD)."""
    solver = optimizer if optimizer is not None else config.solver.optimizer()
    if config.method != "per_example":
        return solver
    return optax.chain(bang(config=bang_config if bang_config is not None else BangConfig()), _record_grad_norm(),
                       solver)


MUTABLE_COLLECTIONS = ("batch_stats", "state")  # updated by training (linen BatchNorm; an NNX model's state)


def as_trainable(model):
    """``model`` as :func:`train` runs it: a linen module as it is; an ``nnx.Module``, a function building one
    from ``rngs=`` or a :class:`bang_jax.nnx.Functional` as a :class:`bang_jax.nnx.Functional`."""
    from bang_jax import nnx as bnnx  # noqa: PLC0415 - flax.nnx is only loaded for NNX models

    if isinstance(model, nn.Module) or isinstance(model, bnnx.Functional):
        return model
    from flax import nnx  # noqa: PLC0415

    if isinstance(model, nnx.Module) or (callable(model) and (not isinstance(model, type)
                                                               or issubclass(model, nnx.Module))):
        try:
            return _functional(model)  # one object per model: train() calls reuse its compiled step
        except TypeError:  # unhashable
            return bnnx.Functional(model)
    raise TypeError(f"model must be a flax.linen Module, an nnx.Module or a function returning one from rngs=, got "
                    f"{type(model).__name__}")


@functools.lru_cache(maxsize=32)
def _functional(model):
    from bang_jax import nnx as bnnx  # noqa: PLC0415

    return bnnx.Functional(model)


def _is_nnx(model) -> bool:
    return type(model).__name__ == "Functional" and type(model).__module__ == "bang_jax.nnx"


def init_states(model, sample_images, models: Sequence[ModelSpec], config: TrainConfig,
                optimizer: optax.GradientTransformation | None = None):
    """Initial states of all models stacked on a leading axis, and the shared non-param variables.

    Each model's variables come from ``model.init`` with its seed; the collections training updates
    (:data:`MUTABLE_COLLECTIONS`: linen's ``batch_stats``, an NNX model's ``state``) go into its state, the others
    (constants such as CifarQuick's mean image) are shared.
    """
    model = as_trainable(model)
    tx = _optimizer(config, None, optimizer)
    states, consts = [], None
    for spec in models:
        variables = model.init(jax.random.PRNGKey(spec.seed), jnp.asarray(sample_images[:1], jnp.float32),
                               train=False)
        if "params" not in variables or not jax.tree.leaves(variables["params"]):
            raise ValueError(f"{model!r} has no parameters to train")
        params = variables["params"]
        consts = {k: v for k, v in variables.items() if k != "params" and k not in MUTABLE_COLLECTIONS}
        states.append(TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            key=jax.random.fold_in(jax.random.PRNGKey(spec.seed), 1),
            bang=spec.bang.broadcast(params),
            model_state={k: v for k, v in variables.items() if k in MUTABLE_COLLECTIONS},
        ))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states), consts


@functools.lru_cache(maxsize=32)
def make_train_step(model, config: TrainConfig, steps_per_dispatch: int = 1,
                    mesh: jax.sharding.Mesh | None = None, *, optimizer: optax.GradientTransformation | None = None,
                    loss_fn: Callable | None = None, correct_fn: Callable | None = None) -> Callable:
    """The jitted ``step(states, consts, images, labels, idx) -> (states, metrics)`` for all models.

    Built once per (model, config, steps_per_dispatch, mesh) and cached. ``images`` and ``labels`` are the whole
    training set on the device (uint8), ``idx`` the ``[K, B]`` example indices of the K =
    ``steps_per_dispatch`` iterations run by this call (a ``lax.scan`` when K > 1); ``states`` is donated.
    ``metrics`` holds ``[K, M]`` arrays: loss, accuracy, lr, grad_norm (of the balanced gradient), update_norm and
    kappa_zero_share (share of per-example κ norms that are exactly zero, over all weighted layers). With a
    ``mesh`` (:func:`bang_jax.distributed.make_mesh`) every batch is split over its ``data`` axis and the metrics
    come back replicated.

    ``optimizer`` replaces ``config.solver``'s Caffe SGD (the ``lr`` metric is then NaN); ``loss_fn`` /
    ``correct_fn`` as in :func:`bang_jax.bang_grad`. A model's mutable collections (BatchNorm statistics) are
    updated by every step and carried in its state.

    ``config.model_batching``: ``'loop'`` unrolls the models inside the one program (fastest on CPU for a few
    models), ``'vmap'`` vectorises over them (for large grids, and on accelerators).

    Why not ``lax.scan`` over iterations: on the XLA CPU backend (jax 0.10.2) a LeNet step inside ``scan`` ran
    several times slower than one dispatched from Python, so the loop over iterations stays in Python with async
    dispatch.
    """
    schedule = config.solver.schedule() if optimizer is None and config.solver is not None else None
    method = config.method
    nnx_model = _is_nnx(model)
    losses = {"loss_fn": loss_fn, "correct_fn": correct_fn}

    def one_step(state: TrainState, consts, images, labels):
        key = jax.random.fold_in(state.key, state.step)
        variables = {**consts, **state.model_state, "params": state.params}
        mutable = {"mutable": list(state.model_state)} if state.model_state else {}
        rngs = {"dropout": key}
        tx = _optimizer(config, state.bang, optimizer)
        model_state = state.model_state
        if method == "per_example":
            pe = per_example_grads(model.apply, variables, images, labels, rngs=rngs, train=True, **losses,
                                   factor_layers=getattr(model, "untied_weighted_layers", False))
            updates, opt_state = tx.update(pe.grads, state.opt_state, state.params, kappa_norms=pe.kappa_norms,
                                           correct=pe.correct)
            loss, correct = pe.loss, pe.correct
            grad_norm = opt_state[1].norm
            zero_share = jnp.mean(jnp.concatenate(jax.tree.leaves(pe.kappa_norms)) == 0)
        else:
            if method == "plain":
                grads, aux = plain_grad(model.apply, variables, images, labels, rngs=rngs, return_aux=True,
                                        train=True, **losses, **mutable)
                zero_share = jnp.float32(jnp.nan)
            elif nnx_model:  # BANG on the rebuilt NNX module (its batch statistics are updated in it)
                from flax import nnx  # noqa: PLC0415

                from bang_jax import nnx as bnnx  # noqa: PLC0415

                net = model.prepare(variables, train=True, rngs=rngs)
                grads, aux = bnnx.bang_grad(net, images, labels, config=state.bang, return_aux=True, **losses,
                                            **model.call_kwargs(True))
                grads = nnx.to_pure_dict(grads)
                aux = aux._replace(model_state=model.state_of(net))
                zero_share = jnp.mean(jnp.concatenate(list(aux.layer_kappa_norms.values())) == 0)
            else:
                grads, aux = bang_grad(model.apply, variables, images, labels, config=state.bang, rngs=rngs,
                                       return_aux=True, train=True, **losses, **mutable)
                zero_share = jnp.mean(jnp.concatenate(list(aux.layer_kappa_norms.values())) == 0)
            if state.model_state:
                model_state = {k: aux.model_state[k] for k in state.model_state}
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            loss, correct, grad_norm = aux.loss, aux.correct, optax.tree.norm(grads)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(correct.astype(jnp.float32)),
            "lr": jnp.asarray(schedule(state.step) if schedule is not None else jnp.nan, jnp.float32),
            "grad_norm": grad_norm,
            "update_norm": optax.tree.norm(updates),
            "kappa_zero_share": zero_share,
        }
        new = state._replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state, model_state=model_state)
        return new, metrics

    if config.model_batching == "vmap":
        many_steps = jax.vmap(one_step, in_axes=(0, None, None, None))
    else:

        def many_steps(states, consts, images, labels):
            outs = []
            for m in range(states.step.shape[0]):
                pick = lambda t, m=m: jax.tree.map(lambda x: x[m], t)  # noqa: E731
                outs.append(one_step(pick(states), consts, images, labels))
            return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    def constrain(x, *spec):
        if mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))

    # The per-example method's vmap(grad) turns each convolution's weight gradient into a batch-grouped
    # convolution, which XLA's SPMD partitioner splits over the batch *wrongly* (per-example conv kernel gradients
    # off by ~0.3, no error; jax 0.10.2, CPU). Its batch therefore stays whole on every device: exact, not faster.
    batch_spec = (None,) if method == "per_example" else ("data",)

    augment_key = jax.random.PRNGKey(config.data_seed)

    def step(states, consts, images, labels, idx):
        def body(states, idx_b):
            batch = jnp.take(images, idx_b, axis=0).astype(jnp.float32)
            if config.augment != "none":  # one draw per iteration, shared by all models, from (data seed, iteration)
                key = jax.random.fold_in(augment_key, states.step.reshape(-1)[0])
                batch = data_lib.augment_batch(batch, key, kind=config.augment, pad=int(config.augment_pad))
            batch = constrain(batch, *batch_spec)
            labels_b = constrain(jnp.take(labels, idx_b, axis=0), *batch_spec)
            return many_steps(states, consts, batch, labels_b)

        if steps_per_dispatch > 1:
            states, metrics = jax.lax.scan(body, states, idx)
        else:
            states, metrics = body(states, idx[0])
            metrics = jax.tree.map(lambda x: x[None], metrics)
        return states, constrain(metrics)

    return jax.jit(step, donate_argnums=(0,))


# ------------------------------------------------------------------------------------------------------------
# Callbacks: the periodic work of a run.


@dataclasses.dataclass
class LoopContext:
    """What a callback sees: the run, the current iteration and states, and the metrics window since the last log."""

    workdir: Path | None
    models: Sequence[ModelSpec]
    config: TrainConfig
    iteration: int
    start: int
    states: Any
    window: list = dataclasses.field(default_factory=list)
    last_metrics: dict = dataclasses.field(default_factory=dict)
    stop: bool = False
    bar: Any = None
    writer: bool = True  # this process writes files (process 0 of a multi-process run)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    @property
    def at_end(self) -> bool:
        return self.iteration == self.config.steps


class Callback:
    """Periodic work: runs at every multiple of ``every`` (and where :meth:`due` says), in ``order``.

    Subclasses implement ``__call__(ctx)`` and may implement ``on_start(ctx)`` (before the first step; resume
    logic lives there) and ``on_end(ctx)``. At one iteration callbacks run by increasing ``order``: logs and
    snapshots before the checkpoint, so that whatever a checkpoint covers is already on disk.
    """

    every: int | None = None
    order: int = 0
    needs_workdir: bool = False

    def due(self, iteration: int, ctx: LoopContext) -> bool:
        return bool(self.every) and iteration % self.every == 0

    def next_due(self, iteration: int, ctx: LoopContext) -> int | None:
        """The first iteration after ``iteration`` at which this callback is due (None: never)."""
        if not self.every:
            return None
        return (iteration // self.every + 1) * self.every

    def on_start(self, ctx: LoopContext) -> None:
        pass

    def __call__(self, ctx: LoopContext) -> None:
        pass

    def on_end(self, ctx: LoopContext) -> None:
        pass


def _check_every(name: str, every) -> int:
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"{name}: every must be a positive integer, got {every!r}")
    return int(every)


class LogMetrics(Callback):
    """Averages the step metrics over each window of ``every`` iterations (and the last, shorter one).

    Writes ``metrics.jsonl`` in the work directory (one line per model: iteration, window_start, model and the
    means) and shows them on the progress bar. On resume, lines past the checkpoint's iteration are dropped, so
    the file never holds a line twice.
    """

    order = 0

    def __init__(self, every: int = 100, *, filename: str = "metrics.jsonl"):
        self.every = _check_every("LogMetrics", every)
        self.filename = filename
        self._window_start = 0

    def due(self, iteration, ctx):
        return iteration % self.every == 0 or ctx.at_end

    def next_due(self, iteration, ctx):
        return min((iteration // self.every + 1) * self.every, ctx.config.steps)

    def on_start(self, ctx):
        self._window_start = ctx.start
        if ctx.workdir is None or not ctx.writer:
            return
        path = ctx.workdir / self.filename
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["iteration"] <= ctx.start:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a kill
        ckpt_lib.atomic_write(path, "".join(s + "\n" for s in keep).encode())

    def __call__(self, ctx):
        if not ctx.window:
            return
        window = jax.device_get(ctx.window)
        ctx.window.clear()
        merged = {key: np.concatenate([w[key] for w in window]) for key in window[0]}  # [iterations, M]
        ctx.last_metrics = {
            name: {key: _window_mean(v[:, m]) if key != "lr" else float(v[-1, m]) for key, v in merged.items()}
            for m, name in enumerate(ctx.names)
        }
        if ctx.bar is not None:
            ctx.bar.set_postfix({n: f"loss {v['loss']:.3f} acc {v['accuracy']:.3f}"
                                 for n, v in ctx.last_metrics.items()})
        if ctx.workdir is not None and ctx.writer:
            path = ctx.workdir / self.filename
            if path.is_symlink():
                raise ckpt_lib.CheckpointError(f"{path} is a symbolic link; refusing to write through it")
            with open(path, "a") as f:
                for name, vals in ctx.last_metrics.items():
                    f.write(json.dumps({"iteration": ctx.iteration, "window_start": self._window_start,
                                        "model": name, **_finite(vals)}) + "\n")
        losses = merged["loss"]
        bad = ~np.isfinite(losses)
        if bad.any():
            step, m = (int(i) for i in np.argwhere(bad)[0])
            info = ckpt_lib.checkpoint_info(ctx.workdir) if ctx.workdir is not None else None
            kept = (f"the last checkpoint (iteration {info.get('iteration')}) is kept" if info else "no checkpoint "
                    "was written")
            raise TrainingDiverged(
                f"model {ctx.names[m]} diverged: its training loss is {losses[step, m]} at iteration "
                f"{self._window_start + step + 1}; training stopped and {kept}. Lower the learning rate "
                "(--train.solver.base-lr) or BANG's β and train again"
            )
        self._window_start = ctx.iteration


class Snapshots(Callback):
    """Saves every model's params to ``snapshots/iter_NNNNNN.msgpack`` every ``every`` iterations or ``at`` them.

    Runs before the checkpoint of the same iteration; on resume, snapshots past the checkpoint are removed (they
    are written again, identically, as training passes them).
    """

    order = 10
    needs_workdir = True

    def __init__(self, every: int | None = None, *, at: Sequence[int] = (), include_start: bool = False):
        self.every = None if every is None else _check_every("Snapshots", every)
        self.at = frozenset(int(a) for a in at)
        if any(a < 0 for a in self.at):
            raise ValueError(f"Snapshots: iterations must be non-negative, got {sorted(self.at)}")
        if self.every is None and not self.at and not include_start:
            raise ValueError("Snapshots needs every= or at=")
        self.include_start = include_start

    def due(self, iteration, ctx):
        return (bool(self.every) and iteration % self.every == 0) or iteration in self.at

    def next_due(self, iteration, ctx):
        later = [a for a in self.at if a > iteration]
        if self.every:
            later.append((iteration // self.every + 1) * self.every)
        return min(later) if later else None

    def on_start(self, ctx):
        if not ctx.writer:
            return
        for it in ckpt_lib.list_snapshots(ctx.workdir):
            if it > ctx.start:
                ckpt_lib.snapshot_path(ctx.workdir, it).unlink()
        if ctx.start == 0 and (self.include_start or 0 in self.at):
            ckpt_lib.save_snapshot(ctx.workdir, 0, snapshot_tree(ctx.states))

    def __call__(self, ctx):
        if ctx.writer:
            ckpt_lib.save_snapshot(ctx.workdir, ctx.iteration, snapshot_tree(ctx.states))


def snapshot_tree(states: TrainState):
    """What a snapshot holds for all models (stacked): their params, and for models that carry state (BatchNorm
    statistics) ``{'params': ..., collection: ...}``. :func:`snapshot_variables` reads one model back."""
    return {"params": states.params, **states.model_state} if states.model_state else states.params


def snapshot_variables(tree, m: int, consts: dict, template: TrainState) -> dict:
    """Model ``m``'s variables from a :func:`snapshot_tree` (``template``: the run's states, for its layout)."""
    picked = jax.tree.map(lambda x: x[m], tree)
    return {**consts, **picked} if template.model_state else {**consts, "params": picked}


class Checkpoint(Callback):
    """Saves all models' states every ``every`` iterations, at the end and when stopped early; resumes from them.

    With ``resume=True`` a run continues from the work directory's checkpoint (if there is one) after checking
    that it was made by the same models and train config (``steps`` may differ); otherwise an existing
    checkpoint is an error unless ``overwrite=True``.
    """

    order = 100
    needs_workdir = True

    def __init__(self, every: int = 1000, *, resume: bool = False, overwrite: bool = False):
        self.every = _check_every("Checkpoint", every)
        self.resume = resume
        self.overwrite = overwrite

    def due(self, iteration, ctx):
        return iteration % self.every == 0 or ctx.at_end or ctx.stop

    def on_start(self, ctx):
        if ctx.writer:
            ckpt_lib.remove_stale_temporaries(ctx.workdir)
        info = ckpt_lib.checkpoint_info(ctx.workdir)
        if info is None:
            return
        if not self.resume:
            if self.overwrite:
                return
            raise ckpt_lib.CheckpointError(
                f"{ctx.workdir} already holds a checkpoint (iteration {info.get('iteration')}); resume it or "
                "allow overwriting it"
            )
        diffs = _differences(info, _run_info(ctx))
        if diffs:
            raise ckpt_lib.CheckpointError(
                f"the checkpoint in {ctx.workdir} was made with other settings: " + "; ".join(diffs)
            )
        ctx.states = ckpt_lib.load_state(ctx.workdir, ctx.states)
        ctx.start = ctx.iteration = int(np.asarray(ctx.states.step)[0])
        print(f"resuming from {ctx.workdir / ckpt_lib.STATE} at iteration {ctx.start}", file=sys.stderr)

    def __call__(self, ctx):
        finite = jax.device_get(jax.tree.map(lambda p: jnp.all(jnp.isfinite(p), axis=tuple(range(1, p.ndim))),
                                             ctx.states.params))
        ok = np.all(np.stack([np.asarray(f) for f in jax.tree.leaves(finite)]), axis=0)  # [M]
        if not ok.all():
            info = ckpt_lib.checkpoint_info(ctx.workdir)
            kept = (f"the last checkpoint (iteration {info.get('iteration')}) is kept" if info
                    else "no checkpoint was written")
            bad = ", ".join(n for n, o in zip(ctx.names, ok) if not o)
            raise TrainingDiverged(
                f"model {bad} diverged: NaN or infinite weights at iteration {ctx.iteration}; training stopped and "
                f"{kept}. Lower the learning rate (--train.solver.base-lr) or BANG's β and train again"
            )
        if ctx.writer:
            ckpt_lib.save_state(ctx.workdir, ctx.states, _run_info(ctx))


class StopAfter(Callback):
    """Stops the run (after checkpointing) once ``count`` iterations were done in this call — for tests."""

    order = 50

    def __init__(self, count: int):
        self.count = _check_every("StopAfter", count)

    def due(self, iteration, ctx):
        return iteration - ctx.start >= self.count

    def next_due(self, iteration, ctx):
        return ctx.start + self.count if iteration < ctx.start + self.count else None

    def __call__(self, ctx):
        ctx.stop = True


def _run_info(ctx: LoopContext) -> dict:
    return {"iteration": ctx.iteration, "models": [m.to_json() for m in ctx.models],
            "config": ctx.config.to_json()}


def _with_defaults(config: dict) -> dict:
    """A saved train config with the fields added since it was written at their defaults (they did not exist,
    so the run used what the default does)."""
    def fill(d, cls):
        return {**{f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}, **d}

    out = fill(config, TrainConfig)
    if isinstance(out.get("solver"), dict):
        out["solver"] = fill(out["solver"], SolverConfig)
    return out


def _differences(saved: dict, now: dict) -> list[str]:
    """Settings that differ between a checkpoint's description and this run (``steps`` may change)."""
    if isinstance(saved.get("config"), dict):
        saved = {**saved, "config": _with_defaults(saved["config"])}
    return ckpt_lib.setting_differences(saved, now, may_change={"iteration", "config.steps"})


# ------------------------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class TrainResult:
    """Final per-model variables (list, in ``models`` order), the final states and the last logged metrics."""

    variables: list[dict]
    states: TrainState
    last_metrics: dict
    seconds: float
    iteration: int


def _as_arrays(data) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(data, "train_images"):
        return data.train_images, data.train_labels
    try:
        images, labels = data
    except (TypeError, ValueError):
        raise TypeError("data must be a bang_jax.Dataset or an (images, labels) pair") from None
    return images, labels


def train(
    model,
    data,
    models: Sequence[ModelSpec],
    config: TrainConfig,
    workdir: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    *,
    consts: dict | None = None,
    progress: bool = True,
    mesh: jax.sharding.Mesh | None | str = "auto",
    steps_per_dispatch: int | None = None,
    optimizer: optax.GradientTransformation | None = None,
    loss_fn: Callable | None = None,
    correct_fn: Callable | None = None,
) -> TrainResult:
    """Trains all ``models`` together for ``config.steps`` iterations.

    Args:
      model: a linen module called as ``model.apply(variables, images, train=...)``, or an NNX model: an
        ``nnx.Module`` (every model starts from its weights) or a function building one from ``rngs=`` (each
        model's seed draws its own initial weights); see :class:`bang_jax.nnx.Functional`. It returns the
        outputs ``loss_fn`` takes (default: ``[N, classes]`` logits). BatchNorm statistics (linen's
        ``batch_stats``, NNX's ``nnx.BatchStat``) are updated in training mode and saved with the weights.
      data: a :class:`bang_jax.Dataset` or ``(images [N, H, W, C] uint8, labels [N] ints)``; kept on the device.
      models: the models (``ModelSpec(name=..., seed=..., bang=BangConfig(...))``; regular: ``BangConfig()``).
      config: the :class:`TrainConfig` (solver, steps, batch size, order, gradient method, model batching,
        augmentation).
      workdir: where callbacks write (metrics, checkpoints, snapshots); needed by :class:`Checkpoint` and
        :class:`Snapshots`.
      callbacks: periodic work, e.g. ``[LogMetrics(100), Snapshots(every=1000), Checkpoint(1000, resume=True)]``.
      consts: non-param variables to use (e.g. CifarQuick's mean image); default: as ``model.init`` makes them.
      progress: show a progress bar.
      mesh: the ``(models, data)`` device mesh; ``"auto"`` (default) lays out all devices of all processes with
        :func:`bang_jax.distributed.make_mesh` (batch split over ``data``; vmapped models over ``models``);
        ``None`` uses the default device only. The result equals single-device training (up to float rounding).
      steps_per_dispatch: iterations run per call of the jitted step (``lax.scan`` when > 1); default 1 on CPU,
        where a scanned step ran several times slower (jax 0.10.2), and 8 on GPU/TPU to amortise dispatch.
      optimizer: your own optax chain instead of ``config.solver``'s Caffe SGD (e.g.
        ``optax.sgd(optax.cosine_decay_schedule(0.1, steps), momentum=0.9, nesterov=True)``). BANG comes first:
        the balanced gradient is what the chain receives. It is not part of the checkpoint's description: resume
        with the same chain.
      loss_fn: per-example loss ``loss_fn(outputs, labels) -> [N]`` (default softmax cross-entropy on integer
        labels); correct_fn: ``correct_fn(outputs, labels) -> [N]`` bool (default argmax == label). Both decide
        which examples count as misclassified for BANG's ``ratio``.

    Returns:
      :class:`TrainResult`. All arguments are checked before anything is written or computed. In a
      multi-process run every process calls ``train`` alike and only process 0 writes files.
    """
    images, labels = _as_arrays(data)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} training images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("the training set is empty")
    if not models:
        raise ValueError("no model to train: models is empty")
    if not all(isinstance(m, ModelSpec) for m in models):
        raise TypeError("models must be bang_jax.train.ModelSpec objects")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    check_models(config, models)
    model = as_trainable(model)
    if optimizer is None and config.solver is None:
        raise ValueError("config.solver is None: pass optimizer= (an optax chain) or a SolverConfig")
    if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}")
    for name, fn in (("loss_fn", loss_fn), ("correct_fn", correct_fn)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    if _is_nnx(model) and config.method == "per_example":
        raise ValueError("method 'per_example' is not available for NNX models in train(): use 'single_pass' (the "
                         "same gradient) or bang_jax.nnx.per_example_grads in your own loop")
    callbacks = sorted(callbacks, key=lambda c: c.order)
    if workdir is None and any(c.needs_workdir for c in callbacks):
        raise ValueError("Checkpoint and Snapshots callbacks need a workdir")
    workdir = Path(workdir) if workdir is not None else None

    if steps_per_dispatch is None:
        steps_per_dispatch = 1 if jax.default_backend() == "cpu" else 8
    steps_per_dispatch = _check_every("steps_per_dispatch", steps_per_dispatch)
    if mesh == "auto":
        mesh = distributed.make_mesh(len(models), config.batch_size, shard_models=config.model_batching == "vmap")
    elif mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be 'auto', None or a jax.sharding.Mesh, got {mesh!r}")
    if mesh is not None and config.batch_size % mesh.shape["data"]:
        raise ValueError(f"batch_size {config.batch_size} does not divide over the mesh's data axis "
                         f"({mesh.shape['data']} devices)")

    states, init_consts = init_states(model, images, models, config, optimizer)
    consts = init_consts if consts is None else consts
    ctx = LoopContext(workdir, list(models), config, 0, 0, states, writer=distributed.is_writer())
    if workdir is not None and ctx.writer:
        workdir.mkdir(parents=True, exist_ok=True)
        ckpt_lib.refuse_symlinked_dirs(workdir)
    for c in reversed(callbacks):  # the checkpoint first: the others clean up after the iteration it resumes at
        c.on_start(ctx)
    states = distributed.put_models(ctx.states, mesh)
    consts = distributed.put_replicated(consts, mesh)
    images_dev = distributed.put_replicated(np.asarray(images), mesh)
    labels_dev = distributed.put_replicated(np.asarray(labels, np.int32), mesh)
    custom = {"optimizer": optimizer, "loss_fn": loss_fn, "correct_fn": correct_fn}
    step_fn = make_train_step(model, config, steps_per_dispatch, mesh, **custom)
    single_fn = make_train_step(model, config, 1, mesh, **custom) if steps_per_dispatch > 1 else step_fn

    t0 = time.perf_counter()
    it = ctx.start
    end = config.steps
    bar = _progress(total=end, initial=it, enabled=progress and ctx.writer,
                    desc=f"train {'+'.join(m.name for m in models)}")
    ctx.bar = bar
    while it < end and not ctx.stop:
        nexts = [c.next_due(it, ctx) for c in callbacks] + [end, it + max(50, steps_per_dispatch)]
        target = min(n for n in nexts if n is not None and n > it)
        idx = batch_indices(
            len(images), config.batch_size, it, target - it, order=config.order, data_seed=config.data_seed
        )
        idx_dev = distributed.put_batch(idx, mesh)
        j = 0
        while j < target - it:  # K iterations per dispatch, single steps for the rest of the chunk
            k = steps_per_dispatch if target - it - j >= steps_per_dispatch else 1
            states, metrics = (step_fn if k == steps_per_dispatch else single_fn)(
                states, consts, images_dev, labels_dev, idx_dev[j : j + k]
            )
            ctx.window.append(metrics)
            j += k
        bar.update(target - it)
        it = ctx.iteration = target
        ctx.states = states
        for c in callbacks:
            if c.due(it, ctx):
                c(ctx)
        if not any(isinstance(c, LogMetrics) for c in callbacks) and len(ctx.window) > 1000:
            ctx.window.clear()
    jax.block_until_ready(states)
    for c in callbacks:
        c.on_end(ctx)
    bar.close()
    states = jax.device_get(states)
    pick = lambda tree, m: jax.tree.map(lambda x: x[m], tree)  # noqa: E731
    variables = [{**consts, **pick(states.model_state, m), "params": pick(states.params, m)}
                 for m in range(len(models))]
    return TrainResult(variables, states, ctx.last_metrics, time.perf_counter() - t0, it)


def _window_mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _finite(d: dict) -> dict:
    return {k: (v if np.isfinite(v) else None) for k, v in d.items()}


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


def _progress(total, initial, enabled, desc):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True)
