"""MNIST as in-memory tensors, and a minimal shuffling batch iterator.

The whole of MNIST fits in 200 MB as float32, so it is read once through
``torchvision.datasets.MNIST`` and kept as tensors: no per-sample transforms, which would
cost more than the network itself for LeNet-300-100.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import torch

from .config import data_dir

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def load_mnist(
    train: bool, root: Optional[Path | str] = None, download: bool = True, limit: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, 28, 28)`` normalised to zero mean, unit variance, and labels ``(N,)``.

    Reads ``<root>/MNIST/raw`` (root defaults to ``$BCLIB_DATA`` or ``data/``), downloading
    there first when ``download`` and the files are missing. ``limit`` keeps the first N.
    """
    from torchvision.datasets import MNIST

    root = Path(root) if root is not None else data_dir()
    try:
        ds = MNIST(str(root), train=train, download=download)
    except (RuntimeError, OSError) as err:
        raise FileNotFoundError(
            f"MNIST is not in {root.resolve() / 'MNIST' / 'raw'} and could not be downloaded ({err}). "
            "Put the four files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte there (gzipped or not), "
            "or point BCLIB_DATA at the folder that holds MNIST/raw."
        ) from err
    x, y = ds.data, ds.targets
    if limit is not None:
        x, y = x[:limit], y[:limit]
    x = (x.float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)).unsqueeze(1)
    return x, y.long()


class TensorBatches:
    """Iterate over ``(x, y)`` in mini-batches, reshuffled each pass with a seeded generator."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int = 128,
        shuffle: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def to(self, device: torch.device | str) -> "TensorBatches":
        self.x, self.y = self.x.to(device), self.y.to(device)
        return self

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        order = torch.randperm(n, generator=self.generator).to(self.x.device) if self.shuffle else None
        for i in range(0, n, self.batch_size):
            if order is None:
                yield self.x[i : i + self.batch_size], self.y[i : i + self.batch_size]
            else:
                idx = order[i : i + self.batch_size]
                yield self.x[idx], self.y[idx]


def mnist_batches(
    batch_size: int = 128, seed: int = 0, train_limit: Optional[int] = None, root: Optional[Path | str] = None
) -> tuple[TensorBatches, TensorBatches]:
    """Shuffled training batches and ordered test batches of MNIST."""
    xtr, ytr = load_mnist(True, root, limit=train_limit)
    xte, yte = load_mnist(False, root)
    train = TensorBatches(xtr, ytr, batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    return train, TensorBatches(xte, yte, 1000)
