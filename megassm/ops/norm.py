"""Gated RMSNorm as in Mamba-2 / Hydra (``norm_before_gate=True``): rmsnorm(x) * w * silu(z)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gated_rms_norm_ref(
    x: Tensor, z: Tensor, weight: Tensor, eps: float = 1e-5, group_size: int | None = None
) -> Tensor:
    """x, z: (..., d); weight (d,). Normalises over groups of ``group_size`` (None: all of d).

    Computes in fp32 and returns x's dtype.
    """
    dtype = x.dtype
    xf, zf = x.float(), z.float()
    d = xf.shape[-1]
    gs = d if group_size is None else group_size
    assert d % gs == 0, f"group_size={gs} must divide the width {d}"
    xg = xf.reshape(*xf.shape[:-1], d // gs, gs)  # (..., groups, gs)
    rstd = torch.rsqrt(xg.square().mean(dim=-1, keepdim=True) + eps)
    out = (xg * rstd).reshape_as(xf) * weight.float()
    return (out * F.silu(zf)).to(dtype)


class RMSNormGated(nn.Module):
    """Parameter name ``weight`` matches mamba-ssm's RMSNormGated (reference checkpoints load)."""

    def __init__(self, d: int, eps: float = 1e-5, group_size: int | None = None):
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return gated_rms_norm_ref(x, z, self.weight, self.eps, self.group_size)
