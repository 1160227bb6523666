"""Settings read from the environment.

- ``BCLIB_DATA``: folder that holds (or receives) the data sets; default ``data/`` of the
  project checkout (or of the working directory when bclib is installed from a wheel).
- ``BCLIB_FAST=1``: fast mode for tests and nbval (data subsets, fewer epochs).
- ``BCLIB_RESULTS``: folder of trained runs that the book reads instead of ``results/``
  (e.g. the output of ``python -m bclib.reproduce --fast --out /tmp/results-fast``, to
  test the chapters before the full runs exist).
- ``BCLIB_FLUSH_DENORMAL=0``: leave subnormal floats alone (see :func:`flush_denormals`).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


def project_root() -> Path:
    """The checkout holding bclib (so chapters in ``book/`` find ``data/`` and ``results/``), else the cwd."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


def data_dir() -> Path:
    env = os.environ.get("BCLIB_DATA")
    return Path(env).expanduser() if env else project_root() / "data"


def results_dir() -> Path:
    """Where the book reads the shipped runs: ``$BCLIB_RESULTS`` if set, else ``results/`` of the checkout."""
    env = os.environ.get("BCLIB_RESULTS")
    return Path(env).expanduser() if env else project_root() / "results"


def fast_mode() -> bool:
    return os.environ.get("BCLIB_FAST", "0").lower() not in ("", "0", "false", "no")


def flush_denormals() -> bool:
    """Flush subnormal float32 values (magnitudes below 1.2e-38) to zero in CPU arithmetic,
    unless ``BCLIB_FLUSH_DENORMAL=0``; returns whether flushing is on.

    x86 CPUs compute on subnormal numbers tens of times slower than on normal ones. Fine-tuning
    (:mod:`bclib.finetune`) fills Adam's moments with them (LeNet-300-100 BC-GNJ: 251,184 of
    535,588 after five epochs), which made it 2.31x (two threads) and 2.94x (one thread)
    slower (``benchmarks/bench_denormals.py``); long training runs collect them too.
    ``import bclib`` calls this: CPU threads created afterwards (PyTorch's worker threads are
    created at the first parallel operation) inherit the setting from the importing thread,
    those created before do not. Values so small change no result this project reports.
    """
    on = os.environ.get("BCLIB_FLUSH_DENORMAL", "1").lower() not in ("0", "false", "no")
    return torch.set_flush_denormal(on) and on


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global generators and return a CPU generator for data shuffling."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
