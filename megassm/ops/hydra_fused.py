"""Fused Hydra mixer: in_proj output -> (conv, two-direction SSD scan, shift/flip/sum, diagonal, gated
RMSNorm) -> the out_proj input, as autograd Functions with hand-written backward (the uncut one also as a pair
of ``torch.library`` custom ops, which a compiled block traces as one node each way).

The reference (``megassm.ops.hydra_mix`` with ``fused=False``, the goombalab algorithm) runs about
fifteen element-wise PyTorch ops around the scan, each a full pass over (B, L, d_inner) tensors, plus
flips and concatenations that are materialised copies, and autograd keeps most of their outputs.
Here the work between in_proj and out_proj is Triton kernels (``megassm.ops.hydra_kernels``) around
mamba-ssm's SSD forward/backward, and cuBLAS for the small fc_D products.

Uncut (``hydra_mix_fused``, one rank holding every head of its tokens: the single-GPU module):

  forward   conv_silu_fwd -> SSD fwd (both directions, one launch, softplus(dt + dt_bias) inside)
            -> fc_D -> out_norm_fwd (y = shift/flip/sum + x * diag, never stored, then the gated norm)
  backward  out_norm_bwd -> fc_D grads (cuBLAS; the x-gradient is added in the GEMM's epilogue)
            -> SSD bwd -> conv_silu_bwd_act -> conv_bwd (input grad written into d(in_proj out))

Cut for tensor / context parallelism (the parts of ``megassm.ops.hydra_mix``), where fc_D and the
norm need channels that other ranks hold:

  local_mix_fused   conv_silu_fwd -> SSD fwd            | SSD bwd -> conv_silu_bwd_act -> conv_bwd
      [fc_D partial products reduced across ranks, by the caller, between the Functions]
  combine_fused     out_norm_fwd without the norm: y    | out_norm_bwd without the norm
      [y travels back to the token layout]
  gated_norm_fused  row sum of squares -> [sum over ranks] -> gated_norm_fwd
                    | row sum(dout * w * silu(z) * y) -> [sum over ranks] -> gated_norm_bwd

Both share the same forward and backward stages (``_conv_scan_fwd`` / ``_scan_conv_bwd``, the out_norm
launchers); the cut costs y once in memory and one more pass over it per direction in the norm.
Saved for backward: the in_proj output (or xbc), the scan's inputs (x in both orders, B/C, dt) and
output, diag and the norm's rstd (and y in the cut path).
Readable twins are ``megassm.ops.hydra_mix``'s reference parts; ``hydra_mix_ref`` composes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megassm.ops.ssd import first_answer_not_traced, ssd_scan_ref

_KERNELS = None
_MAMBA_FWD_BWD = None


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        from megassm.ops import hydra_kernels

        _KERNELS = hydra_kernels
    return _KERNELS


_AVAILABLE: bool | None = None


def fused_available() -> bool:
    """True when the fused path can run on CUDA here (triton and mamba-ssm's SSD kernels import)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        first_answer_not_traced("fused_available")
        try:
            _kernels()
            _mamba_scan_fns()
            _AVAILABLE = torch.cuda.is_available()
        except Exception:  # ImportError, or triton failing to initialise without a GPU
            _AVAILABLE = False
    return _AVAILABLE


def _mamba_scan_fns():
    global _MAMBA_FWD_BWD
    if _MAMBA_FWD_BWD is None:
        from megassm.ops.ssd import _load_triton_scan  # registers the selective_scan_cuda stand-in

        if _load_triton_scan() is None:
            raise ImportError("mamba-ssm's SSD Triton kernels are not importable")
        from mamba_ssm.ops.triton.ssd_combined import _mamba_chunk_scan_combined_bwd, _mamba_chunk_scan_combined_fwd

        _MAMBA_FWD_BWD = (_mamba_chunk_scan_combined_fwd, _mamba_chunk_scan_combined_bwd)
    return _MAMBA_FWD_BWD


def _ssd_fwd_ref(x, dt, A, B, C, dt_bias, chunk_size):
    dt = F.softplus(dt.float() + dt_bias.float())
    return ssd_scan_ref(x, dt, A, B, C, chunk_size)


# --------------------------------------------------------------------------------------------------
# the SSD scan, both directions stacked on the batch axis (mamba-ssm on CUDA; reference for tests)
# --------------------------------------------------------------------------------------------------
def _scan_fwd(x, dt, A, B, C, dt_bias, chunk_size, impl):
    if impl == "ref":
        with torch.no_grad():
            return _ssd_fwd_ref(x, dt, A, B, C, dt_bias, chunk_size)
    fwd, _ = _mamba_scan_fns()
    return fwd(x, dt, A, B, C, chunk_size, dt_bias=dt_bias, dt_softplus=True)[0]


def _scan_bwd(dout, x, dt, A, B, C, out, dt_bias, chunk_size, impl):
    """-> dx, ddt (w.r.t. dt before softplus), dA, dB, dC, ddt_bias."""
    if impl == "ref":  # torch.func, not torch.autograd: this also runs inside a custom op, below autograd
        y, vjp = torch.func.vjp(lambda *ins: _ssd_fwd_ref(*ins, chunk_size), x, dt, A, B, C, dt_bias)
        return vjp(dout.to(y.dtype))
    _, bwd = _mamba_scan_fns()
    dx, ddt, dA, dB, dC, _, _, ddt_bias, _ = bwd(dout, x, dt, A, B, C, out, chunk_size, dt_bias=dt_bias,
                                                 dt_softplus=True)
    return dx, ddt, dA, dB, dC, ddt_bias


# --------------------------------------------------------------------------------------------------
# kernel launchers
# --------------------------------------------------------------------------------------------------
_CONV_BLOCK_L, _CONV_BLOCK_C = 32, 64


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs are enough to exercise the split logic


def _norm_warps(d_inner: int) -> int:
    return 4 if d_inner <= 1024 else 8 if d_inner <= 4096 else 16


def _launch_conv_fwd(xbc, w, bias, d_inner, d_bc):
    K = _kernels()
    Bsz, L, conv_dim = xbc.shape
    xs = torch.empty(2 * Bsz, L, d_inner, device=xbc.device, dtype=xbc.dtype)
    bcs = torch.empty(2 * Bsz, L, d_bc, device=xbc.device, dtype=xbc.dtype)
    grid = (triton_cdiv(L, _CONV_BLOCK_L), triton_cdiv(conv_dim, _CONV_BLOCK_C), Bsz)
    K.conv_silu_fwd_kernel[grid](
        xbc, xbc.stride(0), xbc.stride(1), w, bias if bias is not None else w, xs, bcs,
        Bsz, L, d_inner, d_bc,
        HAS_BIAS=bias is not None, W=w.shape[-1], BLOCK_L=_CONV_BLOCK_L, BLOCK_C=_CONV_BLOCK_C, num_warps=4,
    )
    return xs, bcs


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n)))


# --------------------------------------------------------------------------------------------------
# stages shared by the uncut and the cut Functions
# --------------------------------------------------------------------------------------------------
def _conv_scan_fwd(xbc, conv_w, conv_b, dt, dt_bias, A, headdim, d_state, ngroups, chunk_size, scan_impl):
    """xbc (B, L, conv_dim), channel stride 1; conv_w (conv_dim, W) contiguous; dt (B, L, 2h).

    -> xs (2B, L, d_inner), bcs (2B, L, 2G), dts (2B, L, h), scan (2B, L, h, p) in xbc's dtype.
    """
    Bsz, L, _ = xbc.shape
    h = A.shape[0]
    d_inner, G = h * headdim, ngroups * d_state
    xs, bcs = _launch_conv_fwd(xbc, conv_w, conv_b, d_inner, 2 * G)
    dts = torch.cat([dt[..., :h], dt[..., h:].flip(1)], dim=0)  # (2B, L, h): small
    x4 = xs.view(2 * Bsz, L, h, headdim)
    Bm, Cm = bcs[..., :G].unflatten(-1, (ngroups, d_state)), bcs[..., G:].unflatten(-1, (ngroups, d_state))
    scan = _scan_fwd(x4, dts, A, Bm, Cm, dt_bias, chunk_size, scan_impl).to(xbc.dtype).contiguous()
    return xs, bcs, dts, scan


def _scan_conv_bwd(dscan, dxe, xbc, conv_w, conv_b, xs, bcs, dts, scan, dt_bias, A, dims, dxbc, ddt_out):
    """The scan's and the conv's backward. dscan (2B, L, h, p); dxe (B, L, d_inner): the x-gradient
    from outside the scan (diagonal term, fc_D). Writes d(xbc) into ``dxbc`` and d(dt) into ``ddt_out``
    (views, any row strides); returns d conv_w (conv_dim, W) fp32, d conv_b, d dt_bias, dA."""
    K = _kernels()
    headdim, d_state, ngroups, chunk_size, scan_impl = dims
    Bsz, L, _ = xbc.shape
    h = A.shape[0]
    d_inner, G = h * headdim, ngroups * d_state
    conv_dim = d_inner + 4 * G
    dev = xbc.device
    x4 = xs.view(2 * Bsz, L, h, headdim)
    Bm, Cm = bcs[..., :G].unflatten(-1, (ngroups, d_state)), bcs[..., G:].unflatten(-1, (ngroups, d_state))
    dx, ddt, dA, dB, dC, ddt_bias = _scan_bwd(dscan, x4, dts, A, Bm, Cm, scan, dt_bias, chunk_size, scan_impl)
    ddt_out[..., :h] = ddt[:Bsz]
    ddt_out[..., h:] = ddt[Bsz:].flip(1)

    W = conv_w.shape[-1]
    dpre = torch.empty(Bsz, L, conv_dim, device=dev, dtype=torch.float32)
    grid = (triton_cdiv(L, _CONV_BLOCK_L), triton_cdiv(conv_dim, _CONV_BLOCK_C), Bsz)
    K.conv_silu_bwd_act_kernel[grid](
        xbc, xbc.stride(0), xbc.stride(1), conv_w, conv_b if conv_b is not None else conv_w,
        dx.contiguous(), dxe, dB.contiguous(), dC.contiguous(), dpre, Bsz, L, d_inner, G,
        HAS_BIAS=conv_b is not None, W=W, BLOCK_L=_CONV_BLOCK_L, BLOCK_C=_CONV_BLOCK_C, num_warps=4,
    )
    n_cblk = triton_cdiv(conv_dim, _CONV_BLOCK_C)
    nsplit = max(1, min(triton_cdiv(L, _CONV_BLOCK_L), triton_cdiv(4 * _num_sms(dev), n_cblk * Bsz)))
    l_per_split = triton_cdiv(triton_cdiv(L, nsplit), _CONV_BLOCK_L) * _CONV_BLOCK_L
    nsplit = triton_cdiv(L, l_per_split)
    dw_conv = torch.empty(Bsz * nsplit, W, conv_dim, device=dev, dtype=torch.float32)
    db_conv = torch.empty(Bsz * nsplit, conv_dim, device=dev, dtype=torch.float32)
    K.conv_bwd_kernel[(n_cblk, nsplit, Bsz)](
        dpre, xbc, xbc.stride(0), xbc.stride(1), conv_w, dxbc, dxbc.stride(0), dxbc.stride(1),
        dw_conv, db_conv, L, conv_dim, l_per_split,
        W=W, BLOCK_L=_CONV_BLOCK_L, BLOCK_C=_CONV_BLOCK_C, num_warps=8,
    )
    dconv_w = dw_conv.sum(0).t()
    dconv_b = db_conv.sum(0).to(conv_b.dtype) if conv_b is not None else None
    return dconv_w, dconv_b, ddt_bias.to(dt_bias.dtype), dA.to(A.dtype)


def _out_norm_fwd(scan, xs, diag, z, norm_w, eps, headdim, norm):
    """y = shift/flip/sum(scan) + x * diag, then (norm) the gated norm. scan (2B, L, d_inner) or
    (2B, L, h, p); xs (≥B, L, d_inner), first B rows read; -> out (B, L, d_inner), rstd (B, L) or None."""
    K = _kernels()
    Bsz, L, h = diag.shape
    d_inner = h * headdim
    out = torch.empty(Bsz, L, d_inner, device=xs.device, dtype=xs.dtype)
    rstd = torch.empty(Bsz, L, device=xs.device, dtype=torch.float32) if norm else out
    zt, wt = (z, norm_w) if norm else (out, out)  # unread without the norm
    K.out_norm_fwd_kernel[(L, Bsz)](
        scan, xs, diag, zt, zt.stride(0), zt.stride(1), wt, out, rstd, Bsz, L, h, float(eps),
        HEADDIM=headdim, BLOCK_H=_pow2(h), BLOCK_P=_pow2(headdim), num_warps=_norm_warps(d_inner), NORM=norm,
    )
    return out, (rstd if norm else None)


def _out_norm_bwd(dout, scan, xs, diag, z, norm_w, rstd, dz, headdim, norm):
    """-> dscan (like scan), ddiag (B, L, h) fp32, dxe = dy * diag (B, L, d_inner), dw partials or None.
    With ``norm``, d z is written into ``dz`` (a view, any row strides)."""
    K = _kernels()
    Bsz, L, h = diag.shape
    d_inner = h * headdim
    dev = xs.device
    n_rows = Bsz * L
    n_prog = min(n_rows, 4 * _num_sms(dev))
    rows_per_prog = triton_cdiv(n_rows, n_prog)
    n_prog = triton_cdiv(n_rows, rows_per_prog)
    dscan = torch.empty_like(scan)
    ddiag = torch.empty(Bsz, L, h, device=dev, dtype=torch.float32)
    dxe = torch.empty(Bsz, L, d_inner, device=dev, dtype=xs.dtype)
    dw_part = torch.empty(n_prog if norm else 1, d_inner, device=dev, dtype=torch.float32)
    zt, wt, rt, dzt = (z, norm_w, rstd, dz) if norm else (dxe, dxe, dw_part, dxe)  # unused without the norm
    K.out_norm_bwd_kernel[(n_prog,)](
        dout, scan, xs, diag, zt, zt.stride(0), zt.stride(1), wt, rt,
        dzt, dzt.stride(0), dzt.stride(1), dscan, ddiag, dxe, dw_part, Bsz, L, h, rows_per_prog,
        HEADDIM=headdim, BLOCK_H=_pow2(h), BLOCK_P=_pow2(headdim), num_warps=_norm_warps(d_inner), NORM=norm,
    )
    return dscan, ddiag, dxe, (dw_part if norm else None)


# --------------------------------------------------------------------------------------------------
# uncut: the single-GPU module's path
# --------------------------------------------------------------------------------------------------
def _mix_forward(zxbcdt, conv_w, conv_b, dt_bias, A, fc_w, D, norm_w, eps, headdim, d_state, ngroups, chunk_size,
                 scan_impl):
    """The uncut forward: -> out (B, L, d_inner) and what the backward reads (xs, bcs, dts, scan, diag, rstd),
    each a new contiguous tensor (none aliases an input: the custom op below may return them)."""
    Bsz, L, d_in_proj = zxbcdt.shape
    h = A.shape[0]
    d_inner, G = h * headdim, ngroups * d_state
    conv_dim = d_inner + 4 * G
    assert d_in_proj == 2 * d_inner + 4 * G + 2 * h, f"in_proj width {d_in_proj} does not match the dims"
    zxbcdt = zxbcdt.contiguous()
    conv_w = conv_w.reshape(conv_dim, -1).contiguous()
    z, xbc, dt = zxbcdt.split([d_inner, conv_dim, 2 * h], dim=-1)
    xs, bcs, dts, scan = _conv_scan_fwd(xbc, conv_w, conv_b, dt, dt_bias, A, headdim, d_state, ngroups,
                                        chunk_size, scan_impl)
    diag = F.linear(xs[:Bsz], fc_w.to(zxbcdt.dtype), D.to(zxbcdt.dtype))  # (B, L, h)
    out, rstd = _out_norm_fwd(scan, xs, diag, z, norm_w, eps, headdim, norm=True)
    return out, xs, bcs, dts, scan, diag, rstd


def _mix_backward(dout, zxbcdt, conv_w, conv_b, dt_bias, A, fc_w, D, norm_w, xs, bcs, dts, scan, diag, rstd, dims):
    """The uncut backward -> d(zxbcdt, conv_w, conv_b, dt_bias, A, fc_w, D, norm_w), each in its input's shape and
    dtype (d conv_b None without a bias). ``dims``: (headdim, d_state, ngroups, chunk_size, scan_impl)."""
    headdim = dims[0]
    zxbcdt = zxbcdt.contiguous()
    Bsz, L, _ = zxbcdt.shape
    h = A.shape[0]
    d_inner = h * headdim
    conv_w_shape, conv_dim = conv_w.shape, conv_w.shape[0]
    conv_w2 = conv_w.reshape(conv_dim, -1).contiguous()
    dtype = zxbcdt.dtype
    dzxbcdt = torch.empty_like(zxbcdt)
    z, xbc, _ = zxbcdt.split([d_inner, conv_dim, 2 * h], dim=-1)
    dz, dxbc, ddt_out = dzxbcdt.split([d_inner, conv_dim, 2 * h], dim=-1)

    # 1. gated norm + shift/flip/sum + diagonal, backward
    dscan, ddiag, dxe, dw_part = _out_norm_bwd(dout.contiguous(), scan, xs, diag, z, norm_w, rstd, dz, headdim,
                                               norm=True)
    # 2. fc_D: diag = x @ fc_w^T + D
    n_rows = Bsz * L
    ddiag_c = ddiag.to(dtype).view(n_rows, h)
    dfc_w = (ddiag_c.t() @ xs[:Bsz].reshape(n_rows, d_inner)).to(fc_w.dtype)
    dD = ddiag.sum((0, 1)).to(D.dtype)
    dxe.view(n_rows, d_inner).addmm_(ddiag_c, fc_w.to(dtype))  # dx += ddiag @ fc_w, in the GEMM epilogue
    # 3. the scan (both directions in one call), conv + SiLU
    dconv_w, dconv_b, ddt_bias, dA = _scan_conv_bwd(dscan, dxe, xbc, conv_w2, conv_b, xs, bcs, dts, scan, dt_bias,
                                                    A, dims, dxbc, ddt_out)
    return (dzxbcdt, dconv_w.reshape(conv_w_shape).to(conv_w.dtype), dconv_b, ddt_bias, dA, dfc_w, dD,
            dw_part.sum(0).to(norm_w.dtype))


class HydraMixFn(torch.autograd.Function):
    """The uncut mixer in eager mode (``hydra_mix_fused``); compiled blocks use the custom op below instead."""

    @staticmethod
    def forward(ctx, zxbcdt, conv_w, conv_b, dt_bias, A, fc_w, D, norm_w, eps, headdim, d_state, ngroups,
                chunk_size, scan_impl):
        out, xs, bcs, dts, scan, diag, rstd = _mix_forward(zxbcdt, conv_w, conv_b, dt_bias, A, fc_w, D, norm_w, eps,
                                                           headdim, d_state, ngroups, chunk_size, scan_impl)
        ctx.save_for_backward(zxbcdt, conv_w, conv_b, dt_bias, A, fc_w, D, norm_w, xs, bcs, dts, scan, diag, rstd)
        ctx.dims = (headdim, d_state, ngroups, chunk_size, scan_impl)
        return out

    @staticmethod
    def backward(ctx, dout):
        grads = _mix_backward(dout, *ctx.saved_tensors, ctx.dims)
        return (*grads, None, None, None, None, None, None)


# The same forward and backward as torch.library custom ops, so that ``torch.compile`` of a whole block
# (``model.compile: blocks``) traces through the mixer as one opaque node each way instead of breaking the
# graph there (a compiler-disabled call splits a block into several compiled regions). The fake
# implementations give only shapes and dtypes; the real ones are the functions above.
@torch.library.custom_op("megassm::hydra_mix_fwd", mutates_args=())
def _hydra_mix_fwd_op(zxbcdt: Tensor, conv_w: Tensor, conv_b: Optional[Tensor],  # noqa: UP045 (schema inference)
                      dt_bias: Tensor, A: Tensor, fc_w: Tensor, D: Tensor, norm_w: Tensor, eps: float, headdim: int,
                      d_state: int, ngroups: int, chunk_size: int,
                      scan_impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _mix_forward(zxbcdt, conv_w, conv_b, dt_bias, A, fc_w, D, norm_w, eps, headdim, d_state, ngroups,
                        chunk_size, scan_impl)


@_hydra_mix_fwd_op.register_fake
def _(zxbcdt, conv_w, conv_b, dt_bias, A, fc_w, D, norm_w, eps, headdim, d_state, ngroups, chunk_size, scan_impl):
    Bsz, L, _ = zxbcdt.shape
    h = A.shape[0]
    d_inner = h * headdim

    def new(*shape, dtype=zxbcdt.dtype):
        return zxbcdt.new_empty(shape, dtype=dtype)

    return (new(Bsz, L, d_inner), new(2 * Bsz, L, d_inner), new(2 * Bsz, L, 2 * ngroups * d_state),
            new(2 * Bsz, L, h), new(2 * Bsz, L, h, headdim), new(Bsz, L, h), new(Bsz, L, dtype=torch.float32))


@torch.library.custom_op("megassm::hydra_mix_bwd", mutates_args=())
def _hydra_mix_bwd_op(dout: Tensor, zxbcdt: Tensor, conv_w: Tensor, conv_b: Optional[Tensor],  # noqa: UP045
                      dt_bias: Tensor, A: Tensor, fc_w: Tensor, D: Tensor, norm_w: Tensor, xs: Tensor, bcs: Tensor,
                      dts: Tensor, scan: Tensor, diag: Tensor, rstd: Tensor, headdim: int, d_state: int, ngroups: int,
                      chunk_size: int,
                      scan_impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _mix_backward(dout, zxbcdt, conv_w, conv_b, dt_bias, A, fc_w, D, norm_w, xs, bcs, dts, scan, diag, rstd,
                          (headdim, d_state, ngroups, chunk_size, scan_impl))
    # an op returns tensors only: no bias, an empty d conv_b (dropped again by _hydra_mix_op_backward). Contiguous,
    # as the fake says: Inductor asserts an op's output strides, and d conv_w comes out of its kernel transposed
    return tuple(g.contiguous() if g is not None else conv_w.new_empty(0) for g in grads)


@_hydra_mix_bwd_op.register_fake
def _(dout, zxbcdt, conv_w, conv_b, dt_bias, A, fc_w, D, norm_w, xs, bcs, dts, scan, diag, rstd, headdim, d_state,
      ngroups, chunk_size, scan_impl):
    return tuple(t.new_empty(t.shape) if t is not None else conv_w.new_empty(0)
                 for t in (zxbcdt, conv_w, conv_b, dt_bias, A, fc_w, D, norm_w))


def _hydra_mix_op_setup(ctx, inputs, output):
    zxbcdt, conv_w, conv_b, dt_bias, A, fc_w, D, norm_w, _, headdim, d_state, ngroups, chunk_size, scan_impl = inputs
    out, *saved = output
    ctx.mark_non_differentiable(*saved)
    ctx.save_for_backward(zxbcdt, conv_w, conv_b, dt_bias, A, fc_w, D, norm_w, *saved)
    ctx.dims, ctx.has_bias = (headdim, d_state, ngroups, chunk_size, scan_impl), conv_b is not None


def _hydra_mix_op_backward(ctx, dout, *_):
    grads = _hydra_mix_bwd_op(dout, *ctx.saved_tensors, *ctx.dims)
    return (grads[0], grads[1], grads[2] if ctx.has_bias else None, *grads[3:], None, None, None, None, None, None)


_hydra_mix_fwd_op.register_autograd(_hydra_mix_op_backward, setup_context=_hydra_mix_op_setup)


def hydra_mix_fused(zxbcdt: Tensor, conv_w: Tensor, conv_b: Tensor | None, dt_bias: Tensor, A: Tensor,
                    fc_w: Tensor, D: Tensor, norm_w: Tensor, eps: float, headdim: int, d_state: int,
                    ngroups: int, chunk_size: int = 256, scan_impl: str = "triton") -> Tensor:
    """The Hydra mixer between in_proj and out_proj, uncut.

    zxbcdt: (B, L, 2*d_inner + 4*ngroups*d_state + 2*nheads), the in_proj output [z|x|B_f|C_f|B_b|C_b|dt_f|dt_b];
    conv_w (conv_dim, 1, d_conv), conv_b (conv_dim,) or None; dt_bias, A (= -exp(A_log)), D (nheads,);
    fc_w (nheads, d_inner); norm_w (d_inner,). Returns (B, L, d_inner) in zxbcdt's dtype.
    ``scan_impl``: "triton" (mamba-ssm, CUDA) or "ref" (PyTorch; with TRITON_INTERPRET=1 for CPU tests).
    Eager: ``HydraMixFn``; under ``torch.compile``: the ``megassm::hydra_mix_fwd`` / ``_bwd`` custom ops (the same
    functions), one node in the compiled graph each way.
    """
    assert zxbcdt.dim() == 3, f"zxbcdt must be (B, L, d_in_proj), got {tuple(zxbcdt.shape)}"
    assert A.dim() == 1 and fc_w.shape == (A.shape[0], A.shape[0] * headdim), "fc_w must be (nheads, d_inner)"
    assert conv_w.shape[0] == A.shape[0] * headdim + 4 * ngroups * d_state, "conv_w must be (conv_dim, 1, d_conv)"
    assert conv_w.shape[-1] % 2 == 1 and conv_w.shape[-1] <= 9, "the fused path takes an odd d_conv <= 9"
    args = (zxbcdt, conv_w, conv_b, dt_bias, A.float(), fc_w, D, norm_w, float(eps), headdim, d_state, ngroups,
            chunk_size, scan_impl)
    if torch.compiler.is_compiling():
        return _hydra_mix_fwd_op(*args)[0]
    return HydraMixFn.apply(*args)


# --------------------------------------------------------------------------------------------------
# cut: the parts of megassm.ops.hydra_mix (shapes asserted there)
# --------------------------------------------------------------------------------------------------
class LocalMixFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xbc, dt, conv_w, conv_b, dt_bias, A, headdim, d_state, chunk_size, scan_impl):
        Bsz, L, conv_dim = xbc.shape
        h = A.shape[0]
        ngroups = (conv_dim - h * headdim) // (4 * d_state)
        if xbc.stride(-1) != 1:
            xbc = xbc.contiguous()
        ctx.conv_w_shape = conv_w.shape
        conv_w = conv_w.reshape(conv_dim, -1).contiguous()
        xs, bcs, dts, scan = _conv_scan_fwd(xbc, conv_w, conv_b, dt, dt_bias, A, headdim, d_state, ngroups,
                                            chunk_size, scan_impl)
        ctx.save_for_backward(xbc, conv_w, conv_b, dt_bias, A, xs, bcs, dts, scan)
        ctx.dims = (headdim, d_state, ngroups, chunk_size, scan_impl)
        ctx.dt_dtype = dt.dtype
        return scan.view(2 * Bsz, L, h * headdim), xs[:Bsz]

    @staticmethod
    def backward(ctx, dscan, dx):
        xbc, conv_w, conv_b, dt_bias, A, xs, bcs, dts, scan = ctx.saved_tensors
        Bsz, L, conv_dim = xbc.shape
        h = A.shape[0]
        dscan = torch.zeros_like(scan) if dscan is None else dscan.reshape(scan.shape).contiguous()
        dx = torch.zeros_like(xs[:Bsz]) if dx is None else dx.contiguous()
        dxbc = torch.empty(Bsz, L, conv_dim, device=xbc.device, dtype=xbc.dtype)
        ddt = torch.empty(Bsz, L, 2 * h, device=xbc.device, dtype=ctx.dt_dtype)
        dconv_w, dconv_b, ddt_bias, dA = _scan_conv_bwd(dscan, dx, xbc, conv_w, conv_b, xs, bcs, dts, scan, dt_bias,
                                                        A, ctx.dims, dxbc, ddt)
        dconv_w = dconv_w.reshape(ctx.conv_w_shape).to(conv_w.dtype)
        return dxbc, ddt, dconv_w, dconv_b, ddt_bias, dA, None, None, None, None


@torch.compiler.disable  # Triton launches and hand-written backward: eager inside a compiled block
def local_mix_fused(xbc: Tensor, dt: Tensor, conv_w: Tensor, conv_b: Tensor | None, dt_bias: Tensor, A: Tensor,
                    headdim: int, d_state: int, chunk_size: int, scan_impl: str = "triton") -> tuple[Tensor, Tensor]:
    """``hydra_mix.local_mix`` without fc_D: -> scan (2B, L, h*p), x (B, L, h*p), in xbc's dtype."""
    assert conv_w.shape[-1] <= 9, "the fused path takes an odd d_conv <= 9"
    return LocalMixFn.apply(xbc, dt, conv_w, conv_b, dt_bias, A.float(), headdim, d_state, chunk_size, scan_impl)


class CombineFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scan, x, diag):
        scan, x, diag = scan.contiguous(), x.contiguous(), diag.contiguous()
        headdim = x.shape[-1] // diag.shape[-1]
        y, _ = _out_norm_fwd(scan, x, diag, None, None, 0.0, headdim, norm=False)
        ctx.save_for_backward(scan, x, diag)
        return y

    @staticmethod
    def backward(ctx, dy):
        scan, x, diag = ctx.saved_tensors
        headdim = x.shape[-1] // diag.shape[-1]
        dscan, ddiag, dx, _ = _out_norm_bwd(dy.contiguous(), scan, x, diag, None, None, None, None, headdim,
                                            norm=False)
        return dscan, dx, ddiag.to(diag.dtype)


@torch.compiler.disable  # Triton launches and hand-written backward: eager inside a compiled block
def combine_fused(scan: Tensor, x: Tensor, diag: Tensor) -> Tensor:
    """``hydra_mix.combine``: scan (2B, L, h*p), x (B, L, h*p), diag (B, L, h) -> y (B, L, h*p)."""
    return CombineFn.apply(scan, x, diag)


class GatedNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, z, w, eps, width, sum_over_ranks):
        K = _kernels()
        y = y.contiguous()
        if z.stride(-1) != 1:
            z = z.contiguous()
        Bsz, L, d = y.shape
        local = sum_over_ranks is None
        block = _pow2(d)
        sumsq = y.new_empty(Bsz, L, dtype=torch.float32)
        if not local:
            K.gated_norm_row_sum_kernel[(L, Bsz)](y, z, z.stride(0), z.stride(1), w, y, sumsq, L, d,
                                                  GRAD=False, BLOCK_D=block, num_warps=_norm_warps(d))
            sumsq = sum_over_ranks(sumsq)  # over every rank holding this token's channels
        out = torch.empty_like(y)
        rstd = torch.empty(Bsz, L, device=y.device, dtype=torch.float32)
        K.gated_norm_fwd_kernel[(L, Bsz)](y, z, z.stride(0), z.stride(1), w, sumsq, out, rstd, L, d, width,
                                          float(eps), LOCAL=local, BLOCK_D=block, num_warps=_norm_warps(d))
        ctx.save_for_backward(y, z, w, rstd)
        ctx.width, ctx.sum_over_ranks, ctx.z_dtype = width, sum_over_ranks, z.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        K = _kernels()
        y, z, w, rstd = ctx.saved_tensors
        Bsz, L, d = y.shape
        dout = dout.contiguous()
        local = ctx.sum_over_ranks is None
        block = _pow2(d)
        dot = rstd  # unread when local
        if not local:
            dot = torch.empty(Bsz, L, device=y.device, dtype=torch.float32)
            K.gated_norm_row_sum_kernel[(L, Bsz)](y, z, z.stride(0), z.stride(1), w, dout, dot, L, d,
                                                  GRAD=True, BLOCK_D=block, num_warps=_norm_warps(d))
            dot = ctx.sum_over_ranks(dot)  # the adjoint of the forward's all-reduce is an all-reduce
        n_rows = Bsz * L
        n_prog = min(n_rows, 4 * _num_sms(y.device))
        rows_per_prog = triton_cdiv(n_rows, n_prog)
        n_prog = triton_cdiv(n_rows, rows_per_prog)
        dy = torch.empty_like(y)
        dz = torch.empty(Bsz, L, d, device=y.device, dtype=ctx.z_dtype)
        dw_part = torch.empty(n_prog, d, device=y.device, dtype=torch.float32)
        K.gated_norm_bwd_kernel[(n_prog,)](dout, y, z, z.stride(0), z.stride(1), w, rstd, dot, dy, dz, dw_part,
                                           Bsz, L, d, ctx.width, rows_per_prog, LOCAL=local, BLOCK_D=block,
                                           num_warps=_norm_warps(d))
        return dy, dz, dw_part.sum(0).to(w.dtype), None, None, None


@torch.compiler.disable  # Triton launches and hand-written backward: eager inside a compiled block
def gated_norm_fused(y: Tensor, z: Tensor, w: Tensor, eps: float, width: int,
                     sum_over_ranks: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``hydra_mix.gated_norm`` (group_size None): y, z (B, L, d), w (d,); ``width`` the token's full width.

    ``sum_over_ranks`` (None: this rank holds all ``width`` channels) sums a (B, L) fp32 tensor across
    the ranks holding the rest; it runs once in forward and once in backward, outside autograd.
    """
    return GatedNormFn.apply(y, z, w, float(eps), int(width), sum_over_ranks)
