"""bclib: Bayesian compression for deep learning (Louizos, Ullrich & Welling, NeurIPS 2017).

Modules: ``layers`` (group layers, the prior an argument), ``scales`` (the priors),
``convert`` (``to_bayesian`` for any ``nn.Module``), ``models`` (the paper's networks),
``data`` (MNIST and CIFAR-10 as tensors), ``train`` (objective, loop, checkpoints),
``graph`` (which channels a pruned group takes with it), ``compression`` (masks, bit
precision, rates, ``prune``), ``cost`` (multiply-adds, timing), ``export`` (the pruned net
as a bit-packed file or ONNX), ``load_compressed`` (the bit-packed file's stand-alone
reader) and ``paper`` (the published numbers).
"""
from . import compression, convert, cost, data, export, graph, kl, layers, load_compressed, models, paper, train  # noqa: F401

__version__ = "0.1.0"
