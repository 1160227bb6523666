"""Bayesian group layers: fully connected and convolutional, normal-Jeffreys or horseshoe.

Every weight of group ``i`` shares a scale ``z_i`` (see :mod:`bclib.scales`):

- fully connected: one group per **input** neuron, ``w_ij = z_j * w~_ij`` (so the groups
  of a network's first layer are its input features, e.g. pixels);
- convolutional: one group per **output** filter, ``w_f = z_f * w~_f``.

Given ``z`` the weights have the posterior ``q(w~) = N(mu, sigma^2)`` (paper eq. 6). Training
uses the local reparameterisation trick (Kingma et al., 2015): ``z`` is drawn once per
example and the pre-activations, which are Gaussian given ``z``, are sampled instead of the
weights. In ``eval()`` mode the layer is deterministic and uses the posterior means
``E[w] = E[z] mu``.

``variance_dtype`` (an attribute, also a constructor argument) runs the training pass's
variance path, which only scales the noise, in a cheaper type such as ``torch.bfloat16``
(:mod:`bclib.lrt`); the means, the parameters and eval mode keep the layer's own type.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .kl import kl_std_normal_sum
from .lrt import linear_lrt
from .scales import make_scale

_INIT_LOGVAR = -9.0


class BayesianGroupLayer(nn.Module):
    """Shared parameters and posterior summaries; subclasses define the forward pass.

    ``groups_on`` says where the groups sit: ``"inputs"`` (fully connected) or ``"outputs"``
    (conv filters); ``plain(inputs, outputs)`` builds the plain torch layer that keeps the
    given inputs and outputs, with the posterior means as weights (used by ``prune``).

    Args:
        weight_shape: shape of the weight tensor, output dimension first.
        group_dim: 1 for fully connected layers (groups = inputs), 0 for conv (groups = filters).
        prior: a name in ``bclib.scales.PRIORS``: "nj" (group normal-Jeffreys, BC-GNJ) or
            "hs" (group horseshoe, BC-GHS).
        bias: whether the layer has a (Bayesian) bias.
        clip_var: if given, ``clip_variances()`` caps the weights' variance at this value.
        init_weight, init_bias: posterior means to start from (e.g. a pretrained net).
        tau0: the horseshoe's global scale hyper-parameter (ignored for "nj").
        variance_dtype: floating type of the pre-activation variances' products in training
            (e.g. ``torch.bfloat16``, faster where the hardware has it); None: the layer's type.
    """

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        group_dim: int,
        prior: str,
        bias: bool = True,
        clip_var: Optional[float] = None,
        init_weight: Optional[torch.Tensor] = None,
        init_bias: Optional[torch.Tensor] = None,
        tau0: float = 1e-5,
        variance_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if clip_var is not None and not clip_var > 0:
            raise ValueError(f"clip_var must be positive or None, got {clip_var}")
        if variance_dtype is not None and not (isinstance(variance_dtype, torch.dtype) and variance_dtype.is_floating_point):
            raise ValueError(f"variance_dtype must be a floating torch.dtype (e.g. torch.bfloat16) or None, "
                             f"got {variance_dtype!r}")  # fmt: skip
        self.variance_dtype = variance_dtype
        self.prior = prior
        self.group_dim = group_dim
        self.clip_var = clip_var
        groups = weight_shape[group_dim]
        self.scale = make_scale(prior, groups, tau0=tau0)

        fan_in = math.prod(weight_shape[1:])
        self.weight_mu = nn.Parameter(torch.randn(weight_shape) / math.sqrt(fan_in))
        self.weight_logvar = nn.Parameter(torch.randn(weight_shape) * 1e-2 + _INIT_LOGVAR)
        if init_weight is not None:
            self.weight_mu.data.copy_(_checked(init_weight, weight_shape, "init_weight"))
        if bias:
            self.bias_mu = nn.Parameter(torch.zeros(weight_shape[0]))
            self.bias_logvar = nn.Parameter(torch.randn(weight_shape[0]) * 1e-2 + _INIT_LOGVAR)
            if init_bias is not None:
                self.bias_mu.data.copy_(_checked(init_bias, (weight_shape[0],), "init_bias"))
        else:
            self.register_parameter("bias_mu", None)
            self.register_parameter("bias_logvar", None)
        # Optional 0/1 masks, applied in eval mode (see compression.apply_masks): buffers, so
        # they move with model.to(device), but not saved with the parameters.
        self.register_buffer("weight_mask", None, persistent=False)
        self.register_buffer("bias_mask", None, persistent=False)
        # Optional boolean over the groups, applied in training: the sampled z_i of groups not
        # kept are 0, so they stay pruned while training goes on (bclib.finetune). Not saved.
        self.register_buffer("group_keep", None, persistent=False)
        # Set by models.forward_with_kl: training forwards put their KL here (layer -> KL).
        self.kl_terms: Optional[dict[nn.Module, torch.Tensor]] = None

    # --- posterior summaries -------------------------------------------------------------
    def _per_group(self, v: torch.Tensor) -> torch.Tensor:
        """Reshape a per-group vector so it broadcasts against the weight tensor."""
        shape = [1] * self.weight_mu.dim()
        shape[self.group_dim] = -1
        return v.view(shape)

    @property
    def log_alpha(self) -> torch.Tensor:
        """Per-group log dropout rate ``log Var[z]/E[z]^2`` (paper sec. 4): large = prunable."""
        return self.scale.log_alpha

    @property
    def num_groups(self) -> int:
        return self.weight_mu.shape[self.group_dim]

    def posterior_weight_mean(self) -> torch.Tensor:
        """``E[w] = E[z] mu`` for every weight."""
        return self._per_group(self.scale.mean) * self.weight_mu

    def posterior_weight_variance(self) -> torch.Tensor:
        """Marginal ``Var[w] = E[z]^2 s^2 + Var[z] mu^2 + Var[z] s^2`` (paper sec. 4, for bit precision)."""
        ez, vz = self._per_group(self.scale.mean), self._per_group(self.scale.variance)
        s2 = self.weight_logvar.exp()
        return ez.pow(2) * s2 + vz * self.weight_mu.pow(2) + vz * s2

    def posterior_bias_mean(self) -> Optional[torch.Tensor]:
        return self.bias_mu

    def kl_divergence(self) -> torch.Tensor:
        """KL(q(z, w) || p(z, w)): the scale's KL plus the weights' (and bias') ``KL(N(mu, s^2) || N(0, 1))``."""
        kl = self.scale.kl_divergence() + kl_std_normal_sum(self.weight_mu, self.weight_logvar)
        if self.bias_mu is not None:
            kl = kl + kl_std_normal_sum(self.bias_mu, self.bias_logvar)
        return kl

    @torch.no_grad()
    def clip_variances(self) -> None:
        """Cap ``log sigma^2`` at ``log clip_var`` (the tutorial does this for the first layer)."""
        if self.clip_var is not None:
            bound = math.log(self.clip_var)
            self.weight_logvar.clamp_(max=bound)
            if self.bias_logvar is not None:
                self.bias_logvar.clamp_(max=bound)

    def sample_z(self, n: int) -> torch.Tensor:
        """``n`` draws of the scales ``z ~ q(z)``, shape ``(n, groups)``; 0 where ``group_keep`` is False."""
        z = self.scale.sample(n)
        return z if self.group_keep is None else z * self.group_keep.to(z.dtype)

    def _eval_params(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        w, b = self.posterior_weight_mean(), self.posterior_bias_mean()
        if self.weight_mask is not None:
            w = w * self.weight_mask
            b = None if b is None else b * self.bias_mask
        return w, b


def _checked(t: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(t)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)} but the layer needs {tuple(shape)}")
    return t.detach()


def _sample_gaussian(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return mean + torch.randn_like(mean) * torch.sqrt(var + 1e-8)


class LinearGroup(BayesianGroupLayer):
    """Fully connected layer with one scale ``z_j`` per **input** neuron (paper eq. 6).

    ``prior`` is ``"nj"`` (group normal-Jeffreys, BC-GNJ) or ``"hs"`` (group horseshoe, BC-GHS);
    the other keyword arguments are those of :class:`BayesianGroupLayer`.
    """

    groups_on = "inputs"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, prior: str = "nj", **kwargs) -> None:
        super().__init__((out_features, in_features), group_dim=1, prior=prior, bias=bias, **kwargs)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects inputs with last dimension {self.in_features}, "
                f"got shape {tuple(x.shape)} (flatten images first, e.g. x.flatten(1))"
            )
        if not self.training:
            w, b = self._eval_params()
            return F.linear(x, w, b)
        x2 = x.reshape(-1, self.in_features)
        z = self.sample_z(len(x2))
        eps = torch.randn(len(x2), self.out_features, device=x.device, dtype=x.dtype)
        with_kl = self.kl_terms is not None and self not in self.kl_terms
        out, kl = linear_lrt(x2, z, self.weight_mu, self.weight_logvar, self.bias_mu, self.bias_logvar, eps, with_kl,
                             self.variance_dtype)  # fmt: skip
        if with_kl:
            self.kl_terms[self] = self.scale.kl_divergence() + kl
        return out.view(*x.shape[:-1], self.out_features)

    def plain(self, inputs: torch.Tensor, outputs: torch.Tensor) -> nn.Linear:
        """An ``nn.Linear`` with the posterior means of the kept inputs and outputs (boolean masks)."""
        w = self.posterior_weight_mean()[outputs][:, inputs]
        return _filled(nn.Linear(w.shape[1], w.shape[0], bias=self.bias_mu is not None), w, self.posterior_bias_mean(), outputs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, prior={self.prior!r}"


class ConvGroup(BayesianGroupLayer):
    """Convolution with one scale ``z_f`` per **output** filter; ``dims`` is 1, 2 or 3.

    Takes the arguments of ``nn.Conv{dims}d`` with ``groups=1`` and zero padding, plus
    ``prior`` and the keyword arguments of :class:`BayesianGroupLayer`.
    """

    groups_on = "outputs"
    _CONV = {1: (F.conv1d, nn.Conv1d), 2: (F.conv2d, nn.Conv2d), 3: (F.conv3d, nn.Conv3d)}

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | str | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        bias: bool = True,
        prior: str = "nj",
        dims: int = 2,
        **kwargs,
    ) -> None:
        if dims not in self._CONV:
            raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
        ks = (kernel_size,) * dims if isinstance(kernel_size, int) else tuple(kernel_size)
        super().__init__((out_channels, in_channels, *ks), group_dim=0, prior=prior, bias=bias, **kwargs)
        self.dims = dims
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, ks
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def _apply_conv(self, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
        return self._CONV[self.dims][0](x, w, b, self.stride, self.padding, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (batch, {self.in_channels}, "
                f"{', '.join(['length'] * self.dims)}), got {tuple(x.shape)}"
            )
        if not self.training:
            w, b = self._eval_params()
            return self._apply_conv(x, w, b)
        mean = self._apply_conv(x, self.weight_mu, self.bias_mu)
        bias_var = None if self.bias_logvar is None else self.bias_logvar.exp()
        vd = self.variance_dtype
        if vd is None or vd == x.dtype:
            var = self._apply_conv(x.pow(2), self.weight_logvar.exp(), bias_var)
        else:
            var = self._apply_conv(x.pow(2).to(vd), self.weight_logvar.exp().to(vd), None).to(x.dtype)
            if bias_var is not None:
                var = var + bias_var.view(-1, *([1] * self.dims))
        z = self.sample_z(x.shape[0]).view(x.shape[0], -1, *([1] * self.dims))
        return z * _sample_gaussian(mean, var)

    def posterior_bias_mean(self) -> Optional[torch.Tensor]:
        # The filter's scale multiplies its whole output, bias included.
        return None if self.bias_mu is None else self.bias_mu * self.scale.mean

    def plain(self, inputs: torch.Tensor, outputs: torch.Tensor) -> nn.Module:
        """An ``nn.Conv{dims}d`` with the posterior means of the kept input channels and filters."""
        w = self.posterior_weight_mean()[outputs][:, inputs]
        conv = self._CONV[self.dims][1](w.shape[1], w.shape[0], self.kernel_size, self.stride, self.padding,
                                        self.dilation, bias=self.bias_mu is not None)  # fmt: skip
        return _filled(conv, w, self.posterior_bias_mean(), outputs)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, prior={self.prior!r}"
        )


@torch.no_grad()
def _filled(plain: nn.Module, w: torch.Tensor, b: Optional[torch.Tensor], outputs: torch.Tensor) -> nn.Module:
    plain = plain.to(device=w.device, dtype=w.dtype)
    plain.weight.copy_(w)
    if b is not None:
        plain.bias.copy_(b[outputs])
    return plain


# The tutorial's and the paper's names: one class per prior and layer type.
def _named(base: type, name: str, prior: str, doc: str, **fixed) -> type:
    def __init__(self, *args, **kwargs) -> None:
        base.__init__(self, *args, prior=prior, **fixed, **kwargs)

    return type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


LinearGroupNJ = _named(LinearGroup, "LinearGroupNJ", "nj", "``LinearGroup(..., prior='nj')`` (BC-GNJ).")
LinearGroupHS = _named(LinearGroup, "LinearGroupHS", "hs", "``LinearGroup(..., prior='hs')`` (BC-GHS).")
Conv1dGroupNJ = _named(ConvGroup, "Conv1dGroupNJ", "nj", "``ConvGroup(..., prior='nj', dims=1)``.", dims=1)
Conv1dGroupHS = _named(ConvGroup, "Conv1dGroupHS", "hs", "``ConvGroup(..., prior='hs', dims=1)``.", dims=1)
Conv2dGroupNJ = _named(ConvGroup, "Conv2dGroupNJ", "nj", "``ConvGroup(..., prior='nj', dims=2)`` (BC-GNJ).", dims=2)
Conv2dGroupHS = _named(ConvGroup, "Conv2dGroupHS", "hs", "``ConvGroup(..., prior='hs', dims=2)`` (BC-GHS).", dims=2)
Conv3dGroupNJ = _named(ConvGroup, "Conv3dGroupNJ", "nj", "``ConvGroup(..., prior='nj', dims=3)``.", dims=3)
Conv3dGroupHS = _named(ConvGroup, "Conv3dGroupHS", "hs", "``ConvGroup(..., prior='hs', dims=3)``.", dims=3)
