"""bclib: Bayesian compression for deep learning (Louizos, Ullrich & Welling, NeurIPS 2017).

Modules: ``layers`` (group normal-Jeffreys and horseshoe layers), ``models`` (LeNets and
``to_bayesian``), ``data`` (MNIST as tensors), ``train`` (objective, loop, checkpoints) and
``compression`` (masks, bit precision, rates, ``prune``).
"""
from . import compression, data, kl, layers, models, train  # noqa: F401

__version__ = "0.1.0"
