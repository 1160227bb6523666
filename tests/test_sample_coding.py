"""bclib.sample_coding: the KL of a posterior sample's code against torch.distributions and Monte
Carlo, sampled networks against the moments they are drawn with, and the staged (MIRACLE) code
against the KL it must add up to and its training layer against Monte Carlo over weight draws."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from bclib import models, rate_aware, sample_coding
from bclib.compression import former_group_layers, prune
from bclib.testing import sparsify


def posterior(seed: int = 0, n: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) * 0.05 + 0.005


def lenet_task(n: int = 256, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of a learnable toy task for LeNet-300-100's input size."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 784, generator=g)
    y = x[:, :10].argmax(1)
    return [(x[i : i + 64], y[i : i + 64]) for i in range(0, n, 64)]


def pruned_lenet() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = models.build("lenet_300_100", "nj").eval()
    t = sparsify(model, 0.6, 0)
    return prune(model, t), rate_aware.kept_posterior_std(model, t)


@pytest.mark.parametrize("shrink", [1.0, 0.3])
def test_kl_bits_equal_torch_distributions_at_the_best_scale(shrink: float) -> None:
    mean, std = posterior()
    q = Normal(mean.double(), math.sqrt(shrink) * std.double())
    s = (mean.double() ** 2 + q.variance).mean().sqrt()
    nats = kl_divergence(q, Normal(0.0, s)).sum().item()
    assert sample_coding.coding_kl_bits(mean, std, shrink) == pytest.approx(nats / math.log(2) + 32, rel=1e-9)
    for other in (0.8 * s, 1.25 * s):  # the scale is the best one
        assert kl_divergence(q, Normal(0.0, other)).sum().item() > nats


def test_kl_bits_equal_a_monte_carlo_estimate() -> None:
    """E_q[log q(w) - log p(w)] over draws of w, with p at the closed form's best scale."""
    mean, std = posterior(1)
    g = torch.Generator().manual_seed(2)
    w = mean.double() + std.double() * torch.randn(4000, len(mean), generator=g, dtype=torch.float64)
    s = (mean.double() ** 2 + std.double() ** 2).mean().sqrt()
    log_ratio = (Normal(mean.double(), std.double()).log_prob(w) - Normal(0.0, s).log_prob(w)).sum(1)
    mc_bits = log_ratio.mean().item() / math.log(2)
    se_bits = log_ratio.std().item() / math.sqrt(len(w)) / math.log(2)
    assert abs(sample_coding.coding_kl_bits(mean, std) - 32 - mc_bits) < 4 * se_bits


def test_narrower_posteriors_cost_more_bits() -> None:
    mean, std = posterior(3)
    bits = [sample_coding.coding_kl_bits(mean, std, k) for k in (1.0, 0.5, 0.1, 0.01)]
    assert bits == sorted(bits) and bits[0] < bits[-1]


def test_samples_have_the_posterior_moments_and_leave_the_rest() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    std = [torch.full_like(net[0].weight, 0.2), torch.full_like(net[2].weight, 0.05)]
    g = torch.Generator().manual_seed(0)
    draws = [sample_coding.sampled(net, std, 0.25, g) for _ in range(3000)]
    for i, (layer, s) in enumerate(zip(former_group_layers(net), std)):
        w = torch.stack([former_group_layers(d)[i].weight for d in draws])
        assert torch.allclose(w.mean(0), layer.weight.detach(), atol=4 * 0.5 * s.max().item() / math.sqrt(3000))
        assert torch.allclose(w.std(0), 0.5 * s, rtol=0.08)
        assert all(torch.equal(former_group_layers(d)[i].bias, layer.bias) for d in draws[:5])
    first = sample_coding.sampled(net, std, 1.0, torch.Generator().manual_seed(7))
    again = sample_coding.sampled(net, std, 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(first[0].weight, again[0].weight) and not torch.equal(first[0].weight, net[0].weight)


def test_rate_distortion_on_a_pruned_bayesian_net() -> None:
    """On prune's net with kept_posterior_std: bits fall and samples move further as shrink grows."""
    net, std = pruned_lenet()
    ref = [l.weight.detach().clone() for l in former_group_layers(net)]

    def moved(n: nn.Module) -> float:  # stands in for a test error: how far the sample lies from the mean
        return sum((l.weight - r).abs().sum().item() for l, r in zip(former_group_layers(n), ref))

    pts = sample_coding.rate_distortion(net, std, [0.01, 0.1, 1.0], moved, samples=2, seed=3)
    assert [p.shrink for p in pts] == [0.01, 0.1, 1.0] and all(len(p.errors) == 2 for p in pts)
    assert pts[0].kl_bits > pts[1].kl_bits > pts[2].kl_bits
    assert max(pts[0].errors) < min(pts[1].errors) and max(pts[1].errors) < min(pts[2].errors)
    assert pts[2].kl_bytes == pts[2].kl_bits / 8
    again = sample_coding.rate_distortion(net, std, [0.01, 0.1, 1.0], moved, samples=2, seed=3)
    assert again == pts
    assert all(torch.equal(l.weight, r) for l, r in zip(former_group_layers(net), ref))  # net untouched


def test_bad_inputs_name_the_problem() -> None:
    net = nn.Sequential(nn.Linear(4, 3))
    std = [torch.full((3, 4), 0.1)]
    for k in (0, -1.0, 1.5, True, "1"):
        with pytest.raises(ValueError, match="shrink"):
            sample_coding.sampled(net, std, k, torch.Generator())
    with pytest.raises(ValueError, match="kept_posterior_std"):
        sample_coding.sampled(net, [torch.full((4, 3), 0.1)], 1.0, torch.Generator())
    with pytest.raises(ValueError, match="positive and finite"):
        sample_coding.coding_kl_bits(torch.zeros(3), torch.tensor([0.1, 0.0, 0.1]))
    with pytest.raises(ValueError, match="samples"):
        sample_coding.rate_distortion(net, std, [1.0], lambda n: 0.0, samples=0)


def test_progressive_code_without_training_costs_the_posteriors_kl() -> None:
    """Each weight is sent once, its KL counted at the start's posterior: the stages add up to
    coding_kl_bits of every layer; the result is plain layers holding samples, the input untouched."""
    net, std = pruned_lenet()
    means = [l.weight.detach().clone() for l in former_group_layers(net)]
    c = sample_coding.progressive_code(net, std, lenet_task(), beta=1.0, shrink=0.5, stages=3, epochs=0, first_epochs=0)
    expected = sum(sample_coding.coding_kl_bits(m, s, 0.5) for m, s in zip(means, std))
    assert c.kl_bits == pytest.approx(expected, rel=1e-6) and len(c.stage_bits) == 3
    assert c.kl_bytes == c.kl_bits / 8
    out = former_group_layers(c.net)
    assert [type(l) for l in out] == [nn.Linear] * 3 and not c.net.training
    for l, m, s, ref in zip(out, means, std, former_group_layers(net)):
        z = (l.weight - m) / (math.sqrt(0.5) * s)  # the samples' standardised draws
        assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.1
        assert torch.equal(l.bias, ref.bias) and torch.equal(ref.weight, m)


def test_progressive_code_trains_the_weights_not_yet_sent_and_is_seeded() -> None:
    net, std = pruned_lenet()
    batches = lenet_task()
    first = sample_coding.progressive_code(net, std, batches, beta=0.1, stages=2, epochs=1, first_epochs=1, seed=5)
    again = sample_coding.progressive_code(net, std, batches, beta=0.1, stages=2, epochs=1, first_epochs=1, seed=5)
    for a, b, ref in zip(former_group_layers(first.net), former_group_layers(again.net), former_group_layers(net)):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
        assert not torch.equal(a.bias, ref.bias)  # biases train with the weights
    assert first.kl_bits == again.kl_bits and all(b > 0 for b in first.stage_bits)


@pytest.mark.parametrize("layer", [nn.Linear(5, 4), nn.Conv2d(2, 3, 3, padding=1)])
def test_local_reparameterisation_matches_sampled_weights(layer: nn.Module) -> None:
    """In training the layer's output has the mean and variance of the output under weights drawn
    from N(m, v) (Monte Carlo over weight draws); sent weights add no variance."""
    torch.manual_seed(0)
    std = torch.rand_like(layer.weight) * 0.3 + 0.1
    g = sample_coding._GaussianWeights(layer, std, 1.0).train()
    with torch.no_grad():
        g.sent.view(-1)[:3] = True
        g.value.view(-1)[:3] = 0.5
    x = torch.randn(1, 5) if isinstance(layer, nn.Linear) else torch.randn(1, 2, 4, 4)
    with torch.no_grad():
        lrt = torch.stack([g(x) for _ in range(20000)])
        m = torch.where(g.sent, g.value, g.m)
        s = torch.where(g.sent, 0.0, std)
        mc = torch.stack([g._apply_weight(x, m + s * torch.randn_like(m), layer.bias) for _ in range(20000)])
    assert torch.allclose(lrt.mean(0), mc.mean(0), atol=0.03)
    assert torch.allclose(lrt.var(0), mc.var(0), rtol=0.06, atol=1e-3)


def test_progressive_code_bad_settings_name_the_problem() -> None:
    net, std = pruned_lenet()
    for kwargs, word in (({"stages": 0}, "stages"), ({"epochs": -1}, "epochs"), ({"beta": 0.0}, "beta"),
                         ({"first_epochs": 1.5}, "first_epochs"), ({"shrink": 2.0}, "shrink")):  # fmt: skip
        args = {"beta": 1.0, **kwargs}
        with pytest.raises(ValueError, match=word):
            sample_coding.progressive_code(net, std, [], **args)
