"""The HTH block's memory-bound glue, fused: parameter-free LayerNorm + AdaLN modulation, and the gated
residual, each one kernel per direction on CUDA.

Eager, ``modulate(layer_norm(x), shift, scale)`` and ``x + gate * y`` are 2-4 passes over the (B, L, d)
activations forward and more backward (~9 % of a Hydra block at hth-5b width, L = 29,040, on an H100).
Here each op is a ``torch.autograd.Function`` whose forward and backward are plain tensor functions that
``torch.compile`` fuses; the backward is written out (not derived by AOTAutograd), so gradient shapes
are reshaped to the inputs' (inductor returned (d,) gradients for a (1, 1, d) shift on an H100).
Math is fp32 (fp64 for fp64 inputs) inside and rounds once to the input dtype. LayerNorm saves only its input and the
per-token mean / rstd, recomputing x̂ in the backward (eager keeps x̂ as well).

The reference is the eager composition (``EAGER`` in megassm.models.block); tests/unit/models/
test_block_fusion.py compares both in fp64, outputs and all gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _up(t: Tensor) -> Tensor:
    """fp32 (or fp64, kept) for the arithmetic."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _norm_fwd(x: Tensor, shift: Tensor, scale: Tensor, eps: float):
    xf = _up(x)
    mean = xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt((xf - mean).square().mean(-1, keepdim=True) + eps)
    y = (xf - mean) * rstd * (1 + _up(scale)) + _up(shift)
    return y.to(x.dtype), mean, rstd


def _norm_grads(gy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, shift: Tensor, scale: Tensor):
    """Gradients of y = x̂ (1 + scale) + shift, x̂ = (x - mean) rstd, w.r.t. x, shift, scale (fp32)."""
    gy = _up(gy)
    xhat = (_up(x) - mean) * rstd
    g_shift = gy.sum_to_size(shift.shape)
    g_scale = (gy * xhat).sum_to_size(scale.shape)
    gxh = gy * (1 + _up(scale))
    gx = rstd * (gxh - gxh.mean(-1, keepdim=True) - xhat * (gxh * xhat).mean(-1, keepdim=True))
    return gx, g_shift, g_scale


# The backward functions return every gradient in its input's dtype, cast inside the compiled kernel
# (a full-size fp32 gradient cast afterwards would be one more pass over (B, L, d)).
def _norm_bwd(gy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, shift: Tensor, scale: Tensor):
    gx, g_shift, g_scale = _norm_grads(gy, x, mean, rstd, shift, scale)
    return gx.to(x.dtype), g_shift.to(shift.dtype), g_scale.to(scale.dtype)


def _residual_norm_fwd(x: Tensor, y: Tensor, shift: Tensor, scale: Tensor, eps: float):
    h = x + y
    out, mean, rstd = _norm_fwd(h, shift, scale, eps)
    return h, out, mean, rstd


def _residual_norm_bwd(gh: Tensor, gout: Tensor, h: Tensor, mean: Tensor, rstd: Tensor, shift: Tensor,
                       scale: Tensor):
    gx, g_shift, g_scale = _norm_grads(gout, h, mean, rstd, shift, scale)
    return (gx + _up(gh)).to(h.dtype), g_shift.to(shift.dtype), g_scale.to(scale.dtype)


def _gated_fwd(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    return (_up(x) + _up(gate) * _up(y)).to(x.dtype)


def _gated_bwd(g: Tensor, gate: Tensor, y: Tensor):
    gf = _up(g)
    return (gf * _up(gate)).to(y.dtype), (gf * _up(y)).sum_to_size(gate.shape).to(gate.dtype)


class _Kernels:
    """The forward and backward tensor functions, as written (eager) or compiled once (on first use)."""

    def __init__(self, wrap):
        self.norm_fwd, self.norm_bwd = wrap(_norm_fwd), wrap(_norm_bwd)
        self.residual_norm_fwd, self.residual_norm_bwd = wrap(_residual_norm_fwd), wrap(_residual_norm_bwd)
        self.gated_fwd, self.gated_bwd = wrap(_gated_fwd), wrap(_gated_bwd)


_COMPILED: _Kernels | None = None
PLAIN = _Kernels(lambda f: f)


def compiled_kernels() -> _Kernels:
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = _Kernels(lambda f: torch.compile(f, dynamic=False))
    return _COMPILED


def _like(grad: Tensor, inp: Tensor) -> Tensor:
    """The gradient in its input's shape (a view where possible): inductor on CUDA returned a (d,) tensor for a
    (1, 1, d) ``sum_to_size`` (H100, torch 2.11), which autograd rejects."""
    return grad.reshape(inp.shape)


class _ModulatedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps, k):
        y, mean, rstd = k.norm_fwd(x, shift, scale, eps)
        ctx.save_for_backward(x, mean, rstd, shift, scale)
        ctx.k = k
        return y

    @staticmethod
    def backward(ctx, gy):
        x, mean, rstd, shift, scale = ctx.saved_tensors
        gx, g_shift, g_scale = ctx.k.norm_bwd(gy.contiguous(), x, mean, rstd, shift, scale)
        return _like(gx, x), _like(g_shift, shift), _like(g_scale, scale), None, None


class _ResidualModulatedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, shift, scale, eps, k):
        h, out, mean, rstd = k.residual_norm_fwd(x, y, shift, scale, eps)
        ctx.save_for_backward(h, mean, rstd, shift, scale)
        ctx.k = k
        return h, out

    @staticmethod
    def backward(ctx, gh, gout):
        h, mean, rstd, shift, scale = ctx.saved_tensors
        gh = torch.zeros_like(h) if gh is None else gh.contiguous()
        gout = torch.zeros_like(h) if gout is None else gout.contiguous()
        g, g_shift, g_scale = ctx.k.residual_norm_bwd(gh, gout, h, mean, rstd, shift, scale)
        g = _like(g, h)
        return g, g, _like(g_shift, shift), _like(g_scale, scale), None, None


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y, k):
        ctx.save_for_backward(gate, y)
        ctx.k = k
        return k.gated_fwd(x, gate, y)

    @staticmethod
    def backward(ctx, g):
        gate, y = ctx.saved_tensors
        gy, g_gate = ctx.k.gated_bwd(g.contiguous(), gate, y)
        return g, _like(g_gate, gate), _like(gy, y), None


class FusedGlue:
    """Same call signatures as the eager glue in megassm.models.block; ``compiled=False`` runs the
    hand-written forward/backward without torch.compile (what the CPU tests check against autograd)."""

    def __init__(self, compiled: bool = True):
        self._compiled = compiled

    @property
    def _k(self) -> _Kernels:
        return compiled_kernels() if self._compiled else PLAIN

    def modulated_norm(self, x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
        return _ModulatedNorm.apply(x, shift, scale, eps, self._k)

    def residual_modulated_norm(self, x: Tensor, y: Tensor, shift: Tensor, scale: Tensor, eps: float):
        return _ResidualModulatedNorm.apply(x, y, shift, scale, eps, self._k)

    def gated_residual(self, x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
        return _GatedResidual.apply(x, gate, y, self._k)
