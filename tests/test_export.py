"""bclib.export and the stand-alone bclib.load_compressed: round trip, size, damaged files."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.fx
from torch import nn

import bclib.load_compressed as lc
from bclib import models, precision
from bclib.compression import LayerBits, compression_report, prune, quantized
from bclib.export import _pack_bits, write_quantized, export_compressed, fold_batchnorm
from bclib.load_compressed import load_compressed
from bclib.testing import randomise_batchnorm

# Share of groups (inputs of fc layers, filters of conv layers) whose log_alpha is set high.
PRUNED = {"lenet_300_100": [0.6, 0.5, 0.3], "lenet5_caffe": [0.4, 0.5, 0.5, 0.3]}


def sparse_model(arch: str, prior: str = "nj", seed: int = 0) -> tuple[nn.Sequential, list[float]]:
    """A Bayesian LeNet with some groups' ``log_alpha`` set high by hand (> 3), and thresholds 0.

    Normal-Jeffreys: ``log_alpha = z_logvar - log z_mu^2``; horseshoe: ``log(exp(v) - 1)`` with
    ``v`` a quarter of the summed variances of ``log z``'s parts, ``a``'s included.
    """
    torch.manual_seed(seed)
    model = models.build(arch, prior).eval()
    layers = models.bayesian_layers(model)
    with torch.no_grad():
        for layer, share in zip(layers, PRUNED[arch]):
            logvar = layer.scale.z_logvar if prior == "nj" else layer.scale.a_logvar
            logvar[torch.rand(logvar.shape) < share] = 4.0
    return model, [0.0] * len(layers)


def reference(model: nn.Sequential, thresholds: list[float]) -> nn.Module:
    return quantized(prune(model, thresholds), compression_report(model, thresholds).bits)


def assert_same_weights(net: nn.Module, ref: nn.Module) -> None:
    got, want = ([m.weight for m in n.modules() if isinstance(m, (nn.Linear, nn.Conv2d))] for n in (net, ref))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def dense_bytes(model: nn.Module) -> int:
    return 4 * sum(t.numel() for layer in models.bayesian_layers(model) for t in (layer.weight_mu, layer.bias_mu))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Sequential, list[float], Path]:
    model, thresholds = sparse_model("lenet_300_100")
    path = tmp_path_factory.mktemp("export") / "lenet.bclb"
    export_compressed(model, thresholds, path)
    return model, thresholds, path


def test_pack_bits_round_trip() -> None:
    rng = np.random.default_rng(0)
    for width in range(1, 33):
        words = rng.integers(0, 2**width, size=37, dtype=np.int64)
        packed = _pack_bits(words, width)
        assert len(packed) == -(-37 * width // 8)
        np.testing.assert_array_equal(lc._unpack_bits(packed, 37, width), words)


def test_loader_limits_match_precision() -> None:
    assert (lc.MAX_EXPONENT_BITS, lc.MAX_SIGNIFICAND_BITS) == (precision.MAX_EXPONENT_BITS, precision.MAX_SIGNIFICAND_BITS)


@pytest.mark.parametrize("arch, prior", [("lenet_300_100", "nj"), ("lenet5_caffe", "nj"), ("lenet5_caffe", "hs")])
def test_round_trip_matches_quantized_pruned_net(arch: str, prior: str, tmp_path: Path) -> None:
    model, thresholds = sparse_model(arch, prior)
    ref = reference(model, thresholds)
    size = export_compressed(model, thresholds, tmp_path / "net.bclb")
    net = load_compressed(tmp_path / "net.bclb")

    assert isinstance(net, nn.Sequential) and not net.training
    assert any(isinstance(m, lc.SelectFeatures) for m in net)  # pruned single input features
    assert_same_weights(net, ref)
    x = torch.randn(32, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), atol=1e-5, rtol=0)
    assert size == (tmp_path / "net.bclb").stat().st_size < dense_bytes(model)
    assert [p.name for p in tmp_path.iterdir()] == ["net.bclb"]  # no temporary file left


def test_extreme_significand_bits(tmp_path: Path) -> None:
    """Layers with 23 and with 0 significand bits (posterior variance tiny / large) survive the round trip."""
    model, thresholds = sparse_model("lenet_300_100")
    first, _, last = models.bayesian_layers(model)
    with torch.no_grad():
        first.weight_logvar.fill_(-40.0)
        last.weight_logvar.fill_(0.0)
    bits = compression_report(model, thresholds).bits
    assert (bits[0].significand, bits[2].significand) == (23, 0)
    export_compressed(model, thresholds, tmp_path / "net.bclb")
    net, ref = load_compressed(tmp_path / "net.bclb"), reference(model, thresholds)
    assert_same_weights(net, ref)


def test_overwrites_existing_file(exported: tuple, tmp_path: Path) -> None:
    model, thresholds, _ = exported
    path = tmp_path / "net.bclb"
    path.write_bytes(b"old")
    export_compressed(model, thresholds, path)
    assert path.read_bytes()[:4] == lc.MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["net.bclb"]


def test_unsupported_layer_writes_nothing(tmp_path: Path) -> None:
    model = models.to_bayesian(nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(12, 3)))
    with pytest.raises(TypeError, match="stores Linear, Conv2d"):
        export_compressed(model, [0.0, 0.0], tmp_path / "net.bclb")
    assert list(tmp_path.iterdir()) == []


# --- BatchNorm folding and dropout -----------------------------------------------------------
def with_running_stats(net: nn.Module, seed: int = 0) -> nn.Module:
    """``net`` with random BatchNorm running statistics and affine parameters (not 0/1), in eval mode."""
    return randomise_batchnorm(net, seed).eval()


def batchnorms(net: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def bn_cnn() -> nn.Sequential:
    """Conv2d-BatchNorm2d-ReLU-MaxPool-Dropout-Flatten-Linear-BatchNorm1d-ReLU-Dropout-Linear for 1x12x12 inputs."""
    torch.manual_seed(0)
    return with_running_stats(nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.5), nn.Flatten(),
        nn.Linear(4 * 5 * 5, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 10),
    ))  # fmt: skip


class SharedOutput(nn.Module):
    """A conv output read by a BatchNorm and by the residual add: folding would change the add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_fold_batchnorm_is_exact_and_leaves_the_net_alone() -> None:
    net = bn_cnn()
    folded = fold_batchnorm(net.train())
    assert isinstance(folded, torch.fx.GraphModule) and not folded.training
    assert batchnorms(folded) == 0 and batchnorms(net) == 2 and net.training
    x = torch.randn(8, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net.eval()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.BatchNorm2d(3)), (2, 6, 6)),  # after a ReLU
        (SharedOutput, (3, 5, 5)),
        (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, track_running_stats=False)), (2, 6, 6)),
        (lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), (4, 4)),  # (N, 4, 4): normalizes dim 1, not features
    ],
    ids=["after-relu", "shared-output", "batch-statistics", "linear-3d"],
)
def test_fold_batchnorm_keeps_what_cannot_fold(make: Callable[[], nn.Module], shape: tuple[int, ...]) -> None:
    net = with_running_stats(make())
    x = torch.randn(6, *shape)
    folded = fold_batchnorm(net, x[:2])
    assert batchnorms(folded) == 1
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-5)


def test_batchnorm_and_dropout_round_trip(tmp_path: Path) -> None:
    """BatchNorm folds into the layer before it, which keeps its bits ("fold, then round"); dropout is not stored."""
    net = bn_cnn()
    bits = [LayerBits(3, 5), LayerBits(4, 7), LayerBits(5, 2)]
    size = write_quantized(torch.fx.symbolic_trace(net), bits, tmp_path / "net.bclb")
    loaded = load_compressed(tmp_path / "net.bclb")

    spec, _ = lc._read_file((tmp_path / "net.bclb").read_bytes())
    types = [layer["type"] for layer in spec["layers"]]
    assert types == ["conv2d", "relu", "maxpool2d", "flatten", "linear", "relu", "linear"]  # no batchnorm, no dropout
    assert size == (tmp_path / "net.bclb").stat().st_size
    ref = quantized(fold_batchnorm(net), bits)
    assert_same_weights(loaded, ref)
    assert loaded[0].bias is not None and loaded[4].bias is not None  # the folded shift
    x = torch.randn(16, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref(x), atol=1e-5, rtol=0)


def test_bayesian_net_with_batchnorm_and_dropout(tmp_path: Path) -> None:
    """export_compressed prunes filters with their BatchNorm channels, then folds and rounds."""
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Conv2d(1, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.3),
        nn.Flatten(), nn.Linear(6 * 5 * 5, 10),
    )  # fmt: skip
    model = models.to_bayesian(with_running_stats(plain)).eval()
    with torch.no_grad():
        models.bayesian_layers(model)[0].scale.z_logvar[:2] = 4.0  # log_alpha > 0: two filters go
    thresholds = [0.0, 0.0]
    export_compressed(model, thresholds, tmp_path / "net.bclb")
    net = load_compressed(tmp_path / "net.bclb")
    ref = quantized(fold_batchnorm(prune(model, thresholds)), compression_report(model, thresholds).bits)

    assert net[0].out_channels == 4 and not any(isinstance(m, nn.Dropout) for m in net)
    assert_same_weights(net, ref)
    x = torch.randn(8, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), atol=1e-5, rtol=0)


def test_only_former_group_layers_are_rounded(tmp_path: Path) -> None:
    """A net from ``prune`` names its former group layers; a layer ``to_bayesian`` left plain keeps float32 precision."""
    net = torch.fx.symbolic_trace(bn_cnn())
    net.bayesian_layer_names = ["0", "10"]  # the conv and the last linear layer; "6" stayed plain
    bits = [LayerBits(3, 5), LayerBits(5, 2)]
    write_quantized(net, bits, tmp_path / "net.bclb")
    loaded, folded = load_compressed(tmp_path / "net.bclb"), fold_batchnorm(net)
    assert folded.bayesian_layer_names == ["0", "10"]
    assert torch.equal(loaded[0].weight, precision.round_to_bits(folded.get_submodule("0").weight, 3, 5))
    assert torch.equal(loaded[4].weight, folded.get_submodule("6").weight)
    assert torch.equal(loaded[6].weight, precision.round_to_bits(folded.get_submodule("10").weight, 5, 2))


def test_unfoldable_batchnorm_writes_nothing(tmp_path: Path) -> None:
    net = torch.fx.symbolic_trace(with_running_stats(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.BatchNorm1d(3))))
    with pytest.raises(TypeError, match=r"cannot fold BatchNorm1d\(3.*must directly follow"):
        write_quantized(net, [LayerBits(3, 3)], tmp_path / "net.bclb")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("count", [1, 4])
def test_bits_per_layer_count_checked(tmp_path: Path, count: int) -> None:
    with pytest.raises(ValueError, match=rf"got {count} bit widths for 3 layers \(0, 6, 10\): give one LayerBits per layer"):
        write_quantized(bn_cnn(), [LayerBits(3, 3)] * count, tmp_path / "net.bclb")
    assert list(tmp_path.iterdir()) == []


# --- damaged files ----------------------------------------------------------------------
def load_bytes(data: bytes, tmp_path: Path) -> nn.Module:
    path = tmp_path / "damaged.bclb"
    path.write_bytes(data)
    return load_compressed(path)


def rewrite_spec(data: bytes, edit: Callable[[dict], None]) -> bytes:
    """``data`` with its JSON spec edited and a valid CRC (so only the spec checks can object)."""
    start = lc.HEADER.size + lc.LENGTHS.size
    spec_len, payload_len = lc.LENGTHS.unpack_from(data, lc.HEADER.size)
    spec = json.loads(data[start : start + spec_len])
    edit(spec)
    new = json.dumps(spec).encode()
    body = lc.LENGTHS.pack(len(new), payload_len) + new + data[start + spec_len :]
    return lc.HEADER.pack(lc.MAGIC, lc.FORMAT_VERSION, zlib.crc32(body)) + body


def test_truncated(exported: tuple, tmp_path: Path) -> None:
    data = exported[2].read_bytes()
    for cut in (0, 3, 10, 19, 20, 100, len(data) // 2, len(data) - 1):
        with pytest.raises(ValueError, match="truncated"):
            load_bytes(data[:cut], tmp_path)


def test_flipped_byte(exported: tuple, tmp_path: Path) -> None:
    data = exported[2].read_bytes()
    header = lc.HEADER.size + lc.LENGTHS.size
    for pos in list(range(header)) + np.linspace(header, len(data) - 1, 40).astype(int).tolist():
        flipped = bytearray(data)
        flipped[pos] ^= 0x01
        expected = "not a bclib" if pos < 4 else "format version" if pos < 8 else "altered or corrupt|truncated"
        with pytest.raises(ValueError, match=expected):
            load_bytes(bytes(flipped), tmp_path)


def test_body_flip_reports_crc(exported: tuple, tmp_path: Path) -> None:
    data = bytearray(exported[2].read_bytes())
    data[-5] ^= 0x80
    with pytest.raises(ValueError, match=r"file altered or corrupt: CRC-32 mismatch"):
        load_bytes(bytes(data), tmp_path)


def test_trailing_bytes(exported: tuple, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="altered or corrupt: 1 bytes after the end"):
        load_bytes(exported[2].read_bytes() + b"\0", tmp_path)


def test_wrong_magic(exported: tuple, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a bclib compressed model"):
        load_bytes(b"PK\x03\x04" + exported[2].read_bytes()[4:], tmp_path)


def test_newer_version(exported: tuple, tmp_path: Path) -> None:
    data = bytearray(exported[2].read_bytes())
    data[4:8] = (lc.FORMAT_VERSION + 1).to_bytes(4, "little")
    with pytest.raises(ValueError, match=r"written by format version 2, this loader reads 1: update bclib"):
        load_bytes(bytes(data), tmp_path)


def test_rewrite_spec_helper_keeps_file_valid(exported: tuple, tmp_path: Path) -> None:
    model, thresholds, path = exported
    net = load_bytes(rewrite_spec(path.read_bytes(), lambda spec: None), tmp_path)
    assert_same_weights(net, reference(model, thresholds))


def first_linear(spec: dict) -> dict:
    return next(layer for layer in spec["layers"] if layer["type"] == "linear")


@pytest.mark.parametrize(
    "key, value", [("exponent_bits", 9), ("exponent_bits", 0), ("significand_bits", 24), ("significand_bits", -1)]
)
def test_bits_out_of_range(exported: tuple, tmp_path: Path, key: str, value: int) -> None:
    with pytest.raises(ValueError, match="bit widths out of range"):
        load_bytes(rewrite_spec(exported[2].read_bytes(), lambda spec: first_linear(spec).update({key: value})), tmp_path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda spec: first_linear(spec).pop("e_max"), "malformed"),
        (lambda spec: first_linear(spec).update(e_max=1.5), "malformed"),
        (lambda spec: first_linear(spec).update(out_features=-1), "malformed"),
        (lambda spec: first_linear(spec).update(count=7), "malformed"),
        (lambda spec: spec.pop("layers"), "no layer list"),
        (lambda spec: spec["layers"].append({"type": "softmax"}), "unknown layer type 'softmax'"),
        (lambda spec: spec["layers"].pop(), "not described by the spec"),
    ],
    ids=["missing-key", "float", "negative-size", "wrong-count", "no-layers", "unknown-type", "short-spec"],
)
def test_malformed_spec(exported: tuple, tmp_path: Path, edit: Callable[[dict], None], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_bytes(rewrite_spec(exported[2].read_bytes(), edit), tmp_path)


# --- stand-alone use ----------------------------------------------------------------------
def test_loads_without_bclib(exported: tuple, tmp_path: Path) -> None:
    """The loader file copied alone works in a Python where ``import bclib`` fails."""
    model, thresholds, path = exported
    shutil.copy(lc.__file__, tmp_path / "load_compressed.py")
    x = torch.randn(8, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys\n"
        "sys.modules['bclib'] = None  # any import of bclib now raises ImportError\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import torch\n"
        "from load_compressed import load_compressed\n"
        "net = load_compressed(sys.argv[2])\n"
        "torch.save(net(torch.load(sys.argv[3])).detach(), sys.argv[4])\n"
        "assert not [m for m, v in sys.modules.items() if m.startswith('bclib') and v is not None]\n"
    )
    args = [str(tmp_path), str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-I", "-c", script, *args]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), reference(model, thresholds)(x), atol=1e-5, rtol=0)


@pytest.mark.skipif(
    not (os.environ.get("BCLIB_DATA") and (Path(os.environ["BCLIB_DATA"]) / "MNIST" / "raw").is_dir()),
    reason="set BCLIB_DATA to a folder holding MNIST/raw",
)
def test_mnist_predictions_equal(exported: tuple) -> None:
    from bclib.data import load_mnist

    model, thresholds, path = exported
    x, _ = load_mnist(False, download=False)
    with torch.inference_mode():
        got, want = load_compressed(path)(x), reference(model, thresholds)(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.equal(got.argmax(1), want.argmax(1))
