"""bclib.coded and the stand-alone bclib.load_coded: exact round trip, code lengths, damaged files, KL."""
from __future__ import annotations

import math
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bclib.load_coded as lc
from bclib import coded, models, precision
from bclib.compression import LayerBits, compression_report, former_group_layers, prune, quantized
from bclib.config import results_dir
from bclib.export import export_compressed
from bclib.load_coded import CodedFormatError, load_coded
from bclib.load_compressed import load_compressed
from bclib.testing import randomise_batchnorm, sparsify

INPUTS = {"lenet_300_100": (784,), "lenet5_caffe": (1, 28, 28)}
SHIPPED = [("lenet_300_100", "nj"), ("lenet_300_100", "hs"), ("lenet5_caffe", "nj"), ("lenet5_caffe", "hs")]


def sparse(arch: str, prior: str = "nj", seed: int = 0) -> tuple[nn.Module, list[float]]:
    """A fresh Bayesian LeNet with 40 % of every layer's groups given a high log alpha."""
    torch.manual_seed(seed)
    model = models.build(arch, prior).eval()
    return model, sparsify(model, 0.4, seed)


def weights(net: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def biases(net: nn.Module) -> list[torch.Tensor]:
    return [m.bias for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None]


def assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("arch,prior,model", [("lenet_300_100", "nj", None)] + [
    ("lenet5_caffe", "hs", m) for m in (None, "uniform", "symbol", "factored")])  # fmt: skip
def test_round_trip_equals_the_quantized_net(tmp_path: Path, arch: str, prior: str, model: str) -> None:
    net, t = sparse(arch, prior)
    ref = quantized(prune(net, t), compression_report(net, t).bits)
    enc = coded.export_coded(net, t, tmp_path / "m.bc", model)
    got = load_coded(tmp_path / "m.bc")
    assert enc.size == (tmp_path / "m.bc").stat().st_size
    for g, w in zip(weights(got), weights(ref), strict=True):
        assert torch.equal(g, w)  # equal values (a weight rounded to zero reads back as +0.0)
    for g, w in zip(biases(got), biases(ref), strict=True):
        assert_bitwise(g, w)
    x = torch.randn(32, *INPUTS[arch])
    with torch.no_grad():
        assert_bitwise(got(x), ref(x))


@pytest.mark.parametrize("significand", [0, 4, 10, 23])
def test_biases_rounded_to_m_bits_take_m_bits_and_reload_exactly(tmp_path: Path, significand: int) -> None:
    net, t = sparse("lenet5_caffe", "hs")
    bits = compression_report(net, t).bits
    ref = quantized(prune(net, t), bits, bias_significand=significand)
    enc = coded.encode_network(ref, bits)
    (tmp_path / "m.bc").write_bytes(enc.data)
    for g, w in zip(biases(load_coded(tmp_path / "m.bc")), biases(ref), strict=True):
        assert_bitwise(g, w)
    for layer, b in zip(enc.layers, biases(ref)):  # sign + exponent (adaptive, under 8 bits) + M mantissa bits
        assert len(b) * (1 + significand) <= layer.bias_bits < len(b) * (1 + significand + 8)


def test_a_layer_whose_biases_share_one_exponent_round_trips(tmp_path: Path) -> None:
    """An alphabet of one symbol (every bias in [1, 2), a single output) is certain: nothing coded."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        net[0].bias.copy_(torch.tensor([1.0, 1.25, 1.5, 1.75]))
    bits = [LayerBits(3, 2), LayerBits(3, 2)]
    enc = coded.encode_network(net, bits)
    (tmp_path / "m.bc").write_bytes(enc.data)
    got = load_coded(tmp_path / "m.bc")
    for g, w in zip(biases(got), biases(net), strict=True):
        assert_bitwise(g, w)
    assert enc.layers[0].bias_bits == 4 * (1 + 2)  # sign and two mantissa bits; the exponent is free


def test_mantissa_bits_in_use() -> None:
    mant = lambda *v: coded._bias_fields(torch.tensor(v, dtype=torch.float32))[2]  # noqa: E731
    assert mant(1.0, -2.0, 0.5) == 0
    assert mant(1.5, 1.25) == 2
    assert mant(1.0 + 2.0**-23) == 23
    assert mant(0.1) == 23  # float32(0.1) is 0x3DCCCCCD: its last mantissa bit is set
def test_batchnorm_folds_as_in_the_bit_packed_file(tmp_path: Path) -> None:
    """Oracle: the bit-packed format and its own reader hold the same net (fold, then round)."""
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.5), nn.Flatten(),
        nn.Linear(4 * 5 * 5, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10),
    )  # fmt: skip
    net = models.to_bayesian(randomise_batchnorm(plain), "nj").eval()
    t = sparsify(net, 0.3)
    coded.export_coded(net, t, tmp_path / "m.bc")
    export_compressed(net, t, tmp_path / "m.bclb")
    got, want = load_coded(tmp_path / "m.bc"), load_compressed(tmp_path / "m.bclb")
    for g, w in zip(weights(got) + biases(got), weights(want) + biases(want), strict=True):
        assert torch.equal(g, w)
    x = torch.randn(8, 1, 12, 12)
    with torch.no_grad():
        assert_bitwise(got(x), want(x))


def kt_bits_by_hand(symbols: list[int], contexts: list[int], size: int) -> float:
    """Sequential Krichevsky-Trofimov code length, written out plainly."""
    counts: dict[int, list[int]] = {}
    bits = 0.0
    for s, c in zip(symbols, contexts):
        n = counts.setdefault(c, [0] * size)
        bits -= math.log2((n[s] + 0.5) / (sum(n) + size / 2))
        n[s] += 1
    return bits


def test_adaptive_code_length_is_the_kt_estimator() -> None:
    rng = np.random.default_rng(0)
    s, c = rng.integers(0, 5, 3000), rng.integers(0, 3, 3000)
    assert coded.adaptive_bits(s, c, 5) == pytest.approx(kt_bits_by_hand(list(s), list(c), 5), rel=1e-12)


def test_the_range_coder_reaches_the_code_length() -> None:
    """The file's weights cost what -log2 p says (a few words of coder overhead), and skewed data costs less."""
    rng = np.random.default_rng(1)
    for p in (0.5, 0.05):
        enc = coded._Encoder()
        s = (rng.random(20000) < p).astype(np.int64)
        ideal = enc.adaptive(s, np.zeros_like(s), 2)
        assert 32 * len(enc.words()) <= ideal + 64
    assert ideal < 0.35 * 20000  # H(0.05) = 0.29 bits


def test_value_grid_holds_every_rounded_value() -> None:
    torch.manual_seed(0)
    w = torch.randn(2000) * 0.1
    for bits in (LayerBits(3, 4), LayerBits(4, 2), LayerBits(2, 0)):
        q = precision.round_to_bits(w, bits.exponent, bits.significand).double().numpy()
        grid = coded.value_grid(bits, precision.max_exponent(w))
        assert len(grid) == lc.symbol_alphabet(bits.exponent, bits.significand)
        assert np.all(np.diff(grid) > 0) and np.isin(q, grid).all()


def test_parametric_model_prefers_the_matching_shape() -> None:
    """Laplace-distributed weights code shorter under the Laplace model than under the Gaussian, and vice versa."""
    torch.manual_seed(0)
    lap = torch.distributions.Laplace(0.0, 0.05).sample((4000,))
    gau = torch.randn(4000) * 0.05
    bits = LayerBits(4, 4)
    assert coded.parametric_bits(lap, bits, "laplace") < coded.parametric_bits(lap, bits, "gaussian")
    assert coded.parametric_bits(gau, bits, "gaussian") < coded.parametric_bits(gau, bits, "laplace")


# --- damaged files -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    net, t = sparse("lenet5_caffe", "nj")
    return coded.encode_network(prune(net, t), compression_report(net, t).bits).data


def load_bytes(tmp_path: Path, data: bytes) -> nn.Module:
    path = tmp_path / "x.bc"
    path.write_bytes(data)
    return load_coded(path)


def test_every_flipped_byte_is_caught(tmp_path: Path, good_file: bytes) -> None:
    for pos in range(0, len(good_file), max(1, len(good_file) // 150)):
        bad = bytearray(good_file)
        bad[pos] ^= 0x5A
        with pytest.raises(CodedFormatError):
            load_bytes(tmp_path, bytes(bad))


def test_truncated_and_extended_files(tmp_path: Path, good_file: bytes) -> None:
    for n in (0, 3, 8, 12, len(good_file) // 2, len(good_file) - 1):
        with pytest.raises(CodedFormatError, match="truncated|magic"):
            load_bytes(tmp_path, good_file[:n])
    with pytest.raises(CodedFormatError, match="after the end"):
        load_bytes(tmp_path, good_file + b"\0")


def with_crc(body: bytes) -> bytes:
    return lc.MAGIC + bytes([lc.FORMAT_VERSION]) + zlib.crc32(body).to_bytes(4, "little") + body


def test_header_errors_name_the_problem(tmp_path: Path, good_file: bytes) -> None:
    with pytest.raises(CodedFormatError, match="wrong magic"):
        load_bytes(tmp_path, b"BCLB" + good_file[4:])
    newer = bytearray(good_file)
    newer[4] = lc.FORMAT_VERSION + 1
    with pytest.raises(CodedFormatError, match="update bclib"):
        load_bytes(tmp_path, bytes(newer))
    older = bytearray(good_file)
    older[4] = min(lc.READS) - 1
    with pytest.raises(CodedFormatError, match="older bclib"):
        load_bytes(tmp_path, bytes(older))


def test_a_wrong_spec_with_a_valid_crc_is_an_error_not_a_crash(tmp_path: Path, good_file: bytes) -> None:
    """Damage that the CRC cannot see (a writer bug): an unknown layer type, a stream cut in half.

    (Words appended to a complete stream are not detectable by constriction's decoder, which
    reads ahead; the header's lengths and the CRC guard the file against them.)"""
    body = good_file[lc.HEADER.size :]
    spec_len, pos = lc._varint(body, 0)
    n_words, pos = lc._varint(body, pos)
    spec, words = body[pos : pos + spec_len], body[pos + spec_len :]
    cases = [
        spec[:1] + bytes([len(lc.LAYER_TYPES)]) + spec[2:],  # unknown layer type
        spec,  # with half of the stream
    ]  # fmt: skip
    streams = [words, words[: 4 * (n_words // 2)]]
    for s, w in zip(cases, streams):
        data = with_crc(coded._varints(len(s), len(w) // 4) + s + w)
        with pytest.raises(CodedFormatError):
            load_bytes(tmp_path, data)


def test_bad_arguments(tmp_path: Path) -> None:
    net, t = sparse("lenet_300_100")
    with pytest.raises(IsADirectoryError, match="directory"):
        coded.export_coded(net, t, tmp_path)
    with pytest.raises(FileNotFoundError, match="create it first"):
        coded.export_coded(net, t, tmp_path / "no" / "m.bc")
    with pytest.raises(ValueError, match="one of"):
        coded.encode_network(prune(net, t), compression_report(net, t).bits, "zip")


def test_reader_needs_no_bclib(tmp_path: Path, good_file: bytes) -> None:
    """The reader file alone, copied elsewhere, loads the file (bclib is not importable there)."""
    (tmp_path / "m.bc").write_bytes(good_file)
    reader = Path(lc.__file__).read_text()
    (tmp_path / "reader.py").write_text(reader)
    code = ("import sys; sys.modules['bclib'] = None; import reader, torch; "
            "net = reader.load_coded('m.bc'); print(net(torch.zeros(1, 1, 28, 28)).shape)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "torch.Size([1, 10])" in out.stdout


# --- the KL ------------------------------------------------------------------------------------
@pytest.mark.parametrize("prior", ["nj", "hs"])
def test_kept_kl_of_an_unpruned_net_is_the_models_kl(prior: str) -> None:
    torch.manual_seed(0)
    net = models.build("lenet5_caffe", prior).eval()
    keep_all = [layer.log_alpha.max().item() + 1 for layer in models.bayesian_layers(net)]
    total = sum(k.total for k in coded.kept_kl(net, keep_all))
    assert total == pytest.approx(models.kl_divergence(net).item() / math.log(2), rel=1e-5)


def test_pruned_groups_leave_the_kl() -> None:
    net, t = sparse("lenet_300_100")
    keep_all = [layer.log_alpha.max().item() + 1 for layer in models.bayesian_layers(net)]
    pruned, full = coded.kept_kl(net, t), coded.kept_kl(net, keep_all)
    assert all(p.w < f.w for p, f in zip(pruned, full))


def test_noise_bits_by_hand() -> None:
    """0.75 with 2 significand bits: spacing 2^-3, so a std of 0.5 is 2 bits above it, 0.1 none; 0 rounds to zero."""
    mean, std = torch.tensor([0.75, -0.75, 0.0]), torch.tensor([0.5, 0.1, 9.0])
    assert coded.noise_bits(mean, std, LayerBits(3, 2)) == pytest.approx(1.0)  # (2 + 0) / 2
    net, t = sparse("lenet_300_100")
    assert all(0 <= b < 30 for b in coded.bits_below_noise(net, t))


# --- the shipped files -------------------------------------------------------------------------
def test_settle_ties_moves_only_weights_on_a_rounding_tie() -> None:
    """Oracle: weights placed by hand exactly halfway between two grid values of the top binade."""
    model, t = sparse("lenet_300_100")
    pruned, bits = prune(model, t), compression_report(model, t).bits
    w = former_group_layers(pruned)[0].weight
    e_max, S = precision.max_exponent(w.detach().flatten()), bits[0].significand
    step = 2.0 ** (e_max - S)  # grid spacing in [2^e_max, 2^(e_max + 1))
    with torch.no_grad():
        w[0, 0] = 1.9 * 2.0**e_max  # the largest weight: e_max stays
        w[0, 1:3] = torch.tensor([2**S + 0.5, 2**S + 1.5]) * step  # exact ties
    stored = quantized(pruned, bits)
    theirs = former_group_layers(stored)[0].weight
    with torch.no_grad():
        theirs[0, 1] = (2 ** (S + 1) + 1) * step - theirs[0, 1]  # the tie's other neighbour, as another CPU may give
    assert coded.settle_ties(pruned, bits, stored) == 1
    assert_bitwise(former_group_layers(quantized(pruned, bits))[0].weight, theirs)
    with torch.no_grad():
        theirs[0, 2] += 3 * step  # no tie
    with pytest.raises(ValueError, match="1 of them not on a rounding tie"):
        coded.settle_ties(pruned, bits, stored)


@pytest.mark.parametrize("arch,prior", SHIPPED)
def test_shipped_coded_files_reload_exactly(arch: str, prior: str) -> None:
    from bclib.results import load_run

    path = results_dir() / f"{arch}-{prior}.bc"
    if not path.is_file():
        pytest.skip(f"{path} not shipped: python benchmarks/bench_bytes.py writes it")
    run = load_run(arch, prior, check=False)
    t = run.result["thresholds"]
    report = compression_report(run.model, t)
    pruned = prune(run.model, t)
    got = load_coded(path)
    assert coded.settle_ties(pruned, report.bits, got) <= 2  # (one weight on lenet_300_100-hs on some CPUs)
    assert coded.encode_network(pruned, report.bits).data == path.read_bytes()  # the writer is deterministic
    ref = quantized(pruned, report.bits)
    x = torch.randn(64, *INPUTS[arch])
    with torch.no_grad():
        assert_bitwise(got(x), ref(x))
