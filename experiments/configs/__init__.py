"""Per-dataset experiment configs: ``get_config(preset)`` returns a validated :class:`ExperimentConfig`."""

from experiments.configs import cifar10, mnist

DATASETS = {"mnist": mnist, "cifar10": cifar10}

__all__ = ["DATASETS", "cifar10", "mnist"]
