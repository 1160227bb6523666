"""bclib: Bayesian compression for deep learning (Louizos, Ullrich & Welling, NeurIPS 2017).

Modules: ``layers`` (group layers, the prior an argument), ``scales`` (the priors),
``convert`` (``to_bayesian`` for any ``nn.Module``), ``models`` (the paper's networks),
``data`` (MNIST and CIFAR-10 as tensors), ``train`` (objective, loop, checkpoints),
``distributed`` (training under torchrun), ``graph`` (which channels a pruned group takes
with it), ``compression`` (masks, bit precision, rates, ``prune``), ``baselines`` (other
rankings and fixed thresholds), ``finetune`` (training on with the pruned groups held at 0),
``quantize`` (bit widths searched on held-out data, training through the rounding),
``rate_aware`` (each weight rounded to the value cheapest to code within its posterior),
``uniform_grid`` (weights on whole multiples of a step per layer, for the coded file),
``sample_coding`` (what a code of a posterior sample would cost, and what the sample errs),
``cost`` (multiply-adds, activations, timing), ``runtime`` (faster inference: onnxruntime, or
exact rewrites for eager PyTorch), ``export`` (the pruned net
as a bit-packed file or ONNX), ``load_compressed`` (the bit-packed file's stand-alone
reader), ``coded`` / ``load_coded`` (the entropy-coded file, needs ``constriction``),
``results`` (the shipped runs read back) and ``paper`` (the published numbers).
"""
from .config import flush_denormals

flush_denormals()  # before torch starts its worker threads, which inherit it

from . import (  # noqa: F401, E402
    baselines, compression, convert, cost, data, distributed, export, graph, kl, layers, load_compressed, models,
    paper, results, train,
)

__version__ = "0.1.0"
