"""CIFAR-10 networks (VGG-like, ResNet-18), the CIFAR-10 loader and augmentation, and the
VGG row of ``bclib.reproduce`` on synthetic tensors (no CIFAR-10 here: no result is faked)."""
import functools
import hashlib
import inspect
import json
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from bclib import compression, data, models, reproduce
from bclib.train import load_checkpoint, save_checkpoint, train

# Weights of the linear and conv layers, and how many such layers there are.
WEIGHTS = {"vgg_cifar10": (14_977_728, 15), "resnet18_cifar": (11_164_352, 21)}


def _weight_layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@pytest.mark.parametrize("arch", sorted(WEIGHTS))
def test_plain_net_counts_and_traces(arch):
    net = models.ARCHITECTURES[arch](None)
    weights, n_layers = WEIGHTS[arch]
    layers = _weight_layers(net)
    assert (sum(m.weight.numel() for m in layers), len(layers)) == (weights, n_layers)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    torch.fx.symbolic_trace(net)  # the compression functions trace it


@pytest.mark.parametrize("prior", ["nj", "hs"])
@pytest.mark.parametrize("arch", sorted(WEIGHTS))
def test_every_layer_becomes_a_group_layer(arch, prior):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer left plain (a ConversionWarning would raise)
        net = models.ARCHITECTURES[arch](prior)
    assert _weight_layers(net) == []
    layers = models.bayesian_layers(net)
    assert len(layers) == WEIGHTS[arch][1]
    assert sum(layer.weight_mu.numel() for layer in layers) == WEIGHTS[arch][0]
    net.eval()
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize(("arch", "prior"), [("vgg_cifar10", "nj"), ("resnet18_cifar", "hs")])
def test_training_step_and_checkpoint_round_trip(arch, prior, tmp_path):
    torch.manual_seed(0)
    net = models.build(arch, prior)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    batches = data.TensorBatches(x, y, batch_size=8, shuffle=True, augment=True)
    history = train(net, batches, epochs=1, n_data=45_000, progress=False)
    assert len(history) == 1 and np.isfinite(history[0]["loss"])

    save_checkpoint(tmp_path / "net.pt", net, arch, prior)
    loaded, meta = load_checkpoint(tmp_path / "net.pt")
    assert (meta["arch"], meta["prior"]) == (arch, prior)
    net.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))  # batch-norm statistics travel too


def test_augment_batch_shifts_and_mirrors_reproducibly():
    x = torch.randn(16, 3, 8, 8)
    a = data.augment_batch(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, data.augment_batch(x, torch.Generator().manual_seed(3)))
    assert a.shape == x.shape and not torch.equal(a, x)
    mirrored = data.augment_batch(x, torch.Generator().manual_seed(3), pad=0)  # no shift: only mirroring
    same = [torch.equal(m, i) or torch.equal(m, i.flip(2)) for m, i in zip(mirrored, x)]
    assert all(same) and not torch.equal(mirrored, x)
    # Each image is a window of its zero-padded self: the shift moves no pixel values in.
    for img, orig in zip(a, x):
        padded = nn.functional.pad(orig, (4, 4, 4, 4))
        windows = [padded[:, i : i + 8, j : j + 8] for i in range(9) for j in range(9)]
        assert any(torch.equal(img, w) or torch.equal(img, w.flip(2)) for w in windows)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        data.augment_batch(x[0], torch.Generator())


def test_load_cifar10_says_where_the_files_go(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        data.load_cifar10(True, root=tmp_path, download=False)
    msg = str(err.value)
    assert str(tmp_path.resolve() / "cifar-10-batches-py") in msg
    assert "cifar-10-python.tar.gz" in msg and "BCLIB_DATA" in msg


def _fake_cifar(root, n_per_batch: int, monkeypatch) -> dict[str, dict]:
    """Write CIFAR-10's python pickles with random images and point torchvision's md5 checks at them."""
    from torchvision.datasets import CIFAR10

    folder = root / CIFAR10.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, n_per_batch).tolist()}  # fmt: skip
    files = {**batches, "batches.meta": {"label_names": [f"class{i}" for i in range(10)]}}
    md5 = {}
    for name, entry in files.items():
        (folder / name).write_bytes(pickle.dumps(entry))
        md5[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", dict(CIFAR10.meta, md5=md5["batches.meta"]))
    return batches


def test_load_cifar10_reads_and_normalises(tmp_path, monkeypatch):
    batches = _fake_cifar(tmp_path, 4, monkeypatch)
    monkeypatch.setenv("BCLIB_DATA", str(tmp_path))  # the default root
    x, y = data.load_cifar10(True, download=False)
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    raw = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    assert y.tolist() == sum((batches[f"data_batch_{i}"]["labels"] for i in range(1, 6)), [])
    n, c, h, w = 9, 2, 5, 30  # rows of 3072 bytes: the red, green, blue planes of 32x32
    expected = (raw[n, c * 1024 + h * 32 + w] / 255 - data.CIFAR10_MEAN[c]) / data.CIFAR10_STD[c]
    assert x[n, c, h, w].item() == pytest.approx(expected, abs=1e-5)
    xt, yt = data.load_cifar10(False, root=tmp_path, download=False, limit=3)
    assert xt.shape == (3, 3, 32, 32) and yt.tolist() == batches["test_batch"]["labels"][:3]


def test_table_lists_the_vgg_row_as_not_run():
    text = reproduce.table([])
    assert "| vgg_cifar10 | BC-GNJ | not run here / 8.6 | – / 14 | – / 56 |" in text
    assert "| vgg_cifar10 | BC-GHS | not run here / 9 | – / 18 | – / 59 |" in text
    arch = [[3, 60 + i] for i in range(13)] + [[50, 512], [40, 10]]  # conv: filters kept; fc: inputs kept
    assert reproduce._kept_groups({"arch": "vgg_cifar10", "architecture": arch}) == "-".join(
        [str(60 + i) for i in range(13)] + ["50", "40"]
    )
    with pytest.raises(SystemExit):
        reproduce.main(["--only", "vgg_cifar10-xx"])


def _synthetic(dataset: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    assert dataset == "cifar10"
    g = torch.Generator().manual_seed(int(train))
    n = 12 if train else 4  # 11 to train on, 1 held out
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.skipif(
    "example_input" not in inspect.signature(compression.prune).parameters,
    reason="compression.prune does not take example_input yet (needed to compress a non-sequential net)",
)
def test_vgg_row_end_to_end_on_synthetic_data(tmp_path, monkeypatch):
    """The whole VGG pipeline on CPU within seconds: random tensors instead of CIFAR-10 (written to
    tmp_path only), one Bayesian epoch, and a budget of all the accuracy with a two-point search
    (one pruned-net evaluation per layer, down to one group each)."""
    monkeypatch.setattr(reproduce, "load_data", _synthetic)
    monkeypatch.setattr(reproduce, "BUDGETS", (1.0,))
    monkeypatch.setattr(compression, "search_thresholds",
                        functools.partial(compression.search_thresholds, candidates=2, passes=1))  # fmt: skip
    reproduce.main(["--fast", "--out", str(tmp_path), "--only", "vgg_cifar10-hs", "--epochs", "1"])
    r = json.loads((tmp_path / "vgg_cifar10-hs.json").read_text())
    assert r["dataset"] == "cifar10" and r["fast"] and r["epochs"] == 1
    assert r["architecture"][0][1] == 1 and len(r["architecture"]) == 15  # one filter left in conv 1
    assert r["weights_before"] == WEIGHTS["vgg_cifar10"][0]
    assert r["rate_precision"] >= r["rate_pruning"] > 1
    assert (tmp_path / "vgg_cifar10-hs-pruned.pt").is_file()
    assert "| vgg_cifar10 | BC-GHS | not run here" not in (tmp_path / "table.md").read_text()
