"""bclib.cost: multiply-adds and activations against counts by hand, for plain, Bayesian and pruned nets."""
import torch

from bclib import cost, models
from bclib.compression import prune
from bclib.testing import sparsify

# By hand: conv (out channels x out pixels x in channels x 5 x 5), linear (in x out).
LENET5_MACS = 20 * 24 * 24 * 1 * 25 + 50 * 8 * 8 * 20 * 25 + 800 * 500 + 500 * 10
LENET5_ACTIVATIONS = 20 * 24 * 24 + 50 * 8 * 8 + 500 + 10
LENET300_MACS = 784 * 300 + 300 * 100 + 100 * 10


def test_counts_of_the_plain_and_bayesian_lenets():
    x = torch.zeros(3, 1, 28, 28)
    for prior in (None, "nj", "hs"):
        assert cost.macs(models.build("lenet5_caffe", prior), x) == LENET5_MACS
        assert cost.activations(models.build("lenet5_caffe", prior), x) == LENET5_ACTIVATIONS
        assert cost.macs(models.build("lenet_300_100", prior), x) == LENET300_MACS
        assert cost.activations(models.build("lenet_300_100", prior), x) == 300 + 100 + 10


def test_counts_of_a_pruned_net_follow_its_kept_sizes():
    torch.manual_seed(0)
    model = models.build("lenet5_caffe", "nj").eval()
    net = prune(model, sparsify(model, 0.5, seed=3))
    c1, c2, fc1, fc2 = (m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    x = torch.zeros(1, 1, 28, 28)
    macs = c1.out_channels * 576 * 25 + c2.out_channels * 64 * c1.out_channels * 25
    macs += fc1.in_features * fc1.out_features + fc2.in_features * fc2.out_features
    assert cost.macs(net, x) == macs
    assert cost.activations(net, x) == c1.out_channels * 576 + c2.out_channels * 64 + fc1.out_features + 10


def test_time_forward_times_every_net():
    nets = {"a": models.build("lenet_300_100", None), "b": models.build("lenet_300_100", None).eval()}
    t = cost.time_forward(nets, torch.zeros(4, 1, 28, 28), repeats=3)
    assert set(t) == {"a", "b"} and all(v > 0 for v in t.values())
