"""CIFAR-10 "quick" on CIFAR-10, regular against BANG training (paper Sec. 4.2, Table 2, Figs. 4–5).

    python -m experiments.cifar10                    # default: R0 vs B0, shortened schedule (CPU, ~25 min)
    python -m experiments.cifar10 --preset smoke     # about a minute
    python -m experiments.cifar10 --preset paper     # all Table 2 rows, 20,000 iterations (meant for a GPU)
    python -m experiments.cifar10 --preset grid      # the 13×13 β×ε sweep of Fig. 4 (meant for a GPU)

Presets:

* ``default``: R0 and B0 (β 0.40, ε 0.855, ratio 0.5) trained together, **shortened** to 3,000 iterations
  (6 epochs; the multistep drops scaled to 2,700 and 2,850) because a CIFAR-quick step takes ≈ 0.15 s per model
  on a 2-core CPU (the paper's 20,000 iterations would take ≈ 100 min). Accuracy is therefore ≈ 70%, not 79%;
  attacks on the whole test set; a light noise study (σ 0…40, every 500 iterations). Not the paper's numbers.
  Measured here: 1,490 s (training 533 s, attacks 489 s, noise study 452 s); R0 72.32%, B0 69.19%.
* ``smoke``: 40 iterations, 300 test images.
* ``paper``: R0, R1, B0–B5, the BANG solver (base lr 0.001, momentum 0.9, weight decay 0.004, ×0.1 at 18,000
  and 19,000, batch 100, 20,000 iterations), the paper's noise protocol (every 2nd epoch = 1,000 iterations).
* ``grid``: β ∈ [0.4, 1.0] step 0.05 × ε ∈ [0.80, 0.86] step 0.005, ratio 0.5, plus R0.

Data: the CIFAR-10 binary batches (gzipped or not) in ``--data-dir`` / ``$BANG_DATA_DIR``, or prepared tfds data.
"""

from __future__ import annotations

import dataclasses
import numpy as np

from bang_jax.train import CIFAR_QUICK_SOLVER, BangHParams
from experiments.common import ExperimentConfig, as_grid, main_for
from experiments.paper_tables import TABLE2 as PAPER_TABLE2

TABLE2 = {
    name: BangHParams(name, row["epsilon"] or 0.0, row["beta"] or 1.0, 0.5 if row["epsilon"] else 1.0, seed=i)
    for i, (name, row) in enumerate(PAPER_TABLE2.items())
}
STEP_SECONDS_CPU = 0.15  # measured CIFAR-quick step (batch 100) on a 2-core CPU, per model


def _base(preset: str, models: list[str]) -> ExperimentConfig:
    return ExperimentConfig(
        dataset="cifar10",
        model="cifar_quick",
        preset=preset,
        models=[TABLE2[m] for m in models],
        solver=CIFAR_QUICK_SOLVER,
        num_steps=20_000,
        batch_size=100,
        noise_every=1000,
        noise_sigmas=tuple(float(s) for s in range(0, 41, 5)),
        noise_per_class=100,
        noise_copies=1000,
    )


def default() -> ExperimentConfig:
    cfg = _base("default", ["R0", "B0"])
    cfg.num_steps = 3000
    cfg.solver = dataclasses.replace(CIFAR_QUICK_SOLVER, stepvalues=(2700, 2850))
    cfg.noise_every, cfg.noise_per_class, cfg.noise_copies = 500, 10, 100
    return cfg


def smoke() -> ExperimentConfig:
    cfg = _base("smoke", ["R0", "B0"])
    cfg.num_steps, cfg.test_limit, cfg.log_every, cfg.checkpoint_every = 40, 300, 20, 20
    cfg.solver = dataclasses.replace(CIFAR_QUICK_SOLVER, stepvalues=(36, 38))
    cfg.noise_every, cfg.noise_sigmas, cfg.noise_per_class, cfg.noise_copies = 20, (0.0, 20.0, 40.0), 1, 10
    cfg.hc1_max_step, cfg.figure_images = 255, 4
    return cfg


def paper() -> ExperimentConfig:
    return _base("paper", list(TABLE2))


def grid() -> ExperimentConfig:
    betas = np.round(np.arange(0.4, 1.0001, 0.05), 3)
    epsilons = np.round(np.arange(0.80, 0.8601, 0.005), 4)
    return as_grid(_base("grid", ["R0"]), betas, epsilons, ratio=0.5)


PRESETS = {"default": default, "smoke": smoke, "paper": paper, "grid": grid}


def main(argv=None):
    return main_for(__doc__, PRESETS, TABLE2, "cifar10", step_seconds_cpu=STEP_SECONDS_CPU, paper=PAPER_TABLE2,
                    table_name="table2.md", title="Table 2: CIFAR-10 quick", argv=argv)


if __name__ == "__main__":
    main()
