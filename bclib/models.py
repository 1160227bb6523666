"""Networks of the paper, plain (``prior=None``) or Bayesian.

Each builder makes the plain network and, given a prior, passes it through
:func:`bclib.convert.to_bayesian` (re-exported here with ``bayesian_layers``,
``kl_divergence`` and ``forward_with_kl``), which converts any ``nn.Module`` the same way.
A new network is a builder function registered in ``ARCHITECTURES``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .convert import ConversionWarning, bayesian_layers, forward_with_kl, kl_divergence, to_bayesian  # noqa: F401
from .scales import PRIORS  # noqa: F401


def lenet_300_100(prior: Optional[str] = "nj", **kwargs) -> nn.Sequential:
    """LeNet-300-100: 784-300-100-10 with ReLU (266,200 weights). ``prior=None`` gives the plain net."""
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )
    return net if prior is None else to_bayesian(net, prior, **kwargs)


def lenet5_caffe(prior: Optional[str] = "nj", **kwargs) -> nn.Sequential:
    """LeNet-5-Caffe: conv 20@5x5, pool, conv 50@5x5, pool, fc 800-500, fc 500-10 (430,500 weights)."""
    net = nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10),
    )  # fmt: skip
    return net if prior is None else to_bayesian(net, prior, **kwargs)


# Channels of the VGG-like net's 13 conv layers, "M" a 2x2 max-pool (paper Table 1, as Sparse VD).
VGG_CIFAR10_CHANNELS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGGCifar10(nn.Module):
    """VGG-like net for 3x32x32 inputs: ``features`` (13 conv 3x3 + BN + ReLU, 5 max-pools)
    leave 512x1x1, ``classifier`` is fc 512 + BN + ReLU, fc 10.

    Layers followed by batch norm have no bias (batch norm's shift takes its place).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for c in VGG_CIFAR10_CHANNELS:
            if c == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
                channels = c
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(512, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg_cifar10(prior: Optional[str] = "nj", **kwargs) -> nn.Module:
    """The paper's VGG-like CIFAR-10 net (Table 1): 13 conv 3x3 + 2 fc layers, 14,977,728 weights.

    That is the paper's "about 15.0M"; with the batch norms and the last bias the net has
    14,987,210 parameters. ``prior=None`` gives the plain net; otherwise ``kwargs`` go to
    :func:`to_bayesian`.
    """
    net = VGGCifar10()
    return net if prior is None else to_bayesian(net, prior, **kwargs)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv + BN, added to the input (through a 1x1 conv + BN
    when the stride or the width changes), then ReLU."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return torch.relu(out)


class ResNet18Cifar(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stem (no max-pool), 4 stages of 2 basic blocks
    (64, 128, 256, 512 channels; stride 2 from the second stage), average pool, fc."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, channels = [], 64
        for i, width in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(channels, width, stride), BasicBlock(width, width)))
            channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18_cifar(prior: Optional[str] = "nj", **kwargs) -> nn.Module:
    """ResNet-18 for CIFAR-10: 20 conv layers (3 of them 1x1 shortcuts) and one fc, 11,164,352 weights
    (11,173,962 parameters with the batch norms and the fc bias).

    Not in the paper; a residual net to compress with the same tools. ``prior=None`` gives
    the plain net; otherwise ``kwargs`` go to :func:`to_bayesian`.
    """
    net = ResNet18Cifar()
    return net if prior is None else to_bayesian(net, prior, **kwargs)


ARCHITECTURES = {
    "lenet_300_100": lenet_300_100,
    "lenet5_caffe": lenet5_caffe,
    "vgg_cifar10": vgg_cifar10,
    "resnet18_cifar": resnet18_cifar,
}


def build(arch: str, prior: Optional[str]) -> nn.Module:
    """Build a network by name (used to rebuild a model from a checkpoint)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}: use one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](prior)
