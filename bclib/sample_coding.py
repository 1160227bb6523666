"""What a code of a posterior *sample* would cost, and what the sampled network would err.

Bits-back coding (chapter 1) and relative-entropy coding (MIRACLE, Havasi et al. 2019) send a
sample ``w ~ q`` of the posterior, not its rounded mean, in about ``KL(q || p)`` bits under a
coding distribution ``p`` that sender and receiver share. Here, per kept weight of a pruned
network, ``q`` is the Gaussian ``N(E[w], k Var[w])``: the posterior mean that ``prune`` stores,
the marginal variance of paper sec. 4 (:func:`bclib.rate_aware.kept_posterior_std`), narrowed
by ``k <= 1``, the ``shrink``. The weights are taken as independent, which leaves out that the
weights of a group share their scale ``z``. ``p`` is one zero-mean Gaussian per layer,
``N(0, s^2)``, sent as a 32-bit float; the best ``s^2`` is the mean of ``E[w]^2 + k Var[w]``
over the layer, at which

    KL(q || p) = 1/2 sum_i log(s^2 / (k Var[w_i]))   nats.

A smaller ``k`` samples networks nearer the mean, which err less, and costs more bits: the
trade such a code offers, measured by :func:`rate_distortion`. Practical codes pay somewhat
more than the KL; biases, masks and the architecture come on top.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .compression import former_group_layers

SCALE_BITS = 32  # the coding prior's scale s, per layer


def _check_shrink(shrink: object) -> float:
    if isinstance(shrink, bool) or not isinstance(shrink, (int, float)) or not 0 < shrink <= 1:
        raise ValueError(f"shrink must be a number in (0, 1] (the factor on the posterior variances), got {shrink!r}")
    return float(shrink)


def coding_kl_bits(mean: torch.Tensor, std: torch.Tensor, shrink: float = 1.0) -> float:
    """``KL(N(mean, shrink std^2) || N(0, s^2))`` in bits, summed over the entries, at the best
    single ``s^2``, plus :data:`SCALE_BITS` for sending ``s``."""
    shrink = _check_shrink(shrink)
    if mean.shape != std.shape:
        raise ValueError(f"mean has shape {tuple(mean.shape)} but std {tuple(std.shape)}: one std per weight")
    if not bool((std > 0).all()) or not bool(torch.isfinite(std).all()):
        raise ValueError("std must be positive and finite: the posterior standard deviations of the weights")
    var = shrink * std.double() ** 2
    s2 = (mean.double() ** 2 + var).mean()
    return 0.5 * torch.log(s2 / var).sum().item() / math.log(2) + SCALE_BITS


def _checked_layers(pruned: nn.Module, std: Sequence[torch.Tensor]) -> list[nn.Module]:
    layers = former_group_layers(pruned)
    if len(std) != len(layers) or any(s.shape != l.weight.shape for s, l in zip(std, layers)):
        raise ValueError(f"std must hold one tensor per former group layer of the pruned net, shaped as its weight "
                         f"({[tuple(l.weight.shape) for l in layers]}), got {[tuple(s.shape) for s in std]}: pass "
                         "rate_aware.kept_posterior_std(bayes_model, thresholds) for prune(bayes_model, thresholds)")  # fmt: skip
    return layers


@torch.no_grad()
def sampled(pruned: nn.Module, std: Sequence[torch.Tensor], shrink: float, generator: torch.Generator) -> nn.Module:
    """A copy of ``pruned`` whose former group layers' weights are drawn from
    ``N(weight, shrink std^2)``; everything else (biases included) as in ``pruned``."""
    shrink = _check_shrink(shrink)
    net = copy.deepcopy(pruned)
    for layer, s in zip(_checked_layers(net, std), std):
        eps = torch.randn(s.shape, generator=generator, dtype=s.dtype)
        layer.weight.add_((math.sqrt(shrink) * s * eps).to(layer.weight))
    return net


@dataclass(frozen=True)
class SamplePoint:
    """One ``shrink``: the bits of a sample's code and the test errors (%) of ``len(errors)`` samples."""

    shrink: float
    kl_bits: float
    errors: list[float]

    @property
    def kl_bytes(self) -> float:
        return self.kl_bits / 8


def rate_distortion(pruned: nn.Module, std: Sequence[torch.Tensor], shrinks: Sequence[float],
                    error_of: Callable[[nn.Module], float], samples: int = 4, seed: int = 0) -> list[SamplePoint]:  # fmt: skip
    """For every ``shrink``, the KL bits of all former group layers (:func:`coding_kl_bits`) and
    ``error_of`` of ``samples`` networks drawn by :func:`sampled` (seeded: ``seed``, then one
    stream for all shrinks)."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    layers = _checked_layers(pruned, std)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in shrinks:
        bits = sum(coding_kl_bits(l.weight.detach().cpu(), s, k) for l, s in zip(layers, std))
        out.append(SamplePoint(float(k), bits, [error_of(sampled(pruned, std, k, gen)) for _ in range(samples)]))
    return out
