"""Fine-tuning after pruning: more variational training with the pruned groups held at zero.

The paper prunes a trained posterior once (groups with ``log alpha_i`` above a threshold,
sec. 4) and stops. Here the pruned network trains on, a few epochs, on the same objective
(negative ELBO, ``CE + KL / N``, KL weight 1, :func:`bclib.train.train`), so the kept groups
can take over the work of the pruned ones. The pruned groups stay exactly pruned:

- in training, each group layer draws its scales ``z ~ q(z)`` as always and sets ``z_i = 0``
  for every group ``i`` the masks drop (``BayesianGroupLayer.group_keep``): an input neuron of a
  fully connected layer, a filter of a convolution (its bias included, as ``z_f`` scales the
  filter's whole output), so nothing of a pruned group reaches the loss; channel-wise layers
  (BatchNorm) output 0 on pruned channels, as :func:`bclib.compression.apply_masks` does in eval;
- in eval mode the masks of :func:`bclib.compression.apply_masks` apply, so the model is the
  pruned network in both modes;
- afterwards :func:`thresholds_keeping` finds ``log alpha`` thresholds with which ``prune`` and
  ``compression_report`` keep exactly the fixed groups, or raises :class:`FixedPruningError`.

The groups that a mask drops receive no gradient from the data, only from the KL, which
drives their posterior towards the prior, so their ``log alpha`` only grows; the kept groups'
``log alpha`` may move either way, which is why the thresholds are checked, not assumed.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from . import compression
from .compression import LayerMask, Masks
from .convert import bayesian_layers, unwrap
from .layers import BayesianGroupLayer
from .train import train

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
_TRAINING_HOOKS: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


class FixedPruningError(ValueError):
    """No ``log alpha`` thresholds keep exactly the fixed groups (a kept group's ``log alpha``
    rose to or above that of a pruned one that the graph does not remove anyway)."""


def kept_groups(layer: BayesianGroupLayer, mask: LayerMask) -> torch.Tensor:
    """Which of ``layer``'s groups ``mask`` keeps: its inputs (fully connected) or its outputs (conv filters)."""
    return mask.inputs if layer.groups_on == "inputs" else mask.outputs


def _layers(model: nn.Module) -> list[BayesianGroupLayer]:
    layers = bayesian_layers(unwrap(model))
    if not layers:
        raise TypeError(f"{type(unwrap(model)).__name__} has no Bayesian group layers: fine-tuning after pruning "
                        "needs a network of bclib group layers (bclib.models.to_bayesian(net))")  # fmt: skip
    return layers


def check_masks(model: nn.Module, masks: Sequence[LayerMask]) -> None:
    """A clear error unless ``masks`` are :func:`bclib.compression.group_masks` of a model shaped like ``model``."""
    layers = _layers(model)
    if not isinstance(masks, Masks) or not all(isinstance(m, LayerMask) for m in masks):
        raise TypeError(f"masks must be bclib.compression.group_masks(model, thresholds), got {type(masks).__name__}: "
                        "pass the masks of this model's thresholds, not the thresholds themselves")  # fmt: skip
    if len(masks) != len(layers):
        raise ValueError(f"got {len(masks)} masks for the model's {len(layers)} group layers: they are the masks "
                         "of another model; compute them with group_masks(model, thresholds) for this one")  # fmt: skip
    for i, (layer, m) in enumerate(zip(layers, masks)):
        shape = (layer.weight_mu.shape[1], layer.weight_mu.shape[0])
        got = (m.inputs.numel(), m.outputs.numel())
        if got != shape or m.inputs.dtype != torch.bool or m.outputs.dtype != torch.bool:
            raise ValueError(f"mask {i} covers {got[0]} inputs x {got[1]} outputs ({m.inputs.dtype}), but group layer "
                             f"{i} has {shape[0]} x {shape[1]}: these masks belong to another model; compute them "
                             "with group_masks(model, thresholds) for this one")  # fmt: skip
        if not bool(kept_groups(layer, m).any()):
            raise ValueError(f"mask {i} keeps no group of group layer {i}: the signal would stop there")
    for name in masks.channels:
        try:
            unwrap(model).get_submodule(name)
        except AttributeError:
            raise ValueError(f"the masks prune channels of {name!r}, which the model does not have: they belong "
                             "to another model; compute them with group_masks(model, thresholds)") from None


def fix_pruning(model: nn.Module, masks: Optional[Masks]) -> None:
    """Hold the groups (and channels) that ``masks`` drop at zero in training and eval; ``None`` releases them.

    ``masks``: :func:`bclib.compression.group_masks` of ``model``. Sets each group layer's
    ``group_keep`` and applies the eval masks (:func:`bclib.compression.apply_masks`);
    releasing removes both, including eval masks applied before.
    """
    net = unwrap(model)
    layers = _layers(net)
    if masks is not None:
        check_masks(net, masks)
    for handle in _TRAINING_HOOKS.pop(net, []):
        handle.remove()
    compression.apply_masks(net, masks)
    if masks is None:
        for layer in layers:
            layer.group_keep = None
        return
    for layer, m in zip(layers, masks):
        layer.group_keep = kept_groups(layer, m).to(layer.weight_mu.device)
    hook = compression.zero_pruned_channels  # eval mode: apply_masks' hooks
    _TRAINING_HOOKS[net] = [net.get_submodule(name).register_forward_hook(hook(keep, in_training=True))
                            for name, keep in masks.channels.items()]  # fmt: skip


@contextlib.contextmanager
def fixed_pruning(model: nn.Module, masks: Masks) -> Iterator[nn.Module]:
    """``with fixed_pruning(model, masks): train(model, ...)``: :func:`fix_pruning` for the block, released after."""
    fix_pruning(model, masks)
    try:
        yield model
    finally:
        fix_pruning(model, None)


def _same_masks(a: Masks, b: Masks) -> Optional[str]:
    """Where two sets of masks differ (``None``: nowhere)."""
    for i, (p, q) in enumerate(zip(a, b)):
        for side in ("inputs", "outputs"):
            x, y = getattr(p, side).cpu(), getattr(q, side).cpu()
            if not torch.equal(x, y):
                return f"group layer {i} keeps {int(x.sum())} {side} instead of {int(y.sum())}"
    if set(a.channels) != set(b.channels) or any(not torch.equal(a.channels[n].cpu(), b.channels[n].cpu())
                                                 for n in a.channels):  # fmt: skip
        return f"the channel-wise layers' kept channels differ ({sorted(a.channels)} vs {sorted(b.channels)})"
    return None


@torch.no_grad()
def thresholds_keeping(model: nn.Module, masks: Masks, example_input: Optional[torch.Tensor] = None) -> list[float]:
    """Per-layer ``log alpha`` thresholds with which ``group_masks`` (so ``prune`` and
    ``compression_report``) give exactly ``masks``.

    Each layer's threshold lies just above the largest ``log alpha_i`` of its kept groups
    (midway to the next one): the least pruning that keeps them. Pruning grows with every
    threshold, so if these thresholds keep more than ``masks``, no thresholds give ``masks``:
    a :class:`FixedPruningError` names the layer and the groups in the way.
    """
    layers = _layers(model)
    check_masks(model, masks)
    thresholds = []
    for layer, m in zip(layers, masks):
        la = layer.log_alpha.detach().float().cpu()
        top = la[kept_groups(layer, m).cpu()].max()
        above = la[la > top]
        thresholds.append(((top + above.min()) / 2).item() if above.numel() else top.item() + 1.0)
    got = compression.group_masks(model, thresholds, example_input)
    why = _same_masks(got, masks)
    if why is not None:
        blocking = []
        for i, (layer, m) in enumerate(zip(layers, masks)):
            la = layer.log_alpha.detach().float().cpu()
            dropped = ~kept_groups(layer, m).cpu() & (la < thresholds[i])
            if bool(dropped.any()):
                blocking.append(f"layer {i}: {int(dropped.sum())} pruned groups with log alpha as low as "
                                f"{la[dropped].min().item():.3f} <= the kept groups' largest {thresholds[i]:.3f}")  # fmt: skip
        raise FixedPruningError(f"no log-alpha thresholds keep exactly the fixed groups: at the least pruning that keeps "
                                f"them, {why} ({'; '.join(blocking) or 'the graph keeps more'}). Prune with the masks "
                                "themselves (apply_masks), or fine-tune from thresholds further from the kept groups")  # fmt: skip
    return thresholds


@dataclass
class Finetuned:
    """The outcome of :func:`finetune`: the fixed masks, thresholds that reproduce them on the
    fine-tuned model, and the training history (one dict per epoch, as ``train`` returns)."""

    masks: Masks
    thresholds: list[float]
    history: list[dict[str, float]]

    @property
    def seconds(self) -> float:
        return sum(h["seconds"] for h in self.history)


def finetune(
    model: nn.Module,
    thresholds: Sequence[float],
    train_batches: Batches,
    epochs: int,
    lr: float = 1e-3,
    lr_cooldown: Optional[int] = None,
    n_data: Optional[int] = None,
    example_input: Optional[torch.Tensor] = None,
    state_path: Optional[Path | str] = None,
    progress: bool = True,
) -> Finetuned:
    """Prune ``model`` at ``thresholds`` and train it on with the pruned groups fixed at zero.

    The objective is the negative ELBO of :func:`bclib.train.train` with KL weight 1 from the
    first epoch (no warm-up: the posterior is trained already) and Adam at ``lr`` falling
    linearly over the last ``lr_cooldown`` epochs (default: all of them; the default ``lr`` is
    the training's, the best of 1e-4, 3e-4 and 1e-3 on LeNet-300-100, see
    ``bclib.reproduce._finetune_settings``). ``state_path``
    makes it resumable: an interrupted call resumes at its last finished epoch when called
    again with the same model, thresholds and arguments. ``model`` is changed in place (and
    left without masks); the returned thresholds prune it to exactly the fixed groups.

    Args:
        model: a trained Bayesian network (bclib group layers); may be wrapped in DDP.
        thresholds: one ``log alpha`` threshold per group layer (as for ``prune``).
        train_batches, n_data, state_path, progress: as for :func:`bclib.train.train`.
        epochs: fine-tuning epochs (>= 1).
        example_input: one batch of inputs where the graph analysis needs shapes (as for ``prune``).
    Raises:
        FixedPruningError: after training, no thresholds reproduce the fixed groups.
    """
    masks = compression.group_masks(unwrap(model), thresholds, example_input)
    with fixed_pruning(model, masks):
        history = train(model, train_batches, epochs, n_data=n_data, lr=lr, kl_warmup=0,
                        lr_cooldown=epochs if lr_cooldown is None else lr_cooldown, state_path=state_path,
                        progress=progress)  # fmt: skip
    return Finetuned(masks, thresholds_keeping(unwrap(model), masks, example_input), history)
