"""The variational objective, a seeded training loop, evaluation and atomic checkpoints."""
from __future__ import annotations

import pickle
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .atomic import atomic_write
from .models import bayesian_layers, build, forward_with_kl, kl_divergence

CHECKPOINT_FORMAT = "bclib-checkpoint-v1"


def elbo_loss(
    model: nn.Module,
    logits: torch.Tensor,
    y: torch.Tensor,
    n_data: int,
    kl_weight: float = 1.0,
    kl: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Negative ELBO per example (paper eqs. 1 and 7): ``CE + kl_weight * KL / N``.

    ``kl`` is the model's KL if already at hand (from :func:`bclib.models.forward_with_kl`).
    Returns ``(loss, cross_entropy, kl)``; for a plain network the KL is 0.
    """
    ce = F.cross_entropy(logits, y)
    if kl is None:
        kl = kl_divergence(model) if kl_weight else torch.zeros(())
    kl = kl.to(logits.device)
    return ce + kl_weight * kl / n_data, ce, kl


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Accuracy (0-1) of ``model`` in eval mode (posterior means for group layers)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_batches: int) -> None:
    """Recompute every BatchNorm's running statistics with the rest of ``model`` as at test time.

    Training passes are noisy (group layers sample their weights), so the statistics BatchNorm
    keeps are those of noisy activations; at test time the posterior means give activations of
    smaller variance. Here the group layers run in eval mode (posterior means) and each
    BatchNorm in training mode with ``momentum=None`` over the first ``n_batches`` batches, so
    its statistics become their plain average. No weight changes; ``model`` ends in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    device = next(model.parameters()).device
    model.eval()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        for i, (x, _) in enumerate(batches):
            if i == n_batches:
                break
            model(x.to(device))
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        model.eval()


def kl_schedule(epoch: int, warmup: int) -> float:
    """KL weight for ``epoch`` (0-based): linear ramp from 1/warmup to 1 over ``warmup`` epochs."""
    return 1.0 if warmup <= 0 else min(1.0, (epoch + 1) / warmup)


def lr_factor(epoch: int, epochs: int, cooldown: int) -> float:
    """Learning-rate multiplier for ``epoch`` (0-based): 1, then over the last ``cooldown``
    epochs a linear fall from 1 to ``1/cooldown`` (as Sparse VD decays its rate; 0: constant).

    The factor before the cool-down does not depend on ``epochs``, so a run resumed with more
    epochs is the same as one that had been given them from the start.
    """
    return 1.0 if cooldown <= 0 else min(1.0, (epochs - epoch) / cooldown)


def train(
    model: nn.Module,
    train_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    epochs: int,
    n_data: Optional[int] = None,
    lr: float = 1e-3,
    kl_warmup: int = 0,
    lr_cooldown: int = 0,
    test_batches: Optional[Iterable[tuple[torch.Tensor, torch.Tensor]]] = None,
    state_path: Optional[Path | str] = None,
    on_epoch_end: Optional[Callable[[int, nn.Module], None]] = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train with Adam on the negative ELBO (plain cross-entropy for a plain network).

    Args:
        n_data: training-set size N in ``KL / N``; defaults to the number of examples per pass.
        kl_warmup: epochs over which the KL weight ramps up to 1 (0: no warm-up).
        lr_cooldown: last epochs over which the learning rate falls linearly towards 0 (see :func:`lr_factor`).
        state_path: if given, the model, optimiser and history are saved there atomically
            after every epoch, and a run finding that file resumes from it.
        on_epoch_end: called as ``f(epoch, model)`` after each epoch (e.g. to take snapshots).
    Returns:
        One dict per epoch: loss, cross-entropy, KL, KL weight, learning rate, seconds, test accuracy.
    """
    device = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    history: list[dict[str, float]] = []
    if state_path is not None and Path(state_path).exists():
        state = _torch_load(state_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history = state["history"]
        torch.set_rng_state(state["rng"])
        if "data_rng" in state:
            train_batches.generator.set_state(state["data_rng"])
    layers = bayesian_layers(model)
    n_data = n_data or _count(train_batches)
    for epoch in range(len(history), epochs):
        model.train()
        beta = kl_schedule(epoch, kl_warmup) if layers else 0.0
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(epoch, epochs, lr_cooldown)
        sums = {"loss": 0.0, "ce": 0.0, "kl": 0.0}
        n = 0
        t0 = time.perf_counter()
        bar = tqdm(train_batches, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not progress)
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits, kl = forward_with_kl(model, x)
            loss, ce, kl = elbo_loss(model, logits, y, n_data, beta, kl)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for layer in layers:
                layer.clip_variances()
            for k, v in zip(sums, (loss, ce, kl)):
                sums[k] += v.item()
            n += 1
        record = {k: v / max(n, 1) for k, v in sums.items()}
        record.update(epoch=epoch + 1, kl_weight=beta, lr=opt.param_groups[0]["lr"], seconds=time.perf_counter() - t0)
        if test_batches is not None:
            record["test_acc"] = evaluate(model, test_batches)
        history.append(record)
        if on_epoch_end is not None:
            on_epoch_end(epoch, model)
        if state_path is not None:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "history": history,
                     "rng": torch.get_rng_state()}  # fmt: skip
            if isinstance(getattr(train_batches, "generator", None), torch.Generator):
                state["data_rng"] = train_batches.generator.get_state()
            atomic_save(state, state_path)
        if progress:
            tqdm.write(_describe(record))
    return history


def _count(batches: Iterable) -> int:
    x = getattr(batches, "x", None)
    if x is None:
        raise ValueError("pass n_data: the number of training examples N in KL/N")
    return len(x)


def _describe(r: dict[str, float]) -> str:
    acc = f", test acc {r['test_acc']:.4f}" if "test_acc" in r else ""
    return f"epoch {r['epoch']}: loss {r['loss']:.4f}, CE {r['ce']:.4f}, KL {r['kl']:.1f}{acc} ({r['seconds']:.1f}s)"


# --- checkpoints ------------------------------------------------------------------------
def atomic_save(obj: Any, path: Path | str) -> None:
    """``torch.save`` that never leaves a half-written file (see :mod:`bclib.atomic`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _torch_load(path: Path | str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(
            f"{path} is not a readable checkpoint (truncated or corrupt: {err}). "
            "Delete it and train again, or restore it from git."
        ) from err


def save_checkpoint(
    path: Path | str, model: nn.Module, arch: str, prior: Optional[str], half: bool = False, **meta: Any
) -> None:
    """Save a model built by ``bclib.models.build(arch, prior)`` with metadata (atomically).

    ``half=True`` stores the weights' parameters as float16 (half the size; they load back as
    float32). The few per-group scale parameters stay float32: the horseshoe's log-scales
    sit near +-2 log(tau0), where float16 is too coarse.
    """

    def stored(name: str, v: torch.Tensor) -> torch.Tensor:
        v = v.detach().cpu()
        return v.half() if half and ".scale." not in name else v.float()

    expected = set(build(arch, prior).state_dict())  # build raises for an unknown architecture
    if set(model.state_dict()) != expected:
        raise ValueError(f"the model is not {arch} with prior {prior!r} (its parameters differ from "
                         f"bclib.models.build({arch!r}, {prior!r})): the checkpoint could not be loaded back")  # fmt: skip
    state = {"format": CHECKPOINT_FORMAT, "arch": arch, "prior": prior, "meta": meta,
             "state_dict": {k: stored(k, v) for k, v in model.state_dict().items()}}  # fmt: skip
    atomic_save(state, path)


def load_checkpoint(path: Path | str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load a model saved by :func:`save_checkpoint` onto ``device``; returns ``(model, meta)``."""
    state = _torch_load(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a bclib checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    model = build(state["arch"], state["prior"])
    try:
        model.load_state_dict({k: v.float() for k, v in state["state_dict"].items()})
    except RuntimeError as err:
        raise ValueError(
            f"{path} does not match {state['arch']} with prior {state['prior']!r}: {err}. "
            "Was it saved from another model? Save it again with save_checkpoint."
        ) from err
    model.eval()
    return model.to(device), dict(state["meta"], arch=state["arch"], prior=state["prior"])
