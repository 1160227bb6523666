"""From a trained Bayesian network to a small one: masks, bit precision, rates, pruning.

Pruning (paper sec. 4): group ``i`` of a layer is kept when ``log_alpha_i < threshold``.
Removing a group also removes what only fed it: a pruned input neuron of layer ``l+1`` is
a pruned output neuron of layer ``l``; a pruned filter of a conv layer removes that input
channel of the next conv layer, or that channel's block of features of the next linear
layer (the conv -> fc hand-over); a filter whose features are all pruned downstream goes too.

Bit precision (paper sec. 4): a weight needs the significand bits whose resolution ``2^-t``
is coarser than twice its posterior variance; a layer takes the mean over its kept weights,
rounded up. The exponent needs enough bits to span from the largest kept weight down to
that resolution, plus one sign bit.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.fx
from torch import nn

from .layers import BayesianGroupLayer, _ConvNdGroup, _LinearGroup
from .models import bayesian_layers
from .precision import MAX_EXPONENT_BITS, MAX_SIGNIFICAND_BITS

FLOAT_BITS = 32
# Weights within FLUSH_STD posterior std of zero may be stored as zero (bit_precision). Our
# choice: at 1 std the group horseshoe's LeNet-5 lost 1.3 points of test error, at 0.5 none.
FLUSH_STD = 0.5


@dataclass
class LayerMask:
    """Boolean masks over a layer's inputs (features or channels) and outputs (neurons or filters)."""

    inputs: torch.Tensor
    outputs: torch.Tensor

    def weight_mask(self, weight_shape: torch.Size) -> torch.Tensor:
        m = self.outputs[:, None].float() * self.inputs[None, :].float()
        return m.view(*m.shape, *([1] * (len(weight_shape) - 2))).expand(weight_shape)

    @property
    def kept(self) -> tuple[int, int]:
        return int(self.inputs.sum()), int(self.outputs.sum())


def _layers_of(model: nn.Module) -> list[BayesianGroupLayer]:
    layers = bayesian_layers(model)
    if not layers:
        raise TypeError(
            f"{type(model).__name__} has no Bayesian group layers: compression needs a network built "
            "with bclib.layers (e.g. bclib.models.to_bayesian(net)) and trained with the variational objective"
        )
    return layers


def _check_thresholds(layers: list[BayesianGroupLayer], thresholds: Sequence[float]) -> list[float]:
    thresholds = [float(t) for t in thresholds]
    if len(thresholds) != len(layers):
        raise ValueError(f"got {len(thresholds)} thresholds for {len(layers)} group layers: give one log-alpha threshold per layer")
    bad = [t for t in thresholds if not math.isfinite(t)]
    if bad:
        raise ValueError(f"thresholds must be finite log-alpha values (e.g. -3.0), got {bad}")
    return thresholds


@torch.no_grad()
def group_masks(model: nn.Module, thresholds: Sequence[float]) -> list[LayerMask]:
    """Per-layer input/output masks for the given ``log_alpha`` thresholds (one per group layer)."""
    layers = _layers_of(model)
    thresholds = _check_thresholds(layers, thresholds)
    keep = [(layer.log_alpha < t).cpu() for layer, t in zip(layers, thresholds)]
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    for layer, k in zip(layers, keep):
        linear = isinstance(layer, _LinearGroup)
        ins.append(k.clone() if linear else torch.ones(layer.in_channels, dtype=torch.bool))
        outs.append(torch.ones(layer.out_features, dtype=torch.bool) if linear else k.clone())
    # Hand over between consecutive layers, last to first so that removals propagate upstream.
    for i in range(len(layers) - 2, -1, -1):
        n_out = outs[i].numel()
        if ins[i + 1].numel() % n_out:
            raise ValueError(f"layer {i + 1} has {ins[i + 1].numel()} inputs, not a multiple of layer {i}'s {n_out} outputs")
        block = ins[i + 1].numel() // n_out  # features per channel (1 unless conv -> linear)
        alive = outs[i] & ins[i + 1].view(n_out, block).any(1)
        outs[i] = alive
        ins[i + 1] = ins[i + 1] & alive.repeat_interleave(block)
    return [LayerMask(i, o) for i, o in zip(ins, outs)]


def apply_masks(model: nn.Module, masks: Optional[Sequence[LayerMask]]) -> None:
    """Zero the pruned weights in eval mode (``None`` removes the masks)."""
    layers = _layers_of(model)
    if masks is None:
        for layer in layers:
            layer.weight_mask = layer.bias_mask = None
        return
    for layer, m in zip(layers, masks):
        dev = layer.weight_mu.device
        layer.weight_mask = m.weight_mask(layer.weight_mu.shape).to(dev)
        layer.bias_mask = m.outputs.float().to(dev)


def _kept(t: torch.Tensor, m: LayerMask) -> torch.Tensor:
    return t[m.outputs][:, m.inputs]


@dataclass
class LayerBits:
    """Bits per kept weight of one layer: 1 sign + ``exponent`` + ``significand``."""

    exponent: int
    significand: int

    @property
    def total(self) -> int:
        return 1 + self.exponent + self.significand


def significand_bits(variance: torch.Tensor) -> torch.Tensor:
    """Per weight: the number of ``t`` in 1..23 with ``2 Var(w) < 2^-t`` (bits the posterior can resolve)."""
    t = torch.arange(1, MAX_SIGNIFICAND_BITS + 1, dtype=torch.float64)
    return (2.0 * variance.double().reshape(-1, 1) < torch.pow(2.0, -t)).sum(1)


def exponent_bits(max_abs: float, min_abs: float) -> int:
    """Exponent bits for the magnitudes ``min_abs .. max_abs`` that must survive rounding.

    The exponents in use run from ``floor(log2 max_abs)`` down to ``floor(log2 min_abs)``:
    ``L`` values, plus one code for zero (see :mod:`bclib.precision`), so ``ceil(log2(L + 1))``
    bits. Smaller weights flush to zero.

    The public tutorial's ``ceil(log2(log2(max|w|) + 1) + 1)`` counts only the bits of the
    largest exponent; under a decoder like ours it sets most small weights to zero.
    """
    if not max_abs > 0:
        return 1
    low = min_abs if 0 < min_abs <= max_abs else max_abs
    levels = math.floor(math.log2(max_abs)) - math.floor(math.log2(low)) + 1
    return max(1, math.ceil(math.log2(levels + 1)))


@torch.no_grad()
def bit_precision(model: nn.Module, masks: Sequence[LayerMask]) -> list[LayerBits]:
    """Per layer, the bits that the posterior of its kept weights justifies (paper sec. 4).

    Significand: :func:`significand_bits` averaged over the layer and rounded up. Exponent:
    enough range for every weight whose posterior mean lies at least ``FLUSH_STD`` posterior
    standard deviations from zero; only weights closer to zero than that may flush to zero.
    """
    out = []
    for layer, m in zip(_layers_of(model), masks):
        var = _kept(layer.posterior_weight_variance().cpu(), m)
        mag = _kept(layer.posterior_weight_mean().cpu(), m).abs()
        if var.numel() == 0:
            out.append(LayerBits(0, 0))
            continue
        sig = math.ceil(significand_bits(var).double().mean().item())
        distinct = mag[(mag > 0) & (mag >= FLUSH_STD * var.sqrt())]
        low = distinct.min().item() if distinct.numel() else mag.max().item()
        out.append(LayerBits(min(exponent_bits(mag.max().item(), low), MAX_EXPONENT_BITS), sig))
    return out


@dataclass
class CompressionReport:
    """What pruning and precision reduction achieve (paper Table 1's columns)."""

    architecture: list[tuple[int, int]]  # kept (inputs, outputs) per layer
    weights_before: int
    weights_kept: int
    bits: list[LayerBits]
    rate_pruning: float
    rate_precision: float

    def as_dict(self) -> dict:
        return {
            "architecture": [list(a) for a in self.architecture],
            "weights_before": self.weights_before,
            "weights_kept": self.weights_kept,
            "bits": [[b.exponent, b.significand] for b in self.bits],
            "rate_pruning": self.rate_pruning,
            "rate_precision": self.rate_precision,
        }


@torch.no_grad()
def compression_report(model: nn.Module, thresholds: Sequence[float]) -> CompressionReport:
    """Kept architecture, bits per layer and both compression rates (weights only, as the paper)."""
    layers = _layers_of(model)
    masks = group_masks(model, thresholds)
    bits = bit_precision(model, masks)
    before = sum(layer.weight_mu.numel() for layer in layers)
    kept_per_layer = [int(_kept(layer.weight_mu, m).numel()) for layer, m in zip(layers, masks)]
    kept = sum(kept_per_layer)
    stored_bits = sum(k * b.total for k, b in zip(kept_per_layer, bits))
    return CompressionReport(
        architecture=[m.kept for m in masks],
        weights_before=before,
        weights_kept=kept,
        bits=bits,
        rate_pruning=before / max(kept, 1),
        rate_precision=FLOAT_BITS * before / max(stored_bits, 1),
    )


class _SelectInputs(nn.Module):
    """Keeps the input features that a linear layer still uses (inlined by torch.fx)."""

    def __init__(self, index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(-1, self.index)


@torch.no_grad()
def prune(model: nn.Sequential, thresholds: Sequence[float]) -> torch.fx.GraphModule:
    """The pruned network as plain torch modules (``nn.Linear``/``nn.ConvNd`` of reduced sizes).

    Weights are the posterior means ``E[w]``. The result, a ``torch.fx.GraphModule`` that
    holds only ``torch.nn`` layers (plus an ``index_select`` before a linear layer whose
    input features were pruned individually: pixels, or single features of a kept conv filter), gives the outputs of the masked Bayesian model in eval mode
    and can be saved with ``torch.save`` and loaded without bclib.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"prune needs an nn.Sequential of layers, got {type(model).__name__}")
    layers = _layers_of(model)
    masks = group_masks(model, thresholds)
    by_id = {id(layer): m for layer, m in zip(layers, masks)}
    modules: list[nn.Module] = []
    prev: Optional[LayerMask] = None
    for mod in model:
        m = by_id.get(id(mod))
        if m is None:
            if any(isinstance(s, BayesianGroupLayer) for s in mod.modules()):
                raise TypeError("prune supports group layers directly inside the nn.Sequential, not nested")
            modules.append(copy.deepcopy(mod))
            continue
        # Features arriving here: the previous layer's kept outputs (times pixels per channel).
        arriving = torch.ones_like(m.inputs)
        if prev is not None:
            arriving = prev.outputs.repeat_interleave(m.inputs.numel() // prev.outputs.numel())
        used = m.inputs[arriving]
        if not bool(used.all()):
            modules.append(_SelectInputs(used.nonzero().flatten().to(mod.weight_mu.device)))
        modules.append(_plain_layer(mod, m))
        prev = m
    return torch.fx.symbolic_trace(nn.Sequential(*modules).eval())


def _plain_layer(layer: BayesianGroupLayer, m: LayerMask) -> nn.Module:
    w = _kept(layer.posterior_weight_mean(), m)
    b = layer.posterior_bias_mean()
    n_in, n_out = m.kept
    if isinstance(layer, _LinearGroup):
        plain: nn.Module = nn.Linear(n_in, n_out, bias=b is not None)
    else:
        assert isinstance(layer, _ConvNdGroup)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[layer._dims]
        plain = conv(n_in, n_out, layer.kernel_size, layer.stride, layer.padding, layer.dilation, bias=b is not None)
    plain = plain.to(device=w.device, dtype=w.dtype)
    plain.weight.copy_(w)
    if b is not None:
        plain.bias.copy_(b[m.outputs])
    return plain


@torch.no_grad()
def search_thresholds(
    model: nn.Sequential,
    accuracy_of: Callable[[nn.Module], float],
    max_drop: float = 0.003,
    candidates: int = 24,
    passes: int = 2,
) -> list[float]:
    """Greedy per-layer thresholds: prune as much as keeps accuracy within ``max_drop`` of the unpruned net.

    ``accuracy_of(net)`` scores a pruned plain network (use held-out data, not the test set).
    Layers are visited from the one with most weights down. For each, the number of kept
    groups is lowered along ``candidates`` quantiles of its ``log_alpha`` while the accuracy
    stays within budget, then bisected between the last count within budget and the first
    beyond it, to the single group. Each threshold lies midway between two groups'
    ``log_alpha``, so rounding it changes nothing; every layer keeps at least one group.
    """
    layers = _layers_of(model)
    keep_all = [layer.log_alpha.max().item() + 1.0 for layer in layers]
    base = accuracy_of(prune(model, keep_all))
    thresholds = list(keep_all)
    order = sorted(range(len(layers)), key=lambda i: -layers[i].weight_mu.numel())
    for _ in range(passes):
        for i in order:
            la = layers[i].log_alpha.detach().float().cpu().sort().values
            cut = lambda k: (la[k] + la[k - 1]).item() / 2  # noqa: E731  keeps the k groups of smallest log_alpha

            def within_budget(k: int) -> bool:
                trial = thresholds[:i] + [cut(k)] + thresholds[i + 1 :]
                return accuracy_of(prune(model, trial)) >= base - max_drop

            good = int((la < thresholds[i]).sum())  # groups kept now
            grid = torch.quantile(torch.arange(len(la), dtype=torch.float), torch.linspace(1.0, 0.0, candidates))
            bad = None
            for k in sorted({int(k) for k in grid.long().clamp(min=1)}, reverse=True):
                if k >= good:
                    continue
                if not within_budget(k):
                    bad = k
                    break
                good = k
            while bad is not None and good - bad > 1:
                mid = (good + bad) // 2
                good, bad = (mid, bad) if within_budget(mid) else (good, mid)
            if good < len(la):
                thresholds[i] = cut(good)
    return thresholds
