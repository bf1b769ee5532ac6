"""Hydra: bidirectional Mamba-2 (SSD) token mixer.

    y = shift(SS_f(x)) + flip(shift(SS_b(flip(x)))) + (fc_D(x) + D) * x

Parameter names, shapes, in_proj split order and defaults follow the public reference
implementation (goombalab/hydra ``Hydra``), so its state dicts load with ``strict=True``:

    in_proj  -> [z | x | B_f | C_f | B_b | C_b | dt_f | dt_b]
    conv1d   depthwise, non-causal ('same' padding), over [x | B_f | C_f | B_b | C_b]
    dt_bias, A_log, D (nheads,), fc_D: d_inner -> nheads, norm.weight (gated RMSNorm over
    all of d_inner, normalise-then-gate), out_proj.

The two directions run as one SSD scan with the backward half flipped and stacked on the batch
axis, as the reference does; ``megassm.ops`` holds the fused CUDA path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megassm.ops.norm import RMSNormGated
from megassm.ops.ssd import ssd_scan


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
        ssd_impl is not "ref"; False always runs the reference path below; True requires the fused path."""
        super().__init__()
        if (expand * d_model) % headdim:
            raise ValueError(f"Hydra: expand*d_model={expand * d_model} not divisible by headdim={headdim}")
        if d_conv % 2 == 0:
            raise ValueError(f"Hydra: d_conv={d_conv} must be odd for a non-causal 'same' convolution")
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.expand, self.headdim, self.ngroups = expand, headdim, ngroups
        self.d_inner = expand * d_model
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"Hydra: nheads={self.nheads} not divisible by ngroups={ngroups}")
        self.chunk_size, self.ssd_impl = chunk_size, ssd_impl
        self.fused = fused
        # ZeRO-3: gather all of Hydra's parameters at its entry; both paths read submodule weights
        # (fc_D, and conv1d / norm in the fused path) without calling those submodules.
        self._z3_leaf = True
        self.fused_scan_impl = "triton"  # "ref" runs the fused path's own kernels around the PyTorch scan (tests)
        self.d_bc = 2 * ngroups * d_state  # one direction's B and C

        d_in_proj = 2 * self.d_inner + 2 * self.d_bc + 2 * self.nheads
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias)
        conv_dim = self.d_inner + 2 * self.d_bc
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

    def forward(self, u: Tensor) -> Tensor:
        """u: (B, L, d_model) -> (B, L, d_model)."""
        assert u.dim() == 3 and u.shape[-1] == self.d_model, f"Hydra input must be (B, L, {self.d_model})"
        if self._use_fused(u):
            return self.out_proj(self._fused_mix(self.in_proj(u)))
        z, xbc, dt = torch.split(
            self.in_proj(u), [self.d_inner, self.d_inner + 2 * self.d_bc, 2 * self.nheads], dim=-1
        )
        xbc = F.silu(self.conv1d(xbc.transpose(1, 2)).transpose(1, 2))  # (B, L, d_inner + 2*d_bc)
        x, bc = torch.split(xbc, [self.d_inner, 2 * self.d_bc], dim=-1)
        y = self.bidirectional_scan(x, bc, dt)
        return self.out_proj(self.norm(y, z))

    def _use_fused(self, u: Tensor) -> bool:
        if self.fused is False or (self.fused is None and (not u.is_cuda or self.ssd_impl == "ref" or self.d_conv > 9)):
            return False
        from megassm.ops.hydra_fused import fused_available

        if self.fused is None:
            return fused_available()
        if u.is_cuda and not fused_available():
            raise RuntimeError("Hydra(fused=True) needs triton and mamba-ssm's SSD kernels on CUDA")
        return True

    def _fused_mix(self, zxbcdt: Tensor) -> Tensor:
        """The same function as the reference path between in_proj and out_proj, fused (megassm.ops)."""
        from megassm.ops.hydra_fused import hydra_mix_fused

        if self.norm.group_size is not None:
            raise NotImplementedError("the fused Hydra path normalises over all of d_inner (group_size=None)")
        return hydra_mix_fused(
            zxbcdt, self.conv1d.weight, self.conv1d.bias, self.dt_bias, -torch.exp(self.A_log.float()),
            self.fc_D.weight, self.D, self.norm.weight, self.norm.eps, self.headdim, self.d_state, self.ngroups,
            self.chunk_size, scan_impl=self.fused_scan_impl,
        )

    def bidirectional_scan(self, x: Tensor, bc: Tensor, dt: Tensor) -> Tensor:
        """x (B, L, d_inner), bc (B, L, 2*d_bc) = [B_f|C_f|B_b|C_b], dt (B, L, 2*nheads) pre-softplus.

        Returns shift(fwd) + flip(shift(bwd)) + diagonal term, (B, L, d_inner).
        """
        y = self.scan_pair(x, bc, dt, self.dt_bias, self.A_log)
        diag = F.linear(x, self.fc_D.weight, self.D)  # (B, L, h)
        return y + x * diag.repeat_interleave(self.headdim, dim=-1)

    def scan_pair(self, x: Tensor, bc: Tensor, dt: Tensor, dt_bias: Tensor, A_log: Tensor) -> Tensor:
        """shift(fwd) + flip(shift(bwd)), (B, L, h*headdim): the two SSD directions without the D term.

        Shapes as ``bidirectional_scan``; h and the B/C groups are read from x and bc, and dt_bias /
        A_log (h,) are passed in, so a tensor- or context-parallel caller can run it on its own
        heads (megassm.parallel.hydra).
        """
        batch, seqlen, _ = x.shape
        h, p, g, n = x.shape[-1] // self.headdim, self.headdim, bc.shape[-1] // (4 * self.d_state), self.d_state
        dt = torch.cat([dt[..., :h], dt[..., h:].flip(1)], dim=0)  # (2B, L, h)
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 for bf16/fp32 inputs, fp64 stays fp64
        dt = F.softplus(dt.to(acc) + dt_bias.to(acc))
        xs = torch.cat([x, x.flip(1)], dim=0)  # (2B, L, d_inner)
        bcs = torch.cat([bc[..., : 2 * g * n], bc[..., 2 * g * n :].flip(1)], dim=0)  # (2B, L, 2gn)
        Bm, Cm = bcs.split(g * n, dim=-1)
        A = -torch.exp(A_log.to(acc))
        y = ssd_scan(
            xs.reshape(2 * batch, seqlen, h, p),  # (2B, L, h, p)
            dt,  # fp32: the decay exp(dt*A) is sensitive to rounding
            A,
            Bm.reshape(2 * batch, seqlen, g, n),
            Cm.reshape(2 * batch, seqlen, g, n),
            chunk_size=self.chunk_size,
            impl=self.ssd_impl,
        ).reshape(2 * batch, seqlen, h * p)
        # shift by one: position i sees tokens strictly before it (the diagonal is the D term)
        y = F.pad(y[:, :-1], (0, 0, 1, 0))
        y_fwd, y_bwd = y[:batch], y[batch:].flip(1)
        return y_fwd + y_bwd
