"""The catalogue of bad inputs (issue 14): what a hostile user can pass through the public API.

Each case is one call that must fail with an exception of a fitting type whose message names
what was wrong (``problem``, a regular expression) and how to put it right (``fix``). The cases
are grouped by kind, one parametrised test per kind. Training arguments and non-finite
training are catalogued in ``tests/test_train_guards.py``. A second part checks that no failing
call loses or alters a file written before it, and that the loaders never delete what they read.

Against bclib as of commit 0fa2667 (before these checks; the catalogue with ``ValueError`` in
place of the error classes it did not have yet), 76 of the 127 cases failed: 20 silent (no
error), 56 unclear (a raw error, or a message that names no fix).
"""
from __future__ import annotations

import functools
import hashlib
import random
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

from bclib import compression, data, export, models, train
from bclib.convert import ConversionWarning
from bclib.layers import ConvGroup, LinearGroup
from bclib.load_compressed import load_compressed


@dataclass
class Case:
    """One bad input: ``call(tmp_path)`` must raise ``error`` with a message matching ``problem`` and ``fix``."""

    id: str
    call: Callable[[Path], Any]
    error: type[BaseException]
    problem: str
    fix: str

    def check(self, tmp_path: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConversionWarning)  # a warning counts as the answer where one is due
            with pytest.raises(self.error) as info:
                self.call(tmp_path)
        msg = str(info.value)
        assert re.search(self.problem, msg, re.I | re.S), f"message does not name the problem /{self.problem}/: {msg}"
        assert re.search(self.fix, msg, re.I | re.S), f"message does not name the fix /{self.fix}/: {msg}"


def params(cases: list[Case]) -> list:
    return [pytest.param(c, id=c.id) for c in cases]


# --- shared small models ------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def mlp() -> nn.Module:
    """A 3-layer Bayesian MLP on 16 features (groups: inputs of each layer)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    return models.to_bayesian(net).eval()


@functools.lru_cache(maxsize=None)
def lenet() -> nn.Module:
    torch.manual_seed(0)
    return models.lenet_300_100("nj").eval()


X16 = torch.randn(4, 16)


def batches(n: int = 8, features: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, features, generator=g), torch.randint(0, 3, (n,), generator=g))]


def search(accuracy: Callable[[nn.Module], Any], **kw: Any) -> list[float]:
    return compression.search_thresholds(mlp(), accuracy, example_input=X16, **kw)


# --- thresholds, masks and bit widths -------------------------------------------------------
THRESHOLDS = [
    Case("string-000", lambda p: compression.group_masks(mlp(), "000"),
         TypeError, "list of numbers", r"\[-3\.0\] \* 3"),
    Case("single-float", lambda p: compression.prune(mlp(), -3.0),
         TypeError, "list of numbers", "one log-alpha value per group layer"),
    Case("strings", lambda p: compression.prune(mlp(), ["-3"] * 3), TypeError, "list of numbers", r"e\.g\. \[-3\.0\]"),
    Case("none", lambda p: compression.prune(mlp(), None),
         TypeError, "list of numbers", "one log-alpha value per group layer"),
    Case("bools", lambda p: compression.prune(mlp(), [True] * 3), TypeError, "list of numbers", "one log-alpha"),
    Case("dict", lambda p: compression.prune(mlp(), {0: -3.0, 1: -3.0, 2: -3.0}),
         TypeError, "list of numbers", "one log-alpha"),
    Case("nested-lists", lambda p: compression.prune(mlp(), [[-3.0]] * 3),
         TypeError, "list of numbers", "one log-alpha"),
    Case("tensor-rows", lambda p: compression.prune(mlp(), torch.full((3, 2), -3.0)),
         TypeError, "list of numbers|one number each", "one log-alpha"),
    Case("too-few", lambda p: compression.prune(mlp(), [-3.0] * 2),
         ValueError, "2 thresholds for 3 group layers", "one log-alpha threshold per layer"),
    Case("too-many", lambda p: compression.compression_report(mlp(), [-3.0] * 4),
         ValueError, "4 thresholds for 3 group layers", "one log-alpha threshold per layer"),
    Case("nan", lambda p: compression.group_masks(mlp(), [-3.0, float("nan"), -3.0]),
         ValueError, "nan", r"finite.*e\.g\. -3\.0"),
    Case("inf", lambda p: compression.prune(mlp(), [float("inf")] * 3), ValueError, "inf", r"finite.*e\.g\. -3\.0"),
    Case("numpy-nan", lambda p: compression.prune(mlp(), np.array([-3.0, np.nan, -3.0])), ValueError, "nan", "finite"),
    Case("empties-a-layer", lambda p: compression.prune(mlp(), [-3.0, -1e9, -3.0]), compression.EmptyLayerError,
         "no (inputs|outputs)", "raise its threshold"),
    Case("plain-model", lambda p: compression.prune(nn.Linear(3, 2), [-3.0]),
         TypeError, "no Bayesian group layers", "to_bayesian"),
    Case("masks-too-few", lambda p: compression.apply_masks(mlp(), compression.group_masks(mlp(), [-3.0] * 3)[:2]),
         ValueError, "2 masks for 3 group layers", "group_masks"),
    Case("masks-are-thresholds", lambda p: compression.apply_masks(mlp(), [-3.0] * 3),
         TypeError, "LayerMask", "group_masks"),
    Case("bits-too-few",
         lambda p: compression.quantized(compression.prune(mlp(), [-3.0] * 3), [compression.LayerBits(3, 4)] * 2),
         ValueError, "2 bit widths for 3 layers", "compression_report"),
    Case("bits-are-ints", lambda p: compression.quantized(compression.prune(mlp(), [-3.0] * 3), [8] * 3), TypeError,
         "LayerBits", "compression_report"),
]


@pytest.mark.parametrize("case", params(THRESHOLDS))
def test_thresholds(case: Case, tmp_path: Path) -> None:
    case.check(tmp_path)


def test_thresholds_of_other_number_types_are_accepted() -> None:
    """Numbers of any kind are thresholds: numpy arrays and scalars, 0-d tensors, a 1-d tensor."""
    want = compression.group_masks(mlp(), [-3.0] * 3)
    for t in (np.full(3, -3.0), [np.float32(-3)] * 3, [torch.tensor(-3.0)] * 3, torch.full((3,), -3.0), (-3, -3, -3)):
        got = compression.group_masks(mlp(), t)
        assert all(torch.equal(a.inputs, b.inputs) and torch.equal(a.outputs, b.outputs) for a, b in zip(got, want))


# --- the threshold search and evaluate ------------------------------------------------------
SEARCH = [
    Case("acc-none", lambda p: search(lambda net: None), ValueError, "got None", "between 0 and 1"),
    Case("acc-nan", lambda p: search(lambda net: float("nan")), ValueError, "got nan", "between 0 and 1"),
    Case("acc-5", lambda p: search(lambda net: 5.0), ValueError, "got 5.0", "between 0 and 1"),
    Case("acc-percent", lambda p: search(lambda net: 97.5), ValueError, "got 97.5", "percent.*divide by 100"),
    Case("acc-negative", lambda p: search(lambda net: -0.1), ValueError, r"got -0\.1", "between 0 and 1"),
    Case("acc-string", lambda p: search(lambda net: "0.9"), ValueError, "got '0.9'", "a float"),
    Case("acc-vector", lambda p: search(lambda net: torch.tensor([0.9, 0.8])), ValueError, "tensor", "a float"),
    Case("acc-not-callable", lambda p: search(batches()),
         TypeError, "accuracy_of must be a function", r"evaluate\(net,"),
    Case("max-drop-nan", lambda p: search(lambda net: 0.5, max_drop=float("nan")),
         ValueError, "max_drop", r"between 0 and 1.*0\.003"),
    Case("max-drop-negative", lambda p: search(lambda net: 0.5, max_drop=-0.01),
         ValueError, "max_drop", "between 0 and 1"),
    Case("max-drop-percent", lambda p: search(lambda net: 0.5, max_drop=3.0),
         ValueError, "max_drop", r"0\.003 for 0\.3 points"),
    Case("candidates-1", lambda p: search(lambda net: 0.5, candidates=1), ValueError, "candidates", "at least 2"),
    Case("passes-0", lambda p: search(lambda net: 0.5, passes=0), ValueError, "passes", "at least 1"),
    Case("plain-model", lambda p: compression.search_thresholds(nn.Linear(3, 2), lambda n: 0.5), TypeError,
         "no Bayesian group layers", "to_bayesian"),
    Case("evaluate-empty", lambda p: train.evaluate(mlp(), []), ValueError, "no examples", "non-empty"),
    Case("evaluate-empty-batches", lambda p: train.evaluate(mlp(), [(torch.zeros(0, 16), torch.zeros(0, dtype=torch.long))]),
         ValueError, "no examples", "non-empty"),
    Case("evaluate-one-pair", lambda p: train.evaluate(mlp(), batches()[0]),
         TypeError, r"\(x, y\) pairs", r"\[\(x, y\)\]"),
    Case("evaluate-label-count", lambda p: train.evaluate(mlp(), [(torch.randn(8, 16), torch.zeros(4, dtype=torch.long))]),
         ValueError, "8 inputs but 4 labels", "one label per input"),
    Case("evaluate-one-hot", lambda p: train.evaluate(mlp(), [(torch.randn(3, 16), torch.eye(3))]), ValueError,
         r"shape \(3, 3\)", r"class indices.*argmax"),
]


@pytest.mark.parametrize("case", params(SEARCH))
def test_search_and_evaluate(case: Case, tmp_path: Path) -> None:
    case.check(tmp_path)


def test_scalar_accuracies_are_accepted() -> None:
    """A 0-d tensor or numpy scalar is an accuracy (what ``(pred == y).float().mean()`` returns)."""
    assert len(search(lambda net: torch.tensor(0.5), passes=1, candidates=2)) == 3
    assert len(search(lambda net: np.float32(0.5), passes=1, candidates=2)) == 3


def test_evaluate_a_model_without_parameters() -> None:
    x = torch.eye(3)
    assert train.evaluate(nn.Identity(), [(x, torch.arange(3))]) == 1.0


# --- conversion -----------------------------------------------------------------------------
class MyLinear(nn.Linear):
    """A subclass of nn.Linear: its forward may differ, so it is not converted."""


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Sequential(MyLinear(4, 4)), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


CONVERSION = [
    Case("conv-transpose", lambda p: models.to_bayesian(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ConvTranspose2d(2, 1, 3))),
         ConversionWarning, r"1\.? \(no group layer for ConvTranspose2d\)", "keep_plain|strict"),
    Case("conv-transpose-strict",
         lambda p: models.to_bayesian(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ConvTranspose2d(2, 1, 3)), strict=True),
         ValueError, "ConvTranspose2d", r"keep_plain=\[\.\.\.\]"),
    Case("nested-linear-subclass", lambda p: models.to_bayesian(Nested()),
         ConversionWarning, r"block\.0\.0 \(no group layer for MyLinear\)", "keep_plain|strict"),
    Case("grouped-conv", lambda p: models.to_bayesian(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1))),
         ConversionWarning, "groups=2", "keep_plain|strict"),
    Case("no-convertible-layer", lambda p: models.to_bayesian(nn.Sequential(nn.ReLU(), nn.Flatten())), ValueError,
         "no layer to convert", r"nn\.Linear or nn\.Conv"),
    Case("only-unknown-layers", lambda p: models.to_bayesian(nn.Sequential(nn.ConvTranspose2d(2, 1, 3)), strict=False),
         ValueError, "no layer to convert.*ConvTranspose2d", r"nn\.Linear or nn\.Conv"),
    Case("everything-kept-plain", lambda p: models.to_bayesian(nn.Sequential(nn.Linear(2, 2)), keep_plain=["0"]), ValueError,
         "no layer to convert", "keep_plain"),
    Case("prior-misspelt", lambda p: models.to_bayesian(nn.Linear(2, 2), prior="horseshoe"),
         ValueError, "unknown prior 'horseshoe'", r"\['hs', 'nj'\]"),
    Case("prior-upper-case", lambda p: models.to_bayesian(nn.Linear(2, 2), prior="NJ"),
         ValueError, "unknown prior 'NJ'", r"\['hs', 'nj'\]"),
    Case("prior-none", lambda p: models.to_bayesian(nn.Linear(2, 2), prior=None),
         ValueError, "unknown prior None", r"\['hs', 'nj'\]"),
    Case("build-prior-misspelt", lambda p: models.build("lenet_300_100", "gnj"),
         ValueError, "unknown prior 'gnj'", r"\['hs', 'nj'\]"),
    Case("build-arch-misspelt", lambda p: models.build("lenet300", "nj"),
         ValueError, "unknown architecture 'lenet300'", "lenet_300_100"),
    Case("not-a-module", lambda p: models.to_bayesian(nn.Linear(2, 2).state_dict()),
         TypeError, "needs an nn.Module, got OrderedDict", "pass the network itself"),
    Case("already-bayesian", lambda p: models.to_bayesian(mlp()),
         ValueError, "already has Bayesian group layers", "convert the plain network"),
    Case("keep-plain-unknown", lambda p: models.to_bayesian(nn.Sequential(nn.Linear(2, 2)), keep_plain=["fc"]), ValueError,
         r"\['fc'\] are not modules", "names look like"),
    Case("tau0-zero", lambda p: models.to_bayesian(nn.Linear(2, 2), prior="hs", tau0=0.0),
         ValueError, "tau0 must be positive", "positive"),
    Case("clip-var-negative", lambda p: models.to_bayesian(nn.Linear(2, 2), clip_var=-1.0),
         ValueError, "clip_var", "positive or None"),
    Case("init-weight-list", lambda p: LinearGroup(2, 2, init_weight=[[1.0, 0.0], [0.0, 1.0]]),
         TypeError, "init_weight.*list", "torch.Tensor or a numpy array"),
    Case("init-weight-shape", lambda p: LinearGroup(3, 2, init_weight=np.zeros((3, 2))), ValueError, r"shape \(3, 2\)",
         r"needs \(2, 3\)"),
    Case("init-bias-shape", lambda p: ConvGroup(1, 2, 3, init_bias=torch.zeros(3)),
         ValueError, r"init_bias has shape \(3,\)", r"needs \(2,\)"),
]


@pytest.mark.parametrize("case", params(CONVERSION))
def test_conversion(case: Case, tmp_path: Path) -> None:
    case.check(tmp_path)


def test_numpy_initial_weights_are_converted() -> None:
    w, b = np.arange(6, dtype=np.float64).reshape(2, 3), np.array([1.0, -1.0])
    layer = LinearGroup(3, 2, init_weight=w, init_bias=b)
    assert torch.equal(layer.weight_mu.detach(), torch.from_numpy(w).float())
    assert torch.equal(layer.bias_mu.detach(), torch.from_numpy(b).float())


def test_keep_plain_accepts_one_name() -> None:
    net = models.to_bayesian(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), keep_plain="1")
    assert [type(m) for m in net] == [LinearGroup, nn.Linear]


# --- data files -----------------------------------------------------------------------------
MNIST_FILES = {
    "train-images-idx3-ubyte": (2051, (6, 28, 28)),
    "train-labels-idx1-ubyte": (2049, (6,)),
    "t10k-images-idx3-ubyte": (2051, (4, 28, 28)),
    "t10k-labels-idx1-ubyte": (2049, (4,)),
}


def idx_bytes(magic: int, dims: tuple[int, ...], seed: int = 0) -> bytes:
    """An IDX file (big-endian magic, sizes, then uint8 values) as MNIST's."""
    body = np.random.default_rng(seed).integers(0, 10, int(np.prod(dims)), dtype=np.uint8).tobytes()
    return struct.pack(f">I{len(dims)}I", magic, *dims) + body


def fake_mnist(root: Path, damage: dict[str, Callable[[bytes], bytes]] | None = None) -> Path:
    """Four small MNIST files in ``root/MNIST/raw``, ``damage[name]`` applied to the bytes of that file."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, (magic, dims) in MNIST_FILES.items():
        content = idx_bytes(magic, dims)
        (raw / name).write_bytes((damage or {}).get(name, lambda b: b)(content))
    return root


def load_damaged(tmp_path: Path, name: str, damage: Callable[[bytes], bytes], train_split: bool = True) -> Any:
    return data.load_mnist(train_split, root=fake_mnist(tmp_path, {name: damage}), download=False)


def fake_cifar(root: Path) -> Path:
    """CIFAR-10's seven files in ``root/cifar-10-batches-py``, each 10 bytes of garbage."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"x" * 10)
    return root


def garbage(b: bytes) -> bytes:
    return bytes(random.Random(1).randrange(256) for _ in range(len(b)))


DATA = [
    Case("images-truncated", lambda p: load_damaged(p, "train-images-idx3-ubyte", lambda b: b[:3000]), data.DataFileError,
         r"train-images-idx3-ubyte.*truncated.*3000 bytes.*expected 4720", "delete it"),
    Case("labels-truncated", lambda p: load_damaged(p, "t10k-labels-idx1-ubyte", lambda b: b[:10], False),
         data.DataFileError, r"t10k-labels-idx1-ubyte.*truncated.*10 bytes.*expected 12", "delete it"),
    Case("images-garbage", lambda p: load_damaged(p, "train-images-idx3-ubyte", garbage), data.DataFileError,
         r"train-images-idx3-ubyte.*magic number.*expected 2051", r"delete it.*yann\.lecun|delete it.*download"),
    Case("labels-garbage", lambda p: load_damaged(p, "train-labels-idx1-ubyte", garbage), data.DataFileError,
         r"train-labels-idx1-ubyte.*magic number.*expected 2049", "delete it"),
    Case("images-swapped-with-labels", lambda p: load_damaged(p, "train-images-idx3-ubyte", lambda b: idx_bytes(2049, (6,))),
         data.DataFileError, r"train-images-idx3-ubyte.*magic number 2049.*expected 2051", "delete it"),
    Case("empty-file", lambda p: load_damaged(p, "train-labels-idx1-ubyte", lambda b: b""), data.DataFileError,
         r"train-labels-idx1-ubyte.*0 bytes", "delete it"),
    Case("too-long", lambda p: load_damaged(p, "train-images-idx3-ubyte", lambda b: b + b"\0" * 100), data.DataFileError,
         r"train-images-idx3-ubyte.*4820 bytes.*expected 4720", "delete it"),
    Case("image-size-not-28", lambda p: load_damaged(p, "t10k-images-idx3-ubyte", lambda b: idx_bytes(2051, (4, 32, 32)), False),
         data.DataFileError, r"t10k-images-idx3-ubyte.*32 x 32.*28 x 28", "delete it"),
    Case("counts-differ", lambda p: load_damaged(p, "train-labels-idx1-ubyte", lambda b: idx_bytes(2049, (5,))),
         data.DataFileError, r"6 images.*5 labels", "delete"),
    Case("file-missing-offline", lambda p: (fake_mnist(p), (p / "MNIST/raw/t10k-labels-idx1-ubyte").unlink(),
                                            data.load_mnist(False, root=p, download=False)),
         FileNotFoundError, r"MNIST/raw.*t10k-labels-idx1-ubyte", "download=True|put the four files"),
    Case("data-dir-missing", lambda p: data.load_mnist(True, root=p / "nowhere", download=False), FileNotFoundError,
         "nowhere.*does not exist", "BCLIB_DATA"),
    Case("data-dir-is-a-file", lambda p: ((p / "f").write_text("x"), data.load_mnist(True, root=p / "f"))[1],
         NotADirectoryError, "is a file, not a folder", "BCLIB_DATA"),
    Case("limit-negative", lambda p: data.load_mnist(True, root=fake_mnist(p), download=False, limit=-2), ValueError,
         "limit=-2", "positive number of examples or None"),
    Case("limit-zero", lambda p: data.load_mnist(True, root=fake_mnist(p), download=False, limit=0), ValueError,
         "limit=0", "positive number"),
    Case("limit-float", lambda p: data.load_mnist(True, root=fake_mnist(p), download=False, limit=2.5), TypeError,
         "limit=2.5", "positive number of examples"),
    Case("cifar-missing", lambda p: data.load_cifar10(True, root=p, download=False), FileNotFoundError,
         "CIFAR-10 is missing", "cifar-10-python.tar.gz"),
    Case("cifar-garbage", lambda p: data.load_cifar10(True, root=fake_cifar(p), download=False), FileNotFoundError,
         "missing or corrupt", "delete|cifar-10-python.tar.gz"),
    Case("cifar-dir-missing", lambda p: data.load_cifar10(False, root=p / "nowhere", download=False), FileNotFoundError,
         "nowhere.*does not exist", "BCLIB_DATA"),
]


@pytest.mark.parametrize("case", params(DATA))
def test_data(case: Case, tmp_path: Path) -> None:
    case.check(tmp_path)


def test_bclib_data_not_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``BCLIB_DATA`` pointing at nothing or at a file: the message names the variable."""
    monkeypatch.setenv("BCLIB_DATA", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match=r"absent.*does not exist.*BCLIB_DATA"):
        data.load_mnist(True, download=False)
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("BCLIB_DATA", str(tmp_path / "file"))
    with pytest.raises(NotADirectoryError, match=r"file.*is a file, not a folder.*BCLIB_DATA"):
        data.load_mnist(True)


def test_small_valid_mnist_files_load(tmp_path: Path) -> None:
    """The checks accept well-formed files of any length (the oracle: the bytes written)."""
    x, y = data.load_mnist(False, root=fake_mnist(tmp_path), download=False)
    assert x.shape == (4, 1, 28, 28)
    labels = np.frombuffer(idx_bytes(2049, (4,)), np.uint8, offset=8)
    assert y.tolist() == labels.tolist()


# --- checkpoints ----------------------------------------------------------------------------
def good_checkpoint(path: Path) -> Path:
    train.save_checkpoint(path, lenet(), "lenet_300_100", "nj")
    return path


def saved(path: Path, obj: Any) -> Path:
    torch.save(obj, path)
    return path


def edited(path: Path, **change: Any) -> Path:
    state = torch.load(good_checkpoint(path), weights_only=True)
    for k, v in change.items():
        if v is None:
            del state[k]
        else:
            state[k] = v
    return saved(path, state)


def training_state(path: Path) -> Path:
    net = nn.Sequential(nn.Linear(4, 2))
    batches = data.TensorBatches(torch.randn(8, 4), torch.randint(0, 2, (8,)), 4)
    train.train(net, batches, 1, progress=False, state_path=path)
    return path


CHECKPOINTS = [
    Case("missing", lambda p: train.load_checkpoint(p / "none.pt"),
         FileNotFoundError, "no checkpoint at .*none.pt", "check the path"),
    Case("directory", lambda p: train.load_checkpoint(p),
         IsADirectoryError, "is a directory", r"checkpoint file.*\.pt"),
    Case("empty", lambda p: ((p / "e.pt").write_bytes(b""), train.load_checkpoint(p / "e.pt")),
         train.CheckpointError, "empty", "save it again|delete it"),
    Case("truncated", lambda p: ((p / "t.pt").write_bytes(good_checkpoint(p / "g.pt").read_bytes()[:5000]),
                                 train.load_checkpoint(p / "t.pt")), train.CheckpointError, "truncated or corrupt", "delete it"),
    Case("text-file", lambda p: ((p / "t.pt").write_text('{"arch": "lenet_300_100"}'), train.load_checkpoint(p / "t.pt")),
         train.CheckpointError, "not a torch file", "save_checkpoint"),
    Case("pruned-network", lambda p: train.load_checkpoint(saved(p / "p.pt", compression.prune(mlp(), [-3.0] * 3))),
         train.CheckpointError, "pruned network", r"torch\.load\(.*weights_only=False\)"),
    Case("whole-module", lambda p: train.load_checkpoint(saved(p / "m.pt", nn.Linear(2, 2))), train.CheckpointError,
         "pickled Python object", r"weights_only=False.*trust"),
    Case("bare-state-dict", lambda p: train.load_checkpoint(saved(p / "s.pt", lenet().state_dict())), train.CheckpointError,
         "bare state_dict", r"build\(arch, prior\)\.load_state_dict"),
    Case("training-state", lambda p: train.load_checkpoint(training_state(p / "state.pt")), train.CheckpointError,
         "training state", r"state_path=.*save_checkpoint"),
    Case("other-dict", lambda p: train.load_checkpoint(saved(p / "o.pt", {"weights": torch.zeros(3)})),
         train.CheckpointError, "not a bclib checkpoint", "save_checkpoint"),
    Case("tensor", lambda p: train.load_checkpoint(saved(p / "o.pt", torch.zeros(3))), train.CheckpointError,
         "not a bclib checkpoint.*Tensor", "save_checkpoint"),
    Case("no-arch", lambda p: train.load_checkpoint(edited(p / "c.pt", arch=None)), train.CheckpointError,
         "no 'arch'", "save it again with save_checkpoint"),
    Case("no-state-dict", lambda p: train.load_checkpoint(edited(p / "c.pt", state_dict=None)), train.CheckpointError,
         "no 'state_dict'", "save it again with save_checkpoint"),
    Case("unknown-arch", lambda p: train.load_checkpoint(edited(p / "c.pt", arch="lenet_9000")), train.CheckpointError,
         "unknown architecture 'lenet_9000'", "save it again with save_checkpoint|lenet_300_100"),
    Case("unknown-prior", lambda p: train.load_checkpoint(edited(p / "c.pt", prior="xx")), train.CheckpointError,
         "unknown prior 'xx'", "save it again with save_checkpoint"),
    Case("state-dict-not-dict", lambda p: train.load_checkpoint(edited(p / "c.pt", state_dict=torch.zeros(2))),
         train.CheckpointError, "state_dict", "save it again with save_checkpoint"),
    Case("meta-not-dict", lambda p: train.load_checkpoint(edited(p / "c.pt", meta=[1, 2])), train.CheckpointError,
         "meta", "save it again with save_checkpoint"),
    Case("other-model", lambda p: train.load_checkpoint(edited(p / "c.pt", prior="hs")), train.CheckpointError,
         "does not match lenet_300_100 with prior 'hs'", "save it again with save_checkpoint"),
    Case("other-arch", lambda p: train.load_checkpoint(edited(p / "c.pt", arch="lenet5_caffe")), train.CheckpointError,
         "does not match lenet5_caffe", "save it again with save_checkpoint"),
    Case("compressed-file", lambda p: train.load_checkpoint(compressed_file(p / "m.bclb")),
         train.CheckpointError, "bit-packed compressed model", r"load_compressed\("),
    Case("save-unknown-arch", lambda p: train.save_checkpoint(p / "c.pt", lenet(), "lenet300", "nj"), ValueError,
         "unknown architecture 'lenet300'", "lenet_300_100"),
    Case("save-wrong-arch", lambda p: train.save_checkpoint(p / "c.pt", lenet(), "lenet5_caffe", "nj"), ValueError,
         "not lenet5_caffe with prior 'nj'", "could not be loaded back"),
    Case("save-to-directory", lambda p: train.save_checkpoint(p, lenet(), "lenet_300_100", "nj"), IsADirectoryError,
         "is a directory", r"file path.*\.pt"),
    Case("save-meta-unpicklable", lambda p: train.save_checkpoint(p / "c.pt", lenet(), "lenet_300_100", "nj", fn=lambda: 0),
         TypeError, "meta.*fn", "numbers, strings, lists, dicts or tensors"),
    Case("save-meta-numpy", lambda p: train.save_checkpoint(p / "c.pt", lenet(), "lenet_300_100", "nj", acc=np.float64(0.98)),
         TypeError, r"meta\['acc'\] is a numpy.float64", r"float\(v\)"),
]


@pytest.mark.parametrize("case", params(CHECKPOINTS))
def test_checkpoints(case: Case, tmp_path: Path) -> None:
    case.check(tmp_path)


def test_checkpoint_of_a_data_parallel_model_is_saved_unwrapped(tmp_path: Path) -> None:
    train.save_checkpoint(tmp_path / "dp.pt", nn.DataParallel(lenet()), "lenet_300_100", "nj")
    loaded, _ = train.load_checkpoint(tmp_path / "dp.pt")
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x), lenet()(x))


def test_random_and_truncated_checkpoints_raise_one_error_type(tmp_path: Path) -> None:
    """200 damaged files, seeded: random bytes, truncations and byte flips of a good checkpoint,
    and a zip archive with random members. Each gives ``CheckpointError``, never a raw error."""
    good = good_checkpoint(tmp_path / "good.pt").read_bytes()
    rng = random.Random(14)
    path = tmp_path / "bad.pt"
    for i in range(200):
        kind = i % 4
        if kind == 0:
            content = rng.randbytes(rng.randrange(1, 4096))
        elif kind == 1:
            content = good[: rng.randrange(1, len(good))]
        elif kind == 2:
            content = bytearray(good)
            for _ in range(rng.randrange(1, 8)):
                content[rng.randrange(len(content))] ^= 1 << rng.randrange(8)
            content = bytes(content)
        else:
            content = good[:64] + rng.randbytes(rng.randrange(64, 2048))
        path.write_bytes(content)
        try:
            train.load_checkpoint(path)
        except train.CheckpointError as err:
            assert str(path) in str(err)
        else:  # a flip in unused padding or in a weight leaves a loadable file
            assert kind == 2, f"case {i} (kind {kind}) loaded"


# --- devices --------------------------------------------------------------------------------
DEVICES = [
    Case("load-device-misspelt", lambda p: train.load_checkpoint(good_checkpoint(p / "c.pt"), device="gpu"), ValueError,
         "device 'gpu'", r"'cpu', 'cuda'"),
    Case("load-device-type", lambda p: train.load_checkpoint(good_checkpoint(p / "c.pt"), device=0.5), TypeError,
         "device 0.5", r"torch\.device"),
]
if not torch.cuda.is_available():
    DEVICES.append(Case("load-on-cuda-without-cuda", lambda p: train.load_checkpoint(good_checkpoint(p / "c.pt"), device="cuda"),
                        RuntimeError, "CUDA is not available", "device='cpu'"))


@pytest.mark.parametrize("case", params(DEVICES))
def test_devices(case: Case, tmp_path: Path) -> None:
    case.check(tmp_path)


def test_masks_and_loaded_models_move_to_the_device(tmp_path: Path) -> None:
    """On ``meta`` (no memory): masks follow ``.to``, ``load_checkpoint(device=)`` places every tensor."""
    net = models.lenet_300_100("nj")
    compression.apply_masks(net, compression.group_masks(net, [0.0] * 3))
    net.to("meta")
    assert all(layer.weight_mask.device.type == "meta" for layer in models.bayesian_layers(net))
    loaded, _ = train.load_checkpoint(good_checkpoint(tmp_path / "c.pt"), device=torch.device("meta"))
    assert {t.device.type for t in loaded.state_dict().values()} == {"meta"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_checkpoint_masks_and_evaluate(tmp_path: Path) -> None:
    """On a GPU: the loaded model, its masks and evaluate's batches (given on the CPU) all meet on CUDA."""
    loaded, _ = train.load_checkpoint(good_checkpoint(tmp_path / "c.pt"), device="cuda")
    assert {t.device.type for t in loaded.state_dict().values()} == {"cuda"}
    compression.apply_masks(loaded, compression.group_masks(loaded, [0.0] * 3))
    assert all(layer.weight_mask.is_cuda for layer in models.bayesian_layers(loaded))
    x = torch.randn(8, 1, 28, 28)
    y = loaded(x.cuda()).argmax(1).cpu()
    assert train.evaluate(loaded, [(x, y)]) == 1.0


# --- export: ONNX and the bit-packed file ------------------------------------------------------
def compressed_file(path: Path) -> Path:
    export.export_compressed(lenet(), [0.0] * 3, path)
    return path


def damaged(path: Path, change: Callable[[bytes], bytes]) -> Path:
    p = compressed_file(path)
    p.write_bytes(change(p.read_bytes()))
    return p


def flip(offset: int) -> Callable[[bytes], bytes]:
    def change(b: bytes) -> bytes:
        c = bytearray(b)
        c[offset % len(c)] ^= 0x10
        return bytes(c)

    return change


def onnx(p: Path, net: nn.Module, x: Any) -> Any:
    return export.export_onnx(net, p / "m.onnx", x)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x + self.a(x))


EXPORT = [
    Case("onnx-bayesian-model", lambda p: onnx(p, mlp(), X16), TypeError, "Bayesian group layers",
         r"compression\.prune\(net, thresholds, x\).*compression\.dense\(net, x\)"),
    Case("onnx-wrong-shape", lambda p: onnx(p, compression.prune(mlp(), [-3.0] * 3), torch.randn(4, 10)), ValueError,
         r"example_input of shape \(4, 10\)", r"takes input of shape \(\.\.\., \d+\)"),
    Case("onnx-small-image", lambda p: onnx(p, compression.prune(lenet(), [0.0] * 3), torch.randn(1, 1, 14, 14)), ValueError,
         r"example_input of shape \(1, 1, 14, 14\)", "mat1 and mat2|takes input of shape"),
    Case("onnx-numpy-input", lambda p: onnx(p, compression.prune(mlp(), [-3.0] * 3), np.zeros((1, 16))), TypeError,
         "not ndarray", r"torch\.randn"),
    Case("onnx-scalar-input", lambda p: onnx(p, compression.prune(mlp(), [-3.0] * 3), torch.tensor(1.0)), ValueError,
         "scalar", "batch dimension first"),
    Case("onnx-not-a-module", lambda p: export.export_onnx(lambda x: x, p / "m.onnx", X16),
         TypeError, "needs an nn.Module, got function", "pass the network"),
    Case("onnx-no-folder", lambda p: export.export_onnx(compression.prune(mlp(), [-3.0] * 3), p / "no" / "m.onnx", X16),
         FileNotFoundError, "no directory", "create it first"),
    Case("onnx-path-is-dir", lambda p: export.export_onnx(compression.prune(mlp(), [-3.0] * 3), p, X16), IsADirectoryError,
         "is a directory", "give a file path"),
    Case("compressed-plain-model", lambda p: export.export_compressed(nn.Sequential(nn.Linear(2, 2)), [0.0], p / "m.bclb"),
         TypeError, "no Bayesian group layers", "to_bayesian"),
    Case("compressed-bad-thresholds", lambda p: export.export_compressed(lenet(), "0", p / "m.bclb"), TypeError,
         "list of numbers", "one log-alpha"),
    Case("compressed-not-a-chain", lambda p: export.export_compressed(models.to_bayesian(Residual()), [-3.0] * 2, p / "m.bclb"),
         ValueError, "chain of layers", r"export_onnx"),
    Case("compressed-to-directory", lambda p: export.export_compressed(lenet(), [0.0] * 3, p), IsADirectoryError,
         "is a directory", "give a file path"),
    Case("read-missing", lambda p: load_compressed(p / "none.bclb"),
         FileNotFoundError, "none.bclb", "export_compressed"),
    Case("read-directory", lambda p: load_compressed(p), IsADirectoryError, "is a directory", "export_compressed"),
    Case("read-checkpoint", lambda p: load_compressed(good_checkpoint(p / "c.pt")),
         ValueError, "not a bclib compressed model", r"load_checkpoint"),
    Case("read-flipped-payload", lambda p: load_compressed(damaged(p / "m.bclb", flip(-100))), ValueError, "CRC-32 mismatch",
         "export it again"),
    Case("read-flipped-spec", lambda p: load_compressed(damaged(p / "m.bclb", flip(30))), ValueError, "CRC-32 mismatch",
         "export it again"),
    Case("read-flipped-crc", lambda p: load_compressed(damaged(p / "m.bclb", flip(9))),
         ValueError, "CRC-32 mismatch", "export it again"),
    Case("read-truncated", lambda p: load_compressed(damaged(p / "m.bclb", lambda b: b[: len(b) // 2])), ValueError,
         "truncated", "export it again"),
    Case("read-header-only", lambda p: load_compressed(damaged(p / "m.bclb", lambda b: b[:10])), ValueError,
         "truncated.*10 bytes", "export it again"),
    Case("read-appended", lambda p: load_compressed(damaged(p / "m.bclb", lambda b: b + b"\0\0")), ValueError,
         "2 bytes after the end", "export it again"),
    Case("read-empty", lambda p: load_compressed(damaged(p / "m.bclb", lambda b: b"")), ValueError, "truncated.*0 bytes",
         "export it again"),
    Case("read-future-version", lambda p: load_compressed(damaged(p / "m.bclb", lambda b: b[:4] + struct.pack("<I", 9) + b[8:])),
         ValueError, "format version 9", "update bclib"),
]


@pytest.mark.parametrize("case", params(EXPORT))
def test_export(case: Case, tmp_path: Path) -> None:
    case.check(tmp_path)


def test_damaged_compressed_files_are_refused(tmp_path: Path) -> None:
    """Every flip of one bit anywhere in the file, and every truncation, is a ``ValueError``
    (the CRC-32 detects every single-bit error; checked here on 300 seeded positions)."""
    good = compressed_file(tmp_path / "m.bclb").read_bytes()
    rng = random.Random(14)
    path = tmp_path / "bad.bclb"
    for _ in range(300):
        c = bytearray(good)
        c[rng.randrange(len(c))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(c))
        with pytest.raises(ValueError, match="corrupt|truncated|not a bclib|format version"):
            load_compressed(path)
    for n in sorted(rng.sample(range(len(good)), 50)):
        path.write_bytes(good[:n])
        with pytest.raises(ValueError, match="corrupt|truncated"):
            load_compressed(path)


# --- nothing is lost ----------------------------------------------------------------------------
def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_failing_writers_keep_the_previous_file(tmp_path: Path) -> None:
    """A save or export that fails leaves the file written before it as it was, and no temporary file."""
    ckpt, onnx_path, packed = good_checkpoint(tmp_path / "c.pt"), tmp_path / "m.onnx", compressed_file(tmp_path / "m.bclb")
    onnx_path.write_bytes(b"an earlier onnx file")
    before = {p: digest(p) for p in (ckpt, onnx_path, packed)}
    failing = [
        lambda: train.save_checkpoint(ckpt, lenet(), "lenet5_caffe", "nj"),
        lambda: train.save_checkpoint(ckpt, lenet(), "lenet_300_100", "nj", fn=lambda: 0),
        lambda: export.export_onnx(mlp(), onnx_path, X16),
        lambda: export.export_onnx(compression.prune(mlp(), [-3.0] * 3), onnx_path, torch.randn(4, 10)),
        lambda: export.export_compressed(lenet(), [0.0] * 2, packed),
        lambda: export.export_compressed(models.to_bayesian(Residual()), [-3.0] * 2, packed),
        lambda: export.export_compressed(models.to_bayesian(nn.Sequential(nn.Linear(4, 4), nn.Tanh())), [-3.0], packed),
    ]
    for call in failing:
        with pytest.raises((ValueError, TypeError)):
            call()
    assert {p: digest(p) for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "m.bclb", "m.onnx"]


def test_readers_leave_damaged_files_alone(tmp_path: Path) -> None:
    """Loading a damaged checkpoint, compressed model or MNIST file neither deletes nor changes it."""
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"PK\x03\x04 not really a zip")
    packed = tmp_path / "m.bclb"
    packed.write_bytes(b"BCLB" + b"\0" * 30)
    root = fake_mnist(tmp_path / "data", {"train-images-idx3-ubyte": lambda b: b[:100]})
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    before = {p: digest(p) for p in (ckpt, packed, images)}
    with pytest.raises(train.CheckpointError):
        train.load_checkpoint(ckpt)
    with pytest.raises(ValueError):
        load_compressed(packed)
    with pytest.raises(data.DataFileError):
        data.load_mnist(True, root=root)  # download=True: a damaged file is reported, not replaced
    assert {p: digest(p) for p in before} == before
