"""Triton kernels of the fused Hydra mixer (``megassm.ops.hydra_fused``); readable twins in that file.

Names: B batch, L seqlen, h heads, p headdim, G = ngroups * d_state, d_bc = 2G (one direction's
B and C), conv_dim = d_inner + 2 * d_bc. ``xbc`` is the [x | B_f | C_f | B_b | C_b] slice of the
in_proj output, read in place (row stride = d_in_proj, channel stride 1).

Kernels (all memory-bound; one read of each input where the layout allows):
  conv_silu_fwd        depthwise 'same' conv + bias + SiLU, written straight into the two-direction
                       layouts the scan reads: xs (2B, L, d_inner), bcs (2B, L, d_bc); the backward
                       half is stored at flipped positions, so no flip is ever materialised.
  out_norm_fwd         y = shift(scan_f) + flip(shift(scan_b)) + x * diag, then gated RMSNorm (NORM; without
                       it, y: the cut path's combine).
  out_norm_bwd         its backward: dz, dy -> d(scan) in the scan's layout (shift/flip folded into
                       the store address), d(diag) per head, dy * diag, and norm-weight partials.
  gated_norm_*         the cut path's norm (megassm.ops.hydra_mix): y given, the sum of squares (and in
                       backward sum(dxhat * y)) reduced across ranks between two launches, or in one.
  conv_silu_bwd_act    gathers the conv output's gradient from the scan/diag/B/C grads (flips folded
                       into load addresses) and multiplies by SiLU' of the recomputed conv output.
  conv_bwd             transposed depthwise conv (input grad, written in place into d(in_proj out))
                       + weight / bias partial sums.

The Triton interpreter (TRITON_INTERPRET=1) runs all of them on CPU tensors; the CPU tests use it, and so
does a CPU run with ``model.hydra_path=fused``.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


def fix_interpreter() -> None:
    """Triton 3.6's interpreter turns a loop bound into int(np.array([n])), which numpy >= 2.4 refuses;
    index with the array's single element instead (only the interpreter is touched)."""
    import triton.runtime.interpreter as ti

    if getattr(ti, "_megassm_patched", False) or not hasattr(ti, "_patch_lang_tensor"):
        return
    orig = ti._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    ti._patch_lang_tensor = patched
    ti._megassm_patched = True


if os.environ.get("TRITON_INTERPRET") == "1":
    fix_interpreter()


@triton.jit
def _conv_tile(xbc_ptr, stride_xl, w_ptr, bias_ptr, offs_l, offs_c, cmask, seqlen,
               HAS_BIAS: tl.constexpr, W: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pre-activation conv output for rows offs_l, channels offs_c (fp32, (BLOCK_L, BLOCK_C))."""
    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(W):
        rows = offs_l + (k - W // 2)
        m = ((rows >= 0) & (rows < seqlen))[:, None] & cmask[None, :]
        xin = tl.load(xbc_ptr + rows.to(tl.int64)[:, None] * stride_xl + offs_c[None, :], mask=m, other=0.0)
        wk = tl.load(w_ptr + offs_c * W + k, mask=cmask, other=0.0)
        acc += xin.to(tl.float32) * wk.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def conv_silu_fwd_kernel(
    xbc_ptr, stride_xb, stride_xl, w_ptr, bias_ptr, xs_ptr, bcs_ptr,
    batch, seqlen, d_inner, d_bc,
    HAS_BIAS: tl.constexpr, W: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_l, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    conv_dim = d_inner + 2 * d_bc
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < conv_dim
    b64 = b.to(tl.int64)
    pre = _conv_tile(xbc_ptr + b64 * stride_xb, stride_xl, w_ptr, bias_ptr, offs_l, offs_c, cmask, seqlen,
                     HAS_BIAS, W, BLOCK_L, BLOCK_C)
    out = (pre * tl.sigmoid(pre)).to(xs_ptr.dtype.element_ty)
    lmask = offs_l < seqlen
    row_f = b64 * seqlen + offs_l.to(tl.int64)  # row in the forward half
    row_b = (batch + b64) * seqlen + (seqlen - 1 - offs_l).to(tl.int64)  # flipped row, backward half
    mx = lmask[:, None] & (offs_c < d_inner)[None, :]
    tl.store(xs_ptr + row_f[:, None] * d_inner + offs_c[None, :], out, mask=mx)
    tl.store(xs_ptr + row_b[:, None] * d_inner + offs_c[None, :], out, mask=mx)
    cf = offs_c - d_inner  # [B_f | C_f] channels
    mf = lmask[:, None] & ((cf >= 0) & (cf < d_bc))[None, :]
    tl.store(bcs_ptr + row_f[:, None] * d_bc + cf[None, :], out, mask=mf)
    cb = offs_c - d_inner - d_bc  # [B_b | C_b] channels
    mb = lmask[:, None] & ((cb >= 0) & (cb < d_bc))[None, :]
    tl.store(bcs_ptr + row_b[:, None] * d_bc + cb[None, :], out, mask=mb)


@triton.jit
def _recompute_y(scan_ptr, xs_ptr, diag_ptr, b64, l, batch, seqlen, nheads, d_inner, offs_h, cols, cmask):
    """Row (b, l) of y = shift(scan_f) + flip(shift(scan_b)) + x * diag, fp32 (BLOCK_H, BLOCK_P)."""
    row = b64 * seqlen + l
    x = tl.load(xs_ptr + row * d_inner + cols, mask=cmask, other=0.0).to(tl.float32)
    dg = tl.load(diag_ptr + row * nheads + offs_h, mask=offs_h < nheads, other=0.0).to(tl.float32)
    # forward direction, shifted: position l sees scan_f[l - 1]
    yf = tl.load(scan_ptr + (row - 1) * d_inner + cols, mask=cmask & (l >= 1), other=0.0).to(tl.float32)
    # backward direction: flip(shift(scan_b))[l] = scan_b[L - 2 - l]
    row_b = (batch + b64) * seqlen + (seqlen - 2 - l)
    yb = tl.load(scan_ptr + row_b * d_inner + cols, mask=cmask & (l <= seqlen - 2), other=0.0).to(tl.float32)
    return yf + yb + x * dg[:, None], x, dg


@triton.jit
def out_norm_fwd_kernel(
    scan_ptr, xs_ptr, diag_ptr, z_ptr, stride_zb, stride_zl, w_ptr, out_ptr, rstd_ptr,
    batch, seqlen, nheads, eps,
    HEADDIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, NORM: tl.constexpr,
):
    """NORM: gated RMSNorm of y (z, w, rstd used); else y itself (the cut path's combine)."""
    l, b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    d_inner = nheads * HEADDIM
    offs_h = tl.arange(0, BLOCK_H)
    offs_p = tl.arange(0, BLOCK_P)
    cols = offs_h[:, None] * HEADDIM + offs_p[None, :]  # (BLOCK_H, BLOCK_P): channel = head * p + i
    cmask = (offs_h < nheads)[:, None] & (offs_p < HEADDIM)[None, :]
    y, x, dg = _recompute_y(scan_ptr, xs_ptr, diag_ptr, b, l, batch, seqlen, nheads, d_inner, offs_h, cols, cmask)
    row = b * seqlen + l
    if NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(y * y, axis=1), axis=0) / d_inner + eps)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + b * stride_zb + l * stride_zl + cols, mask=cmask, other=0.0).to(tl.float32)
        out = y * rstd * w * (z * tl.sigmoid(z))
        tl.store(rstd_ptr + row, rstd)
    else:
        out = y
    tl.store(out_ptr + row * d_inner + cols, out.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def out_norm_bwd_kernel(
    dout_ptr, scan_ptr, xs_ptr, diag_ptr, z_ptr, stride_zb, stride_zl, w_ptr, rstd_ptr,
    dz_ptr, stride_dzb, stride_dzl, dscan_ptr, ddiag_ptr, dxd_ptr, dw_ptr,
    batch, seqlen, nheads, rows_per_prog,
    HEADDIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, NORM: tl.constexpr,
):
    """NORM: through the gated norm (dz, dw written); else dout is d(y) (the cut path's combine)."""
    pid = tl.program_id(0)
    d_inner = nheads * HEADDIM
    offs_h = tl.arange(0, BLOCK_H)
    offs_p = tl.arange(0, BLOCK_P)
    hmask = offs_h < nheads
    cols = offs_h[:, None] * HEADDIM + offs_p[None, :]
    cmask = hmask[:, None] & (offs_p < HEADDIM)[None, :]
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_H, BLOCK_P), dtype=tl.float32)
    r_start = pid * rows_per_prog
    r_end = tl.minimum(r_start + rows_per_prog, batch * seqlen)
    for r in range(r_start, r_end):
        b = (r // seqlen).to(tl.int64)
        l = (r % seqlen).to(tl.int64)
        row = b * seqlen + l
        y, x, dg = _recompute_y(scan_ptr, xs_ptr, diag_ptr, b, l, batch, seqlen, nheads, d_inner, offs_h, cols,
                                cmask)
        do = tl.load(dout_ptr + row * d_inner + cols, mask=cmask, other=0.0).to(tl.float32)
        if NORM:
            rstd = tl.load(rstd_ptr + row)
            z = tl.load(z_ptr + b * stride_zb + l * stride_zl + cols, mask=cmask, other=0.0).to(tl.float32)
            xhat = y * rstd
            sig = tl.sigmoid(z)
            gate = z * sig
            dw += do * xhat * gate
            dxhat = do * w * gate
            dy = (dxhat - xhat * (tl.sum(tl.sum(dxhat * xhat, axis=1), axis=0) / d_inner)) * rstd
            dz = do * xhat * w * sig * (1.0 + z * (1.0 - sig))
            tl.store(dz_ptr + b * stride_dzb + l * stride_dzl + cols, dz.to(dz_ptr.dtype.element_ty), mask=cmask)
        else:
            dy = do
        tl.store(ddiag_ptr + row * nheads + offs_h, tl.sum(dy * x, axis=1), mask=hmask)
        tl.store(dxd_ptr + row * d_inner + cols, (dy * dg[:, None]).to(dxd_ptr.dtype.element_ty), mask=cmask)
        # d scan_f[l - 1] = dy[l]; the row nobody reads (L - 1) gets zeros from l = 0
        has_f = l >= 1
        row_f = b * seqlen + tl.where(has_f, l - 1, seqlen - 1)
        tl.store(dscan_ptr + row_f * d_inner + cols, tl.where(has_f, dy, 0.0).to(dscan_ptr.dtype.element_ty),
                 mask=cmask)
        # d scan_b[L - 2 - l] = dy[l]; row L - 1 gets zeros from l = L - 1
        has_b = l <= seqlen - 2
        row_b = (batch + b) * seqlen + tl.where(has_b, seqlen - 2 - l, seqlen - 1)
        tl.store(dscan_ptr + row_b * d_inner + cols, tl.where(has_b, dy, 0.0).to(dscan_ptr.dtype.element_ty),
                 mask=cmask)
    if NORM:
        tl.store(dw_ptr + pid.to(tl.int64) * d_inner + cols, dw, mask=cmask)


@triton.jit
def gated_norm_row_sum_kernel(
    y_ptr, z_ptr, stride_zb, stride_zl, w_ptr, dout_ptr, out_ptr, seqlen, width,
    GRAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per token, over this rank's channels: sum(y * y) (forward), or sum(dout * w * silu(z) * y) (GRAD)."""
    l, b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < width
    row = b * seqlen + l
    y = tl.load(y_ptr + row * width + cols, mask=cmask, other=0.0).to(tl.float32)
    if GRAD:
        z = tl.load(z_ptr + b * stride_zb + l * stride_zl + cols, mask=cmask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        do = tl.load(dout_ptr + row * width + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y * do * w * (z * tl.sigmoid(z))
    else:
        y = y * y
    tl.store(out_ptr + row, tl.sum(y, axis=0))


@triton.jit
def gated_norm_fwd_kernel(
    y_ptr, z_ptr, stride_zb, stride_zl, w_ptr, sumsq_ptr, out_ptr, rstd_ptr, seqlen, width, total_width, eps,
    LOCAL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out = y * rstd * w * silu(z); rstd from this row (LOCAL) or from the summed sumsq_ptr."""
    l, b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < width
    row = b * seqlen + l
    y = tl.load(y_ptr + row * width + cols, mask=cmask, other=0.0).to(tl.float32)
    if LOCAL:
        sumsq = tl.sum(y * y, axis=0)
    else:
        sumsq = tl.load(sumsq_ptr + row)
    rstd = 1.0 / tl.sqrt(sumsq / total_width + eps)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + b * stride_zb + l * stride_zl + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * width + cols, (y * rstd * w * (z * tl.sigmoid(z))).to(out_ptr.dtype.element_ty),
             mask=cmask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def gated_norm_bwd_kernel(
    dout_ptr, y_ptr, z_ptr, stride_zb, stride_zl, w_ptr, rstd_ptr, dot_ptr, dy_ptr, dz_ptr, dw_ptr,
    batch, seqlen, width, total_width, rows_per_prog,
    LOCAL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dy, dz (both (B, L, width), contiguous) and per-program dw partials. The row statistic
    sum(dxhat * xhat) over all channels is this row's own (LOCAL) or rstd * the summed dot_ptr."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < width
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    r_start = pid * rows_per_prog
    r_end = tl.minimum(r_start + rows_per_prog, batch * seqlen)
    for r in range(r_start, r_end):
        b = (r // seqlen).to(tl.int64)
        l = (r % seqlen).to(tl.int64)
        row = b * seqlen + l
        y = tl.load(y_ptr + row * width + cols, mask=cmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + b * stride_zb + l * stride_zl + cols, mask=cmask, other=0.0).to(tl.float32)
        do = tl.load(dout_ptr + row * width + cols, mask=cmask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = y * rstd
        sig = tl.sigmoid(z)
        gate = z * sig
        dxhat = do * w * gate
        if LOCAL:
            dot = tl.sum(dxhat * xhat, axis=0)
        else:
            dot = tl.load(dot_ptr + row) * rstd
        dy = (dxhat - xhat * (dot / total_width)) * rstd
        dw += do * xhat * gate
        tl.store(dy_ptr + row * width + cols, dy.to(dy_ptr.dtype.element_ty), mask=cmask)
        dz = do * xhat * w * sig * (1.0 + z * (1.0 - sig))
        tl.store(dz_ptr + row * width + cols, dz.to(dz_ptr.dtype.element_ty), mask=cmask)
    tl.store(dw_ptr + pid.to(tl.int64) * width + cols, dw, mask=cmask)


@triton.jit
def conv_silu_bwd_act_kernel(
    xbc_ptr, stride_xb, stride_xl, w_ptr, bias_ptr, dxs_ptr, dxe_ptr, dB_ptr, dC_ptr, dpre_ptr,
    batch, seqlen, d_inner, G,
    HAS_BIAS: tl.constexpr, W: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_l, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d_bc = 2 * G
    conv_dim = d_inner + 2 * d_bc
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < conv_dim
    lmask = offs_l < seqlen
    b64 = b.to(tl.int64)
    pre = _conv_tile(xbc_ptr + b64 * stride_xb, stride_xl, w_ptr, bias_ptr, offs_l, offs_c, cmask, seqlen,
                     HAS_BIAS, W, BLOCK_L, BLOCK_C)
    row_f = (b64 * seqlen + offs_l.to(tl.int64))[:, None]
    row_b = ((batch + b64) * seqlen + (seqlen - 1 - offs_l).to(tl.int64))[:, None]
    # x channels: both scan directions + the D-term / fc_D gradient
    mx = lmask[:, None] & (offs_c < d_inner)[None, :]
    c = offs_c[None, :]
    g = tl.load(dxs_ptr + row_f * d_inner + c, mask=mx, other=0.0).to(tl.float32)
    g += tl.load(dxs_ptr + row_b * d_inner + c, mask=mx, other=0.0).to(tl.float32)
    g += tl.load(dxe_ptr + row_f * d_inner + c, mask=mx, other=0.0).to(tl.float32)
    # [B_f | C_f] from the forward half, [B_b | C_b] from the backward half (flipped rows)
    cf = offs_c - d_inner
    in_b = ((cf >= 0) & (cf < G))[None, :] & lmask[:, None]
    in_c = ((cf >= G) & (cf < d_bc))[None, :] & lmask[:, None]
    g += tl.load(dB_ptr + row_f * G + cf[None, :], mask=in_b, other=0.0).to(tl.float32)
    g += tl.load(dC_ptr + row_f * G + (cf - G)[None, :], mask=in_c, other=0.0).to(tl.float32)
    cb = offs_c - d_inner - d_bc
    in_b = ((cb >= 0) & (cb < G))[None, :] & lmask[:, None]
    in_c = ((cb >= G) & (cb < d_bc))[None, :] & lmask[:, None]
    g += tl.load(dB_ptr + row_b * G + cb[None, :], mask=in_b, other=0.0).to(tl.float32)
    g += tl.load(dC_ptr + row_b * G + (cb - G)[None, :], mask=in_c, other=0.0).to(tl.float32)
    sig = tl.sigmoid(pre)
    dpre = g * sig * (1.0 + pre * (1.0 - sig))
    m = lmask[:, None] & cmask[None, :]
    tl.store(dpre_ptr + row_f * conv_dim + c, dpre, mask=m)


@triton.jit
def _tap_product(dp, xbc_b, stride_xl, offs_l, offs_c, cmask, seqlen, shift):
    """dp * xin[l + shift] for the tile, fp32 (zero where l + shift is outside [0, L))."""
    xr = offs_l + shift
    m = ((xr >= 0) & (xr < seqlen))[:, None] & cmask[None, :]
    xin = tl.load(xbc_b + xr.to(tl.int64)[:, None] * stride_xl + offs_c[None, :], mask=m, other=0.0)
    return dp * xin.to(tl.float32)


@triton.jit
def conv_bwd_kernel(
    dpre_ptr, xbc_ptr, stride_xb, stride_xl, w_ptr, dxbc_ptr, stride_dxb, stride_dxl, dw_ptr, db_ptr,
    seqlen, conv_dim, l_per_split,
    W: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """d xin[m] = sum_k w[k] dpre[m - k + W//2];  dw[k] = sum_l dpre[l] xin[l + k - W//2];  db = sum dpre.

    The weight gradient keeps one element-wise accumulator per tap (W <= 9) and reduces over L once at
    the end: a cross-thread reduction per tap and tile was 5x slower on an H100.
    """
    pid_c, pid_s, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    nsplit = tl.num_programs(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < conv_dim
    b64 = b.to(tl.int64)
    dpre_b = dpre_ptr + b64 * seqlen * conv_dim
    xbc_b = xbc_ptr + b64 * stride_xb
    P: tl.constexpr = W // 2
    a0 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    a1 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    a2 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    a3 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    a4 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    a5 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    a6 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    a7 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    a8 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    adb = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    l_start = pid_s * l_per_split
    l_end = tl.minimum(l_start + l_per_split, seqlen)
    for l0 in range(l_start, l_end, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        m = (offs_l < l_end)[:, None] & cmask[None, :]
        dp = tl.load(dpre_b + offs_l.to(tl.int64)[:, None] * conv_dim + offs_c[None, :], mask=m, other=0.0)
        adb += dp
        dx = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
        for k in tl.static_range(W):
            wk = tl.load(w_ptr + offs_c * W + k, mask=cmask, other=0.0).to(tl.float32)
            src = offs_l - (k - P)  # dpre rows feeding input row offs_l through tap k
            ms = ((src >= 0) & (src < seqlen))[:, None] & cmask[None, :]
            dx += wk[None, :] * tl.load(dpre_b + src.to(tl.int64)[:, None] * conv_dim + offs_c[None, :], mask=ms,
                                        other=0.0)
        tl.store(dxbc_ptr + b64 * stride_dxb + offs_l.to(tl.int64)[:, None] * stride_dxl + offs_c[None, :],
                 dx.to(dxbc_ptr.dtype.element_ty), mask=m)
        a0 += _tap_product(dp, xbc_b, stride_xl, offs_l, offs_c, cmask, seqlen, 0 - P)
        if W > 1:
            a1 += _tap_product(dp, xbc_b, stride_xl, offs_l, offs_c, cmask, seqlen, 1 - P)
        if W > 2:
            a2 += _tap_product(dp, xbc_b, stride_xl, offs_l, offs_c, cmask, seqlen, 2 - P)
        if W > 3:
            a3 += _tap_product(dp, xbc_b, stride_xl, offs_l, offs_c, cmask, seqlen, 3 - P)
        if W > 4:
            a4 += _tap_product(dp, xbc_b, stride_xl, offs_l, offs_c, cmask, seqlen, 4 - P)
        if W > 5:
            a5 += _tap_product(dp, xbc_b, stride_xl, offs_l, offs_c, cmask, seqlen, 5 - P)
        if W > 6:
            a6 += _tap_product(dp, xbc_b, stride_xl, offs_l, offs_c, cmask, seqlen, 6 - P)
        if W > 7:
            a7 += _tap_product(dp, xbc_b, stride_xl, offs_l, offs_c, cmask, seqlen, 7 - P)
        if W > 8:
            a8 += _tap_product(dp, xbc_b, stride_xl, offs_l, offs_c, cmask, seqlen, 8 - P)
    out = dw_ptr + (b64 * nsplit + pid_s) * W * conv_dim + offs_c
    tl.store(out, tl.sum(a0, axis=0), mask=cmask)
    if W > 1:
        tl.store(out + 1 * conv_dim, tl.sum(a1, axis=0), mask=cmask)
    if W > 2:
        tl.store(out + 2 * conv_dim, tl.sum(a2, axis=0), mask=cmask)
    if W > 3:
        tl.store(out + 3 * conv_dim, tl.sum(a3, axis=0), mask=cmask)
    if W > 4:
        tl.store(out + 4 * conv_dim, tl.sum(a4, axis=0), mask=cmask)
    if W > 5:
        tl.store(out + 5 * conv_dim, tl.sum(a5, axis=0), mask=cmask)
    if W > 6:
        tl.store(out + 6 * conv_dim, tl.sum(a6, axis=0), mask=cmask)
    if W > 7:
        tl.store(out + 7 * conv_dim, tl.sum(a7, axis=0), mask=cmask)
    if W > 8:
        tl.store(out + 8 * conv_dim, tl.sum(a8, axis=0), mask=cmask)
    tl.store(db_ptr + (b64 * nsplit + pid_s) * conv_dim + offs_c, tl.sum(adb, axis=0), mask=cmask)
