"""Gated RMSNorm as in Mamba-2 / Hydra (``norm_before_gate=True``): rmsnorm(x) * w * silu(z)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gated_rms_norm_ref(
    x: Tensor, z: Tensor, weight: Tensor, eps: float = 1e-5, group_size: int | None = None,
    width: int | None = None, sum_over_ranks: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """x, z: (..., d); weight (d,). Normalises over groups of ``group_size`` (None: all of d).

    ``sum_over_ranks`` (with ``group_size=None``): x holds d of each token's ``width`` channels, the
    rest on other ranks; the (..., 1) sums of squares are summed across them with it (a differentiable
    all-reduce, ``megassm.parallel``). Computes in fp32 (fp64 stays fp64) and returns x's dtype.
    """
    dtype = x.dtype
    acc = torch.promote_types(dtype, torch.float32)
    xf, zf = x.to(acc), z.to(acc)
    d = xf.shape[-1]
    if sum_over_ranks is not None:
        if group_size is not None:
            raise ValueError("gated norm: a channel-sharded norm (sum_over_ranks) needs group_size=None")
        sumsq = sum_over_ranks(xf.square().sum(dim=-1, keepdim=True))  # (..., 1) over all ranks' channels
        rstd = torch.rsqrt(sumsq / (width or d) + eps)
        return (xf * rstd * weight.to(acc) * F.silu(zf)).to(dtype)
    gs = d if group_size is None else group_size
    assert d % gs == 0, f"group_size={gs} must divide the width {d}"
    xg = xf.reshape(*xf.shape[:-1], d // gs, gs)  # (..., groups, gs)
    rstd = torch.rsqrt(xg.square().mean(dim=-1, keepdim=True) + eps)
    out = (xg * rstd).reshape_as(xf) * weight.to(acc)
    return (out * F.silu(zf)).to(dtype)


class RMSNormGated(nn.Module):
    """Parameter name ``weight`` matches mamba-ssm's RMSNormGated (reference checkpoints load)."""

    def __init__(self, d: int, eps: float = 1e-5, group_size: int | None = None):
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return gated_rms_norm_ref(x, z, self.weight, self.eps, self.group_size)
