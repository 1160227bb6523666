"""Posteriors over the per-group scale ``z`` (one value per neuron or filter).

A group layer multiplies every weight of group ``i`` by a shared scale ``z_i``. The
two priors of the paper differ only in how ``z`` is modelled, so each lives here as a
small module with the same interface:

- ``sample(n)``: ``n`` independent draws, shape ``(n, groups)``, reparametrised;
- ``mean`` / ``variance``: the posterior moments of ``z``;
- ``log_alpha``: the log "dropout rate" ``log Var[z]/E[z]^2`` used for pruning;
- ``kl_divergence()``: KL of the scale posterior from its prior, summed (the name every
  bclib object uses for its KL: layers, scales, ``bclib.models.kl_divergence(model)``).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .kl import kl_lognormal_gamma_sum, kl_lognormal_invgamma_sum, kl_normal_jeffreys_sum

_EPS = 1e-8


def _normal_init(shape: tuple[int, ...], mean: float, std: float = 1e-2) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape) * std + mean)


class NormalJeffreysScale(nn.Module):
    """Group normal-Jeffreys: ``p(z) ∝ 1/|z|``, ``q(z_i) = N(mu_i, sigma_i^2)`` (paper eqs. 4, 6, 9).

    ``log_alpha_i = log sigma_i^2 - log mu_i^2``; the KL uses the Sparse VD approximation.
    """

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.z_mu = _normal_init((groups,), 1.0)
        self.z_logvar = _normal_init((groups,), -9.0)

    def sample(self, n: int) -> torch.Tensor:
        eps = torch.randn(n, self.z_mu.numel(), device=self.z_mu.device, dtype=self.z_mu.dtype)
        return torch.addcmul(self.z_mu, eps, torch.exp(0.5 * self.z_logvar))

    @property
    def mean(self) -> torch.Tensor:
        return self.z_mu

    @property
    def variance(self) -> torch.Tensor:
        return self.z_logvar.exp()

    @property
    def log_alpha(self) -> torch.Tensor:
        return self.z_logvar - torch.log(self.z_mu.pow(2) + _EPS)

    def kl_divergence(self) -> torch.Tensor:
        return kl_normal_jeffreys_sum(self.z_mu, self.z_logvar, _EPS)


class HorseshoeScale(nn.Module):
    """Group horseshoe (BC-GHS), non-centred: ``z_i = s * z~_i`` (the paper's group horseshoe).

    ``s ~ C+(0, tau0)`` is the layer's global scale and ``z~_i ~ C+(0, 1)`` the local
    one. Each half-Cauchy is split into a Gamma and an inverse Gamma factor,
    ``s^2 = s_a s_b`` and ``z~_i^2 = a_i b_i`` with ``s_a ~ Gamma(1/2, tau0^2)``,
    ``s_b, b_i ~ InvGamma(1/2, 1)``, ``a_i ~ Gamma(1/2, 1)``, each with a log-normal
    posterior. Then ``log z_i = (log s_a + log s_b + log a_i + log b_i) / 2`` is normal,
    so ``z_i`` is log-normal with ``m = sum(mu)/2`` and ``v = sum(sigma^2)/4``.

    Pruning statistic: for a log-normal ``Var[z]/E[z]^2 = exp(v) - 1``, so
    ``log_alpha = log(exp(v) - 1)``, the same quantity as the normal-Jeffreys
    ``log_alpha`` and compared against thresholds in the same way.
    """

    def __init__(self, groups: int, tau0: float = 1e-5) -> None:
        super().__init__()
        if not tau0 > 0:
            raise ValueError(f"tau0 must be positive, got {tau0}")
        self.tau0 = float(tau0)
        log_tau2 = 2.0 * math.log(self.tau0)
        # Start at E[z] ≈ 1 (like the normal-Jeffreys layers): log s^2 = log tau0^2, log z~^2 = -log tau0^2.
        self.sa_mu = _normal_init((1,), log_tau2)
        self.sa_logvar = _normal_init((1,), -9.0)
        self.sb_mu = _normal_init((1,), 0.0)
        self.sb_logvar = _normal_init((1,), -9.0)
        self.a_mu = _normal_init((groups,), 0.0)
        self.a_logvar = _normal_init((groups,), -9.0)
        self.b_mu = _normal_init((groups,), -log_tau2)
        self.b_logvar = _normal_init((groups,), -9.0)

    def _log_z_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = 0.5 * (self.sa_mu + self.sb_mu + self.a_mu + self.b_mu)
        v = 0.25 * (self.sa_logvar.exp() + self.sb_logvar.exp() + self.a_logvar.exp() + self.b_logvar.exp())
        return m, v

    def sample(self, n: int) -> torch.Tensor:
        m, v = self._log_z_moments()
        eps = torch.randn(n, m.numel(), device=m.device, dtype=m.dtype)
        return torch.exp(m + eps * v.sqrt())

    @property
    def mean(self) -> torch.Tensor:
        m, v = self._log_z_moments()
        return torch.exp(m + 0.5 * v)

    @property
    def variance(self) -> torch.Tensor:
        m, v = self._log_z_moments()
        return torch.expm1(v) * torch.exp(2 * m + v)

    @property
    def log_alpha(self) -> torch.Tensor:
        _, v = self._log_z_moments()
        return torch.log(torch.expm1(v) + _EPS)

    def kl_divergence(self) -> torch.Tensor:
        return (
            kl_lognormal_gamma_sum(self.sa_mu, self.sa_logvar, self.tau0**2)
            + kl_lognormal_invgamma_sum(self.sb_mu, self.sb_logvar)
            + kl_lognormal_gamma_sum(self.a_mu, self.a_logvar, 1.0)
            + kl_lognormal_invgamma_sum(self.b_mu, self.b_logvar)
        )


# The priors: name -> scale posterior, built as ``PRIORS[name](groups, tau0=...)``. A new
# prior is a scale module with the interface above, registered here.
PRIORS: dict[str, Callable[..., nn.Module]] = {
    "nj": lambda groups, tau0=None: NormalJeffreysScale(groups),
    "hs": lambda groups, tau0=1e-5: HorseshoeScale(groups, tau0),
}


def make_scale(prior: str, groups: int, tau0: float = 1e-5) -> nn.Module:
    """The scale posterior of ``prior`` (a name in :data:`PRIORS`) for ``groups`` groups.

    ``tau0`` is the horseshoe's global scale; priors without one ignore it.
    """
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}: use one of {sorted(PRIORS)} ('nj' normal-Jeffreys, 'hs' horseshoe)")
    return PRIORS[prior](groups, tau0=tau0)
