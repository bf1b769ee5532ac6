"""Hydra's mixer between in_proj and out_proj, in parts cut where tensor / context parallelism must
reduce across ranks. ``Hydra`` and ``ParallelHydra`` both run these functions: one copy of the maths.

    local_mix(xbc, dt, heads' weights)   conv + SiLU -> SSD scan, both directions      (token-sequence local)
        -> scan (2B, L, h*p), x (B, L, h*p), diag_partial (B, L, n) = x @ fc_w^T
    [fc_D sums over every channel of a token: the partial products are reduced across ranks; + D]
    combine(scan, x, diag)                y = shift(scan_f) + flip(shift(scan_b)) + x * diag
    [back to the token layout (inverse scan permutation, CP all-to-all)]
    gated_norm(y, z, w, ..., sum_over_ranks)   RMSNorm over all of d_inner, then * silu(z); the sum of
                                               squares is summed across the ranks holding the channels

Names: B batch, L seqlen (scan order), h heads of this call, p headdim, g B/C groups, n d_state;
``xbc`` is [x | B_f | C_f | B_b | C_b] (B, L, h*p + 4*g*n), ``dt`` [dt_f | dt_b] (B, L, 2h) before softplus.
``scan`` holds the two directions stacked on the batch axis, the backward half in flipped order
(what one SSD call over both directions returns). Shapes are asserted here, once, for both paths.

Each part has ``fused=False`` (PyTorch, autograd; the reference) and ``fused=True`` (Triton kernels
with hand-written backward, ``megassm.ops.hydra_fused``). The single-GPU module runs the uncut
fused Function ``hydra_mix_fused`` instead, which keeps y in registers from the scan to the norm;
``hydra_mix`` (the parts composed) is what the tests compare it against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megassm.ops.norm import gated_rms_norm_ref
from megassm.ops.ssd import ssd_scan


class LocalMix(NamedTuple):
    scan: Tensor  # (2B, L, h*p): both scan directions, shift not yet applied
    x: Tensor  # (B, L, h*p): the conv output's x channels (the diagonal term's input)
    diag_partial: Tensor  # (B, L, n_out): x @ fc_w^T over this call's channels


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32 for bf16/fp32, fp64 stays fp64


def conv_silu_ref(xbc: Tensor, w: Tensor, bias: Tensor | None, d_inner: int,
                  padding: int | None = None) -> tuple[Tensor, Tensor]:
    """xbc (B, L, conv_dim) -> xs (2B, L', d_inner) = [x; flip(x)], bcs (2B, L', d_bc) = [BC_f; flip(BC_b)].

    ``padding`` None: zeros each side, (d_conv - 1) / 2, L' = L ('same'); 0: xbc already holds that many
    neighbour tokens each side (a context-parallel slice with its halo), L' = L - (d_conv - 1)."""
    acc = _acc(xbc.dtype)
    out = F.conv1d(xbc.to(acc).transpose(1, 2), w.to(acc), None if bias is None else bias.to(acc),
                   padding=w.shape[-1] // 2 if padding is None else padding, groups=xbc.shape[-1])
    out = F.silu(out).transpose(1, 2).to(xbc.dtype)  # (B, L, conv_dim): non-causal 'same' conv
    x, bc = out.split([d_inner, out.shape[-1] - d_inner], dim=-1)
    d_bc = bc.shape[-1] // 2
    xs = torch.cat([x, x.flip(1)], dim=0)
    bcs = torch.cat([bc[..., :d_bc], bc[..., d_bc:].flip(1)], dim=0)
    return xs, bcs


def _local_mix_ref(xbc, dt, conv_w, conv_b, dt_bias, A, headdim, d_state, chunk_size, scan_impl):
    Bsz, L, conv_dim = xbc.shape
    h = A.shape[0]
    d_inner = h * headdim
    g = (conv_dim - d_inner) // (4 * d_state)
    xs, bcs = conv_silu_ref(xbc, conv_w, conv_b, d_inner)
    acc = _acc(xbc.dtype)
    dts = torch.cat([dt[..., :h], dt[..., h:].flip(1)], dim=0)  # (2B, L, h)
    dts = F.softplus(dts.to(acc) + dt_bias.to(acc))  # kept in fp32: the decay exp(dt*A) is sensitive to rounding
    Bm, Cm = bcs.unflatten(-1, (2, g, d_state)).unbind(-3)  # (2B, L, g, n) each
    scan = ssd_scan(xs.view(2 * Bsz, L, h, headdim), dts, A.to(acc), Bm, Cm, chunk_size=chunk_size, impl=scan_impl)
    return scan.reshape(2 * Bsz, L, d_inner), xs[:Bsz]


def local_mix(xbc: Tensor, dt: Tensor, conv_w: Tensor, conv_b: Tensor | None, dt_bias: Tensor, A: Tensor,
              fc_w: Tensor, *, headdim: int, d_state: int, chunk_size: int, fused: bool = False,
              scan_impl: str = "auto") -> LocalMix:
    """The part of Hydra that needs only this call's heads (full sequence, scan order).

    xbc (B, L, h*p + 4*g*n), dt (B, L, 2h) pre-softplus; conv_w (conv_dim, 1, d_conv), conv_b (conv_dim,)
    or None; dt_bias (h,), A (h,) = -exp(A_log); fc_w (n_out, h*p): fc_D's columns of these channels.
    ``scan_impl``: the SSD scan -- reference path: ``ssd_scan``'s impl ("auto", "ref", "triton");
    fused path: "triton" (mamba-ssm's kernels, CUDA) or "ref" (PyTorch scan; CPU tests in Triton's interpreter).
    """
    assert xbc.dim() == 3 and dt.dim() == 3, f"xbc, dt must be (B, L, ·), got {tuple(xbc.shape)}, {tuple(dt.shape)}"
    Bsz, L, conv_dim = xbc.shape
    h = A.shape[0]
    d_inner = h * headdim
    assert A.dim() == 1 and dt_bias.shape == (h,), f"A, dt_bias must be ({h},)"
    assert dt.shape == (Bsz, L, 2 * h), f"dt must be {(Bsz, L, 2 * h)}, got {tuple(dt.shape)}"
    assert (conv_dim - d_inner) % (4 * d_state) == 0, f"xbc width {conv_dim} != {d_inner} + 4*ngroups*{d_state}"
    assert conv_w.shape[0] == conv_dim and conv_w.shape[-1] % 2 == 1, "conv_w must be (conv_dim, 1, odd d_conv)"
    assert fc_w.dim() == 2 and fc_w.shape[1] == d_inner, f"fc_w must be (n_out, {d_inner}), got {tuple(fc_w.shape)}"
    if fused:
        from megassm.ops.hydra_fused import local_mix_fused

        scan, x = local_mix_fused(xbc, dt, conv_w, conv_b, dt_bias, A, headdim, d_state, chunk_size, scan_impl)
    else:
        scan, x = _local_mix_ref(xbc, dt, conv_w, conv_b, dt_bias, A, headdim, d_state, chunk_size, scan_impl)
    return LocalMix(scan, x, F.linear(x, fc_w.to(x.dtype)))  # cuBLAS on both paths


def _combine_ref(scan: Tensor, x: Tensor, diag: Tensor, shift_in: Tensor | None = None) -> Tensor:
    Bsz, h = x.shape[0], diag.shape[-1]
    acc = _acc(x.dtype)
    if shift_in is None:  # shift by one: position i sees tokens strictly before it
        y = F.pad(scan.to(acc)[:, :-1], (0, 0, 1, 0))
    else:  # ... the first one the neighbouring slice's edge row (state-passing context parallelism)
        y = torch.cat([shift_in.to(acc).unsqueeze(1), scan.to(acc)[:, :-1]], dim=1)
    y = y[:Bsz] + y[Bsz:].flip(1)  # the backward direction back in token order
    return (y + x.to(acc) * diag.to(acc).repeat_interleave(x.shape[-1] // h, dim=-1)).to(x.dtype)


def combine(scan: Tensor, x: Tensor, diag: Tensor, fused: bool = False, shift_in: Tensor | None = None) -> Tensor:
    """y = shift(scan_f) + flip(shift(scan_b)) + x * diag: scan (2B, L, h*p), x (B, L, h*p), diag (B, L, h)
    -> (B, L, h*p) in x's dtype (the diagonal term's product in fp32).

    ``shift_in`` (2B, h*p): what the shift moves into each direction's first row (zeros when None): a slice's
    neighbours' edge rows under state-passing CP (``megassm.ops.hydra_state_passing``; reference path only)."""
    Bsz, L, d = x.shape
    assert scan.shape == (2 * Bsz, L, d), f"scan must be {(2 * Bsz, L, d)}, got {tuple(scan.shape)}"
    assert diag.dim() == 3 and diag.shape[:2] == (Bsz, L) and d % diag.shape[-1] == 0, (
        f"diag must be (B, L, heads) with heads dividing {d}, got {tuple(diag.shape)}")
    assert shift_in is None or shift_in.shape == (2 * Bsz, d), f"shift_in must be {(2 * Bsz, d)}"
    if fused:
        if shift_in is not None:
            raise NotImplementedError("the fused combine has no shift_in (state-passing CP runs the reference)")
        from megassm.ops.hydra_fused import combine_fused

        return combine_fused(scan, x, diag)
    return _combine_ref(scan, x, diag, shift_in)


def gated_norm(y: Tensor, z: Tensor, weight: Tensor, eps: float, width: int | None = None,
               sum_over_ranks: Callable[[Tensor], Tensor] | None = None, group_size: int | None = None,
               fused: bool = False) -> Tensor:
    """rmsnorm(y) * weight * silu(z) over ``width`` channels per token; y, z (B, L, d), weight (d,).

    ``sum_over_ranks``: y holds d of each token's ``width`` channels (TP); it sums a per-token tensor of
    partial sums of squares across the ranks that hold the rest (an all-reduce; the fused backward
    applies it to the norm's other per-token sum, since an all-reduce is its own adjoint).
    """
    assert y.dim() == 3 and z.shape == y.shape and weight.shape == y.shape[-1:], (
        f"y, z must be (B, L, d) with weight (d,), got {tuple(y.shape)}, {tuple(z.shape)}, {tuple(weight.shape)}")
    if fused:
        if group_size is not None:
            raise NotImplementedError("the fused gated norm normalises over all channels (group_size=None)")
        from megassm.ops.hydra_fused import gated_norm_fused

        return gated_norm_fused(y, z, weight, eps, width or y.shape[-1], sum_over_ranks)
    return gated_rms_norm_ref(y, z, weight, eps, group_size, width=width, sum_over_ranks=sum_over_ranks)


def hydra_mix(zxbcdt: Tensor, conv_w, conv_b, dt_bias, A, fc_w, D, norm_w, eps, headdim, d_state, ngroups,
              chunk_size=256, *, fused: bool = False, scan_impl: str = "ref", group_size: int | None = None) -> Tensor:
    """The whole mixer on one rank, composed of the parts: same arguments as ``hydra_mix_fused``.

    zxbcdt (B, L, 2*d_inner + 4*ngroups*d_state + 2*nheads) -> (B, L, d_inner).
    """
    h = A.shape[0]
    d_inner = h * headdim
    z, xbc, dt = zxbcdt.split([d_inner, d_inner + 4 * ngroups * d_state, 2 * h], dim=-1)
    mix = local_mix(xbc, dt, conv_w, conv_b, dt_bias, A, fc_w, headdim=headdim, d_state=d_state,
                    chunk_size=chunk_size, fused=fused, scan_impl=scan_impl)
    y = combine(mix.scan, mix.x, mix.diag_partial + D.to(mix.x.dtype), fused=fused)
    return gated_norm(y, z, norm_w, eps, group_size=group_size, fused=fused)


def hydra_mix_ref(zxbcdt, conv_w, conv_b, dt_bias, A, fc_w, D, norm_w, eps, headdim, d_state, ngroups,
                  chunk_size=256):
    """The reference composition with the PyTorch scan: the fused kernels' test oracle."""
    return hydra_mix(zxbcdt, conv_w, conv_b, dt_bias, A, fc_w, D, norm_w, eps, headdim, d_state, ngroups,
                     chunk_size, fused=False, scan_impl="ref")


def use_fused_path(fused: bool | None, ssd_impl: str, d_conv: int, group_size: int | None,
                   device: torch.device) -> bool:
    """Whether a Hydra layer runs the fused kernels: ``fused`` None (auto) on CUDA when they import,
    ssd_impl is not "ref" and the layer is one they cover; False never; True always (raises on CUDA
    without them; on CPU they run only in Triton's interpreter, TRITON_INTERPRET=1)."""
    if fused is False:
        return False
    if fused is None and (device.type != "cuda" or ssd_impl == "ref" or d_conv > 9 or group_size is not None):
        return False
    from megassm.ops.hydra_fused import fused_available

    if fused is None:
        return fused_available()
    if device.type == "cuda" and not fused_available():
        raise RuntimeError("Hydra(fused=True) needs triton and mamba-ssm's SSD kernels on CUDA")
    return True


def default_fused_scan_impl(ssd_impl: str, device: torch.device) -> str:
    """The scan inside the fused path: mamba-ssm's kernel on CUDA unless ssd_impl is "ref", else PyTorch."""
    return "triton" if device.type == "cuda" and ssd_impl != "ref" else "ref"
