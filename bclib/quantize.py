"""Bit widths chosen on held-out data, and weights trained onto their grid (after pruning).

The paper's rule (sec. 4, :func:`bclib.compression.bit_precision`) gives each layer the
significand bits that its posterior variance can resolve. That keeps bits below the
posterior's noise (:func:`bclib.coded.bits_below_noise`): the rounding, not the coder, is what
keeps the coded file far above the KL (chapter 10). Two steps beyond the paper close part of
that gap on a pruned network (:func:`bclib.compression.prune`):

- :func:`train_on_grid`: quantization-aware training. The forward pass rounds each former
  group layer's weights to their bits (:func:`bclib.precision.round_to_bits`), the backward
  pass treats the rounding as the identity (the straight-through estimator, Bengio et al.
  2013), so the float weights move until their rounding fits the data.
- :func:`search_bits`: greedy descent on the bit widths, from the paper's rule down. Layers
  are visited from the one with most weights; each step lowers one width (significand
  first, then exponent) by one bit and is kept if the held-out accuracy of the rounded net
  stays within ``max_drop`` of the start (the rule's bits, rounded).
- :func:`fit_bits`: the two in turn; training wins back accuracy that the next search spends.
- ``zeros`` (:func:`train_on_grid`; the ``masks`` of :func:`train_through`): the smallest share
  of a layer's weights held at zero through that training (:func:`smallest_zeroed`: single weights, inside
  the groups the priors kept), which a coded file stores in fewer bits.

Trained nets keep float ("latent") weights; the network to store is their rounding,
``compression.quantized(net, bits, bias_significand)``, which the coded file holds exactly.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .compression import LayerBits, _accuracy, check_bits, copy_pruned, former_group_layers, quantized
from .precision import round_to_bits

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
BIAS_SIGNIFICAND = 10  # float16's significand for the few dozen biases: 13 bits less each than float32


class _OnGrid(nn.Module):
    """Parametrization: ``w`` rounded to ``(exponent, significand)`` forward, the identity backward."""

    def __init__(self, bits: LayerBits) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (round_to_bits(w, self.bits.exponent, self.bits.significand) - w).detach()


class _Masked(nn.Module):
    """Parametrization: a straight-through ``rounding``, times a 0/1 ``mask`` (its zeros get no gradient)."""

    def __init__(self, rounding: nn.Module, mask: torch.Tensor) -> None:
        super().__init__()
        self.rounding, self.mask = rounding, mask

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.rounding(w) * self.mask


def smallest_zeroed(weight: torch.Tensor, fraction: float) -> torch.Tensor:
    """A 0/1 mask of ``weight``'s shape that holds its ``fraction`` of entries with the smallest
    magnitude at zero (its zeros counted, ties at the cut included): magnitude pruning of single
    weights (as in Deep Compression, Han, Mao & Dally 2016) on top of the groups."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"a fraction of weights to zero must be in [0, 1) (0.7: the smallest 70 %), got {fraction!r}")
    a = weight.detach().abs()
    k = int(fraction * a.numel())
    return torch.ones_like(a) if k == 0 else (a > a.flatten().kthvalue(k).values).to(a.dtype)


def zero_masks(net: nn.Module, zeros: Sequence[float]) -> list[torch.Tensor]:
    """:func:`smallest_zeroed` of each former group layer of ``net``, ``zeros`` giving its fraction."""
    layers = former_group_layers(net)
    if not isinstance(zeros, (list, tuple)) or len(zeros) != len(layers):
        raise ValueError(f"zeros must give one fraction per former group layer ({len(layers)}), e.g. "
                         f"[0.7] + [0] * {len(layers) - 1}; got {zeros!r:.80}")  # fmt: skip
    return [smallest_zeroed(m.weight, f) for m, f in zip(layers, zeros)]


def train_on_grid(net: nn.Module, bits: Sequence[LayerBits], train_batches: Batches, epochs: int,
                  lr: float = 1e-3, zeros: Optional[Sequence[float]] = None) -> nn.Module:  # fmt: skip
    """A copy of the pruned ``net`` trained ``epochs`` on cross-entropy through its rounding to ``bits``.

    Adam at ``lr`` falling linearly to 0 over all steps; ``net`` is left unchanged. The copy
    keeps float weights: store ``quantized(copy, bits)``. ``zeros``: per former group layer, the
    share of its smallest weights (:func:`zero_masks`) held at zero throughout, and zero in the copy.
    """
    check_bits(bits, former_group_layers(net))
    masks = None if zeros is None else zero_masks(net, zeros)
    return train_through(net, train_batches, epochs, lr, lambda i, layer: _OnGrid(bits[i]), masks=masks)


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Knowledge distillation (Hinton, Vinyals and Dean 2015): ``T^2 KL(softmax(t/T) || softmax(s/T))``
    for student logits ``s`` and teacher logits ``t``, averaged over the batch.

    The factor ``T^2`` keeps the gradient's size as ``T`` changes: it is
    ``T (softmax(s/T) - softmax(t/T)) / N``.
    """
    t = temperature
    log_q, log_p = nn.functional.log_softmax(logits / t, 1), nn.functional.log_softmax(teacher_logits / t, 1)
    return t * t * nn.functional.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def train_through(net: nn.Module, train_batches: Batches, epochs: int, lr: float,
                  rounding: Callable[[int, nn.Module], nn.Module],
                  after_epoch: Optional[Callable[[list[tuple[int, nn.Module]]], None]] = None,
                  teacher: Optional[nn.Module] = None, temperature: float = 2.0,
                  masks: Optional[Sequence[torch.Tensor]] = None) -> nn.Module:  # fmt: skip
    """The training loop of :func:`train_on_grid` through any rounding.

    ``rounding(i, layer)`` gives the parametrization of former group layer ``i``'s weight (its
    forward rounds, its gradient is the identity); ``after_epoch`` sees the ``(i, layer)`` pairs
    after every epoch. The loss is the cross-entropy with the labels, or with a ``teacher`` (put
    in eval mode: a Bayesian net predicts with its posterior means) :func:`distillation_loss`
    towards its outputs at ``temperature``. ``masks`` (one 0/1 tensor per former group layer,
    e.g. :func:`zero_masks`) multiply the rounded weights, so their zeros stay zero (an
    ``after_epoch`` may change them in place); they are zero in the copy too. Returns the
    trained copy with its float weights.
    """
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise ValueError(f"epochs must be a whole number >= 0, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch module (the network to distil from), got {type(teacher).__name__}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    out = copy_pruned(net)
    layers = former_group_layers(out)
    shapes = [tuple(m.weight.shape) for m in layers]
    if masks is not None and [tuple(m.shape) for m in masks] != shapes:
        raise ValueError(f"masks must match the former group layers' weights {shapes}, got "
                         f"{[tuple(m.shape) for m in masks]}: make them with "
                         "quantize.zero_masks(net, zeros)")  # fmt: skip
    if epochs == 0:
        return _zeroed(out, masks).eval()
    grids = [(i, layer) for i, layer in enumerate(layers) if layer.weight.numel()]
    for i, layer in grids:
        r = rounding(i, layer)
        parametrize.register_parametrization(layer, "weight", r if masks is None else _Masked(r, masks[i]))
    try:
        steps = epochs * len(train_batches)  # type: ignore[arg-type]
        opt = torch.optim.Adam(out.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: max(0.0, 1.0 - k / steps))
        out.train()
        if teacher is not None:
            teacher.eval()
        for _ in range(epochs):
            for x, y in train_batches:
                if teacher is None:
                    loss = nn.functional.cross_entropy(out(x), y)
                else:
                    with torch.no_grad():
                        target = teacher(x)
                    loss = distillation_loss(out(x), target, temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if after_epoch is not None:
                after_epoch(grids)
    finally:
        for _, layer in grids:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    return _zeroed(out, masks).eval()


@torch.no_grad()
def _zeroed(net: nn.Module, masks: Optional[Sequence[torch.Tensor]]) -> nn.Module:
    for layer, mask in zip(former_group_layers(net), masks or []):
        layer.weight.mul_(mask)
    return net


def _lowered(bits: Sequence[LayerBits], i: int, field: str) -> Optional[list[LayerBits]]:
    """``bits`` with layer ``i``'s ``field`` one lower, or None where it is at its least."""
    b = bits[i]
    if getattr(b, field) <= (0 if field == "significand" else 1):
        return None
    new = LayerBits(b.exponent - (field == "exponent"), b.significand - (field == "significand"))
    return [*bits[:i], new, *bits[i + 1 :]]


def _descend(net: nn.Module, bits: list[LayerBits], accuracy_of: Callable[[nn.Module], float], floor: float,
             passes: int) -> list[LayerBits]:  # fmt: skip
    """Greedy descent: lower one width at a time while ``quantized(net, bits)`` scores at least ``floor``."""
    sizes = [m.weight.numel() for m in former_group_layers(net)]
    for _ in range(passes):
        for i in sorted(range(len(bits)), key=lambda i: -sizes[i]):
            for field in ("significand", "exponent"):
                while (trial := _lowered(bits, i, field)) is not None:
                    if _accuracy(accuracy_of(quantized(net, trial))) < floor:
                        break
                    bits = trial
    return bits


def _check(net: nn.Module, bits: Sequence[LayerBits], accuracy_of: object, max_drop: object, passes: object) -> None:
    check_search(accuracy_of, max_drop, passes)
    check_bits(bits, former_group_layers(net))


def check_search(accuracy_of: object, max_drop: object, passes: object) -> None:
    """Clear errors for the arguments of a greedy search on held-out accuracy."""
    if not callable(accuracy_of):
        raise TypeError(f"accuracy_of must be a function of the net returning its held-out accuracy, "
                        f"got {type(accuracy_of).__name__}")  # fmt: skip
    if not (isinstance(max_drop, (int, float)) and 0.0 <= max_drop <= 1.0):
        raise ValueError(f"max_drop must be a share of accuracy between 0 and 1 (e.g. 0.001), got {max_drop!r}")
    if not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes must be a whole number >= 1, got {passes!r}")


def search_bits(net: nn.Module, bits: Sequence[LayerBits], accuracy_of: Callable[[nn.Module], float],
                max_drop: float = 0.001, passes: int = 2) -> list[LayerBits]:  # fmt: skip
    """Lower the bit widths of a pruned net while its rounding's held-out accuracy stays within ``max_drop``.

    ``bits`` is where the descent starts (``compression_report(model, thresholds).bits``) and
    the reference of ``max_drop``: the accuracy of ``quantized(net, bits)``. ``accuracy_of(net)``
    scores a plain net on held-out data (not the test set). Layers go from the one with most
    weights down, each width one bit at a time, significand before exponent, ``passes`` times.
    """
    _check(net, bits, accuracy_of, max_drop, passes)
    floor = _accuracy(accuracy_of(quantized(net, bits))) - max_drop
    return _descend(net, list(bits), accuracy_of, floor, passes)


def fit_bits(net: nn.Module, bits: Sequence[LayerBits], accuracy_of: Callable[[nn.Module], float],
             train_batches: Batches, max_drop: float = 0.001, rounds: int = 1, epochs: int = 3, lr: float = 1e-3,
             passes: int = 2,
             zeros: Optional[Sequence[float]] = None) -> tuple[nn.Module, list[LayerBits]]:  # fmt: skip
    """:func:`search_bits` and :func:`train_on_grid` (with its ``zeros``) in turn, ``rounds`` times.

    Training on the grid wins back held-out accuracy, which the next search spends on fewer
    bits; the floor stays the start's (``quantized(net, bits)``'s accuracy less ``max_drop``).
    Returns the trained net (float weights: store ``quantized(net, bits, BIAS_SIGNIFICAND)``)
    and its bits.
    """
    _check(net, bits, accuracy_of, max_drop, passes)
    if zeros is not None:
        zero_masks(net, zeros)  # a clear error before the search, not after
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a whole number >= 1, got {rounds!r}")
    floor = _accuracy(accuracy_of(quantized(net, bits))) - max_drop
    bits = list(bits)
    for _ in range(rounds):
        bits = _descend(net, bits, accuracy_of, floor, passes)
        net = train_on_grid(net, bits, train_batches, epochs, lr, zeros)
    return net, bits
