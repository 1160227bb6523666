"""bclib: Bayesian compression for deep learning (Louizos, Ullrich & Welling, NeurIPS 2017).

Modules: ``layers`` (group normal-Jeffreys and horseshoe layers), ``models`` (LeNets and
``to_bayesian``), ``data`` (MNIST as tensors), ``train`` (objective, loop, checkpoints),
``compression`` (masks, bit precision, rates, ``prune``), ``export`` (``export_compressed``:
the pruned, bit-reduced net as a small file) and ``load_compressed`` (its stand-alone reader).
"""
from . import compression, data, export, kl, layers, load_compressed, models, train  # noqa: F401

__version__ = "0.1.0"
