"""Hydra's mixer over one contiguous slice of the scan order, with the scan state passed between slices:
the maths of state-passing context parallelism (``megassm.parallel.hydra_state``), in pure PyTorch.

A CP rank holds tokens [a, b) of the scan order. The SSD recurrence h_t = exp(a_t) h_{t-1} + dt_t B_t x_t^T
is linear in h, so the slice's outputs from its true incoming state h0 are its outputs from a zero state
plus C_t . h0 * exp(sum_{k<=t} a_k). Per direction and head:

    slice_scan      conv over [halo | slice | halo] + SiLU, SSD from zero state both ways ->
                    scan0 (2B, Lc, h, p), and the slice's summary: its final state (2B, h, p, n) and
                    its total log-decay sum_t dt_t A (2B, h)
    incoming_state  from every slice's summary (stacked over slices, in slice order): the state entering
                    slice r -- forward: the prefix over slices < r, h_in[s+1] = exp(ld_s) h_in[s] + S_s;
                    backward (the flipped sequence): the suffix over slices > r
    correct_scan    scan0 + C_t . h0 exp(cumsum_t a)    (cheaper than re-running the chunk scan)
    then ``hydra_mix.combine`` with ``shift_in``: the row that the shift-by-one moves into the slice's first
    position of each direction -- the previous slice's last forward row, the next slice's first (token
    order) backward row -- and zeros at the sequence ends.

The depthwise conv is non-causal: it needs (d_conv - 1) / 2 tokens of ``xbc`` from each neighbour
(zeros at the ends, as the unsplit conv's padding). The diagonal term is token-local.
Names as in ``megassm.ops.hydra_mix``: B batch, Lc tokens of this slice, h heads, p headdim, g groups, n d_state.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megassm.ops.hydra_mix import _acc, conv_silu_ref
from megassm.ops.ssd import ssd_scan


class SliceScan(NamedTuple):
    scan0: Tensor  # (2B, Lc, h, p): both directions from a zero state, backward half flipped; fp32/fp64
    x: Tensor  # (B, Lc, h*p): the conv output's x channels, x's dtype
    C: Tensor  # (2B, Lc, g, n): the output projections (for the correction)
    log_decay_steps: Tensor  # (2B, Lc, h): dt_t * A per step, fp32/fp64
    summary: Tensor  # (2B, h, p*n + 1): [final state (p*n) | total log-decay], fp32/fp64


def slice_scan(xbc_ext: Tensor, dt: Tensor, conv_w: Tensor, conv_b: Tensor | None, dt_bias: Tensor, A: Tensor,
               *, headdim: int, d_state: int, chunk_size: int, scan_impl: str = "ref") -> SliceScan:
    """xbc_ext (B, Lc + d_conv - 1, conv_dim): the slice with (d_conv - 1) / 2 neighbour tokens each side
    (zeros at the sequence ends); dt (B, Lc, 2h) pre-softplus; conv_w (conv_dim, 1, d_conv); A (h,)."""
    Bsz, Lext, conv_dim = xbc_ext.shape
    h, k = A.shape[0], conv_w.shape[-1] - 1
    Lc, d_inner = Lext - k, h * headdim
    assert dt.shape == (Bsz, Lc, 2 * h), f"dt must be {(Bsz, Lc, 2 * h)}, got {tuple(dt.shape)}"
    assert conv_w.shape[0] == conv_dim and k % 2 == 0, "conv_w must be (conv_dim, 1, odd d_conv)"
    g = (conv_dim - d_inner) // (4 * d_state)
    xs, bcs = conv_silu_ref(xbc_ext, conv_w, conv_b, d_inner, padding=0)  # (2B, Lc, ·)
    acc = _acc(xbc_ext.dtype)
    dts = torch.cat([dt[..., :h], dt[..., h:].flip(1)], dim=0)  # (2B, Lc, h)
    dts = F.softplus(dts.to(acc) + dt_bias.to(acc))
    Bm, Cm = bcs.unflatten(-1, (2, g, d_state)).unbind(-3)  # (2B, Lc, g, n) each
    # the scan in fp32 (fp64 stays fp64): its final state is a message other slices add to their outputs
    scan0, final = ssd_scan(xs.view(2 * Bsz, Lc, h, headdim).to(acc), dts, A.to(acc), Bm.to(acc), Cm.to(acc),
                            chunk_size=chunk_size, return_final_states=True, impl=scan_impl)
    steps = dts * A.to(acc)  # (2B, Lc, h) log-decay per step
    summary = torch.cat([final.to(acc).flatten(2), steps.sum(1).unsqueeze(-1)], dim=-1)  # (2B, h, p*n + 1)
    return SliceScan(scan0, xs[:Bsz], Cm, steps, summary)


def _prefix(states: Tensor, log_decay: Tensor, upto: int) -> Tensor:
    """The state entering slice ``upto``: h <- exp(ld_s) h + S_s over s < upto. states (cp, b, h, p, n),
    log_decay (cp, b, h) -> (b, h, p, n)."""
    out = torch.zeros_like(states[0])
    for s in range(upto):
        out = torch.exp(log_decay[s])[..., None, None] * out + states[s]
    return out


def incoming_state(summaries: Tensor, rank: int, d_state: int) -> Tensor:
    """summaries (cp, 2B, h, p*n + 1): every slice's ``SliceScan.summary`` in slice order -> the state
    entering slice ``rank`` (2B, h, p, n): forward half the prefix over slices < rank, backward half
    (which scans the flipped sequence) the suffix over slices > rank."""
    cp, B2 = summaries.shape[:2]
    assert summaries.dim() == 4 and B2 % 2 == 0 and 0 <= rank < cp, f"bad summaries {tuple(summaries.shape)}"
    states = summaries[..., :-1].unflatten(-1, (-1, d_state))  # (cp, 2B, h, p, n)
    ld = summaries[..., -1]  # (cp, 2B, h)
    B = B2 // 2
    fwd = _prefix(states[:, :B], ld[:, :B], rank)
    bwd = _prefix(states[:, B:].flip(0), ld[:, B:].flip(0), cp - 1 - rank)
    return torch.cat([fwd, bwd], dim=0)


def correct_scan(s: SliceScan, h0: Tensor) -> Tensor:
    """scan0 + the incoming state's contribution C_t . h0 * exp(sum_{k<=t} dt_k A): (2B, Lc, h*p), fp32/fp64.
    h0 (2B, h, p, n)."""
    b, Lc, h, p = s.scan0.shape
    C = s.C.to(s.scan0.dtype).repeat_interleave(h // s.C.shape[2], dim=2)  # (2B, Lc, h, n)
    decay = torch.exp(torch.cumsum(s.log_decay_steps, dim=1))  # (2B, Lc, h)
    y = s.scan0 + torch.einsum("blhn,bhpn,blh->blhp", C, h0.to(s.scan0.dtype), decay)
    return y.reshape(b, Lc, h * p)


def edge_rows(scan: Tensor) -> tuple[Tensor, Tensor]:
    """What a slice sends for its neighbours' shift-by-one, scan (2B, Lc, d) -> (to_prev, to_next), (B, d)
    each: the next slice needs this slice's last forward row, the previous one its first token's backward
    row (the last row of the flipped half)."""
    B = scan.shape[0] // 2
    return scan[B:, -1], scan[:B, -1]


def halo_rows(xbc: Tensor, halo: int) -> tuple[Tensor, Tensor]:
    """xbc (B, Lc, c) -> (to_prev, to_next): the first / last ``halo`` tokens, (B, halo, c) each."""
    if xbc.shape[1] < halo:
        raise ValueError(f"a context-parallel slice of {xbc.shape[1]} tokens is shorter than the conv's halo "
                         f"(d_conv - 1) / 2 = {halo}: use fewer CP ranks or cp_impl=ulysses")
    return xbc[:, :halo], xbc[:, xbc.shape[1] - halo:]
