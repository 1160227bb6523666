"""From a trained Bayesian network to a small one: masks, bit precision, rates, pruning.

Pruning (paper sec. 4): group ``i`` of a layer is kept when ``log_alpha_i < threshold``, one
threshold per group layer in ``bayesian_layers`` order. What a pruned group takes with it
elsewhere (the neurons that only fed it, a filter's BatchNorm channel, the block of features
a filter hands to a fully connected layer, channels coupled by a residual add) is read from
the network's graph by :mod:`bclib.graph`, so any model ``torch.fx`` can trace compresses.

Bit precision (paper sec. 4): a weight needs the significand bits whose resolution ``2^-t``
is coarser than twice its posterior variance; a layer takes the mean over its kept weights,
rounded up. The exponent needs enough bits to span from the largest kept weight down to
the smallest one at least ``FLUSH_STD`` posterior standard deviations from zero, plus one
sign bit.
"""
from __future__ import annotations

import copy
import math
import numbers
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx
from torch import nn

from . import graph
from .convert import bayesian_layers, unwrap
from .layers import BayesianGroupLayer
from .precision import MAX_EXPONENT_BITS, MAX_SIGNIFICAND_BITS, round_to_bits

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


def _is_number(t: Any) -> bool:
    """A real number: a Python or numpy scalar, or a one-element tensor (not a bool)."""
    if isinstance(t, torch.Tensor):
        return t.numel() == 1 and not t.dtype.is_complex and t.dtype != torch.bool
    return isinstance(t, numbers.Real) and not isinstance(t, bool)


def _check_thresholds(layers: list[BayesianGroupLayer], thresholds: Sequence[float]) -> list[float]:
    if isinstance(thresholds, (str, bytes, dict)) or not hasattr(thresholds, "__len__") or not all(
        _is_number(t) for t in thresholds
    ):
        raise TypeError(f"thresholds must be a list of numbers, one log-alpha value per group layer "
                        f"(e.g. [-3.0] * {len(layers)}), got {thresholds!r:.80}")  # fmt: skip
    thresholds = [float(t) for t in thresholds]
    if len(thresholds) != len(layers):
        raise ValueError(f"got {len(thresholds)} thresholds for {len(layers)} group layers: give one log-alpha threshold per layer")
    bad = [t for t in thresholds if not math.isfinite(t)]
    if bad:
        raise ValueError(f"thresholds must be finite log-alpha values (e.g. -3.0), got {bad}")
    return thresholds


class Masks(list):
    """One :class:`LayerMask` per group layer (in ``bayesian_layers`` order), plus ``channels``:
    for each channel-wise layer (BatchNorm, depthwise convolution) with pruned channels, its
    qualified name and a boolean over its channels (see :mod:`bclib.graph` for what a pruned
    channel means)."""

    def __init__(self, layer_masks: Sequence[LayerMask], channels: dict[str, torch.Tensor]) -> None:
        super().__init__(layer_masks)
        self.channels = channels


class EmptyLayerError(ValueError):
    """The thresholds remove every input or output of a group layer (the signal would stop there)."""


@dataclass
class _Solution:
    structure: graph.Structure
    names: list[str]  # qualified name of each group layer, in bayesian_layers order
    masks: Masks
    alive: Callable[[int, int], torch.Tensor]  # (channel set, size) -> which of its channels are kept


def _solve(model: nn.Module, thresholds: Sequence[float], example_input: Optional[torch.Tensor]) -> _Solution:
    """Which groups, inputs and channels survive the thresholds, everywhere in the graph.

    A channel set is kept where some producer keeps the channel (a filter with
    ``log_alpha < threshold``, or any neuron of a fully connected layer) and some consumer
    uses it (a fully connected layer's kept input feature, or any other consumer); channels
    of sets that not only group layers produce, or that an operation needs whole, all stay.
    """
    model = unwrap(model)
    layers = _layers_of(model)
    thresholds = _check_thresholds(layers, thresholds)
    st = graph.analyse(model, example_input)
    atoms = st.atoms
    by_layer = {id(m): name for name, m in model.named_modules()}
    names = [by_layer[id(layer)] for layer in layers]
    own = {name: (layer.log_alpha < t).cpu() for name, layer, t in zip(names, layers, thresholds)}
    produced: dict[int, torch.Tensor] = {}
    used: dict[int, torch.Tensor] = {}

    def add(table: dict[int, torch.Tensor], atom: int, keep: torch.Tensor) -> None:
        root = atoms.find(atom)
        table[root] = table[root] | keep if root in table else keep.clone()

    for name, layer in zip(names, layers):
        use = st.layers.get(name)
        if use is None:  # never called in forward
            continue
        n_out = atoms.get_size(use.out_atom)
        add(produced, use.out_atom, own[name] if layer.groups_on == "outputs" else torch.ones(n_out, dtype=torch.bool))
        if layer.groups_on == "inputs":
            offset = 0
            for seg in use.in_segs:
                size = atoms.get_size(seg.atom)
                add(used, seg.atom, own[name][offset : offset + size * seg.block].view(size, seg.block).any(1))
                offset += size * seg.block

    def alive(root: int, size: int) -> torch.Tensor:
        if atoms.plain[root] or atoms.forced[root]:
            return torch.ones(size, dtype=torch.bool)
        keep = produced.get(root, torch.zeros(size, dtype=torch.bool))
        return keep if atoms.used_all[root] else keep & used.get(root, torch.zeros(size, dtype=torch.bool))

    layer_masks = []
    for name, layer in zip(names, layers):
        use = st.layers.get(name)
        if use is None:
            n_in = layer.weight_mu.shape[1]
            ins, outs = torch.ones(n_in, dtype=torch.bool), torch.ones(layer.weight_mu.shape[0], dtype=torch.bool)
            ins = own[name] if layer.groups_on == "inputs" else ins
            outs = own[name] if layer.groups_on == "outputs" else outs
        else:
            ins = st.features(use.in_segs, alive)
            ins = ins & own[name] if layer.groups_on == "inputs" else ins
            outs = alive(atoms.find(use.out_atom), atoms.get_size(use.out_atom))
        if use is not None and not (bool(ins.any()) and bool(outs.any())):
            raise EmptyLayerError(f"the thresholds leave group layer {name} with no {'inputs' if outs.any() else 'outputs'} "
                                  f"(kept {int(ins.sum())} x {int(outs.sum())}): raise its threshold or those that feed it")  # fmt: skip
        layer_masks.append(LayerMask(ins, outs))
    channels = {n: f for n, segs in st.channelwise.items() if not bool((f := st.features(segs, alive)).all())}
    return _Solution(st, names, Masks(layer_masks, channels), alive)


@torch.no_grad()
def group_masks(model: nn.Module, thresholds: Sequence[float], example_input: Optional[torch.Tensor] = None) -> Masks:
    """Per-layer input/output masks for the given ``log_alpha`` thresholds (one per group layer).

    Works on any model ``torch.fx`` can trace; the graph decides what a pruned group removes
    (:mod:`bclib.graph`). ``example_input``: one batch of inputs, where shapes must be known.
    """
    return _solve(model, thresholds, example_input).masks


_MASK_HOOKS: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


def zero_pruned_channels(keep: torch.Tensor, in_training: bool = False) -> Callable:
    """Forward hook: a channel-wise layer's pruned channels (``keep`` False) output 0, in eval
    mode, or in training mode with ``in_training`` (bclib.finetune); the other mode is untouched."""

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> Optional[torch.Tensor]:
        if module.training != in_training:
            return None
        return out * keep.to(out.device, out.dtype).view(1, -1, *([1] * (out.dim() - 2)))

    return hook


def apply_masks(model: nn.Module, masks: Optional[Sequence[LayerMask]]) -> None:
    """Zero the pruned weights, and the pruned channels of channel-wise layers, in eval mode.

    ``None`` removes the masks. With the masks of :func:`group_masks` the model gives, in
    eval mode, the outputs of ``prune(model, thresholds)``.
    """
    model = unwrap(model)
    layers = _layers_of(model)
    if masks is not None:
        _check_masks(layers, masks)
    for handle in _MASK_HOOKS.pop(model, []):
        handle.remove()
    if masks is None:
        for layer in layers:
            layer.weight_mask = layer.bias_mask = None
        return
    for layer, m in zip(layers, masks):
        dev = layer.weight_mu.device
        layer.weight_mask = m.weight_mask(layer.weight_mu.shape).to(dev)
        layer.bias_mask = m.outputs.float().to(dev)
    channels = getattr(masks, "channels", {})
    _MASK_HOOKS[model] = [model.get_submodule(name).register_forward_hook(zero_pruned_channels(keep))
                          for name, keep in channels.items()]  # fmt: skip


def _check_masks(layers: list[BayesianGroupLayer], masks: Sequence[LayerMask]) -> None:
    """One :class:`LayerMask` per group layer, as :func:`group_masks` gives them."""
    if not all(isinstance(m, LayerMask) for m in masks):
        kinds = sorted({type(m).__name__ for m in masks if not isinstance(m, LayerMask)})
        raise TypeError(f"masks must be LayerMask objects (got {', '.join(kinds)}): "
                        "pass group_masks(model, thresholds), not the thresholds themselves")  # fmt: skip
    if len(masks) != len(layers):
        raise ValueError(f"got {len(masks)} masks for {len(layers)} group layers: "
                         "pass all of group_masks(model, thresholds), one LayerMask per layer")  # fmt: skip


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
def compression_report(
    model: nn.Module, thresholds: Sequence[float], example_input: Optional[torch.Tensor] = None
) -> CompressionReport:
    """Kept architecture, bits per layer and both compression rates (weights only, as the paper).

    Counts the group layers' weights: layers left plain are neither pruned nor reduced.
    """
    layers = _layers_of(model)
    masks = group_masks(model, thresholds, example_input)
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


@torch.no_grad()
def prune(model: nn.Module, thresholds: Sequence[float], example_input: Optional[torch.Tensor] = None) -> torch.fx.GraphModule:
    """The pruned network: the model's graph with every layer cut to what it keeps.

    Group layers become ``nn.Linear``/``nn.ConvNd`` of reduced sizes with the posterior means
    ``E[w]`` as weights; BatchNorm and depthwise convolutions lose the pruned channels, plain
    layers the pruned inputs. A fully connected layer whose input features are pruned one by one
    (pixels, single features of a kept filter) is fed through ``x.index_select(-1, index)``.
    The result, a ``torch.fx.GraphModule`` of plain torch modules, gives the outputs of the
    model after ``apply_masks(model, group_masks(model, thresholds))`` in eval mode, and saves
    with ``torch.save`` and loads without bclib. Its ``bayesian_layer_names`` lists the layers
    that were group layers, in ``bayesian_layers`` order (for :func:`quantized`).
    """
    sol = _solve(model, thresholds, example_input)
    st, masks = sol.structure, dict(zip(sol.names, sol.masks))
    g = copy.deepcopy(st.gm.graph)
    g._tracer_cls = None  # else the saved net would need bclib's tracer to load
    root: dict[str, Any] = {}
    for node in list(g.nodes):
        if node.op == "get_attr":
            root[node.target] = copy.deepcopy(_attr(st.gm, node.target))
        if node.op != "call_module":
            continue
        name, m = node.target, st.gm.get_submodule(node.target)
        if name in st.layers:
            mask = masks[name]
            root[name] = m.plain(mask.inputs, mask.outputs)
            arriving = st.features(st.layers[name].in_segs, sol.alive)
            if m.groups_on == "inputs" and not bool(mask.inputs[arriving].all()):
                index = f"{name.replace('.', '_')}_kept_inputs"
                root[index] = mask.inputs[arriving].nonzero().flatten().to(m.weight_mu.device)
                with g.inserting_before(node):
                    sel = g.call_method("index_select", (node.args[0], -1, g.get_attr(index)))
                node.args = (sel, *node.args[1:])
        elif name in st.channelwise:
            root[name] = _channelwise_kept(m, st.features(st.channelwise[name], sol.alive))
        elif name in st.plain_consumers:
            root[name] = _inputs_kept(m, st.features(st.plain_consumers[name], sol.alive))
        else:
            root[name] = copy.deepcopy(m)
    net = torch.fx.GraphModule(root, g).eval()
    net.bayesian_layer_names = [n for n in sol.names if n in st.layers]
    return net


def dense(model: nn.Module, example_input: Optional[torch.Tensor] = None) -> torch.fx.GraphModule:
    """The plain network at full size with the posterior means ``E[w]``: :func:`prune` keeping every group."""
    keep_all = [layer.log_alpha.max().item() + 1.0 for layer in _layers_of(model)]
    return prune(model, keep_all, example_input)


def _attr(gm: nn.Module, target: str) -> Any:
    for part in target.split("."):
        gm = getattr(gm, part)
    return gm


def _channelwise_kept(m: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A BatchNorm or depthwise convolution restricted to the kept channels."""
    n = int(keep.sum())
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        new: nn.Module = type(m)(n, m.eps, m.momentum, m.affine, m.track_running_stats)
    else:
        new = type(m)(n, n, m.kernel_size, m.stride, m.padding, m.dilation, groups=n, bias=m.bias is not None)
    return _copy_sliced(m, new, lambda t: t[keep] if t.dim() else t)


def _inputs_kept(m: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A plain linear or convolution layer restricted to its kept inputs."""
    n = int(keep.sum())
    if isinstance(m, nn.Linear):
        new: nn.Module = nn.Linear(n, m.out_features, bias=m.bias is not None)
    else:
        new = type(m)(n, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, bias=m.bias is not None,
                      padding_mode=m.padding_mode)  # fmt: skip
    return _copy_sliced(m, new, lambda t: t[:, keep] if t.dim() > 1 else t)


def _copy_sliced(old: nn.Module, new: nn.Module, cut: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    ref = next(iter(old.state_dict().values()))
    new = new.to(ref.device)
    new.load_state_dict({k: cut(v) for k, v in old.state_dict().items()})
    return new.train(old.training)


def copy_pruned(net: nn.Module) -> nn.Module:
    """A deep copy of a pruned net that keeps :func:`prune`'s ``bayesian_layer_names`` (deepcopy drops it)."""
    names = getattr(net, "bayesian_layer_names", None)
    out = copy.deepcopy(net)
    if names is not None:
        out.bayesian_layer_names = list(names)
    return out


def former_group_layer_names(net: nn.Module) -> list[str]:
    """The names of the layers whose weights take bit widths: ``prune``'s former group layers in
    order (``net.bayesian_layer_names``) or, in a plain net of other origin, its linear and conv
    layers in order."""
    names = getattr(net, "bayesian_layer_names", None)
    if names is not None:
        return list(names)
    return [n for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]


def former_group_layers(net: nn.Module) -> list[nn.Module]:
    """The modules of :func:`former_group_layer_names`, in order."""
    return [net.get_submodule(n) for n in former_group_layer_names(net)]


def check_bits(bits: Any, layers: Sequence[nn.Module]) -> None:
    """A clear error unless ``bits`` holds one :class:`LayerBits` per layer of ``layers``."""
    if not all(isinstance(b, LayerBits) for b in bits):
        raise TypeError(f"bits must be LayerBits (exponent, significand), got {bits!r:.80}: "
                        "pass compression_report(model, thresholds).bits")  # fmt: skip
    if len(bits) != len(layers):
        raise ValueError(f"got {len(bits)} bit widths for {len(layers)} layers: "
                         "pass compression_report(model, thresholds).bits, one LayerBits per former group layer")  # fmt: skip


@torch.no_grad()
def quantized(net: nn.Module, bits: Sequence[LayerBits], bias_significand: Optional[int] = None) -> nn.Module:
    """A copy of a pruned net (:func:`prune`) with each former group layer's weights rounded to its bits.

    With ``bias_significand`` their biases round too, to that many significand bits (within
    float32's exponent range); the coded file (:mod:`bclib.coded`) stores them in that many bits.
    """
    net = copy_pruned(net)
    layers = former_group_layers(net)
    check_bits(bits, layers)
    for layer, b in zip(layers, bits):
        if layer.weight.numel():
            layer.weight.copy_(round_to_bits(layer.weight, b.exponent, b.significand))
        if bias_significand is not None and layer.bias is not None and layer.bias.numel():
            layer.bias.copy_(round_to_bits(layer.bias, MAX_EXPONENT_BITS, bias_significand))
    return net


def _accuracy(acc: Any) -> float:
    """``acc`` as a float in [0, 1]; a clear ``ValueError`` for anything else (None, NaN, 5.0, 97.5, ...)."""
    value = float(acc) if _is_number(acc) else math.nan
    if not 0.0 <= value <= 1.0:
        hint = " (a percentage? divide by 100)" if 1.0 < value <= 100.0 else ""
        raise ValueError(f"accuracy_of must return an accuracy between 0 and 1 (a float), got {acc!r:.80}{hint}")
    return value


def _check_search_arguments(accuracy_of: Any, max_drop: Any, candidates: Any, passes: Any) -> None:
    if not callable(accuracy_of):
        raise TypeError(f"accuracy_of must be a function of the pruned net returning its accuracy, got "
                        f"{type(accuracy_of).__name__}: e.g. lambda net: evaluate(net, validation_batches)")  # fmt: skip
    if not _is_number(max_drop) or not 0.0 <= float(max_drop) <= 1.0:
        raise ValueError(f"max_drop must be a share of accuracy between 0 and 1 (e.g. 0.003 for 0.3 points), got {max_drop!r}")
    for name, value, least in (("candidates", candidates, 2), ("passes", passes, 1)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be a whole number, at least {least}, got {value!r}")


@torch.no_grad()
def search_thresholds(
    model: nn.Module,
    accuracy_of: Callable[[nn.Module], float],
    max_drop: float = 0.003,
    candidates: int = 24,
    passes: int = 2,
    example_input: Optional[torch.Tensor] = None,
    start: Optional[Sequence[float]] = None,
) -> list[float]:
    """Greedy per-layer thresholds: prune as much as keeps accuracy within ``max_drop`` of the unpruned net.

    ``accuracy_of(net)`` scores a pruned plain network (use held-out data, not the test set).
    Layers are visited from the one with most weights down. For each, the number of kept
    groups is lowered along ``candidates`` quantiles of its ``log_alpha`` while the accuracy
    stays within budget, then bisected between the last count within budget and the first
    beyond it, to the single group. ``example_input`` as for :func:`prune`. Each threshold lies midway between two groups'
    ``log_alpha``, so rounding it changes nothing; every layer keeps at least one group.
    ``start``: thresholds to prune further from (a subset of their groups is kept), with the
    budget counted from the net they prune, not the unpruned one: a second round after
    fine-tuning.
    """
    layers = _layers_of(model)
    _check_search_arguments(accuracy_of, max_drop, candidates, passes)
    start = None if start is None else _check_thresholds(layers, start)

    def score(net: nn.Module) -> float:
        return _accuracy(accuracy_of(net))

    if start is None:
        base = score(dense(model, example_input))
        thresholds = [layer.log_alpha.max().item() + 1.0 for layer in layers]
    else:
        base, thresholds = score(prune(model, start, example_input)), start
    order = sorted(range(len(layers)), key=lambda i: -layers[i].weight_mu.numel())
    for _ in range(passes):
        for i in order:
            la = layers[i].log_alpha.detach().float().cpu().sort().values
            cut = lambda k: (la[k] + la[k - 1]).item() / 2  # noqa: E731  keeps the k groups of smallest log_alpha

            def within_budget(k: int) -> bool:
                trial = thresholds[:i] + [cut(k)] + thresholds[i + 1 :]
                try:
                    return score(prune(model, trial, example_input)) >= base - max_drop
                except EmptyLayerError:  # the kept groups of two layers no longer meet
                    return False

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
