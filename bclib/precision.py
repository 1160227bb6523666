"""Rounding weights to a floating-point format of few bits (paper sec. 4, "bit precision").

A number with ``E`` exponent bits and ``S`` significand bits is stored as
``sign * (1 + f / 2^S) * 2^e``. The exponent is stored relative to the largest weight's,
``e_max``: codes ``1 .. 2^E - 1`` give ``e = e_max - code + 1``, and code 0 means zero, so
weights below ``2^(e_max - 2^E + 2)`` in magnitude flush to 0.
"""
from __future__ import annotations

import torch

MAX_EXPONENT_BITS = 8
MAX_SIGNIFICAND_BITS = 23


def check_bits(exponent: int, significand: int) -> None:
    if not (1 <= exponent <= MAX_EXPONENT_BITS and 0 <= significand <= MAX_SIGNIFICAND_BITS):
        raise ValueError(
            f"bit widths out of range: exponent {exponent} (1..{MAX_EXPONENT_BITS}), "
            f"significand {significand} (0..{MAX_SIGNIFICAND_BITS})"
        )


def max_exponent(w: torch.Tensor) -> int:
    """``e_max = floor(log2 max|w|)`` (0 for an all-zero tensor)."""
    m = w.abs().max().item() if w.numel() else 0.0
    return int(torch.floor(torch.log2(torch.tensor(m))).item()) if m > 0 else 0


def encode(w: torch.Tensor, exponent: int, significand: int, e_max: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``w`` into (sign bit, exponent code, significand integer), rounding to nearest."""
    check_bits(exponent, significand)
    w = w.detach().double()
    sign = (w < 0).to(torch.int64)
    mag = w.abs()
    e = torch.floor(torch.log2(mag.clamp_min(1e-300)))
    frac = torch.round((mag / torch.pow(2.0, e) - 1.0) * 2**significand)
    carry = frac >= 2**significand  # rounding 1.111.. up to 10.000..
    e, frac = e + carry, torch.where(carry, torch.zeros_like(frac), frac)
    over = e > e_max  # saturate at the largest representable number
    e, frac = torch.where(over, float(e_max), e), torch.where(over, float(2**significand - 1), frac)
    code = (e_max - e + 1).clamp(min=1)
    e_min = e_max - (2**exponent - 1) + 1
    zero = (mag == 0) | (e < e_min)
    code = torch.where(zero, torch.zeros_like(code), code)
    frac = torch.where(zero, torch.zeros_like(frac), frac)
    return sign, code.to(torch.int64), frac.to(torch.int64)


def decode(sign: torch.Tensor, code: torch.Tensor, frac: torch.Tensor, significand: int, e_max: int) -> torch.Tensor:
    """Inverse of :func:`encode` (float32)."""
    e = (e_max + 1 - code).double()
    mag = (1.0 + frac.double() / 2**significand) * torch.pow(2.0, e)
    mag = torch.where(code == 0, torch.zeros_like(mag), mag)
    return torch.where(sign.bool(), -mag, mag).float()


def round_to_bits(w: torch.Tensor, exponent: int, significand: int) -> torch.Tensor:
    """``w`` as it reads back after storing it with the given bit widths."""
    e_max = max_exponent(w)
    s, c, f = encode(w, exponent, significand, e_max)
    return decode(s, c, f, significand, e_max).to(w.dtype).view_as(w)
