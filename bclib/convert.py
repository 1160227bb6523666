"""From any plain network to a Bayesian one, and the questions asked of its group layers.

:func:`to_bayesian` swaps every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` of a module, however
deeply nested, for a group layer (:mod:`bclib.layers`) whose posterior means start at the
plain layer's weights: the paper starts its Bayesian nets from pretrained ones this way.
"""
from __future__ import annotations

import copy
import warnings
from typing import Iterable, Optional

import torch
from torch import nn

from .layers import BayesianGroupLayer, ConvGroup, LinearGroup
from .scales import PRIORS

_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
# Layers with weights that have no group layer: reported as left plain.
_WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd, nn.Bilinear, nn.Embedding)


class ConversionWarning(UserWarning):
    """``to_bayesian`` left layers with weights plain (``strict=True`` raises instead)."""


def _why_plain(m: nn.Module) -> Optional[str]:
    """Why ``m`` cannot become a group layer, or None if it can."""
    if type(m) is nn.Linear:
        return None
    if type(m) in _CONV_DIMS:
        if m.groups != 1:
            return f"groups={m.groups} (group layers need groups=1)"
        if m.padding_mode != "zeros":
            return f"padding_mode={m.padding_mode!r} (group layers pad with zeros)"
        return None
    return f"no group layer for {type(m).__name__}"


def _weights_read_directly(model: nn.Module) -> set[str]:
    """Modules whose parameters the surrounding code reads itself, e.g. an attention block's
    ``F.linear(x, self.qkv.weight)``: a group layer has no ``weight`` to give. Tracing the plain
    model shows them as ``get_attr`` nodes; a model fx cannot trace is not checked."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # tracing is only a check here: prune reports untraceable models
        return set()
    return {n.target.rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr"}


def _group_layer(m: nn.Module, prior: str, **kw) -> BayesianGroupLayer:
    kw.update(bias=m.bias is not None, prior=prior, init_weight=m.weight, init_bias=m.bias)
    if isinstance(m, nn.Linear):
        layer: BayesianGroupLayer = LinearGroup(m.in_features, m.out_features, **kw)
    else:
        layer = ConvGroup(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                          dims=_CONV_DIMS[type(m)], **kw)  # fmt: skip
    return layer.to(device=m.weight.device, dtype=m.weight.dtype)


def to_bayesian(
    model: nn.Module,
    prior: str = "nj",
    clip_var: Optional[float] = 0.04,
    tau0: float = 1e-5,
    keep_plain: Iterable[str] = (),
    strict: bool = False,
    variance_dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """A copy of ``model`` with each ``nn.Linear`` and ``nn.Conv1d/2d/3d`` made a group layer.

    Args:
        model: any ``nn.Module``; it is not changed.
        prior: a name in ``bclib.scales.PRIORS`` ("nj" for BC-GNJ, "hs" for BC-GHS).
        clip_var: caps the weight variance of the *first* converted layer only (in
            registration order), as the public tutorial does; None for no cap.
        tau0: the horseshoe's global scale.
        keep_plain: qualified module names (as in ``model.named_modules()``) to leave plain,
            with everything inside them (e.g. ``["fc"]`` or ``"fc"`` for a ResNet's last layer).
        strict: raise ``ValueError`` instead of warning when a layer with weights cannot be
            converted (grouped or circular-padded convolutions, transposed convolutions,
            subclasses of ``nn.Linear`` such as attention's projections, embeddings, layers
            whose weights the surrounding code reads itself).
        variance_dtype: the group layers' ``variance_dtype`` (:mod:`bclib.layers`), e.g.
            ``torch.bfloat16`` for cheaper training products; None: the model's own type.

    The posterior means start at the plain weights and biases. Layers left plain are listed
    in a :class:`ConversionWarning` with the reason; a model with no layer to convert is a
    ``ValueError`` (there would be nothing to compress).
    """
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}: use one of {sorted(PRIORS)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_bayesian needs an nn.Module, got {type(model).__name__}: pass the network itself "
                        "(load a state_dict into its network first)")  # fmt: skip
    keep = {keep_plain} if isinstance(keep_plain, str) else set(keep_plain)
    names = {name for name, _ in model.named_modules()}
    if keep - names:
        raise ValueError(f"keep_plain names {sorted(keep - names)} are not modules of the model; "
                         f"names look like {sorted(n for n in names if n)[:5]}")  # fmt: skip
    if isinstance(model, BayesianGroupLayer) or any(isinstance(m, BayesianGroupLayer) for m in model.modules()):
        raise ValueError("the model already has Bayesian group layers: convert the plain network")
    read_directly = _weights_read_directly(model)
    net = copy.deepcopy(model)
    left: list[str] = []
    first = True  # no layer converted yet

    def convert(parent: nn.Module, prefix: str) -> None:
        nonlocal first
        for child_name, child in parent.named_children():
            name = f"{prefix}{child_name}"
            if name in keep:
                continue
            why = _why_plain(child) if isinstance(child, _WEIGHTED) else "container"
            if why is None and name in read_directly:
                why = "the surrounding forward reads its weight directly"
            if why is None:
                extra = {"clip_var": clip_var if first else None, "tau0": tau0, "variance_dtype": variance_dtype}
                setattr(parent, child_name, _group_layer(child, prior, **extra))
                first = False
            elif why == "container":
                convert(child, name + ".")
            else:
                left.append(f"{name or type(child).__name__} ({why})")

    if isinstance(net, _WEIGHTED):  # a single layer
        holder = nn.Sequential(net)
        convert(holder, "")
        net = holder[0]
    else:
        convert(net, "")
    if first:
        found = f" (left plain: {'; '.join(left)})" if left else ""
        kept = f" not named in keep_plain={sorted(keep)}" if keep else ""
        raise ValueError(f"to_bayesian found no layer to convert in {type(model).__name__}{found}: it converts "
                         f"nn.Linear or nn.Conv1d/2d/3d layers (groups=1, zero padding){kept}")  # fmt: skip
    if left:
        msg = f"to_bayesian left {len(left)} layer(s) with weights plain: " + "; ".join(left)
        if strict:
            raise ValueError(msg + ". Pass keep_plain=[...] to keep them plain on purpose, or strict=False.")
        warnings.warn(msg + ". They are neither pruned nor reduced; pass keep_plain=[...] to keep them plain on purpose "
                      "(silences this warning), or strict=True to make it an error.", ConversionWarning, stacklevel=2)  # fmt: skip
    return net


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside ``nn.DataParallel`` / ``DistributedDataParallel`` wrappers (else ``model``)."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def bayesian_layers(model: nn.Module) -> list[BayesianGroupLayer]:
    """The group layers of ``model`` in registration order (``model.modules()``), each once.

    This is the order in which thresholds (one ``log_alpha`` per layer), masks and bit widths
    are given everywhere in bclib. For the networks of :mod:`bclib.models` it is the forward order.
    """
    return [m for m in model.modules() if isinstance(m, BayesianGroupLayer)]


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """``KL(q || p)`` summed over all group layers of ``model`` (paper eq. 7's KL term; 0 for a plain net)."""
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
