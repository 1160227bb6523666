"""The variational objective, a seeded training loop, evaluation and atomic checkpoints."""
from __future__ import annotations

import math
import numbers
import pickle
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .atomic import atomic_write
from .convert import unwrap
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
    """Accuracy (0-1) of ``model`` in eval mode (posterior means for group layers).

    ``batches`` yields ``(x, y)`` pairs, ``y`` the class indices ``(N,)``; no examples at all
    is a ``ValueError`` (an accuracy of 0 would pass for a result).
    """
    was_training = model.training
    model.eval()
    first = next(iter(model.parameters()), None)
    device = None if first is None else first.device
    correct = total = 0
    try:
        for batch in batches:
            x, y = _evaluation_batch(batch, device)
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate got no examples: the batches were empty; pass a non-empty iterable of "
                         "(x, y) batches (e.g. TensorBatches(x, y, 1000))")  # fmt: skip
    return correct / total


def _evaluation_batch(batch: Any, device: Optional[torch.device]) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(x, y)`` of :func:`evaluate`, on ``device`` (None: where it is), checked."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch)):
        raise TypeError(f"evaluate needs an iterable of (x, y) pairs of tensors, got an item of type "
                        f"{type(batch).__name__}: pass e.g. TensorBatches(x, y) or [(x, y)], not (x, y)")  # fmt: skip
    x, y = batch if device is None else (t.to(device) for t in batch)
    if y.dim() != 1:
        raise ValueError(f"evaluate needs labels as class indices of shape (N,), got shape {tuple(y.shape)} "
                         "(for one-hot labels pass y.argmax(1))")  # fmt: skip
    if len(x) != len(y):
        raise ValueError(f"a batch has {len(x)} inputs but {len(y)} labels: give one label per input")
    return x, y


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


class NonFiniteLossError(FloatingPointError):
    """Training met a NaN or infinite loss or parameter at ``epoch``, ``step`` (both 1-based).

    The training state on disk, if any, is that of the last finished epoch: it is never
    overwritten with non-finite weights, and a run started again resumes from it.
    """

    def __init__(self, message: str, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch, self.step = epoch, step


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
    compile: bool = False,
) -> list[dict[str, float]]:
    """Train with Adam on the negative ELBO (plain cross-entropy for a plain network).

    Args:
        model: the network; under ``torch.distributed`` with several processes, the network in
            ``DistributedDataParallel`` (:func:`bclib.distributed.wrap`).
        train_batches: ``(x, y)`` tensor pairs, iterated once per epoch (a list, a
            :class:`bclib.data.TensorBatches` or a DataLoader; not a generator, spent after one
            pass). ``x`` of the model's floating dtype, ``y`` integer class indices in
            ``[0, classes)`` (any integer dtype; used as int64).
        epochs: the total number of epochs (>= 1), counting those of a resumed state.
        n_data: training-set size N in ``KL / N``; defaults to the whole training set
            (``len(train_batches.x)``, or ``len(train_batches.dataset)`` of a DataLoader),
            which under several processes is all of the data, not one rank's shard.
        lr: Adam's learning rate (> 0).
        kl_warmup: epochs over which the KL weight ramps up to 1 (0: no warm-up).
        lr_cooldown: last epochs over which the learning rate falls linearly towards 0 (see :func:`lr_factor`).
        state_path: if given, the model, optimiser, history and random states (CPU, and CUDA
            when training on it) are saved there atomically after every epoch, and a run
            finding that file resumes from it; it must have been saved by this model with at
            most ``epochs`` epochs.
        on_epoch_end: called as ``f(epoch, model)`` after each epoch (e.g. to take snapshots), on every rank.
        compile: run each step's forward pass and KL (:func:`bclib.models.forward_with_kl`),
            and their backward, as graphs compiled by ``torch.compile``, the noise drawn by the
            eager random generator (a seed gives the same draws as without). It pays on some
            networks and costs on others (on CPU: faster for LeNet-300-100, slower for the conv
            LeNet-5-Caffe): ``benchmarks/bench_train.py --compile`` measures both. The first
            step compiles (seconds). One process only.
    Returns:
        One dict per epoch: loss, cross-entropy, KL (means over the epoch's steps of all ranks),
        KL weight, learning rate, seconds, test accuracy (mean over the ranks).
    Raises:
        NonFiniteLossError: a loss is NaN or infinite, or a step made a parameter so (found at
            the next loss or the epoch's end); the state file keeps the last finished epoch.
        ValueError, TypeError: bad arguments, batches or state file; the message names the fix.

    Several processes (e.g. ``torchrun``, see :mod:`bclib.distributed`): the negative ELBO per
    example (paper eqs. 1 and 7) is ``-L/N = (1/N) sum_i CE_i + KL(q || p) / N``. Rank ``r``'s
    loss on its batch ``B_r`` of ``b`` examples is ``l_r = (1/b) sum_{i in B_r} CE_i + beta KL / N``
    and DDP averages the gradients, so every rank steps along
    ``(1/M) sum_r grad l_r = grad[(1/(M b)) sum_{i in B_1 u ... u B_M} CE_i + beta KL / N]``:
    the single-process estimate on the global batch of ``M b`` examples, with the KL counted
    once (N is the whole set; N of one shard would count it M times). Rank 0 alone logs and
    writes the state file, and every rank waits until it is on disk; all ranks resume from
    that file, each with its own random state (rank 0's when resumed with another number of
    processes, which also changes the data order).
    """
    _check_arguments(epochs, n_data, lr, kl_warmup, lr_cooldown)
    _check_wrapped(model)
    if compile and distributed.world_size() > 1:
        raise ValueError("train: compile=True runs in one process only; under torchrun pass compile=False")
    # the noise from the eager generator: a seed draws the same noise compiled or not
    forward = torch.compile(forward_with_kl, options={"fallback_random": True}) if compile else forward_with_kl
    net = unwrap(model)  # the network itself: its layers, and state_dict keys a plain model loads
    params = list(net.parameters())
    device = params[0].device
    dtype = next((p.dtype for p in params if p.is_floating_point()), None)
    opt = torch.optim.Adam(params, lr=lr, fused=True)
    history: list[dict[str, float]] = []
    if state_path is not None and Path(state_path).exists():
        history = _resume(Path(state_path), net, opt, train_batches, epochs, device)
    layers = bayesian_layers(net)
    n_data = n_data or _count(train_batches)
    show = progress and distributed.is_main()
    for epoch in range(len(history), epochs):
        model.train()
        beta = kl_schedule(epoch, kl_warmup) if layers else 0.0
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(epoch, epochs, lr_cooldown)
        sums, n = [0.0, 0.0, 0.0], 0  # loss, CE, KL summed over this rank's steps
        t0 = time.perf_counter()
        bar = tqdm(train_batches, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not show)
        last: Optional[tuple[int, torch.Tensor, float]] = None  # the last step, x and loss: see _check_parameters
        for step, batch in enumerate(bar, 1):
            where = f"epoch {epoch + 1}, step {step}"
            x, y = _batch(batch, device, dtype, where)
            logits, kl = forward(model, x)
            y = _checked_labels(y, logits, where)
            loss, ce, kl = elbo_loss(net, logits, y, n_data, beta, kl)
            values = torch.stack([loss, ce, kl]).detach().tolist()
            finite = math.isfinite(values[0])
            if distributed.any_rank(not finite, device):  # every rank stops, none steps
                if last is not None:
                    _check_parameters(net, params, last, epoch + 1, state_path, len(history))
                detail = "the loss is not finite on another rank" if finite else \
                    f"the loss is {values[0]} (cross-entropy {values[1]}, KL {values[2]})"  # fmt: skip
                raise _non_finite(detail, epoch + 1, step, None if finite else x, state_path, len(history))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for layer in layers:
                layer.clip_variances()
            last = (step, x, values[0])
            sums = [s + v for s, v in zip(sums, values)]
            n += 1
        if n == 0:
            raise ValueError(f"train_batches gave no batches in epoch {epoch + 1}: it is empty, or an iterator "
                             "spent by an earlier pass (pass a list, a TensorBatches or a DataLoader)")  # fmt: skip
        _check_parameters(net, params, last, epoch + 1, state_path, len(history), at_end=True)  # before saving
        totals = distributed.sum_over_ranks(torch.tensor([*sums, n], dtype=torch.float64, device=device)).tolist()
        record = {k: v / totals[3] for k, v in zip(("loss", "ce", "kl"), totals)}
        record.update(epoch=epoch + 1, kl_weight=beta, lr=opt.param_groups[0]["lr"], seconds=time.perf_counter() - t0)
        if test_batches is not None:
            acc = torch.tensor([evaluate(net, test_batches)], dtype=torch.float64, device=device)
            record["test_acc"] = distributed.sum_over_ranks(acc).item() / distributed.world_size()
        history.append(record)
        if on_epoch_end is not None:
            on_epoch_end(epoch, model)
        if state_path is not None:
            _save_state(Path(state_path), net, opt, history, train_batches, device)
        if show:
            tqdm.write(_describe(record))
    return history


def _check_arguments(epochs: Any, n_data: Any, lr: Any, kl_warmup: Any, lr_cooldown: Any) -> None:
    """Clear errors for training arguments of the wrong type or range."""

    def integer(name: str, v: Any, least: int, what: str) -> None:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"train: {name} must be an int ({what}), got {v!r} of type {type(v).__name__}")
        if v < least:
            raise ValueError(f"train: {name} must be at least {least} ({what}), got {v}")

    integer("epochs", epochs, 1, "the total number of passes over the data, counting resumed ones")
    if n_data is not None:
        integer("n_data", n_data, 1, "the number of training examples N in KL / N; None: the whole training set")
    integer("kl_warmup", kl_warmup, 0, "epochs of the KL weight's ramp; 0: none")
    integer("lr_cooldown", lr_cooldown, 0, "last epochs of falling learning rate; 0: none")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"train: lr must be a positive finite number (Adam's learning rate, e.g. 1e-3), got {lr!r}")


def _check_wrapped(model: nn.Module) -> None:
    """Under several processes the model must be in DDP, or each rank would train its own copy."""
    world = distributed.world_size()
    if world > 1 and not isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(f"train: torch.distributed runs {world} processes but the model is not in "
                         "DistributedDataParallel: pass bclib.distributed.wrap(model), so that the ranks train one model")  # fmt: skip


def _batch(batch: Any, device: torch.device, dtype: Optional[torch.dtype], where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of one training batch on ``device``; inputs of another floating dtype than the model's are an error."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch)):
        raise TypeError(f"{where}: a training batch must be a pair (x, y) of tensors, got {type(batch).__name__}")
    x, y = (t.to(device, non_blocking=True) for t in batch)
    if dtype is not None and x.is_floating_point() and x.dtype != dtype:
        raise TypeError(f"{where}: the inputs are {x.dtype} but the model's parameters are {dtype}: convert the "
                        f"data once (e.g. TensorBatches(x.to({dtype}), y)) or the model (model.to({x.dtype}))")  # fmt: skip
    return x, y


def _checked_labels(y: torch.Tensor, logits: torch.Tensor, where: str) -> torch.Tensor:
    """``y`` as int64 class indices, checked against the logits' shape and number of classes.

    Checked before the cross-entropy, whose own error for a label out of range is an index
    error on the CPU and a device-side assert (which ends the CUDA context) on a GPU.
    """
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{where}: labels must be integer class indices, got {y.dtype} "
                        "(convert them with y.long(); one-hot labels: y.argmax(1))")  # fmt: skip
    classes = logits.shape[1] if logits.dim() > 1 else logits.shape[0]
    shape = logits.shape[:1] + logits.shape[2:] if logits.dim() > 1 else torch.Size([])
    if y.shape != shape:
        raise ValueError(f"{where}: labels have shape {tuple(y.shape)} but the model's outputs {tuple(logits.shape)} "
                         f"need labels of shape {tuple(shape)} (one class index per example)")  # fmt: skip
    if y.numel() == 0:
        raise ValueError(f"{where}: an empty batch (no examples): drop it from train_batches")
    low, high = torch.aminmax(y.long())
    low, high = int(low), int(high)
    if low < 0 or high >= classes:
        raise ValueError(f"{where}: labels must lie in [0, {classes - 1}] for the model's {classes} outputs, "
                         f"got labels from {low} to {high} (1-based labels? subtract 1; else give the model more outputs)")  # fmt: skip
    return y.long()


def _check_parameters(net: nn.Module, params: list[torch.Tensor], last: tuple[int, torch.Tensor, float], epoch: int,
                      state_path: Optional[Path | str], saved: int, at_end: bool = False) -> None:  # fmt: skip
    """Raise if an optimiser's step made a parameter NaN or infinite; ``last`` is the last step, its inputs and loss.

    Checked when a loss is not finite (a NaN parameter makes the next loss NaN, so the last
    step did it) and at the end of each epoch (``at_end``: some step of the epoch did it),
    before the state is saved, rather than after every step: one pass over all parameters
    less per step. DDP gives every rank the same parameters, so all stop together.
    """
    if not _all_finite(params):
        step, x, loss = last
        bad = [name for name, p in net.named_parameters() if not torch.isfinite(p).all()]
        when = "at the epoch's end" if at_end else "after the optimiser's step"
        raise _non_finite(f"{when}, the parameters {bad} hold NaN or infinite values (the last loss was {loss})",
                          epoch, step, x, state_path, saved)  # fmt: skip


def _all_finite(params: list[torch.Tensor]) -> bool:
    """Are all parameters finite? One sum per tensor: NaN or inf when any element is (or the
    weights are past 1e38 in total, which a diverged run is anyway)."""
    return bool(torch.stack([p.detach().sum() for p in params]).isfinite().all())


def _non_finite(detail: str, epoch: int, step: int, x: Optional[torch.Tensor], state_path: Optional[Path | str],
                saved: int) -> NonFiniteLossError:  # fmt: skip
    """The error for a NaN or infinite loss or parameter: where, a likely cause (from this rank's
    inputs ``x``; None: another rank's loss, whose error names the cause), and what is on disk."""
    bad = int((~torch.isfinite(x)).sum()) if x is not None and x.is_floating_point() else 0
    if x is None:
        cause = "the error of the rank that met it names the likely cause"
    elif bad:
        cause = f"this batch's inputs hold {bad} NaN or infinite values: clean the data (drop or replace them, e.g. torch.nan_to_num)"
    else:
        cause = "this batch's inputs are finite: lower the learning rate (lr) or lengthen the KL warm-up (kl_warmup)"
    if state_path is None:
        kept = "No training state is saved (state_path=None)."
    elif saved:
        kept = f"{state_path} is left as it was, after epoch {saved}: fix the cause and train again to resume from it."
    else:
        kept = f"Nothing was written to {state_path}."
    return NonFiniteLossError(f"training stopped at epoch {epoch}, step {step}: {detail}; {cause}. {kept}", epoch, step)


def _rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random states: the CPU's, and every GPU's when training on CUDA."""
    state: dict[str, Any] = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _save_state(path: Path, net: nn.Module, opt: torch.optim.Optimizer, history: list[dict[str, float]],
                batches: Iterable, device: torch.device) -> None:  # fmt: skip
    """Rank 0 writes the training state atomically (with every rank's random state); all ranks wait for it."""
    rngs = distributed.gather(_rng_state(device))
    if distributed.is_main():
        state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "history": history, **rngs[0]}
        if len(rngs) > 1:
            state["rank_rng"] = rngs
        if isinstance(getattr(batches, "generator", None), torch.Generator):
            state["data_rng"] = batches.generator.get_state()
        atomic_save(state, path)
    distributed.barrier()


def _resume(path: Path, net: nn.Module, opt: torch.optim.Optimizer, batches: Iterable, epochs: int,
            device: torch.device) -> list[dict[str, float]]:  # fmt: skip
    """Load the training state at ``path`` into ``net``, ``opt``, the random generators; returns its history."""
    state = _torch_load(path)
    if not isinstance(state, dict) or not {"model", "optimizer", "history", "rng"} <= set(state):
        keys = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a training state written by bclib.train.train (it holds {keys}): "
                         "pass another state_path, or delete the file to train from the start")  # fmt: skip
    _check_same_model(path, state["model"], net.state_dict())
    history = state["history"]
    if len(history) > epochs:
        raise ValueError(f"{path} holds {len(history)} trained epochs, more than epochs={epochs}: pass "
                         f"epochs >= {len(history)} to go on from it, or another state_path to train afresh")  # fmt: skip
    net.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    ranks = state.get("rank_rng")
    own = ranks[distributed.rank()] if ranks is not None and len(ranks) == distributed.world_size() else state
    torch.set_rng_state(own["rng"])
    if device.type == "cuda" and "cuda_rng" in own:
        for i, s in enumerate(own["cuda_rng"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    if "data_rng" in state:
        batches.generator.set_state(state["data_rng"])
    return history


def _check_same_model(path: Path, saved: dict[str, Any], own: dict[str, torch.Tensor]) -> None:
    """A clear error when the state file's parameters are not those of the model being trained."""
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in saved and tuple(getattr(saved[k], "shape", ())) != tuple(v.shape)]  # fmt: skip
    if missing or unexpected or shapes:
        diff = "; ".join(f"{what}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                         for what, items in (("missing", missing), ("not in this model", unexpected),
                                             ("shapes differ (file vs model)", shapes)) if items)  # fmt: skip
        raise ValueError(f"{path} is the training state of another model ({diff}), so it cannot resume this one: "
                         "give this model its own state_path, or delete the file to train from the start")  # fmt: skip


def _count(batches: Iterable) -> int:
    """N of the whole training set: the length of a TensorBatches' ``x`` (all the data, on every
    rank) or of a DataLoader's ``dataset``."""
    for examples in (getattr(batches, "x", None), getattr(batches, "dataset", None)):
        if examples is not None:
            return len(examples)
    raise ValueError("train: pass n_data, the number of training examples N in KL / N "
                     "(it cannot be read from a list or an iterator of batches)")  # fmt: skip


def _describe(r: dict[str, float]) -> str:
    acc = f", test acc {r['test_acc']:.4f}" if "test_acc" in r else ""
    return f"epoch {r['epoch']}: loss {r['loss']:.4f}, CE {r['ce']:.4f}, KL {r['kl']:.1f}{acc} ({r['seconds']:.1f}s)"


# --- checkpoints ------------------------------------------------------------------------
def atomic_save(obj: Any, path: Path | str) -> None:
    """``torch.save`` that never leaves a half-written file (see :mod:`bclib.atomic`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


class CheckpointError(ValueError):
    """A file given as a checkpoint is not one that loads: damaged, or another kind of file.

    The message names the file, what it holds instead and what to do.
    """


_TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; the legacy format's pickle
_COMPRESSED_MAGIC = b"BCLB"  # bclib.load_compressed.MAGIC
# Types that torch.load(weights_only=True) reads back in checkpoint metadata (with dicts, lists, tuples).
_META_TYPES = (type(None), bool, int, float, str)


def _torch_load(path: Path | str) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU; a file that is not a readable torch
    file is a :class:`CheckpointError` that says what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: give the path of a checkpoint file, e.g. {path / 'model.pt'}")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: check the path (save_checkpoint and train(state_path=...) write them)")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes: an interrupted copy?): delete it, and save it again or restore it from a copy")
    if head.startswith(_COMPRESSED_MAGIC):
        raise CheckpointError(f"{path} is a bit-packed compressed model (bclib.export.export_compressed), not a checkpoint: "
                              "read it with bclib.load_compressed.load_compressed(path)")  # fmt: skip
    if not head.startswith(_TORCH_FILE_STARTS):
        raise CheckpointError(f"{path} is not a torch file (it starts with {head!r}, not a zip archive or a pickle): "
                              "give a file written by save_checkpoint or train(state_path=...)")  # fmt: skip
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:
            raise _corrupt(path, err) from err
        if found.group(1).startswith("torch.fx."):
            raise CheckpointError(
                f"{path} holds a pruned network (a torch.fx.GraphModule from bclib.compression.prune, saved with "
                "torch.save), not a checkpoint: load it with torch.load(path, weights_only=False), only from a "
                "source you trust (it runs pickled code); it runs without bclib"
            ) from err
        raise CheckpointError(
            f"{path} holds a pickled Python object ({found.group(1)}), not a checkpoint of tensors: load it with "
            "torch.load(path, weights_only=False) if you trust its source, or save the model with save_checkpoint"
        ) from err
    except Exception as err:  # a damaged file fails anywhere in torch's reader, with any error type
        raise _corrupt(path, err) from err


def _corrupt(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt: {type(err).__name__}: "
                           f"{str(err)[:300]}). Delete it and train again, or restore it from a copy")  # fmt: skip


def _check_meta(value: Any, where: str) -> None:
    """Metadata that ``torch.load(weights_only=True)`` reads back: else a ``TypeError`` naming the entry."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_meta(k, f"a key of {where}")
            _check_meta(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_meta(v, f"{where}[{i}]")
    elif type(value) not in _META_TYPES and not isinstance(value, torch.Tensor):
        raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__name__}: checkpoint metadata must be "
                        "numbers, strings, lists, dicts or tensors (a checkpoint loads with weights_only=True); "
                        "convert it, e.g. float(v) or str(v)")  # fmt: skip


def save_checkpoint(
    path: Path | str, model: nn.Module, arch: str, prior: Optional[str], half: bool = False, **meta: Any
) -> None:
    """Save a model built by ``bclib.models.build(arch, prior)`` with metadata (atomically).

    ``half=True`` stores the weights' parameters as float16 (half the size; they load back as
    float32). The few per-group scale parameters stay float32: the horseshoe's log-scales
    sit near +-2 log(tau0), where float16 is too coarse. A model in ``DataParallel`` or
    ``DistributedDataParallel`` is saved unwrapped. ``meta`` holds numbers, strings, lists,
    dicts and tensors (what ``load_checkpoint`` reads back).
    """

    def stored(name: str, v: torch.Tensor) -> torch.Tensor:
        v = v.detach().cpu()
        return v.half() if half and ".scale." not in name else v.float()

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: give a file path for the checkpoint, e.g. {path / f'{arch}.pt'}")
    model = unwrap(model)
    _check_meta(meta, "meta")
    expected = set(build(arch, prior).state_dict())  # build raises for an unknown architecture
    if set(model.state_dict()) != expected:
        raise ValueError(f"the model is not {arch} with prior {prior!r} (its parameters differ from "
                         f"bclib.models.build({arch!r}, {prior!r})): the checkpoint could not be loaded back")  # fmt: skip
    state = {"format": CHECKPOINT_FORMAT, "arch": arch, "prior": prior, "meta": meta,
             "state_dict": {k: stored(k, v) for k, v in model.state_dict().items()}}  # fmt: skip
    atomic_save(state, path)


def _device(device: Any) -> torch.device:
    """``device`` as a ``torch.device`` that exists here."""
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"device {device!r} must be a str or a torch.device, e.g. 'cpu', 'cuda:0' or torch.device('cuda')")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r} is not a torch device: use 'cpu', 'cuda', 'cuda:1', 'mps' or 'meta'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"CUDA is not available on this machine (device {device!r}): load with device='cpu'")
    return dev


def _checkpoint_fields(path: Path | str, state: Any) -> tuple[str, Optional[str], dict[str, torch.Tensor], dict[str, Any]]:
    """``(arch, prior, state_dict, meta)`` of a loaded checkpoint, or a :class:`CheckpointError` saying what the file is."""
    again = "save it again with save_checkpoint(path, model, arch, prior)"
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a bclib checkpoint: it holds a {type(state).__name__}, not the dict "
                              f"that save_checkpoint writes; {again}")  # fmt: skip
    if state.get("format") != CHECKPOINT_FORMAT:
        if {"model", "optimizer"} <= set(state):
            raise CheckpointError(f"{path} is a training state written by train(state_path=...), not a checkpoint: "
                                  "resume training with train(..., state_path=path), or save the trained model "
                                  "with save_checkpoint(path, model, arch, prior)")  # fmt: skip
        if state and all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path} holds a bare state_dict (parameter names -> tensors), not a bclib checkpoint: "
                                  "load it into its network with bclib.models.build(arch, prior).load_state_dict"
                                  f"(torch.load(path)), or {again}")  # fmt: skip
        raise CheckpointError(f"{path} is not a bclib checkpoint (expected format {CHECKPOINT_FORMAT!r}; it holds a "
                              f"dict with keys {sorted(map(str, state))[:6]}): {again}")  # fmt: skip
    for key in ("arch", "prior", "state_dict"):
        if key not in state:
            raise CheckpointError(f"{path} is a bclib checkpoint with no {key!r} entry (written by hand or damaged): {again}")
    arch, prior, state_dict, meta = state["arch"], state["prior"], state["state_dict"], state.get("meta", {})
    if not isinstance(arch, str) or not (prior is None or isinstance(prior, str)):
        raise CheckpointError(f"{path} names arch {arch!r} and prior {prior!r}, not strings: {again}")
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: its 'state_dict' is a {type(state_dict).__name__}, not a dict of tensors: {again}")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its 'meta' is a {type(meta).__name__}, not a dict: {again}")
    return arch, prior, state_dict, meta


def load_checkpoint(path: Path | str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load a model saved by :func:`save_checkpoint` onto ``device``; returns ``(model, meta)``.

    Any file that is not such a checkpoint is a :class:`CheckpointError` saying what it holds
    (a pruned network, a training state, a state_dict, a compressed model, damaged bytes, ...)
    and how to load it.
    """
    device = _device(device)
    arch, prior, state_dict, meta = _checkpoint_fields(path, _torch_load(path))
    try:
        model = build(arch, prior)
    except ValueError as err:
        raise CheckpointError(f"{path} names a model this bclib cannot build ({err}): save it again with "
                              "save_checkpoint, from the code that defines it")  # fmt: skip
    try:
        model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    except RuntimeError as err:
        raise CheckpointError(
            f"{path} does not match {arch} with prior {prior!r}: {err}. "
            "Was it saved from another model? Save it again with save_checkpoint."
        ) from err
    model.eval()
    return model.to(device), dict(meta, arch=arch, prior=prior)
