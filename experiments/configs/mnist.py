"""LeNet on MNIST, regular against BANG training (paper Sec. 4.1, Table 1, Figs. 1–3).

Presets (``python -m experiments.mnist --preset NAME``):

* ``default`` — R0 and B1 (β 1.0, ε 0.815) trained together in one jitted program with the paper's full solver
  (Caffe "inv" lr 0.01, γ 1e-4, power 0.75, momentum 0.9, weight decay 5e-4, batch 64, 10,000 iterations,
  sequential data order); FGS (paper rule and exact gradient), HC1 and PASS on the whole test set; a lighter
  noise study (10 images per class, 100 copies, σ = 0…100 step 10, snapshots every 1,000 iterations); Fig. 1.
  Hardware: a 2-core CPU. Runtime: about 25 minutes; the measured time and machine are in docs/reproducing.md
  (Run times, generated from docs/results/mnist-default).
  Expected: R0 ≈ 99.3% / B1 ≈ 99.2% accuracy; paper-rule FGS ≈ 94% on R0 and ≈ 2% on B1; exact FGS ≈ 99.9% on
  both; HC1 L∞ ≈ 120 (R0) vs ≈ 210 (B1).
* ``smoke`` — the same pipeline in miniature (60 iterations, 500 test images, tiny noise study); used by the
  tests. About 1.5 minutes on a 2-core CPU; numbers mean nothing.
* ``paper`` — R0, R1, B0–B5 of Table 1, full schedule, full test set, the paper's noise protocol (100 images per
  class, 1,000 copies, snapshots every 500 iterations). Prints its estimated time first (≈ 25 min of training on
  a 2-core CPU, more for the noise study); meant for a GPU.
* ``grid`` — β ∈ [1.0, 1.6] step 0.05 × ε ∈ [0.78, 0.84] step 0.005 (169 BANG models, vmapped in one program)
  plus R0, with the heat maps of Fig. 2. Meant for a GPU (≈ 9 hours of training on a 2-core CPU).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bang_jax.balance import BangConfig
from bang_jax.evaluate import EvalConfig
from bang_jax.solvers import LENET_SOLVER
from bang_jax.train import ModelSpec, TrainConfig
from experiments.config import ExperimentConfig
from experiments.paper_tables import TABLE1 as PAPER

PRESETS = ("default", "smoke", "paper", "grid")
# Table 1 of the paper: regular rows have BangConfig() (η = 1); the seeds are ours.
TABLE = {
    name: ModelSpec(name=name, seed=i, bang=BangConfig(epsilon=row["epsilon"] or 0.0, beta=row["beta"] or 1.0))
    for i, (name, row) in enumerate(PAPER.items())
}
TABLE_FILE = "table1.md"
TITLE = "Table 1: LeNet on MNIST"
STEP_SECONDS_CPU = 0.019  # measured LeNet step (batch 64) on a 2-core CPU, per model


def grid_models(betas, epsilons, ratio: float) -> tuple[ModelSpec, ...]:
    """The β×ε sweep of Figs. 2/4 as BANG models (seeds 100, 101, …), β rows, ε columns."""
    return tuple(
        ModelSpec(name=f"b{b:.2f}_e{e:.3f}", seed=100 + i * len(epsilons) + j,
                  bang=BangConfig(epsilon=float(e), beta=float(b), ratio=ratio))
        for i, b in enumerate(betas)
        for j, e in enumerate(epsilons)
    )


def get_config(preset: str = "default") -> ExperimentConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    train = TrainConfig(solver=LENET_SOLVER, steps=10_000, batch_size=64)
    cfg = ExperimentConfig(
        dataset="mnist", model="lenet", preset=preset, models=(TABLE["R0"], TABLE["B1"]), train=train,
        noise_every=1000, noise_sigmas=tuple(float(s) for s in range(0, 101, 10)), noise_per_class=10,
        noise_copies=100,
    )
    if preset == "smoke":
        cfg.train = dataclasses.replace(train, steps=60)
        cfg.test_limit, cfg.log_every, cfg.checkpoint_every = 500, 20, 30
        cfg.noise_every, cfg.noise_sigmas, cfg.noise_per_class, cfg.noise_copies = 30, (0.0, 50.0, 100.0), 2, 10
        cfg.eval, cfg.figure_images = EvalConfig(hc1_max_step=255), 4
    elif preset == "paper":
        cfg.models = tuple(TABLE.values())
        cfg.noise_every, cfg.noise_per_class, cfg.noise_copies = 500, 100, 1000
    elif preset == "grid":
        betas = np.round(np.arange(1.0, 1.6001, 0.05), 3)
        epsilons = np.round(np.arange(0.78, 0.8401, 0.005), 4)
        cfg.models = (TABLE["R0"],) + grid_models(betas, epsilons, ratio=1.0)
        cfg.train = dataclasses.replace(train, model_batching="vmap")
        cfg.noise_every, cfg.figure_images = 0, 0
    return cfg.validate()
