"""The fused local reparameterisation of group linear layers against plain autograd."""
import pytest
import torch
from torch import nn

from bclib import kl, layers, models
from bclib.lrt import linear_lrt


def _args(bias: bool, dtype=torch.float64):
    torch.manual_seed(0)
    b, i, o = 5, 4, 3
    args = [torch.randn(b, i), 1 + 0.1 * torch.randn(b, i), torch.randn(o, i), torch.randn(o, i) - 1,
            torch.randn(o), torch.randn(o) - 1]  # fmt: skip
    args = [a.to(dtype).requires_grad_() for a in args]
    if not bias:
        args[4:] = [None, None]
    return args, torch.randn(b, o, dtype=dtype)


def _reference(x, z, w_mu, w_logvar, b_mu, b_logvar, eps):
    """The same sample and KL written with autograd ops only."""
    xz = x * z
    mean = xz @ w_mu.T + (0 if b_mu is None else b_mu)
    var = xz.pow(2) @ w_logvar.exp().T + (0 if b_logvar is None else b_logvar.exp())
    kl_w = kl.kl_std_normal(w_mu, w_logvar).sum()
    if b_mu is not None:
        kl_w = kl_w + kl.kl_std_normal(b_mu, b_logvar).sum()
    return mean + eps * (var + 1e-8).sqrt(), kl_w


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_kl", [True, False])
def test_gradcheck(bias, with_kl):
    args, eps = _args(bias)
    assert torch.autograd.gradcheck(lambda *a: linear_lrt(*a, eps, with_kl), args)


@pytest.mark.parametrize("bias", [True, False])
def test_matches_autograd(bias):
    args, eps = _args(bias, torch.float32)
    out, kl_w = linear_lrt(*args, eps, True)
    ref_out, ref_kl = _reference(*args, eps)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(kl_w, ref_kl)
    params = [a for a in args if a is not None]
    g = torch.autograd.grad(out.pow(2).sum() + 3 * kl_w, params)
    g_ref = torch.autograd.grad(ref_out.pow(2).sum() + 3 * ref_kl, params)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("arch,prior", [("lenet_300_100", "nj"), ("lenet_300_100", "hs"), ("lenet5_caffe", "nj")])
def test_forward_with_kl_equals_forward_plus_kl(arch, prior):
    """Same RNG state: same logits, KL and gradients as model(x) + kl_divergence(model)."""
    torch.manual_seed(0)
    net = models.build(arch, prior).train()
    x = torch.randn(8, 1, 28, 28)
    grads = []
    for fused in (True, False):
        torch.manual_seed(1)
        logits, kl_total = models.forward_with_kl(net, x) if fused else (net(x), models.kl_divergence(net))
        net.zero_grad()
        (logits.pow(2).sum() + kl_total).backward()
        grads.append([p.grad.clone() for p in net.parameters()])
        assert all(layer.kl_terms is None for layer in models.bayesian_layers(net))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_layer_used_twice_counts_its_kl_once():
    torch.manual_seed(0)
    layer = layers.LinearGroupNJ(6, 6)
    _, kl_total = models.forward_with_kl(nn.Sequential(layer, layer), torch.randn(3, 6))
    torch.testing.assert_close(kl_total, layer.kl_divergence())


def test_forward_with_kl_of_a_plain_net_is_zero():
    _, kl_total = models.forward_with_kl(models.build("lenet_300_100", None), torch.randn(2, 1, 28, 28))
    assert kl_total == 0



def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("bias", [True, False])
def test_bfloat16_variances_against_autograd(bias):
    """The variance path in bfloat16: its noise term and every gradient within 1 % (norm-wise) of
    float32 autograd; with no noise the output is float32's exactly (the mean path is untouched)."""
    torch.manual_seed(0)
    b, i, o = 64, 50, 30
    args = [torch.randn(b, i), 1 + 0.1 * torch.randn(b, i), torch.randn(o, i) / 7, torch.randn(o, i) - 3,
            torch.randn(o), torch.randn(o) - 3]  # fmt: skip
    args = [a.requires_grad_() for a in args]
    if not bias:
        args[4:] = [None, None]
    eps = torch.randn(b, o)
    out, kl_w = linear_lrt(*args, eps, True, torch.bfloat16)
    ref_out, ref_kl = _reference(*args, eps)
    mean = _reference(*args, torch.zeros_like(eps))[0]
    assert out.dtype == torch.float32
    assert 0 < _rel_err(out - mean, ref_out - mean) < 1e-2  # bfloat16 did round, by little
    torch.testing.assert_close(kl_w, ref_kl)
    params = [a for a in args if a is not None]
    g = torch.autograd.grad(out.pow(2).sum() + 3 * kl_w, params)
    g_ref = torch.autograd.grad(ref_out.pow(2).sum() + 3 * ref_kl, params)
    for a, r in zip(g, g_ref):
        assert a.dtype == torch.float32 and _rel_err(a, r) < 1e-2
    no_noise = linear_lrt(*args, torch.zeros_like(eps), False, torch.bfloat16)[0]
    assert torch.equal(no_noise, linear_lrt(*args, torch.zeros_like(eps))[0])


@pytest.mark.parametrize("arch", ["lenet_300_100", "lenet5_caffe"])
def test_variance_dtype_of_whole_networks(arch):
    """Linear and conv group layers with bfloat16 variances: the same training pass within 1 %, the
    same gradients within 2 %, eval mode identical; to_bayesian sets it on every layer."""
    torch.manual_seed(0)
    plain = models.build(arch, None)
    nets = []
    for dt in (None, torch.bfloat16):
        torch.manual_seed(1)  # the same initial posterior
        nets.append(models.to_bayesian(plain, "nj", variance_dtype=dt))
    assert all(layer.variance_dtype == torch.bfloat16 for layer in models.bayesian_layers(nets[1]))
    x = torch.randn(16, 1, 28, 28)
    outs, grads = [], []
    for net in nets:
        torch.manual_seed(1)
        logits, kl_total = models.forward_with_kl(net.train(), x)
        (logits.pow(2).sum() + kl_total).backward()
        outs.append(logits)
        grads.append([p.grad for p in net.parameters()])
    assert 0 < _rel_err(outs[1], outs[0]) < 1e-2
    for a, r in zip(*grads):
        assert _rel_err(a, r) < 2e-2
    with torch.no_grad():
        assert torch.equal(nets[0].eval()(x), nets[1].eval()(x))


def test_variance_dtype_must_be_a_floating_type():
    with pytest.raises(ValueError, match="variance_dtype must be a floating torch.dtype"):
        layers.LinearGroupNJ(3, 2, variance_dtype=torch.int8)
    with pytest.raises(ValueError, match="variance_dtype must be a floating torch.dtype"):
        layers.Conv2dGroupNJ(1, 2, 3, variance_dtype="bfloat16")
