"""Group layers: shapes, train/eval behaviour, posterior moments, KL against Monte-Carlo."""
import math

import pytest
import torch
from torch.distributions import Gamma, LogNormal, Normal

from bclib import kl, layers, models
from bclib.scales import HorseshoeScale, NormalJeffreysScale

LINEAR = [layers.LinearGroupNJ, layers.LinearGroupHS]
CONV = [
    (layers.Conv1dGroupNJ, (2, 3, 12)),
    (layers.Conv2dGroupNJ, (2, 3, 12, 12)),
    (layers.Conv3dGroupNJ, (2, 3, 6, 6, 6)),
    (layers.Conv2dGroupHS, (2, 3, 12, 12)),
]


@pytest.mark.parametrize("cls", LINEAR)
def test_linear_shapes_and_modes(cls):
    torch.manual_seed(0)
    layer = cls(7, 5)
    x = torch.randn(4, 7)
    assert layer(x).shape == (4, 5)
    assert layer.log_alpha.shape == (7,)  # one group per input neuron
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # stochastic in training
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    expected = x @ layer.posterior_weight_mean().T + layer.bias_mu
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("cls,shape", CONV)
def test_conv_shapes_and_modes(cls, shape):
    torch.manual_seed(0)
    layer = cls(3, 4, 3, padding=1)
    x = torch.randn(shape)
    out = layer(x)
    assert out.shape == (shape[0], 4, *shape[2:])
    assert layer.log_alpha.shape == (4,)  # one group per output filter
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_train_mean_matches_eval_output():
    """With tiny variances, the local reparameterisation sample is close to the eval output."""
    torch.manual_seed(0)
    layer = layers.LinearGroupNJ(20, 6)
    x = torch.randn(64, 20)
    layer.train()
    with torch.no_grad():
        mc = torch.stack([layer(x) for _ in range(1000)]).mean(0)
    layer.eval()
    torch.testing.assert_close(mc, layer(x), atol=1e-2, rtol=0)


def test_local_reparameterisation_variance_matches_weight_sampling():
    """Pre-activation variance from the layer equals that of sampling z and w explicitly."""
    torch.manual_seed(0)
    layer = layers.LinearGroupNJ(5, 3)
    with torch.no_grad():
        layer.weight_logvar.fill_(math.log(0.05))
        layer.scale.z_logvar.fill_(math.log(0.1))
        layer.bias_logvar.fill_(-20)
    x = torch.randn(1, 5).expand(20000, 5)
    layer.train()
    with torch.no_grad():
        out = layer(x)
        z = layer.scale.mean + layer.scale.variance.sqrt() * torch.randn(20000, 5)
        w = layer.weight_mu + layer.weight_logvar.exp().sqrt() * torch.randn(20000, 3, 5)
        ref = torch.einsum("noi,ni->no", w, x * z) + layer.bias_mu
    torch.testing.assert_close(out.var(0), ref.var(0), rtol=0.1, atol=1e-3)
    torch.testing.assert_close(out.mean(0), ref.mean(0), rtol=0, atol=0.02)


@pytest.mark.parametrize("scale_cls", [NormalJeffreysScale, HorseshoeScale])
def test_scale_moments_match_samples(scale_cls):
    torch.manual_seed(0)
    s = scale_cls(4)
    with torch.no_grad():
        for name, p in s.named_parameters():
            if name.endswith("logvar"):
                p.fill_(math.log(0.2))
    z = s.sample(200000)
    torch.testing.assert_close(z.mean(0), s.mean.detach(), rtol=0.02, atol=0)
    torch.testing.assert_close(z.var(0), s.variance.detach(), rtol=0.05, atol=0)
    torch.testing.assert_close(s.log_alpha.detach(), torch.log(z.var(0) / z.mean(0) ** 2), rtol=0, atol=0.05)


def test_marginal_weight_variance_matches_samples():
    torch.manual_seed(0)
    layer = layers.LinearGroupNJ(3, 2)
    with torch.no_grad():
        layer.weight_logvar.fill_(math.log(0.03))
        layer.scale.z_logvar.fill_(math.log(0.2))
    n = 200000
    z = layer.scale.sample(n)[:, None, :]
    w = z * (layer.weight_mu + layer.weight_logvar.exp().sqrt() * torch.randn(n, 2, 3))
    torch.testing.assert_close(w.var(0), layer.posterior_weight_variance().detach(), rtol=0.05, atol=0)
    torch.testing.assert_close(w.mean(0), layer.posterior_weight_mean().detach(), rtol=0, atol=0.01)


def test_log_uniform_kl_matches_monte_carlo():
    """-KL(N(1, a) || log-uniform) = 1/2 log a - E log|1 + sqrt(a) eps| + C (Molchanov et al. eq. 14)."""
    torch.manual_seed(0)
    eps = torch.randn(2_000_000, dtype=torch.float64)
    log_alpha = torch.linspace(-4, 4, 9, dtype=torch.float64)
    neg_kl = torch.stack([0.5 * la - torch.log((1 + la.mul(0.5).exp() * eps).abs()).mean() for la in log_alpha])
    ref = -(neg_kl - neg_kl[-1])  # up to a constant: compare differences to the largest alpha
    approx = kl.kl_log_uniform(log_alpha) - kl.kl_log_uniform(log_alpha[-1])
    torch.testing.assert_close(approx, ref, rtol=0, atol=0.02)
    assert kl.kl_log_uniform(torch.tensor(20.0)).abs() < 1e-3  # -> 0 as alpha -> inf


def _mc_kl(q, p, n=400000):
    x = q.rsample((n,))
    return (q.log_prob(x) - p.log_prob(x)).mean()


@pytest.mark.parametrize("mu,logvar", [(0.3, math.log(0.5)), (-1.0, math.log(0.1))])
def test_std_normal_kl_matches_monte_carlo(mu, logvar):
    torch.manual_seed(0)
    q = Normal(torch.tensor(mu), torch.tensor(logvar).mul(0.5).exp())
    exact = kl.kl_std_normal(torch.tensor(mu), torch.tensor(logvar))
    torch.testing.assert_close(exact, _mc_kl(q, Normal(0.0, 1.0)), rtol=0, atol=0.02)


class _InvGamma:
    """InvGamma(shape, scale) log density (torch ships only Gamma)."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def log_prob(self, x):
        return self.a * math.log(self.b) - math.lgamma(self.a) - (self.a + 1) * torch.log(x) - self.b / x


@pytest.mark.parametrize("mu,logvar,scale", [(0.0, math.log(0.3), 1.0), (-2.0, math.log(0.5), 0.01), (-23.0, math.log(0.1), 1e-10)])
def test_lognormal_gamma_kl_matches_monte_carlo(mu, logvar, scale):
    torch.manual_seed(0)
    mu_t, lv_t = torch.tensor(mu, dtype=torch.float64), torch.tensor(logvar, dtype=torch.float64)
    q = LogNormal(mu_t, lv_t.mul(0.5).exp())
    p = Gamma(torch.tensor(0.5, dtype=torch.float64), torch.tensor(1.0 / scale, dtype=torch.float64))  # rate = 1/scale
    torch.testing.assert_close(kl.kl_lognormal_gamma(mu_t, lv_t, scale), _mc_kl(q, p), rtol=5e-3, atol=0.02)


@pytest.mark.parametrize("mu,logvar", [(0.0, math.log(0.3)), (3.0, math.log(0.5))])
def test_lognormal_invgamma_kl_matches_monte_carlo(mu, logvar):
    torch.manual_seed(0)
    mu_t, lv_t = torch.tensor(mu, dtype=torch.float64), torch.tensor(logvar, dtype=torch.float64)
    q = LogNormal(mu_t, lv_t.mul(0.5).exp())
    torch.testing.assert_close(kl.kl_lognormal_invgamma(mu_t, lv_t), _mc_kl(q, _InvGamma(0.5, 1.0)), rtol=0, atol=0.02)


def test_half_cauchy_split():
    """sqrt(s_a s_b) with s_a ~ Gamma(1/2, scale tau^2), s_b ~ InvGamma(1/2, 1) is C+(0, tau)."""
    torch.manual_seed(0)
    tau, n = 0.5, 400000
    sa = Gamma(0.5, 1.0 / tau**2).sample((n,))
    sb = 1.0 / Gamma(0.5, 1.0).sample((n,))
    s = (sa * sb).sqrt()
    for q in (0.25, 0.5, 0.75):
        assert abs(torch.quantile(s, q).item() - tau * math.tan(math.pi * q / 2)) < 0.02


def test_layer_kl_sums_parts():
    layer = layers.LinearGroupHS(6, 4)
    expected = (layer.scale.kl_divergence() + kl.kl_std_normal(layer.weight_mu, layer.weight_logvar).sum()
                + kl.kl_std_normal(layer.bias_mu, layer.bias_logvar).sum())  # fmt: skip
    torch.testing.assert_close(layer.kl_divergence(), expected)
    net = models.lenet_300_100("hs")
    assert torch.isfinite(models.kl_divergence(net))
    assert models.kl_divergence(models.lenet_300_100(None)) == 0


def test_gradients_flow_to_all_parameters():
    net = models.lenet5_caffe("hs")
    net(torch.randn(2, 1, 28, 28)).sum().add(models.kl_divergence(net)).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_clip_variances():
    layer = layers.LinearGroupNJ(3, 2, clip_var=0.04)
    with torch.no_grad():
        layer.weight_logvar.fill_(0.0)
    layer.clip_variances()
    assert layer.weight_logvar.max().item() == pytest.approx(math.log(0.04))


def test_to_bayesian_starts_from_pretrained_weights():
    torch.manual_seed(0)
    plain = models.lenet5_caffe(None).eval()
    bayes = models.to_bayesian(plain, "nj").eval()
    with torch.no_grad():
        for layer in models.bayesian_layers(bayes):
            layer.scale.z_mu.fill_(1.0)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(bayes(x), plain(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "layer,x,match",
    [
        (layers.LinearGroupNJ(784, 10), torch.randn(2, 1, 28, 28), "last dimension 784"),
        (layers.Conv2dGroupNJ(1, 4, 3), torch.randn(2, 3, 28, 28), r"\(batch, 1,"),
        (layers.Conv2dGroupHS(1, 4, 3), torch.randn(28, 28), "expects input of shape"),
    ],
)
def test_wrong_input_shape_is_a_clear_error(layer, x, match):
    with pytest.raises(ValueError, match=match):
        layer(x)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="unknown prior"):
        models.lenet_300_100("laplace")
    with pytest.raises(ValueError, match="init_weight has shape"):
        layers.LinearGroupNJ(3, 2, init_weight=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="tau0"):
        layers.LinearGroupHS(3, 2, tau0=0.0)
    with pytest.raises(ValueError, match="clip_var"):
        layers.LinearGroupNJ(3, 2, clip_var=-1.0)


def test_fused_std_normal_kl_sum_matches_autograd():
    mu = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(kl.kl_std_normal_sum, (mu, logvar))
    torch.testing.assert_close(kl.kl_std_normal_sum(mu, logvar), kl.kl_std_normal(mu, logvar).sum())


def test_fused_normal_jeffreys_kl_sum_matches_autograd():
    torch.manual_seed(0)
    z_mu = torch.randn(40, dtype=torch.float64, requires_grad=True)
    z_logvar = (torch.randn(40, dtype=torch.float64) * 4 - 3).requires_grad_()  # log alpha from about -15 to 10
    assert torch.autograd.gradcheck(kl.kl_normal_jeffreys_sum, (z_mu, z_logvar))
    fused = kl.kl_normal_jeffreys_sum(z_mu, z_logvar)
    composed = kl.kl_log_uniform(z_logvar - torch.log(z_mu.pow(2) + 1e-8)).sum()  # autograd's oracle
    torch.testing.assert_close(fused, composed)
    for a, b in zip(torch.autograd.grad(fused, (z_mu, z_logvar)), torch.autograd.grad(composed, (z_mu, z_logvar))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("prior, scale", [("gamma", 1.0), ("gamma", 1e-10), ("invgamma", 1.0)])  # tau0 = 1e-5: 1e-10
def test_fused_lognormal_kl_sums_match_autograd(prior, scale):
    torch.manual_seed(0)
    mu = (torch.randn(30, dtype=torch.float64) * 2 + math.log(scale)).requires_grad_()  # about where training starts
    logvar = (torch.randn(30, dtype=torch.float64) * 2 - 3).requires_grad_()
    if prior == "gamma":
        fused = lambda m, v: kl.kl_lognormal_gamma_sum(m, v, scale)  # noqa: E731
        composed = lambda m, v: kl.kl_lognormal_gamma(m, v, scale).sum()  # noqa: E731
    else:
        fused, composed = kl.kl_lognormal_invgamma_sum, lambda m, v: kl.kl_lognormal_invgamma(m, v).sum()
    assert torch.autograd.gradcheck(fused, (mu, logvar))
    a, b = fused(mu, logvar), composed(mu, logvar)  # autograd's composition is the oracle
    torch.testing.assert_close(a, b)
    for ga, gb in zip(torch.autograd.grad(a, (mu, logvar)), torch.autograd.grad(b, (mu, logvar))):
        torch.testing.assert_close(ga, gb)
