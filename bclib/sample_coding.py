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
trade such a code offers, measured by :func:`rate_distortion`. :func:`progressive_code` adds
MIRACLE's remedy: train the posterior for the code, then send the weights in stages and train
the ones still to be sent after each. Practical codes pay somewhat more than the KL; biases,
masks and the architecture come on top.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .compression import copy_pruned, former_group_layer_names, former_group_layers

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
    net = copy_pruned(pruned)
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


# --- MIRACLE's procedure: a posterior trained for the code, sent in stages -------------------
class _GaussianWeights(nn.Module):
    """A linear or conv layer with weights ``N(m, exp(log_var))`` per entry, some of them sent
    (``sent``: fixed at ``value``), trained by the local reparameterisation; biases plain."""

    def __init__(self, layer: nn.Module, std: torch.Tensor, shrink: float) -> None:
        super().__init__()
        self.layer = layer  # its weight is overwritten at the end; its conv settings are used
        self.m = nn.Parameter(layer.weight.detach().clone())
        self.log_var = nn.Parameter((shrink * std.to(self.m) ** 2).log())
        self.register_buffer("sent", torch.zeros_like(self.m, dtype=torch.bool))
        self.register_buffer("value", torch.zeros_like(self.m))
        self.register_buffer("s2", (self.m.detach() ** 2 + self.log_var.detach().exp()).mean())  # the coding prior

    def _apply_weight(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, bias)
        return self.layer._conv_forward(x, w, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = self._apply_weight(x, torch.where(self.sent, self.value, self.m), self.layer.bias)
        if not self.training:
            return mean
        var = self._apply_weight(x * x, torch.where(self.sent, 0.0, self.log_var.exp()), None)
        return mean + var.clamp_min(1e-16).sqrt() * torch.randn_like(mean)

    def kl(self, which: torch.Tensor) -> torch.Tensor:
        """``KL(q || N(0, s2))`` in nats, summed over the entries ``which`` selects."""
        v, m = self.log_var.exp()[which], self.m[which]
        return 0.5 * ((v + m * m) / self.s2 - 1 - torch.log(v / self.s2)).sum()


@dataclass(frozen=True)
class ProgressiveCode:
    """The pruned net with every weight a sent sample, and the KL bits of each stage (their sum
    plus :data:`SCALE_BITS` per layer is ``kl_bits``)."""

    net: nn.Module
    stage_bits: list[float]
    kl_bits: float

    @property
    def kl_bytes(self) -> float:
        return self.kl_bits / 8


def _train(net: nn.Module, layers: list[_GaussianWeights], batches: Iterable, size: tuple[int, int], epochs: int,
           beta: float, lr: float) -> None:  # fmt: skip
    """``epochs`` passes over ``batches`` (``size``: examples and batches per pass) of Adam on
    ``CE + beta KL / N`` over the weights not yet sent, the learning rate falling linearly to 0."""
    opt = torch.optim.Adam([p for l in layers for p in (l.m, l.log_var, l.layer.bias) if p is not None], lr=lr)
    n, steps = size[0], max(1, epochs * size[1])
    net.train()
    for i, (x, y) in enumerate(b for _ in range(epochs) for b in batches):
        for group in opt.param_groups:
            group["lr"] = lr * (1 - i / steps)
        kl = sum(l.kl(~l.sent) for l in layers)
        loss = F.cross_entropy(net(x), y) + beta * kl / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()


def progressive_code(pruned: nn.Module, std: Sequence[torch.Tensor], train_batches: Iterable, beta: float,
                     shrink: float = 1.0, stages: int = 20, epochs: int = 1, first_epochs: int = 10, lr: float = 1e-3,
                     seed: int = 0) -> ProgressiveCode:  # fmt: skip
    """MIRACLE's procedure (Havasi et al. 2019) on a pruned net, its code length counted by the KL.

    Every kept weight gets the posterior ``N(E[w], shrink Var[w])``, the code one Gaussian
    ``N(0, s^2)`` per layer fixed at the start (as in :func:`coding_kl_bits`). The posterior
    trains ``first_epochs`` on ``CE + beta KL / N`` (``beta < 1`` buys accuracy with bits); then
    in each of ``stages`` stages a random share of the weights not yet sent is sent: each draws
    its sample, its KL at that moment counts as its bits, and it stays fixed, while the others
    train ``epochs`` more to make up for the draws. An ideal relative-entropy code sends each
    stage in about its KL. ``pruned`` is not changed; the result's net is a copy with plain layers.
    Seeds torch's global generator with ``seed`` (the draws and the training noise).
    """
    shrink = _check_shrink(shrink)
    for name, v, low in (("stages", stages, 1), ("epochs", epochs, 0), ("first_epochs", first_epochs, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive number (the KL's weight; 1: the ELBO), got {beta!r}")
    _checked_layers(pruned, std)
    net = copy_pruned(pruned)
    names = former_group_layer_names(net)
    plain = [net.get_submodule(n) for n in names]
    counts = [len(y) for _, y in train_batches]
    size = (sum(counts), len(counts))
    torch.manual_seed(seed)
    layers = [_GaussianWeights(l, s, shrink) for l, s in zip(plain, std)]
    for name, layer in zip(names, layers):
        net.set_submodule(name, layer)
    _train(net, layers, train_batches, size, first_epochs, beta, lr)
    stage_bits = []
    for stage in range(stages):
        bits = 0.0
        with torch.no_grad():
            for l in layers:
                free = (~l.sent).flatten().nonzero().squeeze(1)
                pick = free[torch.randperm(len(free))[: math.ceil(len(free) / (stages - stage))]]
                which = torch.zeros_like(l.sent)
                which.view(-1)[pick] = True
                bits += l.kl(which).item() / math.log(2)
                draw = l.m + l.log_var.exp().sqrt() * torch.randn_like(l.m)
                l.value[which], l.sent[which] = draw[which], True
        stage_bits.append(bits)
        if stage < stages - 1:
            _train(net, layers, train_batches, size, epochs, beta, lr)
    with torch.no_grad():
        for name, l in zip(names, layers):
            l.layer.weight.copy_(l.value)
            net.set_submodule(name, l.layer)
    return ProgressiveCode(net.eval(), stage_bits, sum(stage_bits) + SCALE_BITS * len(layers))
