"""Kullback-Leibler divergences used by the Bayesian group layers.

All functions are element-wise and return a tensor of the same shape as their
arguments: the caller sums. Log-normal posteriors are parametrised by the mean
``mu`` and log-variance ``logvar`` of the *logarithm* of the variable.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Molchanov et al. (2017), eq. 14: constants of the sigmoid fit to -KL(q || log-uniform).
K1, K2, K3 = 0.63576, 1.87320, 1.48695
_HALF_LOG_2 = 0.5 * math.log(2.0)


def kl_log_uniform(log_alpha: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, alpha mu^2) || p(z) ∝ 1/|z|), approximately (paper eq. 9, Sparse VD eq. 14).

    The prior is improper, so the KL is defined up to a constant; this one is fixed so
    that the KL tends to 0 as ``alpha -> inf`` (a group that carries no information).
    """
    neg_kl = K1 * torch.sigmoid(K2 + K3 * log_alpha) - 0.5 * F.softplus(-log_alpha) - K1
    return -neg_kl


class _NormalJeffreysKLSum(torch.autograd.Function):
    """``kl_log_uniform(log_alpha).sum()`` from ``(z_mu, z_logvar)``, with a hand-written backward.

    Autograd would record and walk about fifteen small operations per layer and step for
    ``log_alpha = z_logvar - log(z_mu^2)`` and the sigmoid fit; here it is one node. With
    ``s = sigmoid(K2 + K3 log_alpha)``: ``dKL/dlog_alpha = -(K1 K3 s (1 - s) + sigmoid(-log_alpha) / 2)``,
    ``dlog_alpha/dz_logvar = 1`` and ``dlog_alpha/dz_mu = -2 z_mu / (z_mu^2 + eps)``.
    """

    @staticmethod
    def forward(ctx, z_mu: torch.Tensor, z_logvar: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        mu2 = torch.addcmul(torch.full_like(z_mu, eps), z_mu, z_mu)
        log_alpha = z_logvar - mu2.log()
        s = torch.sigmoid(K2 + K3 * log_alpha)
        ctx.save_for_backward(z_mu, mu2, log_alpha, s)
        return K1 * (z_mu.numel() - s.sum()) + 0.5 * F.softplus(-log_alpha).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        z_mu, mu2, log_alpha, s = ctx.saved_tensors
        d_log_alpha = (s * (1.0 - s)).mul_(-K1 * K3).sub_(torch.sigmoid(-log_alpha), alpha=0.5).mul_(grad)
        return d_log_alpha * z_mu * (-2.0) / mu2, d_log_alpha, None


def kl_normal_jeffreys_sum(z_mu: torch.Tensor, z_logvar: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``kl_log_uniform(z_logvar - log(z_mu^2 + eps)).sum()``: the group normal-Jeffreys scales' KL (eq. 9), one autograd node."""
    return _NormalJeffreysKLSum.apply(z_mu, z_logvar, eps)


def kl_std_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) (paper eq. 8 for the weights given z), element-wise."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def kl_std_normal_sum_given_var(mu: torch.Tensor, logvar: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``kl_std_normal(mu, logvar).sum()`` when ``var = exp(logvar)`` is already at hand (no gradient)."""
    return 0.5 * (torch.dot(mu.flatten(), mu.flatten()) + var.sum() - logvar.sum() - mu.numel())


class _StdNormalKLSum(torch.autograd.Function):
    """``kl_std_normal(mu, logvar).sum()`` with a hand-written backward.

    The weights' KL is evaluated every step over all weights; writing its gradients
    ``d/dmu = mu`` and ``d/dlogvar = (exp(logvar) - 1) / 2`` directly saves the
    intermediate tensors that autograd would keep.
    """

    @staticmethod
    def forward(ctx, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        var = logvar.exp()
        ctx.save_for_backward(mu, var)
        return kl_std_normal_sum_given_var(mu, logvar, var)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        mu, var = ctx.saved_tensors
        return grad * mu, (0.5 * grad) * (var - 1.0)  # exp - 1, not expm1: several times faster on CPU


def kl_std_normal_sum(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``kl_std_normal(mu, logvar).sum()``, cheaper in memory and time."""
    return _StdNormalKLSum.apply(mu, logvar)


class _LogNormalKLSum(torch.autograd.Function):
    """Summed KL of a log-normal from a Gamma(1/2, scale) (``sign = 1``) or InvGamma(1/2, 1) (``sign = -1``).

    With ``e = exp(sign mu + sigma^2 / 2)`` (the mean of ``x`` or of ``1/x``), both KLs read
    ``[log(scale) / 2] + e / scale - (sign mu + logvar + 1) / 2 - log(2) / 2``, so
    ``dKL/dmu = sign (e / scale - 1/2)`` and ``dKL/dlogvar = (e / scale) sigma^2 / 2 - 1/2``:
    one autograd node instead of about a dozen per factor of the horseshoe.
    """

    @staticmethod
    def forward(ctx, mu: torch.Tensor, logvar: torch.Tensor, sign: float, scale: float) -> torch.Tensor:  # type: ignore[override]
        var = logvar.exp()
        e_over_scale = torch.exp(sign * mu + 0.5 * var).div_(scale)
        ctx.sign = sign
        ctx.save_for_backward(var, e_over_scale)
        const = (0.5 * math.log(scale) if sign > 0 else 0.0) - 0.5 - _HALF_LOG_2
        return e_over_scale.sum() - 0.5 * (sign * mu.sum() + logvar.sum()) + const * mu.numel()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:  # type: ignore[override]
        var, e_over_scale = ctx.saved_tensors
        d_mu = (e_over_scale - 0.5).mul_(ctx.sign * grad)
        d_logvar = (e_over_scale * var).sub_(1.0).mul_(0.5 * grad)
        return d_mu, d_logvar, None, None


def kl_lognormal_gamma_sum(mu: torch.Tensor, logvar: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``kl_lognormal_gamma(mu, logvar, scale).sum()`` as one autograd node."""
    return _LogNormalKLSum.apply(mu, logvar, 1.0, scale)


def kl_lognormal_invgamma_sum(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``kl_lognormal_invgamma(mu, logvar).sum()`` as one autograd node."""
    return _LogNormalKLSum.apply(mu, logvar, -1.0, 1.0)


def kl_lognormal_gamma(mu: torch.Tensor, logvar: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """KL(LogNormal(mu, exp(logvar)) || Gamma(shape=1/2, scale)), exact.

    Used for the horseshoe's non-centred scales (the paper's Gamma / inverse-Gamma split of
    each half-Cauchy scale): ``s_a`` with ``scale = tau0**2`` and the local ``alpha_i``
    with ``scale = 1``.
    """
    mean = torch.exp(mu + 0.5 * logvar.exp())
    return 0.5 * math.log(scale) + mean / scale - 0.5 * (mu + logvar + 1.0) - _HALF_LOG_2


def kl_lognormal_invgamma(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(LogNormal(mu, exp(logvar)) || InvGamma(shape=1/2, scale=1)), exact."""
    mean_inv = torch.exp(0.5 * logvar.exp() - mu)
    return mean_inv - 0.5 * (-mu + logvar + 1.0) - _HALF_LOG_2
