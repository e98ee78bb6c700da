"""Experiment entry points: ``python -m experiments.mnist`` (LeNet) and, later, ``python -m experiments.cifar10``."""
