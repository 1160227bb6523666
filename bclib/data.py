"""MNIST and CIFAR-10 as in-memory tensors, and a minimal shuffling batch iterator.

The whole of MNIST fits in 200 MB as float32 (CIFAR-10 in 740 MB), so each is read once
through ``torchvision.datasets`` and kept as tensors: no per-sample transforms, which would
cost more than the network itself for LeNet-300-100. CIFAR-10's training augmentation runs
on whole batches of tensors instead (:func:`augment_batch`).
"""
from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Iterator, Optional

import torch

from . import distributed
from .config import data_dir

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# IDX files of MNIST: magic number (0x0000 0803 images, 0x0000 0801 labels) and sizes after it.
_IDX_IMAGES, _IDX_LABELS = 2051, 2049
MNIST_SIZE = 28
# Per-channel mean and standard deviation of CIFAR-10's 50,000 training images (RGB).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class DataFileError(ValueError):
    """A data file under ``BCLIB_DATA`` is damaged: truncated, too long, or not the file its name says."""


def _check_root(root: Path, download: bool, holds: str) -> None:
    """``root`` must be a folder; it may be missing only when it is to receive a download."""
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"the data folder {root} is a file, not a folder: point BCLIB_DATA (or root=) "
                                 f"at the folder that holds {holds}")  # fmt: skip
    if not root.exists() and not download:
        raise FileNotFoundError(f"the data folder {root.resolve()} does not exist (download=False): create it with "
                                f"{holds} inside, or point BCLIB_DATA (or root=) at the folder that holds {holds}")  # fmt: skip


def _idx_count(path: Path, magic: int, sizes: tuple[int, ...], fix: str) -> int:
    """Examples in the MNIST IDX file ``path`` after checking its header and length.

    ``sizes`` are the sizes after the count (``(28, 28)`` for images, ``()`` for labels); the
    file is a big-endian ``uint32`` magic number, the count, ``sizes``, then one byte per value.
    """
    header_len = 4 * (2 + len(sizes))
    with open(path, "rb") as f:
        header = f.read(header_len)
    length = path.stat().st_size
    found = struct.unpack(">I", header[:4])[0] if length >= 4 else magic
    if found != magic:
        raise DataFileError(f"{path} is not an MNIST {'image' if magic == _IDX_IMAGES else 'label'} file: bad magic "
                            f"number {found}, expected {magic} (garbage bytes or another file). {fix}")  # fmt: skip
    if length < header_len:
        raise DataFileError(f"{path} is truncated: {length} bytes, shorter than its {header_len}-byte header. {fix}")
    _, count, *dims = struct.unpack(f">{2 + len(sizes)}I", header)
    if tuple(dims) != sizes:
        raise DataFileError(f"{path} holds {' x '.join(map(str, dims))} images, MNIST's are "
                            f"{' x '.join(map(str, sizes))}. {fix}")  # fmt: skip
    expected = header_len + count * math.prod(sizes)
    if length != expected:
        what = "truncated" if length < expected else "too long"
        raise DataFileError(f"{path} is {what}: {length} bytes, expected {expected} for the {count} examples "
                            f"its header announces. {fix}")  # fmt: skip
    return count


def _check_mnist_files(raw: Path, train: bool) -> None:
    """Check the split's image and label files in ``raw`` where present (missing ones are torchvision's to fetch)."""
    from torchvision.datasets import MNIST

    prefix = "train" if train else "t10k"
    images, labels = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
    fix = (f"Delete it so that it is downloaded again (load_mnist(download=True) or python -m bclib.reproduce), "
           f"or replace it by the unzipped file from {MNIST.mirrors[0]}")  # fmt: skip
    counts = [_idx_count(p, magic, sizes, fix) if p.is_file() else None
              for p, magic, sizes in ((images, _IDX_IMAGES, (MNIST_SIZE, MNIST_SIZE)), (labels, _IDX_LABELS, ()))]  # fmt: skip
    if None not in counts and counts[0] != counts[1]:
        raise DataFileError(f"{images} holds {counts[0]} images but {labels} {counts[1]} labels: one of them is damaged "
                            "or from another copy. Delete both so that they are downloaded again")  # fmt: skip


def _check_limit(limit: Optional[int]) -> None:
    if limit is None:
        return
    if not isinstance(limit, int) or isinstance(limit, bool):
        raise TypeError(f"limit={limit!r}: give a positive number of examples or None (all)")
    if limit < 1:
        raise ValueError(f"limit={limit}: give a positive number of examples or None (all)")


def load_mnist(
    train: bool, root: Optional[Path | str] = None, download: bool = True, limit: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, 28, 28)`` normalised to zero mean, unit variance, and labels ``(N,)``.

    Reads ``<root>/MNIST/raw`` (root defaults to ``$BCLIB_DATA`` or ``data/``), downloading
    there first when ``download`` and the files are missing. ``limit`` keeps the first N.
    A damaged file (truncated, too long, of the wrong kind) is a :class:`DataFileError`
    naming it; it is not replaced.
    """
    from torchvision.datasets import MNIST

    _check_limit(limit)
    root = Path(root) if root is not None else data_dir()
    _check_root(root, download, "MNIST/raw")
    raw = root / "MNIST" / "raw"
    _check_mnist_files(raw, train)
    try:
        ds = MNIST(str(root), train=train, download=download)
    except (RuntimeError, OSError) as err:
        names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
        missing = [n for n in names if not (raw / n).is_file()]
        raise FileNotFoundError(
            f"MNIST is not in {raw.resolve()} (missing: {', '.join(missing) or 'none'}) and could not be "
            f"downloaded ({err}). Put the four files {', '.join(names)} there, or point BCLIB_DATA at the "
            "folder that holds MNIST/raw."
        ) from err
    x, y = ds.data, ds.targets
    if limit is not None:
        x, y = x[:limit], y[:limit]
    x = (x.float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)).unsqueeze(1)
    return x, y.long()


def load_cifar10(
    train: bool, root: Optional[Path | str] = None, download: bool = True, limit: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 3, 32, 32)`` normalised per channel (``CIFAR10_MEAN``, ``CIFAR10_STD``), labels ``(N,)``.

    Reads ``<root>/cifar-10-batches-py`` (root defaults to ``$BCLIB_DATA`` or ``data/``)
    through ``torchvision.datasets.CIFAR10``, which checks the files' md5 sums; when
    ``download`` and they are missing it extracts ``<root>/cifar-10-python.tar.gz``,
    downloading it first if that is missing too. ``limit`` keeps the first N.
    """
    from torchvision.datasets import CIFAR10

    _check_limit(limit)
    root = Path(root) if root is not None else data_dir()
    _check_root(root, download, f"{CIFAR10.base_folder} or cifar-10-python.tar.gz")
    try:
        ds = CIFAR10(str(root), train=train, download=download)
    except (RuntimeError, OSError) as err:
        raise FileNotFoundError(
            f"CIFAR-10 is missing or corrupt in {root.resolve() / CIFAR10.base_folder}"
            f"{'' if download else ' (download=False)'}: {err}. Put the folder cifar-10-batches-py "
            f"(data_batch_1..5, test_batch, batches.meta) or the archive cifar-10-python.tar.gz "
            f"(from {CIFAR10.url}, extracted on first use) in {root.resolve()}, "
            "or point BCLIB_DATA at the folder that holds them."
        ) from err
    x, y = torch.from_numpy(ds.data), torch.tensor(ds.targets)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    x = x.permute(0, 3, 1, 2).contiguous().float().div_(255.0).sub_(mean).div_(std)  # NHWC uint8 -> NCHW
    return x, y.long()


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation of a batch ``(N, C, H, W)``: each image shifted by a random
    crop of its ``pad``-pixel zero padding (zero is the mean colour after normalisation) and
    mirrored left-right with probability 1/2. Draws from ``generator`` (on the CPU), so it is seeded.
    """
    if x.dim() != 4:
        raise ValueError(f"augment_batch needs images (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    dev = x.device
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(dev)
    flip = (torch.rand(n, generator=generator) < 0.5).to(dev)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=dev)).view(n, 1, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=dev)).view(n, 1, 1, w)
    out = padded[torch.arange(n, device=dev).view(n, 1, 1, 1), torch.arange(c, device=dev).view(1, c, 1, 1), rows, cols]
    return torch.where(flip.view(n, 1, 1, 1), out.flip(3), out)


class TensorBatches:
    """Iterate over ``(x, y)`` in mini-batches, reshuffled each pass with a seeded generator.

    ``augment=True`` passes each batch of images through :func:`augment_batch` with the same
    generator (so a training state that saves the generator resumes the same augmentation).

    Several processes (``torch.distributed``, e.g. under ``torchrun``): each holds all of ``x``
    and ``y`` and gives the same seeded ``generator``; ``rank`` and ``world_size`` default to
    the process group's (0 and 1 without one). Each pass draws one global permutation of the
    N examples, as one process would, pads it to a multiple of ``world_size`` by repeating its
    first examples (at most ``world_size - 1``, as ``DistributedSampler`` does) and gives rank
    ``r`` every ``world_size``-th example from the ``r``-th: shards of equal length, disjoint
    but for the padding, so every rank makes the same number of steps. Batch ``j`` of all ranks together is slice
    ``j`` of ``batch_size * world_size`` examples of the padded permutation: the global batch
    is ``batch_size * world_size``. Augmentation draws from the shared generator, so the ranks'
    images get the same shifts and flips within a batch.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int = 128,
        shuffle: bool = False,
        generator: Optional[torch.Generator] = None,
        augment: bool = False,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y, self.batch_size, self.shuffle, self.augment = x, y, batch_size, shuffle, augment
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.rank, self.world_size = _rank_and_world(rank, world_size)

    def __len__(self) -> int:
        """Batches per pass on this rank."""
        return (self._shard_size() + self.batch_size - 1) // self.batch_size

    def _shard_size(self) -> int:
        """Examples per pass on each rank: ``ceil(N / world_size)``."""
        return (len(self.x) + self.world_size - 1) // self.world_size

    def to(self, device: torch.device | str) -> "TensorBatches":
        self.x, self.y = self.x.to(device), self.y.to(device)
        return self

    def _order(self) -> Optional[torch.Tensor]:
        """This rank's example indices for one pass (``None``: all examples in order, one process)."""
        n = len(self.x)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(self.x.device)
        elif self.world_size == 1:
            return None
        else:
            order = torch.arange(n, device=self.x.device)
        if self.world_size == 1 or n == 0:
            return order
        total = self._shard_size() * self.world_size
        padded = order.repeat((total + n - 1) // n)[:total]
        return padded[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        n = len(self.x) if order is None else len(order)
        for i in range(0, n, self.batch_size):
            if order is None:
                x, y = self.x[i : i + self.batch_size], self.y[i : i + self.batch_size]
            else:
                idx = order[i : i + self.batch_size]
                x, y = self.x[idx], self.y[idx]
            yield (augment_batch(x, self.generator) if self.augment else x), y


def _rank_and_world(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    """Explicit ``rank``/``world_size``, else those of the running process group (0 and 1 without one)."""
    rank = distributed.rank() if rank is None else rank
    world_size = distributed.world_size() if world_size is None else world_size
    for name, v in (("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"TensorBatches: {name} must be an int, got {v!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"TensorBatches: need world_size >= 1 and 0 <= rank < world_size, got rank {rank} "
                         f"and world_size {world_size} (each process passes its own rank, all the same world_size)")  # fmt: skip
    return rank, world_size


def mnist_batches(
    batch_size: int = 128, seed: int = 0, train_limit: Optional[int] = None, root: Optional[Path | str] = None
) -> tuple[TensorBatches, TensorBatches]:
    """Shuffled training batches and ordered test batches of MNIST."""
    xtr, ytr = load_mnist(True, root, limit=train_limit)
    xte, yte = load_mnist(False, root)
    train = TensorBatches(xtr, ytr, batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    return train, TensorBatches(xte, yte, 1000)
