"""Uniform grids: each layer's weights rounded to whole multiples of one step, for the coded file.

The paper's bit precision (sec. 4; :mod:`bclib.precision`) rounds a weight to a floating-point
grid: ``E`` exponent bits and ``S`` significand bits, so the grid is fine near zero and coarse
for the large weights. Once the file is entropy-coded (:mod:`bclib.coded`), a grid is paid
for by the entropy of its values, not by its width, and a uniform grid ``step * n`` (``n`` an
integer) is the classical choice: entropy-coded uniform scalar quantization comes within
about 0.25 bits per weight of the rate-distortion bound of a memoryless source at high rates
(Gish & Pierce, 1968), where a floating-point grid spends its levels on small weights whose
rounding matters little. On the fine-tuned LeNets, at the same level and held-out budget, the
coded files are 0.61 (LeNet-300-100) and 0.86 (LeNet-5-Caffe) times those of bits fitted by
:mod:`bclib.quantize`, at the same test error (medians; ``python -m bclib.reproduce --grid``,
chapter 10.11).

- :class:`GridStep`: a layer's step (a float32 value; the file stores it exactly).
- :func:`on_steps`: a pruned net with its former group layers rounded to their steps.
- :func:`search_steps`: per layer the coarsest step, on a ladder ``rms(w) 2^(j/4)``, whose
  rounding keeps the held-out accuracy within ``max_drop`` (as :func:`bclib.quantize.search_bits`).
- :func:`fit_steps`: the search and training through the rounding (straight-through
  gradients, :func:`bclib.quantize.train_through`) in turn, as :func:`bclib.quantize.fit_bits`.

``bclib.coded.encode_network`` takes a :class:`GridStep` in place of a layer's ``LayerBits``
and codes its integers ``n`` under an adaptive model (format version 3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .compression import _accuracy, copy_pruned, former_group_layers
from .precision import MAX_EXPONENT_BITS, round_to_bits
from .quantize import Batches, check_search, train_through, zero_masks

LADDER = 4  # rungs per doubling of the step
FINEST, COARSEST = -4 * LADDER, 4 * LADDER  # rungs: steps from rms(w) / 16 to 16 rms(w)


@dataclass(frozen=True)
class GridStep:
    """A layer's weights on the grid ``step * n``, ``n`` a whole number; ``step`` is kept as a float32 value."""

    step: float

    def __post_init__(self) -> None:
        if not (isinstance(self.step, (int, float)) and math.isfinite(self.step) and self.step > 0):
            raise ValueError(f"a grid step must be a positive finite number, got {self.step!r}")
        f32 = float(np.float32(self.step))
        if not (math.isfinite(f32) and f32 > 0):
            raise ValueError(f"a grid step must be a positive float32 value, got {self.step!r}")
        object.__setattr__(self, "step", f32)


def round_to_step(w: torch.Tensor, step: GridStep) -> torch.Tensor:
    """``step * round(w / step)`` (ties to even), in ``w``'s type: what the coded file stores."""
    d = torch.tensor(step.step, dtype=w.dtype, device=w.device)
    return torch.round(w / d) * d


def check_steps(steps: object, layers: Sequence[nn.Module]) -> None:
    """A clear error unless ``steps`` holds one :class:`GridStep` per layer of ``layers``."""
    if not isinstance(steps, (list, tuple)) or not all(isinstance(s, GridStep) for s in steps):
        raise TypeError(f"steps must be a list of GridStep, one per former group layer, got {steps!r:.80}")
    if len(steps) != len(layers):
        raise ValueError(f"got {len(steps)} grid steps for {len(layers)} layers: give one GridStep per former group layer")


@torch.no_grad()
def on_steps(net: nn.Module, steps: Sequence[GridStep], bias_significand: Optional[int] = None) -> nn.Module:
    """A copy of a pruned net with each former group layer's weights rounded to its step.

    With ``bias_significand`` the biases round to that many significand bits, as
    :func:`bclib.compression.quantized` does; the coded file stores them in that many bits.
    """
    net = copy_pruned(net)
    layers = former_group_layers(net)
    check_steps(steps, layers)
    for layer, s in zip(layers, steps):
        layer.weight.copy_(round_to_step(layer.weight, s))
        if bias_significand is not None and layer.bias is not None and layer.bias.numel():
            layer.bias.copy_(round_to_bits(layer.bias, MAX_EXPONENT_BITS, bias_significand))
    return net


class _OnStep(nn.Module):
    """Parametrization: ``w`` rounded to the step forward, the identity backward (straight-through)."""

    def __init__(self, step: GridStep) -> None:
        super().__init__()
        self.step = step

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (round_to_step(w, self.step) - w).detach()


def train_on_steps(net: nn.Module, steps: Sequence[GridStep], train_batches: Batches, epochs: int,
                   lr: float = 1e-3, teacher: Optional[nn.Module] = None,
                   zeros: Optional[Sequence[float]] = None) -> nn.Module:  # fmt: skip
    """A copy of the pruned ``net`` trained ``epochs`` through its rounding to ``steps``
    (as :func:`bclib.quantize.train_on_grid`, ``zeros`` too; with a ``teacher``, distilled from
    its outputs: :func:`bclib.quantize.train_through`); store ``on_steps(copy, steps, ...)``."""
    check_steps(steps, former_group_layers(net))
    masks = None if zeros is None else zero_masks(net, zeros)
    return train_through(net, train_batches, epochs, lr, lambda i, layer: _OnStep(steps[i]), teacher=teacher,
                         masks=masks)  # fmt: skip


def _rms(w: torch.Tensor) -> float:
    return float(w.detach().float().pow(2).mean().sqrt()) if w.numel() else 1.0


def _rung_steps(net: nn.Module, rungs: Sequence[int]) -> list[GridStep]:
    return [GridStep(max(_rms(m.weight), 1e-30) * 2.0 ** (j / LADDER)) for m, j in zip(former_group_layers(net), rungs)]


def _ascend(net: nn.Module, rungs: list[int], accuracy_of: Callable[[nn.Module], float], floor: float,
            passes: int) -> list[int]:  # fmt: skip
    """Greedy: coarsen one layer's step a rung at a time while ``on_steps`` scores at least ``floor``."""
    sizes = [m.weight.numel() for m in former_group_layers(net)]
    for _ in range(passes):
        for i in sorted(range(len(rungs)), key=lambda i: -sizes[i]):
            while rungs[i] < COARSEST:
                trial = [*rungs[:i], rungs[i] + 1, *rungs[i + 1 :]]
                if _accuracy(accuracy_of(on_steps(net, _rung_steps(net, trial)))) < floor:
                    break
                rungs = trial
    return rungs


def _start(net: nn.Module, accuracy_of: Callable[[nn.Module], float], max_drop: float) -> tuple[list[int], float]:
    """Every layer on the finest rung, and the floor: that rounding's accuracy less ``max_drop``."""
    rungs = [FINEST] * len(former_group_layers(net))
    return rungs, _accuracy(accuracy_of(on_steps(net, _rung_steps(net, rungs)))) - max_drop


def search_steps(net: nn.Module, accuracy_of: Callable[[nn.Module], float], max_drop: float = 0.001,
                 passes: int = 2) -> list[GridStep]:  # fmt: skip
    """Coarsen the grid steps of a pruned net while its rounding's held-out accuracy stays within ``max_drop``.

    Every layer starts at ``rms(w) / 16``, whose rounding's accuracy is the reference; layers
    go from the one with most weights down, a rung (a factor ``2^(1/4)``) at a time, ``passes``
    times. ``accuracy_of(net)`` scores a plain net on held-out data (not the test set).
    """
    check_search(accuracy_of, max_drop, passes)
    rungs, floor = _start(net, accuracy_of, max_drop)
    return _rung_steps(net, _ascend(net, rungs, accuracy_of, floor, passes))


def fit_steps(net: nn.Module, accuracy_of: Callable[[nn.Module], float], train_batches: Batches,
              max_drop: float = 0.001, rounds: int = 1, epochs: int = 3, lr: float = 1e-3,
              passes: int = 2, teacher: Optional[nn.Module] = None,
              zeros: Optional[Sequence[float]] = None) -> tuple[nn.Module, list[GridStep]]:  # fmt: skip
    """:func:`search_steps` and :func:`train_on_steps` (with its ``teacher`` and ``zeros``) in
    turn, ``rounds`` times (as :func:`bclib.quantize.fit_bits`; the floor stays the start's).
    Returns the trained net (float weights: store ``on_steps(net, steps,
    quantize.BIAS_SIGNIFICAND)``) and its steps."""
    check_search(accuracy_of, max_drop, passes)
    if zeros is not None:
        zero_masks(net, zeros)  # a clear error before the search, not after
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a whole number >= 1, got {rounds!r}")
    rungs, floor = _start(net, accuracy_of, max_drop)
    for _ in range(rounds):
        rungs = _ascend(net, rungs, accuracy_of, floor, passes)
        steps = _rung_steps(net, rungs)
        net = train_on_steps(net, steps, train_batches, epochs, lr, teacher, zeros)
    return net, steps
