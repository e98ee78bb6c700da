"""CIFAR-10 "quick" on CIFAR-10, regular against BANG training (paper Sec. 4.2, Table 2, Figs. 4–5).

    python -m experiments.cifar10                    # default: R0 vs B0, shortened schedule (CPU, ~25 min)
    python -m experiments.cifar10 --preset smoke     # about a minute
    python -m experiments.cifar10 --preset paper     # all Table 2 rows, 20,000 iterations (meant for a GPU)
    python -m experiments.cifar10 --preset grid      # the 13×13 β×ε sweep of Fig. 4 (meant for a GPU)
    python -m experiments.cifar10 --out runs/x --stages evaluate,report --attacks fgs,hc1,pgd

Presets, their hardware, run time and expected results: ``experiments/configs/cifar10.py``. Every setting can be
overridden (``--help`` lists them). Data: the CIFAR-10 binary batches (gzipped or not) in ``--data-dir`` /
``$BANG_DATA_DIR``, or prepared tensorflow-datasets data.
"""

from __future__ import annotations

from experiments.pipeline import run_command


def main(argv=None):
    return run_command("cifar10", argv, __doc__)


if __name__ == "__main__":
    main()
