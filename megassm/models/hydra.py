"""Hydra: bidirectional Mamba-2 (SSD) token mixer.

    y = shift(SS_f(x)) + flip(shift(SS_b(flip(x)))) + (fc_D(x) + D) * x

Parameter names, shapes, in_proj split order and defaults follow the public reference
implementation (goombalab/hydra ``Hydra``), so its state dicts load with ``strict=True``:

    in_proj  -> [z | x | B_f | C_f | B_b | C_b | dt_f | dt_b]
    conv1d   depthwise, non-causal ('same' padding), over [x | B_f | C_f | B_b | C_b]
    dt_bias, A_log, D (nheads,), fc_D: d_inner -> nheads, norm.weight (gated RMSNorm over
    all of d_inner, normalise-then-gate), out_proj.

The two directions run as one SSD scan with the backward half flipped and stacked on the batch
axis, as the reference does. The maths between in_proj and out_proj is ``megassm.ops.hydra_mix``
(shared with ``megassm.parallel.hydra``); the fused CUDA path is ``megassm.ops.hydra_fused``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from megassm.models.scan import in_scan_order
from megassm.ops.hydra_mix import combine, default_fused_scan_impl, local_mix, use_fused_path
from megassm.ops.norm import RMSNormGated


@dataclass(frozen=True)
class HydraDims:
    """Hydra's derived widths, computed here only (the layer, accounting, shard plan and checks read them).

    d_inner = expand * d_model channels in nheads = d_inner / headdim heads; d_bc = 2 * ngroups * d_state
    (one direction's B and C); in_proj emits [z | x | B_f | C_f | B_b | C_b | dt_f | dt_b] (d_in_proj) and
    the convolution runs over [x | B_f | C_f | B_b | C_b] (conv_dim).
    """

    d_inner: int
    nheads: int
    d_bc: int
    d_in_proj: int
    conv_dim: int

    @classmethod
    def from_sizes(cls, d_model: int, expand: int, headdim: int, ngroups: int, d_state: int) -> HydraDims:
        d_inner = expand * d_model
        nheads = d_inner // headdim
        d_bc = 2 * ngroups * d_state
        return cls(d_inner, nheads, d_bc, 2 * d_inner + 2 * d_bc + 2 * nheads, d_inner + 2 * d_bc)

    @classmethod
    def of(cls, m) -> HydraDims:
        """From a ModelConfig."""
        return cls.from_sizes(m.d_model, m.expand, m.headdim, m.ngroups, m.d_state)


class Hydra(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        d_conv: int = 7,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        ssd_impl: str = "auto",
        fused: bool | None = None,
    ):
        """``fused``: None (auto) runs ``megassm.ops.hydra_fused`` on CUDA when its kernels import and
        ssd_impl is not "ref"; False always runs the reference parts of ``megassm.ops.hydra_mix``; True
        requires the fused path (``megassm.ops.hydra_mix.use_fused_path``)."""
        super().__init__()
        if (expand * d_model) % headdim:
            raise ValueError(f"Hydra: expand*d_model={expand * d_model} not divisible by headdim={headdim}")
        if d_conv % 2 == 0:
            raise ValueError(f"Hydra: d_conv={d_conv} must be odd for a non-causal 'same' convolution")
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.expand, self.headdim, self.ngroups = expand, headdim, ngroups
        dims = HydraDims.from_sizes(d_model, expand, headdim, ngroups, d_state)
        self.d_inner, self.nheads = dims.d_inner, dims.nheads
        if self.nheads % ngroups:
            raise ValueError(f"Hydra: nheads={self.nheads} not divisible by ngroups={ngroups}")
        self.chunk_size, self.ssd_impl = chunk_size, ssd_impl
        self.fused = fused
        # the scan inside the fused path; None: mamba-ssm's kernel on CUDA unless ssd_impl="ref", else PyTorch
        # ("ref" runs the fused kernels around the PyTorch scan, as the CPU tests do in Triton's interpreter)
        self.fused_scan_impl: str | None = None
        self.path_taken: str | None = None  # "fused" or "reference" after a forward: tests check which ran
        self.d_bc = dims.d_bc  # one direction's B and C

        self.in_proj = nn.Linear(d_model, dims.d_in_proj, bias=bias)
        conv_dim = dims.conv_dim
        self.conv1d = nn.Conv1d(
            conv_dim, conv_dim, kernel_size=d_conv, groups=conv_dim, padding=d_conv // 2, bias=conv_bias
        )
        # dt initialised log-uniformly in [dt_min, dt_max]; dt_bias is its softplus-inverse.
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.zeros(self.nheads))  # A = -1, as the reference initialises
        self.D = nn.Parameter(torch.ones(self.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.fc_D = nn.Linear(self.d_inner, self.nheads, bias=False)
        self.norm = RMSNormGated(self.d_inner, eps=1e-5)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def mix(self, x: Tensor, grid, scan_order: str) -> Tensor:
        """x: (B, L, d_model) in canonical token order; the scan runs in ``scan_order`` over ``grid``."""
        return in_scan_order(self, x, grid, scan_order)

    def forward(self, u: Tensor) -> Tensor:
        """u: (B, L, d_model), tokens in scan order -> (B, L, d_model)."""
        assert u.dim() == 3 and u.shape[-1] == self.d_model, f"Hydra input must be (B, L, {self.d_model})"
        zxbcdt = self.in_proj(u)
        if use_fused_path(self.fused, self.ssd_impl, self.d_conv, self.norm.group_size, u.device):
            self.path_taken = "fused"
            return self.out_proj(self._fused_mix(zxbcdt))
        self.path_taken = "reference"
        z, xbc, dt = torch.split(zxbcdt, [self.d_inner, self.d_inner + 2 * self.d_bc, 2 * self.nheads], dim=-1)
        mix = local_mix(xbc, dt, self.conv1d.weight, self.conv1d.bias, self.dt_bias, decay_rates(self.A_log),
                        self.fc_D.weight, headdim=self.headdim, d_state=self.d_state, chunk_size=self.chunk_size,
                        scan_impl=self.ssd_impl)
        y = combine(mix.scan, mix.x, mix.diag_partial + self.D.to(mix.x.dtype))  # (B, L, d_inner)
        return self.out_proj(self.norm(y, z))

    def _fused_mix(self, zxbcdt: Tensor) -> Tensor:
        """The same function as ``hydra_mix`` (the reference parts composed), uncut (megassm.ops.hydra_fused)."""
        from megassm.ops.hydra_fused import hydra_mix_fused

        if self.norm.group_size is not None:
            raise NotImplementedError("the fused Hydra path normalises over all of d_inner (group_size=None)")
        return hydra_mix_fused(
            zxbcdt, self.conv1d.weight, self.conv1d.bias, self.dt_bias, -torch.exp(self.A_log.float()),
            self.fc_D.weight, self.D, self.norm.weight, self.norm.eps, self.headdim, self.d_state, self.ngroups,
            self.chunk_size, scan_impl=self.fused_scan_impl or default_fused_scan_impl(self.ssd_impl, zxbcdt.device),
        )


def decay_rates(A_log: Tensor) -> Tensor:
    """A = -exp(A_log), (h,), in fp32 (fp64 stays fp64): the SSD's per-head decay rates."""
    return -torch.exp(A_log.to(torch.promote_types(A_log.dtype, torch.float32)))
