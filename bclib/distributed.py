"""Small helpers for multi-process training with ``torch.distributed`` (e.g. under ``torchrun``).

Without an initialised process group every helper answers as for one process (rank 0 of 1)
and runs no collective, so code written with them runs unchanged in a single process.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# How long a collective waits for the other ranks: rank 0 compresses alone while the others wait
# at a barrier, which takes minutes; torchrun ends every rank when one fails, so no hang outlasts a crash.
TIMEOUT = timedelta(hours=2)


def is_initialized() -> bool:
    """Is a ``torch.distributed`` process group running in this process?"""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Is this rank 0, the one that writes files and logs?"""
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes in the environment; returns whether one runs.

    Needs ``WORLD_SIZE`` > 1 (set by ``torchrun``); otherwise nothing happens and the caller runs
    as one process. Uses NCCL when CUDA is available (each rank on GPU ``LOCAL_RANK``), else gloo.
    """
    if is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {name} is not set: start the "
                               "processes with torchrun (e.g. torchrun --nproc_per_node=2 -m bclib.reproduce)")  # fmt: skip
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl", timeout=TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return True


def close() -> None:
    """Leave the process group, if one runs."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (no-op for one process)."""
    if is_initialized():
        dist.barrier()


def wrap(model: nn.Module) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when several processes run, else ``model`` itself.

    The parameters stay those of ``model`` (DDP copies rank 0's values to every rank).
    """
    if world_size() == 1:
        return model
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``values`` over all ranks (``values`` itself for one process)."""
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(flag: bool, device: torch.device) -> bool:
    """Is ``flag`` true on any rank? (``device``: where the backend's tensors live, CUDA for NCCL.)"""
    if world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank (``[obj]`` for one process)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
