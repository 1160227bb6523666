"""What a network costs to run: multiply-adds per example, and measured time per forward pass."""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch
from torch import nn

from .layers import BayesianGroupLayer, ConvGroup, LinearGroup


def _layer_macs(m: nn.Module, out: torch.Tensor) -> int:
    """Multiply-adds of one call of a linear or convolution layer (whole batch)."""
    if isinstance(m, (nn.Linear, LinearGroup)):
        return out.numel() * m.in_features
    if isinstance(m, nn.modules.conv._ConvNd):
        return out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    if isinstance(m, ConvGroup):
        return out.numel() * m.in_channels * math.prod(m.kernel_size)
    return 0


def macs(net: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-adds per example of ``net``'s linear and convolution layers (dense count; others ignored).

    Runs ``net`` once in eval mode on ``example_input`` (any batch size) with forward hooks.
    Group layers count at their full size: prune first to count what is kept.
    """
    return _per_example(net, example_input, _layer_macs)


def activations(net: nn.Module, example_input: torch.Tensor) -> int:
    """Values per example written by ``net``'s linear and convolution layers (their outputs' sizes).

    The element-wise layers after them (ReLU, pooling) read as many, so time spent there
    follows this count, not :func:`macs`: where such memory-bound work dominates, a pruned
    net's speed-up tends towards its ratio of activations. Counted like :func:`macs`.
    """
    return _per_example(net, example_input, lambda m, out: out.numel())


@torch.no_grad()
def _per_example(net: nn.Module, example_input: torch.Tensor, count: Callable[[nn.Module, torch.Tensor], int]) -> int:
    """``count(layer, output)`` summed over one eval-mode pass's linear and conv layers, per example."""
    total = 0

    def hook(m: nn.Module, args: object, out: torch.Tensor) -> None:
        nonlocal total
        total += count(m, out)

    kinds = (nn.Linear, nn.modules.conv._ConvNd, BayesianGroupLayer)
    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, kinds)]
    was_training = net.training
    try:
        net.eval()(example_input)
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    return total // len(example_input)


def time_forward(nets: dict[str, nn.Module], x: torch.Tensor, repeats: int = 30, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per forward pass of each net on ``x``, under ``torch.inference_mode``.

    The nets alternate within each repeat, so a drift of the machine's speed hits them alike:
    compare the times of one call (ratios), not times from different calls. Each timed sample
    follows an untimed pass of the same net, so it finds the caches as a loop over batches
    would, not as the previous net left them.
    """
    inner = max(1, 64 // len(x))  # several calls per sample for tiny batches
    samples: dict[str, list[float]] = {k: [] for k in nets}
    with torch.inference_mode():
        for net in nets.values():
            for _ in range(warmup):
                net(x)
        for _ in range(repeats):
            for name, net in nets.items():
                net(x)
                t0 = time.perf_counter()
                for _ in range(inner):
                    net(x)
                samples[name].append((time.perf_counter() - t0) / inner)
    return {k: 1e3 * statistics.median(v) for k, v in samples.items()}
