"""Masks, bit precision, compression rates and pruning to plain torch modules."""
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from bclib import compression, models, precision
from bclib.layers import Conv2dGroupNJ, LinearGroupHS, LinearGroupNJ


def _set_log_alpha(layer, log_alpha):
    """Hand-set a normal-Jeffreys layer's groups: z_mu = 1, so log_alpha = z_logvar."""
    with torch.no_grad():
        layer.scale.z_mu.fill_(1.0)
        layer.scale.z_logvar.copy_(torch.as_tensor(log_alpha, dtype=torch.float32))


def _mlp():
    torch.manual_seed(0)
    net = nn.Sequential(LinearGroupNJ(4, 3), nn.ReLU(), LinearGroupNJ(3, 2), nn.ReLU(), LinearGroupNJ(2, 2))
    _set_log_alpha(net[0], [-5.0, 0.0, -5.0, -5.0])  # input 1 pruned at threshold -3
    _set_log_alpha(net[2], [-5.0, -5.0, 0.0])  # layer-1 neuron 2 pruned via layer 2's input
    _set_log_alpha(net[4], [-5.0, -5.0])
    return net


def test_linear_masks_by_hand():
    masks = compression.group_masks(_mlp(), [-3, -3, -3])
    assert masks[0].inputs.tolist() == [True, False, True, True]
    assert masks[0].outputs.tolist() == [True, True, False]  # removed because layer 2 drops input 2
    assert masks[1].inputs.tolist() == [True, True, False]
    assert masks[2].outputs.tolist() == [True, True]  # the classes always stay
    assert [m.kept for m in masks] == [(3, 2), (2, 2), (2, 2)]


def test_compression_rates_by_hand():
    net = _mlp()
    with torch.no_grad():  # every weight mean 0.75; the kept groups' Var(z) = e^-5 sets Var(w)
        for layer in models.bayesian_layers(net):
            layer.weight_mu.fill_(0.75)
            layer.weight_logvar.fill_(-60.0)
    report = compression.compression_report(net, [-3, -3, -3])
    before, kept = 4 * 3 + 3 * 2 + 2 * 2, 3 * 2 + 2 * 2 + 2 * 2
    assert (report.weights_before, report.weights_kept) == (before, kept)
    assert report.rate_pruning == pytest.approx(before / kept)
    # Var(w) ~= Var(z) mu^2 = e^-5 * 0.5625, 2 Var(w) = 7.58e-3 < 2^-t for t in 1..7
    assert [b.significand for b in report.bits] == [7, 7, 7]
    # every |w| = 0.75 lies beyond its std: one exponent (-1) plus zero -> 1 bit
    assert [b.exponent for b in report.bits] == [1, 1, 1]
    assert report.rate_precision == pytest.approx(32 * before / (kept * (1 + 1 + 7)))


def test_significand_and_exponent_bits():
    assert compression.significand_bits(torch.tensor([1.0, 2.0**-6, 1e-30])).tolist() == [0, 4, 23]
    assert compression.exponent_bits(1.2, 2.0**-8) == 4  # exponents 0 .. -8 and zero: 10 codes
    assert compression.exponent_bits(0.3, 0.26) == 1  # exponent -2 only, and zero
    assert compression.exponent_bits(0.3, 0.0) == 1  # no lower bound: the largest exponent only
    assert compression.exponent_bits(0.0, 0.0) == 1


def test_bits_keep_weights_down_to_min_abs():
    """Weights of at least min_abs keep S significand bits; only smaller ones may flush to zero."""
    torch.manual_seed(0)
    w = torch.randn(10000) * 0.3
    low = 0.01
    for s_bits in (2, 5, 9):
        e_bits = compression.exponent_bits(w.abs().max().item(), low)
        r = precision.round_to_bits(w, e_bits, s_bits)
        big = w.abs() >= low
        assert ((r - w).abs()[big] <= w.abs()[big] * 2.0 ** -(s_bits + 1) + 1e-7).all()
        assert (r[~big].abs() <= 2 * low).all()


def _masked_equals_pruned(net, thresholds, x):
    net.eval()
    pruned = compression.prune(net, thresholds)
    compression.apply_masks(net, compression.group_masks(net, thresholds))
    torch.testing.assert_close(pruned(x), net(x), atol=1e-5, rtol=1e-5)
    compression.apply_masks(net, None)
    return pruned


def test_prune_linear_matches_masked_model():
    torch.manual_seed(0)
    net = models.lenet_300_100("hs")
    la = [layer.log_alpha.detach() for layer in models.bayesian_layers(net)]
    thresholds = [torch.quantile(a, q).item() for a, q in zip(la, (0.4, 0.6, 0.8))]
    pruned = _masked_equals_pruned(net, thresholds, torch.randn(8, 1, 28, 28))
    plain = [m for m in pruned.modules() if isinstance(m, nn.Linear)]
    masks = compression.group_masks(net, thresholds)
    assert [(m.in_features, m.out_features) for m in plain] == [mk.kept for mk in masks]
    assert not any(type(m).__module__.startswith("bclib") for m in pruned.modules())


def test_prune_conv_matches_masked_model_and_hands_over_to_fc():
    torch.manual_seed(0)
    net = models.lenet5_caffe("nj")
    conv1, conv2, fc1, fc2 = models.bayesian_layers(net)
    _set_log_alpha(conv1, torch.where(torch.arange(20) % 3 == 0, 0.0, -5.0))
    _set_log_alpha(conv2, torch.where(torch.arange(50) % 4 == 0, 0.0, -5.0))
    fc1_la = torch.full((800,), -5.0)
    fc1_la[torch.arange(800) % 7 == 0] = 0.0
    fc1_la[16 * 1 : 16 * 2] = 0.0  # all features of filter 1 of conv2 pruned -> filter 1 goes too
    _set_log_alpha(fc1, fc1_la)
    thresholds = [-3.0] * 4
    masks = compression.group_masks(net, thresholds)
    assert not masks[1].outputs[1] and not masks[1].outputs[0]
    assert torch.equal(masks[1].inputs, masks[0].outputs)
    assert masks[2].inputs.view(50, 16)[~masks[1].outputs].sum() == 0
    pruned = _masked_equals_pruned(net, thresholds, torch.randn(5, 1, 28, 28))
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [int(masks[0].outputs.sum()), int(masks[1].outputs.sum())]


def test_pruned_model_loads_without_bclib(tmp_path):
    net = _mlp()
    pruned = compression.prune(net, [-3, -3, -3])
    x = torch.randn(3, 4)
    torch.save({"net": pruned, "x": x, "y": pruned(x)}, tmp_path / "p.pt")
    code = (
        "import sys, torch; sys.modules['bclib'] = None\n"
        f"d = torch.load({str(tmp_path / 'p.pt')!r}, weights_only=False)\n"
        "assert torch.allclose(d['net'](d['x']), d['y'])\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_masks_bad_input():
    net = _mlp()
    with pytest.raises(ValueError, match="got 2 thresholds for 3 group layers"):
        compression.group_masks(net, [-3, -3])
    with pytest.raises(ValueError, match="finite"):
        compression.group_masks(net, [-3, math.nan, -3])
    with pytest.raises(TypeError, match="no Bayesian group layers"):
        compression.prune(models.lenet_300_100(None), [-3, -3, -3])
    with pytest.raises(TypeError, match="not a single LinearGroupHS"):
        compression.prune(LinearGroupHS(3, 2), [-3])


def test_search_thresholds_respects_budget():
    torch.manual_seed(0)
    net = _mlp()
    with torch.no_grad():
        net[0].weight_mu[:, 1] = 0.0  # input 1 carries nothing
    x = torch.randn(256, 4)
    y = net.eval()(x).argmax(1)
    acc = lambda m: (m(x).argmax(1) == y).float().mean().item()  # noqa: E731
    thresholds = compression.search_thresholds(net, acc, max_drop=0.0)
    assert acc(compression.prune(net, thresholds)) == 1.0
    # the uninformative input group (log_alpha 0) is removed without loss
    assert not compression.group_masks(net, thresholds)[0].inputs[1]


@pytest.mark.parametrize("e_bits,s_bits", [(3, 2), (4, 7), (8, 23)])
def test_round_to_bits(e_bits, s_bits):
    torch.manual_seed(0)
    w = torch.randn(1000) * 0.1
    r = precision.round_to_bits(w, e_bits, s_bits)
    smallest = 2.0 ** (precision.max_exponent(w) - 2**e_bits + 2)
    big = w.abs() >= smallest
    # kept magnitudes: relative error at most half a unit in the last significand place
    assert ((r[big] - w[big]).abs() / w[big].abs()).max() <= 2.0 ** -(s_bits + 1) + 1e-7
    assert ((r[~big] == 0) | (r[~big].abs() == smallest)).all()  # flushed, or rounded up to the smallest
    assert len(torch.unique(r[big].abs() / 2.0 ** torch.floor(torch.log2(r[big].abs())))) <= 2**s_bits


def test_round_to_bits_bad_widths():
    with pytest.raises(ValueError, match="bit widths out of range"):
        precision.round_to_bits(torch.ones(3), 0, 4)
    with pytest.raises(ValueError, match="bit widths out of range"):
        precision.round_to_bits(torch.ones(3), 4, 30)


def test_conv_group_layer_masks_channels_of_next_conv():
    torch.manual_seed(0)
    net = nn.Sequential(Conv2dGroupNJ(1, 3, 3), nn.ReLU(), Conv2dGroupNJ(3, 2, 3))
    _set_log_alpha(net[0], [-5.0, 0.0, -5.0])
    _set_log_alpha(net[2], [-5.0, -5.0])
    masks = compression.group_masks(net, [-3, -3])
    assert masks[1].inputs.tolist() == [True, False, True]
    _masked_equals_pruned(net, [-3, -3], torch.randn(2, 1, 8, 8))


def test_search_thresholds_finds_the_smallest_group_count_within_budget():
    """Accuracy that needs 37 of 100 inputs: the grid plus bisection stops at exactly 37."""
    torch.manual_seed(0)
    net = nn.Sequential(LinearGroupNJ(100, 5), nn.ReLU(), LinearGroupNJ(5, 3))
    first = lambda m: next(x for x in m.modules() if isinstance(x, nn.Linear))  # noqa: E731
    evaluated = []
    acc = lambda m: evaluated.append(m) or float(first(m).in_features >= 37)  # noqa: E731
    thresholds = compression.search_thresholds(net, acc, max_drop=0.0)
    masks = compression.group_masks(net, thresholds)
    assert int(masks[0].inputs.sum()) == 37
    assert int(masks[1].inputs.sum()) == 1  # the accuracy ignores it: pruned down to one group
    assert len(evaluated) < 80  # far fewer than trying every count


def test_search_from_start_thresholds_counts_the_budget_from_the_net_they_prune():
    """A second round (after fine-tuning): from ``start`` the search keeps a subset of its groups,
    and ``max_drop`` counts from the accuracy of the net ``start`` prunes, not the unpruned one."""
    torch.manual_seed(0)
    net = nn.Sequential(LinearGroupNJ(100, 5), nn.ReLU(), LinearGroupNJ(5, 3))
    _set_log_alpha(net[0], torch.linspace(-6.0, 2.0, 100)[torch.randperm(100)])
    first = lambda m: next(x for x in m.modules() if isinstance(x, nn.Linear))  # noqa: E731
    acc = lambda m: 1.0 if first(m).in_features >= 60 else 0.9 if first(m).in_features >= 37 else 0.0  # noqa: E731
    kept = lambda t: compression.group_masks(net, t)[0].inputs  # noqa: E731
    fresh = compression.search_thresholds(net, acc, max_drop=0.0)
    assert int(kept(fresh).sum()) == 60
    la = net[0].log_alpha.detach().sort().values
    start = [((la[49] + la[50]) / 2).item(), 10.0]  # keeps the 50 inputs of smallest log alpha
    again = compression.search_thresholds(net, acc, max_drop=0.0, start=start)
    assert int(kept(again).sum()) == 37 and not (kept(again) & ~kept(start)).any()
    assert compression.search_thresholds(net, acc, max_drop=0.0, start=[10.0, 10.0]) == fresh
    with pytest.raises(ValueError, match="got 1 thresholds for 2 group layers"):
        compression.search_thresholds(net, acc, start=[-3.0])


@pytest.mark.parametrize("bad", ["000", -3.0, [-3, "a", -3], [True, -3, -3], None])
def test_thresholds_must_be_numbers(bad):
    with pytest.raises(TypeError, match="list of numbers, one log-alpha value per group layer"):
        compression.group_masks(_mlp(), bad)


@pytest.mark.parametrize("acc", [None, float("nan"), 5.0, -0.1])
def test_search_refuses_a_bad_accuracy_function(acc):
    with pytest.raises(ValueError, match="accuracy between 0 and 1"):
        compression.search_thresholds(_mlp(), lambda net: acc)
