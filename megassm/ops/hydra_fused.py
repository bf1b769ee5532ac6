"""Fused Hydra mixer: in_proj output -> (conv, two-direction SSD scan, shift/flip/sum, diagonal, gated
RMSNorm) -> the out_proj input, as one autograd Function with a hand-written backward.

The reference (``megassm.models.hydra.Hydra`` with ``fused=False``, the goombalab algorithm) runs
about fifteen element-wise PyTorch ops around the scan, each a full pass over (B, L, d_inner) tensors,
plus flips and concatenations that are materialised copies, and autograd keeps most of their outputs.
Here the work between in_proj and out_proj is five Triton kernels (``megassm.ops.hydra_kernels``)
around mamba-ssm's SSD forward/backward, and cuBLAS for the small fc_D products:

  forward   conv_silu_fwd -> SSD fwd (both directions, one launch, softplus(dt + dt_bias) inside)
            -> fc_D -> out_norm_fwd
  backward  out_norm_bwd -> fc_D grads (cuBLAS; the x-gradient is added in the GEMM's epilogue)
            -> SSD bwd -> conv_silu_bwd_act -> conv_bwd (input grad written into d(in_proj out))

Saved for backward: the in_proj output, the scan's inputs (x in both orders, B/C, dt) and output,
diag and the norm's rstd -- nothing of width d_inner that the kernels can recompute cheaply.

Every kernel has a readable PyTorch twin below (``*_ref``); ``hydra_mix_ref`` composes them with
autograd and is the test oracle together with the module's reference path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from megassm.ops.ssd import ssd_scan_ref

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


# --------------------------------------------------------------------------------------------------
# readable twins of the kernels
# --------------------------------------------------------------------------------------------------
def conv_silu_ref(xbc: Tensor, w: Tensor, bias: Tensor | None, d_inner: int) -> tuple[Tensor, Tensor]:
    """xbc (B, L, conv_dim) -> xs (2B, L, d_inner) = [x; flip(x)], bcs (2B, L, d_bc) = [BC_f; flip(BC_b)]."""
    B = xbc.shape[0]
    out = F.silu(F.conv1d(xbc.float().transpose(1, 2), w.float(), None if bias is None else bias.float(),
                          padding=w.shape[-1] // 2, groups=xbc.shape[-1]).transpose(1, 2)).to(xbc.dtype)
    x, bc = out.split([d_inner, out.shape[-1] - d_inner], dim=-1)
    d_bc = bc.shape[-1] // 2
    xs = torch.cat([x, x.flip(1)], dim=0)
    bcs = torch.cat([bc[..., :d_bc], bc[..., d_bc:].flip(1)], dim=0)
    assert xs.shape[0] == 2 * B
    return xs, bcs


def out_norm_ref(scan: Tensor, xs: Tensor, diag: Tensor, z: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """scan/xs (2B, L, d_inner), diag (B, L, h), z (B, L, d_inner) -> gated-RMSNorm(y), rstd (B, L)."""
    B, h = z.shape[0], diag.shape[-1]
    y = F.pad(scan.float()[:, :-1], (0, 0, 1, 0))  # shift by one
    x = xs[:B].float()
    y = y[:B] + y[B:].flip(1) + x * diag.float().repeat_interleave(x.shape[-1] // h, dim=-1)
    rstd = torch.rsqrt(y.square().mean(-1) + eps)
    out = y * rstd.unsqueeze(-1) * w.float() * F.silu(z.float())
    return out.to(z.dtype), rstd


def _ssd_fwd_ref(x, dt, A, B, C, dt_bias, chunk_size):
    dt = F.softplus(dt.float() + dt_bias.float())
    return ssd_scan_ref(x, dt, A, B, C, chunk_size)


def hydra_mix_ref(zxbcdt, conv_w, conv_b, dt_bias, A, fc_w, D, norm_w, eps, headdim, d_state, ngroups,
                  chunk_size=256):
    """Same function as ``hydra_mix_fused`` composed of the twins, differentiable by autograd."""
    Bsz, L, _ = zxbcdt.shape
    h = A.shape[0]
    d_inner, G = h * headdim, ngroups * d_state
    conv_dim = d_inner + 4 * G
    z, xbc, dt = zxbcdt.split([d_inner, conv_dim, 2 * h], dim=-1)
    xs, bcs = conv_silu_ref(xbc, conv_w, conv_b, d_inner)
    dts = torch.cat([dt[..., :h], dt[..., h:].flip(1)], dim=0)
    scan = _ssd_fwd_ref(xs.view(2 * Bsz, L, h, headdim), dts, A, bcs[..., :G].unflatten(-1, (ngroups, d_state)),
                        bcs[..., G:].unflatten(-1, (ngroups, d_state)), dt_bias, chunk_size)
    diag = F.linear(xs[:Bsz], fc_w, D)
    return out_norm_ref(scan.flatten(-2), xs, diag, z, norm_w, eps)[0]


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
    if impl == "ref":
        with torch.enable_grad():
            ins = [t.detach().requires_grad_() for t in (x, dt, A, B, C, dt_bias)]
            y = _ssd_fwd_ref(*ins[:5], ins[5], chunk_size)
            return torch.autograd.grad(y, ins, dout)
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


class HydraMixFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zxbcdt, conv_w, conv_b, dt_bias, A, fc_w, D, norm_w, eps, headdim, d_state, ngroups,
                chunk_size, scan_impl):
        K = _kernels()
        Bsz, L, d_in_proj = zxbcdt.shape
        h = A.shape[0]
        d_inner, G = h * headdim, ngroups * d_state
        d_bc, conv_dim = 2 * G, d_inner + 4 * G
        assert d_in_proj == 2 * d_inner + 2 * d_bc + 2 * h, f"in_proj width {d_in_proj} does not match the dims"
        zxbcdt = zxbcdt.contiguous()
        dtype = zxbcdt.dtype
        ctx.conv_w_shape = conv_w.shape
        conv_w = conv_w.reshape(conv_dim, -1).contiguous()
        z, xbc, dt = zxbcdt.split([d_inner, conv_dim, 2 * h], dim=-1)
        xs, bcs = _launch_conv_fwd(xbc, conv_w, conv_b, d_inner, d_bc)
        dts = torch.cat([dt[..., :h], dt[..., h:].flip(1)], dim=0)  # (2B, L, h): small
        x4 = xs.view(2 * Bsz, L, h, headdim)
        Bm, Cm = bcs[..., :G].unflatten(-1, (ngroups, d_state)), bcs[..., G:].unflatten(-1, (ngroups, d_state))
        scan = _scan_fwd(x4, dts, A, Bm, Cm, dt_bias, chunk_size, scan_impl).to(dtype).contiguous()  # (2B, L, h, p)
        diag = F.linear(xs[:Bsz], fc_w.to(dtype), D.to(dtype))  # (B, L, h)
        out = torch.empty(Bsz, L, d_inner, device=zxbcdt.device, dtype=dtype)
        rstd = torch.empty(Bsz, L, device=zxbcdt.device, dtype=torch.float32)
        BLOCK_H, BLOCK_P = _pow2(h), _pow2(headdim)
        K.out_norm_fwd_kernel[(L, Bsz)](
            scan, xs, diag, z, z.stride(0), z.stride(1), norm_w, out, rstd, Bsz, L, h, eps,
            HEADDIM=headdim, BLOCK_H=BLOCK_H, BLOCK_P=BLOCK_P, num_warps=_norm_warps(d_inner),
        )
        ctx.save_for_backward(zxbcdt, conv_w, conv_b, dt_bias, A, fc_w, D, norm_w, xs, bcs, dts, scan, diag, rstd)
        ctx.dims = (headdim, d_state, ngroups, chunk_size, scan_impl)
        return out

    @staticmethod
    def backward(ctx, dout):
        K = _kernels()
        zxbcdt, conv_w, conv_b, dt_bias, A, fc_w, D, norm_w, xs, bcs, dts, scan, diag, rstd = ctx.saved_tensors
        headdim, d_state, ngroups, chunk_size, scan_impl = ctx.dims
        Bsz, L, _ = zxbcdt.shape
        h = A.shape[0]
        d_inner, G = h * headdim, ngroups * d_state
        conv_dim = d_inner + 4 * G
        dtype, dev = zxbcdt.dtype, zxbcdt.device
        dout = dout.contiguous()
        dzxbcdt = torch.empty_like(zxbcdt)
        z, xbc, _ = zxbcdt.split([d_inner, conv_dim, 2 * h], dim=-1)
        dz, dxbc, ddt_out = dzxbcdt.split([d_inner, conv_dim, 2 * h], dim=-1)

        # 1. gated norm + shift/flip/sum + diagonal, backward
        n_rows = Bsz * L
        n_prog = min(n_rows, 4 * _num_sms(dev))
        rows_per_prog = triton_cdiv(n_rows, n_prog)
        n_prog = triton_cdiv(n_rows, rows_per_prog)
        dscan = torch.empty_like(scan)
        ddiag = torch.empty(Bsz, L, h, device=dev, dtype=torch.float32)
        dxe = torch.empty(Bsz, L, d_inner, device=dev, dtype=dtype)
        dw_part = torch.empty(n_prog, d_inner, device=dev, dtype=torch.float32)
        K.out_norm_bwd_kernel[(n_prog,)](
            dout, scan, xs, diag, z, z.stride(0), z.stride(1), norm_w, rstd,
            dz, dz.stride(0), dz.stride(1), dscan, ddiag, dxe, dw_part, Bsz, L, h, rows_per_prog,
            HEADDIM=headdim, BLOCK_H=_pow2(h), BLOCK_P=_pow2(headdim),
            num_warps=_norm_warps(d_inner),
        )
        # 2. fc_D: diag = x @ fc_w^T + D
        ddiag_c = ddiag.to(dtype).view(n_rows, h)
        x_og = xs[:Bsz].reshape(n_rows, d_inner)
        dfc_w = (ddiag_c.t() @ x_og).to(fc_w.dtype)
        dD = ddiag.sum((0, 1)).to(D.dtype)
        dxe.view(n_rows, d_inner).addmm_(ddiag_c, fc_w.to(dtype))  # dx += ddiag @ fc_w, in the GEMM epilogue

        # 3. the scan, both directions in one call
        x4 = xs.view(2 * Bsz, L, h, headdim)
        Bm, Cm = bcs[..., :G].unflatten(-1, (ngroups, d_state)), bcs[..., G:].unflatten(-1, (ngroups, d_state))
        dx, ddt, dA, dB, dC, ddt_bias = _scan_bwd(dscan, x4, dts, A, Bm, Cm, scan, dt_bias, chunk_size, scan_impl)
        ddt_out[..., :h] = ddt[:Bsz]
        ddt_out[..., h:] = ddt[Bsz:].flip(1)

        # 4. conv + SiLU backward
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
        dconv_w = dw_conv.sum(0).t().reshape(ctx.conv_w_shape)
        dconv_b = db_conv.sum(0).to(conv_b.dtype) if conv_b is not None else None
        return (dzxbcdt, dconv_w.to(conv_w.dtype), dconv_b, ddt_bias.to(dt_bias.dtype), dA.to(A.dtype), dfc_w, dD,
                dw_part.sum(0).to(norm_w.dtype), None, None, None, None, None, None)


def hydra_mix_fused(zxbcdt: Tensor, conv_w: Tensor, conv_b: Tensor | None, dt_bias: Tensor, A: Tensor,
                    fc_w: Tensor, D: Tensor, norm_w: Tensor, eps: float, headdim: int, d_state: int,
                    ngroups: int, chunk_size: int = 256, scan_impl: str = "triton") -> Tensor:
    """The Hydra mixer between in_proj and out_proj.

    zxbcdt: (B, L, 2*d_inner + 4*ngroups*d_state + 2*nheads), the in_proj output [z|x|B_f|C_f|B_b|C_b|dt_f|dt_b];
    conv_w (conv_dim, 1, d_conv), conv_b (conv_dim,) or None; dt_bias, A (= -exp(A_log)), D (nheads,);
    fc_w (nheads, d_inner); norm_w (d_inner,). Returns (B, L, d_inner) in zxbcdt's dtype.
    ``scan_impl``: "triton" (mamba-ssm, CUDA) or "ref" (PyTorch; with TRITON_INTERPRET=1 for CPU tests).
    """
    assert zxbcdt.dim() == 3, f"zxbcdt must be (B, L, d_in_proj), got {tuple(zxbcdt.shape)}"
    assert A.dim() == 1 and fc_w.shape == (A.shape[0], A.shape[0] * headdim), "fc_w must be (nheads, d_inner)"
    assert conv_w.shape[0] == A.shape[0] * headdim + 4 * ngroups * d_state, "conv_w must be (conv_dim, 1, d_conv)"
    assert conv_w.shape[-1] % 2 == 1 and conv_w.shape[-1] <= 9, "the fused path takes an odd d_conv <= 9"
    return HydraMixFn.apply(zxbcdt, conv_w, conv_b, dt_bias, A.float(), fc_w, D, norm_w, float(eps), headdim,
                            d_state, ngroups, chunk_size, scan_impl)
