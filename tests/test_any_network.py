"""Compress any network: conversion of any nn.Module, and the graph-driven pruning invariant.

The invariant: ``prune(model, t)`` gives, in eval mode, the outputs of the model after
``apply_masks(model, group_masks(model, t))``, with fewer parameters and no bclib modules.
The masked model is an independent oracle: it runs the Bayesian layers at full size with
zeroed weights, while the pruned one is rebuilt from plain torch layers of reduced sizes.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bclib import compression, graph, layers, models, train
from bclib.convert import ConversionWarning
from bclib.testing import check_pruned_equals_masked, randomise_batchnorm, sparsify


def check_invariant(bayes: nn.Module, x: torch.Tensor, thresholds: list[float], example_input=None) -> nn.Module:
    """The invariant, and that the thresholds pruned something that changes the outputs."""
    pruned = check_pruned_equals_masked(bayes, x, thresholds, example_input)
    with torch.no_grad():
        assert not torch.allclose(pruned(x), bayes.eval()(x), atol=1e-4), "the thresholds pruned nothing that matters"
    return pruned


class CustomMLP(nn.Module):
    """A user's own module: not a Sequential, functional ReLU, a view."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.hidden(x.view(x.size(0), -1))))


def bn_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(), nn.Dropout(0.2),
        nn.Flatten(), nn.Linear(24 * 4 * 4, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10),
    )  # fmt: skip


class Branches(nn.Module):
    """Two conv branches concatenated along the channels, then adaptive pooling and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 5, padding=2)
        self.bn = nn.BatchNorm2d(14)
        self.mix = nn.Conv2d(14, 12, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(12 * 4 + 14, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        skip = y.mean((2, 3))  # the concatenated channels also feed the classifier directly
        return self.fc(torch.cat([torch.flatten(self.pool(F.relu(self.mix(y))), 1), skip], 1))


def test_custom_module_mlp():
    bayes = models.to_bayesian(CustomMLP(), "nj")
    assert isinstance(bayes.hidden, layers.LinearGroup) and isinstance(bayes.out, layers.LinearGroup)
    x = torch.randn(6, 1, 8, 8)
    check_invariant(bayes, x, sparsify(bayes), example_input=x[:1])


@pytest.mark.parametrize("prior", ["nj", "hs"])
def test_sequential_cnn_with_batchnorm_and_dropout(prior):
    torch.manual_seed(0)
    plain = bn_cnn()
    randomise_batchnorm(plain)
    bayes = models.to_bayesian(plain, prior)
    x = torch.randn(4, 3, 8, 8)
    pruned = check_invariant(bayes, x, sparsify(bayes))
    bns = [m for m in pruned.modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert [b.num_features for b in bns] == [c.out_channels for c in convs]  # BN went with its filters
    assert convs[0].out_channels < 16


def test_pruned_channel_is_zero_after_batchnorm():
    """The meaning of a pruned channel: zero after BatchNorm too, not BatchNorm's shift."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    randomise_batchnorm(plain)
    with torch.no_grad():
        plain[1].bias.fill_(1.0)  # a positive shift: a zeroed filter alone would leave a constant 1
    bayes = models.to_bayesian(plain).eval()
    la = [-9.0, 9.0, -9.0, -9.0]  # filter 1 pruned
    with torch.no_grad():
        bayes[0].scale.z_mu.fill_(1.0)
        bayes[0].scale.z_logvar.copy_(torch.tensor(la))
        bayes[4].scale.z_logvar.fill_(-9.0)
    masks = compression.group_masks(bayes, [0.0, 0.0])
    assert list(masks.channels) == ["1"] and masks.channels["1"].tolist() == [True, False, True, True]
    compression.apply_masks(bayes, masks)
    feats = bayes[:3](torch.randn(2, 1, 8, 8))
    assert feats[:, 1].abs().sum() == 0 and feats[:, 0].abs().sum() > 0
    check_invariant(bayes, torch.randn(3, 1, 8, 8), [0.0, 0.0])


@pytest.mark.parametrize("prior", ["nj", "hs"])
def test_torchvision_resnet18(prior):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=10)
    randomise_batchnorm(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)
        bayes = models.to_bayesian(plain, prior)
    n_conv = sum(isinstance(m, nn.Conv2d) for m in plain.modules())
    assert len(models.bayesian_layers(bayes)) == n_conv + 1 == 21
    x = torch.randn(2, 3, 32, 32)
    pruned = check_invariant(bayes, x, sparsify(bayes, 0.3))
    # The residual stream is coupled: the stem keeps exactly the channels layer1's blocks keep.
    width = [pruned.get_submodule(n) for n in ("conv1", "bn1", "layer1.0.conv2", "layer1.1.conv2", "layer2.0.conv1")]
    assert width[0].out_channels == width[1].num_features == width[2].out_channels == width[3].out_channels
    assert width[4].in_channels == width[0].out_channels < 64


def test_concatenated_branches_and_adaptive_pooling():
    torch.manual_seed(0)
    plain = Branches()
    randomise_batchnorm(plain)
    bayes = models.to_bayesian(plain, "nj")
    x = torch.randn(3, 3, 12, 12)
    pruned = check_invariant(bayes, x, sparsify(bayes, 0.5), example_input=x[:1])
    assert pruned.bn.num_features == pruned.a.out_channels + pruned.b.out_channels
    assert pruned.a.out_channels < 8 and pruned.b.out_channels < 6  # the branches lose filters


def test_train_step_then_prune_any_module():
    torch.manual_seed(0)
    bayes = models.to_bayesian(CustomMLP(), "hs")
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    history = train.train(bayes, [(x, y)], epochs=1, n_data=16, progress=False)
    assert torch.isfinite(torch.tensor(history[-1]["loss"]))
    assert models.kl_divergence(bayes).detach().item() > 0
    check_invariant(bayes, x, sparsify(bayes), example_input=x[:1])


def test_layers_take_the_prior_as_an_argument():
    assert layers.LinearGroup(5, 3, prior="hs").prior == "hs"
    conv = layers.ConvGroup(2, 4, 3, prior="hs", dims=1)
    assert conv(torch.randn(2, 2, 9)).shape == (2, 4, 7)
    assert isinstance(layers.Conv3dGroupHS(1, 2, 3), layers.ConvGroup)
    with pytest.raises(ValueError, match="unknown prior 'xx'"):
        layers.LinearGroup(5, 3, prior="xx")


def test_to_bayesian_reports_what_it_leaves_plain():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.ConvTranspose2d(4, 4, 3), nn.Conv2d(4, 8, 1), nn.Flatten(), nn.Linear(8, 3))
    with pytest.warns(ConversionWarning, match=r"0 \(groups=2.*1 \(no group layer for ConvTranspose2d\)"):
        bayes = models.to_bayesian(net)
    assert [type(m).__name__ for m in bayes][:3] == ["Conv2d", "ConvTranspose2d", "ConvGroup"]
    with pytest.raises(ValueError, match="left 2 layer"):
        models.to_bayesian(net, strict=True)
    kept = models.to_bayesian(bn_cnn(), keep_plain=["12"])
    assert type(kept[12]) is nn.Linear and isinstance(kept[9], layers.LinearGroup)
    with pytest.raises(ValueError, match="not modules of the model"):
        models.to_bayesian(bn_cnn(), keep_plain=["fc"])
    with pytest.raises(ValueError, match="already has Bayesian group layers"):
        models.to_bayesian(models.lenet_300_100("nj"))


def test_kept_plain_last_layer_prunes_through():
    """A plain layer after a group layer loses the inputs its producer dropped."""
    torch.manual_seed(0)
    plain = bn_cnn()
    randomise_batchnorm(plain)
    bayes = models.to_bayesian(plain, keep_plain=["9"])
    x = torch.randn(4, 3, 8, 8)
    pruned = check_invariant(bayes, x, sparsify(bayes))
    assert pruned.get_submodule("9").in_features < 24 * 4 * 4


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return self.fc(x)
        return -self.fc(x)


def test_untraceable_model_gets_a_clear_error():
    bayes = models.to_bayesian(Untraceable())
    with pytest.raises(TypeError, match="cannot be traced by torch.fx.*control flow"):
        compression.prune(bayes, [0.0])


def test_barrier_keeps_every_channel():
    """A sigmoid maps a zero channel to 0.5: the filters before it must all stay."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 36, 2))
    bayes = models.to_bayesian(net).eval()
    thresholds = sparsify(bayes, 0.5)
    masks = compression.group_masks(bayes, thresholds)
    assert bool(masks[0].outputs.all())
    pruned = compression.prune(bayes, thresholds)
    compression.apply_masks(bayes, masks)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(pruned(x), bayes(x))


def test_reshape_needs_example_input():
    bayes = models.to_bayesian(CustomMLP())
    with pytest.raises(ValueError, match="pass example_input"):
        compression.group_masks(bayes, [0.0, 0.0])
    with pytest.raises(ValueError, match="fails on example_input of shape"):
        compression.group_masks(bayes, [0.0, 0.0], example_input=torch.randn(1, 3))


def test_quantized_rounds_only_former_group_layers():
    """A layer kept plain before the group layers keeps its float32 weights."""
    torch.manual_seed(0)
    bayes = models.to_bayesian(bn_cnn(), keep_plain=["0"])
    thresholds = sparsify(bayes)
    pruned = compression.prune(bayes, thresholds)
    bits = compression.compression_report(bayes, thresholds).bits
    q = compression.quantized(pruned, bits)
    assert torch.equal(q.get_submodule("0").weight, pruned.get_submodule("0").weight)
    assert not torch.equal(q.get_submodule("4").weight, pruned.get_submodule("4").weight)


def test_thresholds_that_empty_a_layer_are_refused():
    """Conv keeps filter 0 only, the next fc only features of filter 1: nothing would flow."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4, 3))
    bayes = models.to_bayesian(net).eval()
    with torch.no_grad():
        bayes[0].scale.z_mu.fill_(1.0)
        bayes[0].scale.z_logvar.copy_(torch.tensor([-9.0, 9.0]))
        bayes[2].scale.z_mu.fill_(1.0)
        bayes[2].scale.z_logvar.copy_(torch.tensor([9.0] * 4 + [-9.0] * 4))
    with pytest.raises(compression.EmptyLayerError, match="no outputs"):
        compression.prune(bayes, [0.0, 0.0])
    # The search never proposes such thresholds.
    x = torch.randn(8, 1, 4, 4)
    t = compression.search_thresholds(bayes, lambda n: float((n(x).argmax(1) == 0).float().mean()), max_drop=1.0)
    compression.prune(bayes, t)(x)


def test_coupled_layers_of_a_resnet():
    bayes = models.resnet18_cifar("nj")
    sets = graph.coupled_layers(bayes, torch.zeros(1, 3, 32, 32))
    assert ["conv1", "layer1.0.conv2", "layer1.1.conv2"] in sets
    assert ["layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2"] in sets and len(sets) == 4


class ReadsWeight(nn.Module):
    """Uses a layer's weight itself, as attention blocks do (``F.linear(x, self.qkv.weight)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.linear(x, self.qkv.weight))


def test_layers_whose_weight_is_read_stay_plain():
    with pytest.warns(ConversionWarning, match="qkv .the surrounding forward reads its weight"):
        bayes = models.to_bayesian(ReadsWeight())
    assert type(bayes.qkv) is nn.Linear and isinstance(bayes.out, layers.LinearGroup)
    x = torch.randn(3, 4)
    check_invariant(bayes, x, sparsify(bayes, 0.5))


def test_masks_move_with_the_model():
    bayes = models.to_bayesian(bn_cnn())
    compression.apply_masks(bayes, compression.group_masks(bayes, sparsify(bayes)))
    bayes.to(torch.float64)
    assert bayes[0].weight_mask.dtype == torch.float64
    assert "weight_mask" not in "".join(bayes.state_dict())  # not saved with the parameters
    assert bayes.eval()(torch.randn(2, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


class SqueezeExcite(nn.Module):
    """A conv, a squeeze-excitation gate on its channels (in both factor orders), a head."""

    def __init__(self, gate_first: bool) -> None:
        super().__init__()
        self.gate_first = gate_first
        self.a = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.bn(self.a(x)))
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.head(g * y if self.gate_first else y * g).mean((2, 3))


@pytest.mark.parametrize("gate_first", [True, False])
def test_squeeze_excitation_gate_prunes_with_its_channels(gate_first):
    torch.manual_seed(0)
    plain = SqueezeExcite(gate_first)
    randomise_batchnorm(plain)
    bayes = models.to_bayesian(plain)
    x = torch.randn(3, 3, 8, 8)
    pruned = check_invariant(bayes, x, sparsify(bayes, 0.5), example_input=x[:1])
    assert pruned.a.out_channels == pruned.fc2.out_channels == pruned.head.in_channels < 8


def test_sigmoid_used_elsewhere_keeps_channels():
    """The gate also feeds the output directly: 0.5 where a channel was pruned, so all stay."""

    class Leaky(SqueezeExcite):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            g = torch.sigmoid(self.fc2(self.fc1(y)))
            return self.head(g * y) + g.sum(1, keepdim=True)

    bayes = models.to_bayesian(Leaky(True))
    x = torch.randn(3, 3, 8, 8)
    thresholds = sparsify(bayes, 0.5)
    assert bool(compression.group_masks(bayes, thresholds, x[:1])[0].outputs.all())
    compression.apply_masks(bayes, compression.group_masks(bayes, thresholds, x[:1]))
    torch.testing.assert_close(compression.prune(bayes, thresholds, x[:1])(x), bayes.eval()(x))


class TokenMLP(nn.Module):
    """Linear layers on (batch, tokens, features) inputs, added to another tensor (as in Swin)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(torch.zeros_like(h) + F.relu(h)).mean(1)


def test_linear_layers_on_token_inputs():
    bayes = models.to_bayesian(TokenMLP())
    x = torch.randn(3, 4, 8)
    check_invariant(bayes, x, sparsify(bayes, 0.5), example_input=x[:1])


def test_compression_unwraps_data_parallel():
    bayes = models.to_bayesian(bn_cnn())
    thresholds = sparsify(bayes)
    wrapped = nn.DataParallel(bayes)  # on CPU a plain wrapper, as DistributedDataParallel is
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(compression.prune(wrapped, thresholds)(x), compression.prune(bayes, thresholds)(x))
    compression.apply_masks(wrapped, compression.group_masks(wrapped, thresholds))
    torch.testing.assert_close(wrapped.eval()(x), compression.prune(bayes, thresholds)(x))
