"""Rate-aware rounding: each weight to the grid value that is cheapest to code, within its posterior.

Rounding to the nearest value of a layer's bit-precision grid (:mod:`bclib.precision`) spends
the same care on every weight. A weight whose posterior is wide may move further, to a value
the coder writes in fewer bits: zero above all. Entropy-constrained scalar quantization (Chou,
Lookabaugh & Gray 1989) makes that a trade: weight ``w`` with posterior standard deviation
``sigma`` goes to the grid value ``v`` minimising

    -log2 p(v)  +  lam (v - w)^2 / (2 sigma^2 ln 2),

the bits of ``v`` under the layer's value frequencies ``p`` plus ``lam`` times the bits by which
the posterior ``N(w, sigma^2)`` finds ``v`` less likely than ``w``. ``lam = 1`` weighs both
alike (the two-part code length of chapter 1); larger ``lam`` keeps the weights closer, and
``lam -> inf`` is rounding to the nearest grid value (as :func:`bclib.precision.round_to_bits`
but for the weights that it flushes to zero below the least magnitude). ``p`` and the
assignment are iterated to a fixed point from nearest rounding, so on a grid so fine that
every weight has a value of its own nothing moves: coarsen the bits first
(:func:`bclib.quantize.fit_bits`). The values stay on the grid, so the coded file
(:mod:`bclib.coded`) holds them as they are; its adaptive models learn ``p`` as they read.

:func:`train_rate_aware` trains the pruned net through this rounding (straight-through, as
:func:`bclib.quantize.train_on_grid` does through nearest rounding), the table ``p`` renewed
after every epoch; the network to store is :func:`rate_aware_quantized` of the result.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from . import precision
from .coded import value_grid
from .compression import LayerBits, _kept, check_bits, former_group_layers, group_masks, quantized
from .convert import bayesian_layers
from .precision import round_to_bits
from .quantize import train_through

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
FIXED_POINT_ITERATIONS = 10
_CELLS = 1 << 22  # weight-value costs scored at a time


@torch.no_grad()
def kept_posterior_std(bayes_model: nn.Module, thresholds: Sequence[float],
                       example_input: Optional[torch.Tensor] = None) -> list[torch.Tensor]:  # fmt: skip
    """Per group layer, the posterior standard deviation of its kept weights, shaped as in ``prune``'s net.

    ``sqrt(Var[w])`` of :meth:`bclib.layers.BayesianGroupLayer.posterior_weight_variance` (paper
    sec. 4), the groups of ``group_masks(bayes_model, thresholds)``.
    """
    masks = group_masks(bayes_model, thresholds, example_input)
    return [_kept(layer.posterior_weight_variance().cpu(), m).sqrt() for layer, m in zip(bayesian_layers(bayes_model), masks)]


def _check(w: torch.Tensor, std: torch.Tensor, lam: object) -> None:
    if not (isinstance(lam, (int, float)) and not isinstance(lam, bool) and math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be a positive number (1: bits and posterior alike; larger: closer to nearest "
                         f"rounding), got {lam!r}")  # fmt: skip
    if std.shape != w.shape:
        raise ValueError(f"std has shape {tuple(std.shape)} but the weights {tuple(w.shape)}: pass "
                         "kept_posterior_std(bayes_model, thresholds), one tensor per former group layer")  # fmt: skip
    if not bool((std > 0).all()) or not bool(torch.isfinite(std).all()):
        raise ValueError("std must be positive and finite: the posterior standard deviations of the weights")


def _nearest(w: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Index into the ascending ``grid`` of each weight's nearest value (the lower one on a tie)."""
    hi = torch.searchsorted(grid, w).clamp(max=len(grid) - 1)
    lo = (hi - 1).clamp(min=0)
    return torch.where((grid[hi] - w).abs() < (grid[lo] - w).abs(), hi, lo)


def _assign(w: torch.Tensor, inv_var: torch.Tensor, grid: torch.Tensor, rate: torch.Tensor, lam: float) -> torch.Tensor:
    """Index into ``grid`` of each weight's cheapest value (float64, in chunks).

    Only the nearest value and the values in use can win: an unused value costs the most bits
    and lies no nearer than the nearest one.
    """
    scale = lam / (2 * math.log(2))
    out = _nearest(w, grid)
    best = rate[out] + scale * (grid[out] - w).pow(2) * inv_var
    used = (rate < rate.max()).nonzero().squeeze(1)
    rate_u, grid_u = rate[used][None, :], grid[used][None, :]
    chunk = max(1, _CELLS // max(1, len(used)))
    for i in range(0, len(w) if len(used) else 0, chunk):
        low, j = (rate_u + scale * (grid_u - w[i : i + chunk, None]).pow(2) * inv_var[i : i + chunk, None]).min(1)
        better = low < best[i : i + chunk]
        out[i : i + chunk][better] = used[j[better]]
    return out


def _rate(index: torch.Tensor, size: int) -> torch.Tensor:
    """Bits of each grid value under the frequencies of ``index`` (counts + 1/2, as the coder's KT models)."""
    c = torch.bincount(index, minlength=size).double() + 0.5
    return -torch.log2(c / c.sum())


class _Table:
    """A layer's grid and value code lengths, at the fixed point of assignment and frequencies."""

    def __init__(self, w: torch.Tensor, std: torch.Tensor, bits: LayerBits, lam: float) -> None:
        self.inv_var = std.detach().double().flatten().pow(-2)
        self.bits, self.lam = bits, lam
        self.fit(w)

    def fit(self, w: torch.Tensor) -> None:
        flat = w.detach().double().flatten().cpu()
        self.grid = torch.from_numpy(value_grid(self.bits, precision.max_exponent(flat)))
        index = _nearest(round_to_bits(flat, self.bits.exponent, self.bits.significand), self.grid)
        for _ in range(FIXED_POINT_ITERATIONS):
            self.rate = _rate(index, len(self.grid))
            new = _assign(flat, self.inv_var, self.grid, self.rate, self.lam)
            if torch.equal(new, index):
                break
            index = new

    def round(self, w: torch.Tensor) -> torch.Tensor:
        index = _assign(w.detach().double().flatten().cpu(), self.inv_var, self.grid, self.rate, self.lam)
        return self.grid[index].to(w.dtype).view_as(w).to(w.device)


def rate_aware_round(w: torch.Tensor, std: torch.Tensor, bits: LayerBits, lam: float) -> torch.Tensor:
    """``w`` rounded to values of its ``bits`` grid at the fixed point of the trade above (same shape).

    ``std``: the weights' posterior standard deviations (same shape). Every value is one that
    ``round_to_bits(., bits)`` leaves unchanged, so the coded file stores it exactly.
    """
    _check(w, std, lam)
    precision.check_bits(bits.exponent, bits.significand)
    return _Table(w, std, bits, lam).round(w) if w.numel() else w.clone()


@torch.no_grad()
def rate_aware_quantized(net: nn.Module, bits: Sequence[LayerBits], std: Sequence[torch.Tensor], lam: float,
                         bias_significand: Optional[int] = None) -> nn.Module:  # fmt: skip
    """A copy of a pruned net with each former group layer's weights :func:`rate_aware_round`-ed.

    As :func:`bclib.compression.quantized`, but rate-aware; ``std`` from
    :func:`kept_posterior_std`. Store it with ``bclib.coded.encode_network(copy, bits)``.
    """
    out = quantized(net, bits, bias_significand)  # biases
    layers = former_group_layers(out)
    _check_std(std, layers)
    for src, layer, s, b in zip(former_group_layers(net), layers, std, bits):
        if layer.weight.numel():
            layer.weight.copy_(rate_aware_round(src.weight, s.to(src.weight.device), b, lam))
    return out


def _check_std(std: Sequence[torch.Tensor], layers: Sequence[nn.Module]) -> None:
    if len(std) != len(layers):
        raise ValueError(f"got {len(std)} std tensors for {len(layers)} layers: pass "
                         "kept_posterior_std(bayes_model, thresholds), one per former group layer")  # fmt: skip


class _RateAware(nn.Module):
    """Parametrization: ``w`` rate-aware rounded under a fixed table forward, the identity backward."""

    def __init__(self, table: _Table) -> None:
        super().__init__()
        self.table = table

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (self.table.round(w) - w).detach()


def train_rate_aware(net: nn.Module, bits: Sequence[LayerBits], std: Sequence[torch.Tensor], lam: float,
                     train_batches: Batches, epochs: int, lr: float = 1e-3) -> nn.Module:  # fmt: skip
    """A copy of the pruned ``net`` trained ``epochs`` on cross-entropy through its rate-aware rounding.

    As :func:`bclib.quantize.train_on_grid` (Adam, ``lr`` falling linearly to 0, straight-through
    gradients), each layer's table renewed from its float weights after every epoch. ``net`` is
    left unchanged; store ``rate_aware_quantized(copy, bits, std, lam)``.
    """
    layers = former_group_layers(net)
    check_bits(bits, layers)
    _check_std(std, layers)
    for layer, s in zip(layers, std):
        _check(layer.weight, s.to(layer.weight.device), lam)
    tables: dict[int, _Table] = {}

    def parametrization(i: int, layer: nn.Module) -> nn.Module:
        tables[i] = _Table(layer.weight, std[i], bits[i], lam)
        return _RateAware(tables[i])

    def renew(grids: list[tuple[int, nn.Module]]) -> None:
        for i, layer in grids:
            tables[i].fit(layer.parametrizations.weight.original)

    return train_through(net, train_batches, epochs, lr, parametrization, renew)
