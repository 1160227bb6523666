"""bclib.rate_aware: entropy-constrained rounding against a brute-force oracle, and its file."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bclib import coded, models, rate_aware, reproduce
from bclib.compression import LayerBits, _kept, compression_report, former_group_layers, group_masks, prune, quantized
from bclib.convert import bayesian_layers
from bclib.load_coded import load_coded
from bclib.precision import max_exponent, round_to_bits
from bclib.testing import sparsify, synthetic_mnist
from bclib.train import evaluate


def oracle_cost(values: list[float], w: list[float], std: list[float], grid: np.ndarray, lam: float) -> list[list[float]]:
    """Per weight, the cost of every grid value under the frequencies of ``values`` (plain Python)."""
    counts = {g: 0.5 for g in grid}
    for v in values:
        counts[v] += 1
    total = sum(counts.values())
    return [[-math.log2(counts[g] / total) + lam * (g - wi) ** 2 / (2 * si**2 * math.log(2)) for g in grid]
            for wi, si in zip(w, std)]  # fmt: skip


@pytest.mark.parametrize("bits", [LayerBits(3, 1), LayerBits(4, 6)])  # a coarse grid and a paper-like one
def test_every_weight_takes_its_cheapest_value_at_the_fixed_point(bits: LayerBits) -> None:
    """Given the frequencies of the rounded values, no weight has a cheaper grid value (oracle:
    every value's cost computed by hand); and the values are fewer bits than nearest rounding's."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(400, generator=g) * 0.1
    std = torch.rand(400, generator=g) * 0.08 + 0.01
    out = rate_aware.rate_aware_round(w, std, bits, lam=2.0)
    grid = coded.value_grid(bits, max_exponent(w))
    assert set(out.double().tolist()) <= set(grid.tolist())
    costs = oracle_cost(out.double().tolist(), w.double().tolist(), std.double().tolist(), grid, 2.0)
    for v, c in zip(out.double().tolist(), costs):
        assert c[list(grid).index(v)] <= min(c) + 1e-9
    near = round_to_bits(w, bits.exponent, bits.significand)
    assert coded.weight_bits(out, bits, coded.WeightModel("symbol")) < coded.weight_bits(near, bits, coded.WeightModel("symbol"))
    assert out.unique().numel() < near.unique().numel()


def test_narrow_posteriors_round_to_the_nearest_value_and_wide_ones_to_the_common_value() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(200, generator=g)
    bits = LayerBits(3, 2)
    grid = torch.from_numpy(coded.value_grid(bits, max_exponent(w))).float()
    nearest = grid[(w[:, None] - grid).abs().argmin(1)]
    assert torch.equal(rate_aware.rate_aware_round(w, torch.full_like(w, 1e-6), bits, 1.0), nearest)
    assert torch.equal(rate_aware.rate_aware_round(w, torch.full_like(w, 0.01), bits, 1e9), nearest)
    flushed = round_to_bits(w, 3, 2) != nearest  # round_to_bits flushes what lies below the least magnitude
    assert bool((w[flushed].abs() < grid[grid > 0].min()).all())
    wide = rate_aware.rate_aware_round(w, torch.full_like(w, 1e3), bits, 1.0)
    assert wide.unique().numel() == 1  # nothing to tell the weights apart: one value costs almost nothing


def test_values_stay_on_the_grid_the_file_stores() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(30, 50, generator=g) * 0.05
    std = torch.rand(30, 50, generator=g) * 0.05 + 1e-3
    for bits in (LayerBits(2, 0), LayerBits(3, 1), LayerBits(4, 3)):
        out = rate_aware.rate_aware_round(w, std, bits, 3.0)
        assert out.shape == w.shape and torch.equal(round_to_bits(out, bits.exponent, bits.significand), out)


def pruned_lenet(seed: int = 0):
    torch.manual_seed(seed)
    model = models.build("lenet_300_100", "nj").eval()
    t = sparsify(model, 0.6, seed)
    return model, t, prune(model, t), compression_report(model, t).bits


def test_kept_std_lines_up_with_the_pruned_weights() -> None:
    """The kept slice that gives the std gives the pruned net's weights (the posterior means)."""
    model, t, net, _ = pruned_lenet()
    std = rate_aware.kept_posterior_std(model, t)
    for s, layer, bl, m in zip(std, former_group_layers(net), bayesian_layers(model), group_masks(model, t)):
        assert s.shape == layer.weight.shape and bool((s > 0).all())
        assert torch.equal(_kept(bl.posterior_weight_mean().detach(), m), layer.weight.detach())
        assert torch.allclose(s.pow(2), _kept(bl.posterior_weight_variance().detach(), m))


def test_trained_net_is_a_copy_and_its_file_reads_back_exactly(tmp_path) -> None:
    model, t, net, _ = pruned_lenet()
    bits = [LayerBits(3, 2)] * 3  # as coarse as fitted bits (bclib.quantize) end
    std = rate_aware.kept_posterior_std(model, t)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trained = rate_aware.train_rate_aware(net, bits, std, 4.0, [(x, y)], epochs=2)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert trained.bayesian_layer_names == net.bayesian_layer_names
    stored = rate_aware.rate_aware_quantized(trained, bits, std, 4.0, bias_significand=10)
    enc = coded.encode_network(stored, bits)
    (tmp_path / "n.bc").write_bytes(enc.data)
    back = load_coded(tmp_path / "n.bc")
    with torch.no_grad():
        assert torch.equal(back(x), stored(x))
    nearest = coded.encode_network(quantized(trained, bits, 10), bits)
    assert enc.size < nearest.size


def test_bad_arguments() -> None:
    model, t, net, bits = pruned_lenet()
    std = rate_aware.kept_posterior_std(model, t)
    w = torch.randn(5)
    for lam in (0, -1.0, float("nan"), True, "3"):
        with pytest.raises(ValueError, match="lam must be a positive number"):
            rate_aware.rate_aware_round(w, torch.ones(5), LayerBits(3, 1), lam)
    with pytest.raises(ValueError, match="std has shape"):
        rate_aware.rate_aware_round(w, torch.ones(4), LayerBits(3, 1), 1.0)
    with pytest.raises(ValueError, match="std must be positive"):
        rate_aware.rate_aware_round(w, torch.zeros(5), LayerBits(3, 1), 1.0)
    with pytest.raises(ValueError, match="bit widths out of range"):
        rate_aware.rate_aware_round(w, torch.ones(5), LayerBits(0, 1), 1.0)
    with pytest.raises(ValueError, match="std tensors for 3 layers"):
        rate_aware.rate_aware_quantized(net, bits, std[:2], 1.0)
    with pytest.raises(ValueError, match="std tensors for 3 layers"):
        rate_aware.train_rate_aware(net, bits, std[:2], 1.0, [], epochs=1)


def test_quantize_level_adds_a_rate_aware_point_per_lam(tmp_path, monkeypatch) -> None:
    """``tools/quantize_level.py --lam``: each point's file is the size it records and decodes to its error."""
    monkeypatch.setattr(reproduce, "load_data", synthetic_mnist)
    model, t, _, bits = pruned_lenet()
    batches = reproduce._split("lenet_300_100", 600, 128, 0)
    s = reproduce._quantize_settings("lenet_300_100", True)
    point = reproduce._quantize_level(model, t, bits, 0.01, s, 0, batches, tmp_path / "q.bc", (4.0,))
    [r] = point["rate_aware"]
    file = tmp_path / "q-lam4.bc"
    assert r["lam"] == 4.0 and file.stat().st_size == r["coded_bytes"]
    assert 100 * (1 - evaluate(load_coded(file), batches[2])) == pytest.approx(r["error"], abs=1e-9)
