"""The local reparameterisation trick for a group linear layer, as one autograd function.

Given the scales ``z`` of one training step, the pre-activations of a group linear layer are
Gaussian (Kingma et al., 2015; paper sec. 3 with eq. 6):

    mean = (x z) mu^T + b_mu,    var = (x z)^2 (sigma^2)^T + sigma_b^2,
    out = mean + eps sqrt(var),  eps ~ N(0, 1).

Autograd would keep and walk about a dozen intermediate tensors for this, and the weights'
KL (paper eq. 8), evaluated every step, would compute ``exp(logvar)`` over all weights a
second time. The hand-written backward here needs the four matrix products and a few
in-place passes, and adds the KL's gradient to the weight gradients where they are formed.
``benchmarks/bench_train.py`` measures the resulting training step against a plain one.

The variance path (``(x z)^2 (sigma^2)^T`` and its two products in the backward) only sets the
scale of the sampled noise, so it can run in a cheaper floating type (``var_dtype``, e.g.
``torch.bfloat16``: 8 significant bits, float32's exponent range, accumulated in float32 by
the matrix kernels): a relative error of about 2^-9 in a standard deviation, far below the
Monte-Carlo noise it scales. The mean path and all element-wise work stay in the inputs' type.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .kl import kl_std_normal_sum_given_var

_EPS_VAR = 1e-8  # keeps sqrt(var) differentiable where var underflows


class _LinearLRT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, z, w_mu, w_logvar, b_mu, b_logvar, eps, with_kl, var_dtype):  # type: ignore[override]
        xz = x * z
        w_var = w_logvar.exp()
        b_var = None if b_logvar is None else b_logvar.exp()
        mean = xz @ w_mu.t() if b_mu is None else torch.addmm(b_mu, xz, w_mu.t())
        if var_dtype is None or var_dtype == x.dtype:
            xz2, w_var_v = xz * xz, w_var
            var = xz2 @ w_var.t() if b_var is None else torch.addmm(b_var, xz2, w_var.t())
        else:
            xz2, w_var_v = (xz * xz).to(var_dtype), w_var.to(var_dtype)
            var = (xz2 @ w_var_v.t()).to(x.dtype)
            if b_var is not None:  # added in float32: inside a bfloat16 addmm the gradients drift 5 %
                var += b_var
        std = var.add_(_EPS_VAR).sqrt_()
        out = torch.addcmul(mean, eps, std)
        half_eps_over_std = (eps / std).mul_(0.5)  # d out / d var
        kl = kl_std_normal_sum_given_var(w_mu, w_logvar, w_var) if with_kl else out.new_zeros(())
        if with_kl and b_mu is not None:
            kl += kl_std_normal_sum_given_var(b_mu, b_logvar, b_var)
        ctx.with_kl = with_kl
        ctx.save_for_backward(x, z, xz, xz2, w_mu, w_var, w_var_v, b_mu, b_var, half_eps_over_std)
        return out, kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, grad_kl):  # type: ignore[override]
        x, z, xz, xz2, w_mu, w_var, w_var_v, b_mu, b_var, half_eps_over_std = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_var = grad * half_eps_over_std
        grad_var_v = grad_var.to(xz2.dtype)  # the variance path's type (a no-op without var_dtype)
        # d KL / d mu = mu and d KL / d logvar = (sigma^2 - 1) / 2, added in place to the data terms.
        c = grad_kl if ctx.with_kl else None
        d_w_mu = _plus_kl_mu(grad.t() @ xz, w_mu, c) if need[2] else None
        d_w_logvar = _times_var_plus_kl((grad_var_v.t() @ xz2).to(x.dtype), w_var, c) if need[3] else None
        d_b_mu = _plus_kl_mu(grad.sum(0), b_mu, c) if need[4] else None
        d_b_logvar = _times_var_plus_kl(grad_var.sum(0), b_var, c) if need[5] else None
        d_x = d_z = None
        if need[0] or need[1]:
            d_xz = torch.addcmul(grad @ w_mu, (grad_var_v @ w_var_v).to(x.dtype), xz, value=2.0)
            d_x = d_xz * z if need[0] else None
            d_z = d_xz * x if need[1] else None
        return d_x, d_z, d_w_mu, d_w_logvar, d_b_mu, d_b_logvar, None, None, None


def _plus_kl_mu(d_mu: torch.Tensor, mu: torch.Tensor, c: Optional[torch.Tensor]) -> torch.Tensor:
    return d_mu if c is None else d_mu.addcmul_(mu, c)


def _times_var_plus_kl(d_var: torch.Tensor, var: torch.Tensor, c: Optional[torch.Tensor]) -> torch.Tensor:
    """``d logvar = (d var + c / 2) var - c / 2``: the chain rule through exp plus the KL's term."""
    if c is None:
        return d_var.mul_(var)
    half_c = 0.5 * c
    return d_var.add_(half_c).mul_(var).sub_(half_c)


def linear_lrt(
    x: torch.Tensor,
    z: torch.Tensor,
    w_mu: torch.Tensor,
    w_logvar: torch.Tensor,
    b_mu: Optional[torch.Tensor],
    b_logvar: Optional[torch.Tensor],
    eps: torch.Tensor,
    with_kl: bool = False,
    var_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled pre-activations of a group linear layer (see the module doc) and the weights' KL.

    Args:
        x, z: inputs and their sampled scales, both ``(batch, in_features)``.
        w_mu, w_logvar: the weights' posterior means and log-variances, ``(out, in)``.
        b_mu, b_logvar: the bias' (or both None).
        eps: standard normal noise ``(batch, out)``; passed in so the function is deterministic.
        with_kl: also return ``KL(q(w~) || N(0, 1))`` summed over weights and bias (paper eq. 8),
            sharing ``exp(logvar)`` with the forward pass and its gradient with the backward's;
            otherwise the second output is 0.
        var_dtype: the floating type of the variance path's matrix products (see the module
            doc), e.g. ``torch.bfloat16``; None: the inputs' type.
    Returns:
        ``(out, kl)``: pre-activations ``(batch, out)`` and a scalar.
    """
    return _LinearLRT.apply(x, z, w_mu, w_logvar, b_mu, b_logvar, eps, with_kl, var_dtype)
