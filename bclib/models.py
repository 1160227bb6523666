"""Networks of the paper, plain or Bayesian, and the conversion between the two.

Every network is an ``nn.Sequential``; :func:`to_bayesian` swaps its ``nn.Linear`` and
``nn.Conv*d`` layers for group layers that start from their weights, which is how the paper
initialises a Bayesian network from a pretrained one. Your own sequential nets convert the
same way.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from .layers import (
    BayesianGroupLayer,
    Conv1dGroupNJ,
    Conv2dGroupHS,
    Conv2dGroupNJ,
    Conv3dGroupNJ,
    LinearGroupHS,
    LinearGroupNJ,
)

PRIORS = ("nj", "hs")
_BAYESIAN_CLASS = {
    (nn.Linear, "nj"): LinearGroupNJ,
    (nn.Linear, "hs"): LinearGroupHS,
    (nn.Conv1d, "nj"): Conv1dGroupNJ,
    (nn.Conv2d, "nj"): Conv2dGroupNJ,
    (nn.Conv3d, "nj"): Conv3dGroupNJ,
    (nn.Conv2d, "hs"): Conv2dGroupHS,
}


def bayesian_layers(model: nn.Module) -> list[BayesianGroupLayer]:
    """The group layers of ``model`` in registration order (the forward order for our nets)."""
    return [m for m in model.modules() if isinstance(m, BayesianGroupLayer)]


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """Total KL of all group layers of ``model`` (zero for a plain network)."""
    layers = bayesian_layers(model)
    if not layers:
        return torch.zeros(())
    return torch.stack([layer.kl_divergence() for layer in layers]).sum()


def forward_with_kl(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(model(x), kl_divergence(model))``, cheaper in training mode.

    There the group linear layers compute their weights' KL inside their forward pass
    (:func:`bclib.lrt.linear_lrt`), sharing its work; the other layers add ``kl_divergence()``.
    """
    layers = bayesian_layers(model)
    terms: dict[nn.Module, torch.Tensor] = {}
    for layer in layers:
        layer.kl_terms = terms
    try:
        out = model(x)
    finally:
        for layer in layers:
            layer.kl_terms = None
    if not layers:
        return out, torch.zeros((), device=out.device)
    return out, torch.stack([terms[m] if m in terms else m.kl_divergence() for m in layers]).sum()


def to_bayesian(
    model: nn.Sequential, prior: str = "nj", clip_var: Optional[float] = 0.04, tau0: float = 1e-5
) -> nn.Sequential:
    """A copy of a plain ``nn.Sequential`` with each linear/conv layer made a group layer.

    The posterior means start at the plain layer's weights and biases. ``clip_var`` caps the
    weight variance of the *first* layer only, as the public tutorial does.
    """
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}: use one of {PRIORS}")
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"to_bayesian needs an nn.Sequential, got {type(model).__name__}")
    layers, first = [], True
    for m in model:
        cls = _BAYESIAN_CLASS.get((type(m), prior))
        if cls is None:
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                raise ValueError(f"no {prior!r} group layer for {type(m).__name__}")
            layers.append(copy.deepcopy(m))
            continue
        extra = {"tau0": tau0} if prior == "hs" else {}
        kw = dict(
            bias=m.bias is not None,
            clip_var=clip_var if first else None,
            init_weight=m.weight,
            init_bias=m.bias,
            **extra,
        )
        if isinstance(m, nn.Linear):
            layers.append(cls(m.in_features, m.out_features, **kw))
        else:
            if m.groups != 1 or m.padding_mode != "zeros":
                raise ValueError("group layers support only groups=1 and zero padding")
            layers.append(cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, **kw))
        first = False
    return nn.Sequential(*layers)


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


ARCHITECTURES = {"lenet_300_100": lenet_300_100, "lenet5_caffe": lenet5_caffe}


def build(arch: str, prior: Optional[str]) -> nn.Sequential:
    """Build a network by name (used to rebuild a model from a checkpoint)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}: use one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](prior)
