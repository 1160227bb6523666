"""Checking compression on a network without training it: hand-set sparsity, BatchNorm
statistics that matter, the pruning invariant, and MNIST-shaped tensors for running the
pipeline without the data. Used by bclib's tests and benchmarks."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from . import compression
from .convert import bayesian_layers

HIGH_LOG_ALPHA = 4.0  # far above the thresholds (0) that sparsify returns


class TinyResNet(nn.Module):
    """A residual block with BatchNorm on 3-channel images, 4 classes: a net beyond a chain."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.stem(x)))
        return self.fc(torch.relu(y + self.bn2(self.conv(y))).mean((2, 3)))


@torch.no_grad()
def sparsify(model: nn.Module, share: float = 0.4, seed: int = 0) -> list[float]:
    """Give ``round(share * groups)`` random groups of every group layer a high ``log_alpha``
    (at least one group stays); returns thresholds (0 for every layer) that prune exactly those.

    Normal-Jeffreys: ``log_alpha = z_logvar - log z_mu^2`` with ``z_mu`` near 1; horseshoe: the
    local ``a_logvar`` raises the variance of ``log z``.
    """
    g = torch.Generator().manual_seed(seed)
    layers = bayesian_layers(model)
    for layer in layers:
        logvar = layer.scale.z_logvar if layer.prior == "nj" else layer.scale.a_logvar
        n = logvar.numel()
        drop = torch.randperm(n, generator=g)[: min(round(share * n), n - 1)]
        logvar[drop] = HIGH_LOG_ALPHA
    return [0.0] * len(layers)


@torch.no_grad()
def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters for every BatchNorm (so its shift matters)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            if m.track_running_stats:
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.copy_(torch.randn(n, generator=g) * 0.5 + 1)
                m.bias.copy_(torch.randn(n, generator=g) * 0.5)
    return model


@torch.no_grad()
def check_pruned_equals_masked(
    bayes: nn.Module,
    x: torch.Tensor,
    thresholds: Sequence[float],
    example_input: Optional[torch.Tensor] = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> torch.fx.GraphModule:
    """Assert the invariant of :func:`bclib.compression.prune` on ``x``; returns the pruned net.

    In eval mode, ``prune(bayes, thresholds)(x)`` equals ``bayes(x)`` after
    ``apply_masks(bayes, group_masks(bayes, thresholds))`` (``atol`` is relative to the
    largest output when that exceeds 1); the pruned net holds no bclib
    module and fewer parameters than :func:`bclib.compression.dense`.
    """
    bayes.eval()
    compression.apply_masks(bayes, compression.group_masks(bayes, thresholds, example_input))
    try:
        want = bayes(x)
    finally:
        compression.apply_masks(bayes, None)
    pruned = compression.prune(bayes, thresholds, example_input)
    scale = max(1.0, want.abs().max().item())  # deep random nets reach huge outputs: atol relative to them
    torch.testing.assert_close(pruned(x), want, rtol=rtol, atol=atol * scale)
    left = [type(m).__name__ for m in pruned.modules() if type(m).__module__.startswith("bclib")]
    assert not left, f"bclib modules left in the pruned net: {left}"
    n_params = [sum(p.numel() for p in net.parameters()) for net in (pruned, compression.dense(bayes, example_input))]
    assert n_params[0] < n_params[1], f"pruning kept every parameter ({n_params[0]:,})"
    return pruned


def synthetic_mnist(dataset: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable MNIST-shaped tensors (640 training, 200 test images; the label is a function of
    the first 10 pixels), in the signature of ``bclib.reproduce.load_data``, which tests replace."""
    g = torch.Generator().manual_seed(int(train))
    x = torch.rand(640 if train else 200, 1, 28, 28, generator=g) * 2 - 1
    return x, (x.flatten(1)[:, :10] > 0).long().sum(1) % 10
