"""Baselines (bclib.baselines): rankings swapped in for log alpha, checked against plain torch."""
import pytest
import torch
from torch import nn

from bclib import baselines, compression
from bclib.convert import bayesian_layers, to_bayesian
from bclib.data import TensorBatches
from bclib.train import evaluate


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 3))  # fmt: skip


def test_group_norm_by_hand():
    bayes = to_bayesian(_cnn(), "nj")
    conv, fc1, _ = bayesian_layers(bayes)
    w = conv.posterior_weight_mean()
    want = torch.stack([-torch.log(w[f].pow(2).sum().sqrt()) for f in range(6)])  # one per filter
    torch.testing.assert_close(baselines.neg_log_group_norm(conv), want)
    w = fc1.posterior_weight_mean()
    want = torch.stack([-torch.log(w[:, j].pow(2).sum().sqrt()) for j in range(96)])  # one per input
    torch.testing.assert_close(baselines.neg_log_group_norm(fc1), want)


def test_ranked_copy_prunes_by_the_statistic_and_keeps_the_posterior():
    bayes = to_bayesian(_cnn(), "hs").eval()
    ranked = baselines.ranked_by(bayes, baselines.neg_log_group_norm)
    x = torch.randn(5, 1, 10, 10)
    torch.testing.assert_close(ranked(x), bayes(x))  # same posterior means
    for a, b in zip(bayesian_layers(ranked), bayesian_layers(bayes)):
        torch.testing.assert_close(a.posterior_weight_variance(), b.posterior_weight_variance())
        torch.testing.assert_close(a.log_alpha, baselines.neg_log_group_norm(b))
    assert not torch.equal(bayesian_layers(bayes)[0].log_alpha, bayesian_layers(ranked)[0].log_alpha)
    # thresholds at the median norm keep exactly the filters with the larger norms
    stat = baselines.neg_log_group_norm(bayesian_layers(bayes)[0])
    t = [stat.median().item(), 1e9, 1e9]
    masks = compression.group_masks(ranked, t, example_input=x[:1])
    assert torch.equal(masks[0].outputs, stat < t[0])


def test_ranked_by_rejects_a_statistic_of_the_wrong_shape():
    with pytest.raises(ValueError, match="one value per group"):
        baselines.ranked_by(to_bayesian(_cnn(), "nj"), lambda layer: torch.zeros(2))


def test_plain_as_group_net_equals_the_plain_net():
    plain = _cnn().eval()
    x = torch.randn(4, 1, 10, 10)
    torch.testing.assert_close(baselines.plain_as_group_net(plain)(x), plain(x))


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 10, 10, generator=g)
    return TensorBatches(x, torch.randint(0, 3, (n,), generator=g), 50)


def test_norm_search_prunes_groups_of_zero_weight_first():
    """Zeroed inputs of fc1 change nothing, so a zero-budget search by norm removes at least them."""
    plain = _cnn().eval()
    with torch.no_grad():
        plain[4].weight[:, :40] = 0
    held_out = _data(200, 1)
    labels = torch.cat([plain(x).argmax(1) for x, _ in held_out])
    held_out = TensorBatches(held_out.x, labels, 50)  # the plain net is 100 % right on its own labels
    x0 = held_out.x[:1]
    (p,) = baselines.searched(baselines.ranked_by(baselines.plain_as_group_net(plain), baselines.neg_log_group_norm),
                              [0.0], held_out, held_out, x0)  # fmt: skip
    assert p["error_pruned"] == 0.0
    assert p["architecture"][1][0] <= 96 - 40  # fc1 keeps at most the 56 inputs with weight


def test_fixed_thresholds_skip_values_that_empty_a_layer():
    bayes = to_bayesian(_cnn(), "nj").eval()
    test = _data(100, 2)
    x0 = test.x[:1]
    la_max = max(l.log_alpha.max().item() for l in bayesian_layers(bayes))
    la_min = min(l.log_alpha.min().item() for l in bayesian_layers(bayes))
    points = baselines.fixed(bayes, test, x0, values=[la_min - 1, la_max + 1])
    assert [p["fixed_threshold"] for p in points] == [la_max + 1]  # la_min - 1 keeps nothing
    assert points[0]["rate_pruning"] == pytest.approx(1.0)
    assert points[0]["error_pruned"] == pytest.approx(100 * (1 - evaluate(bayes, test)))


def test_nearest_uses_the_error_after_precision_where_there_is_one():
    points = [{"error_compressed": 1.3, "error_pruned": 1.0, "rate_pruning": 9.0},
              {"error_compressed": 1.1, "error_pruned": 1.2, "rate_pruning": 5.0},
              {"error_pruned": 1.05, "rate_pruning": 2.0}]  # fmt: skip
    assert baselines.nearest(points, 1.0) is points[2]
    assert baselines.nearest(points[:2], 1.0) is points[1]
    tie = [{"error_pruned": 0.75, "rate_pruning": 3.0}, {"error_pruned": 1.25, "rate_pruning": 4.0}]
    assert baselines.nearest(tie, 1.0) is tie[1]


def test_table_names_the_missing_baselines():
    with pytest.raises(ValueError, match="--baselines"):
        baselines.table([{"arch": "lenet5_caffe", "prior": "nj", "tradeoff": []}])
