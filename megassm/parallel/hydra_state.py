"""State-passing context parallelism for one Hydra block: traffic per block that does not grow with L.

Each CP rank keeps its contiguous slice of the tokens (B, Lc, ·) and all of its TP rank's heads; the block's
scan order must keep every rank's slice contiguous in that order (``models.scan.keeps_slices_contiguous``:
'h' always, 'v' when the cuts fall between frames, 't' only on images). Per block, for CP rank r:

    in_proj -> z, x, B/C, dt on the slice      (slice permuted into scan order locally: 'v' on whole frames)
    conv halo       (d_conv-1)/2 tokens of [x | B/C] from r-1 and from r+1   (point-to-point, zeros at the ends)
    slice scan      conv + SiLU, SSD both directions from a zero state -> outputs and a summary per head
    all-gather      every rank's summary [final state | total log-decay] (cp x 2B x h x (p n + 1))
    correction      + C_t . h0 exp(cumsum a): h0 the prefix over ranks < r (forward), suffix over > r (backward)
    shift rows      the last forward row to r+1, the first token's backward row to r-1 (point-to-point)
    combine, fc_D   partial products reduce-scattered over TP only (every rank holds all tokens' channels of
                    its heads on its slice); gated norm, out_proj as under Ulysses

The maths is ``megassm.ops.hydra_state_passing`` (reference parts; the scan goes through ``ssd_scan``'s
dispatcher, mamba-ssm's kernel on CUDA). The fused Hydra kernels are not used on this path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megassm.models.hydra import decay_rates
from megassm.models.scan import apply_scan
from megassm.ops.hydra_mix import combine
from megassm.ops.hydra_state_passing import correct_scan, edge_rows, halo_rows, incoming_state, slice_scan
from megassm.parallel.comm import exchange_with_neighbours, gather_along, reduce_scatter_along


def state_passing_mix(layer, x: Tensor, bc: Tensor, dt: Tensor, grid, scan_order: str) -> Tensor:
    """The mixer between in_proj and the gated norm on this rank's slice, canonical order.

    ``layer``: a ``ParallelHydra`` (its parameters, already TP-local); x (B, Lc, h*p), bc (B, Lc, 4*g*n),
    dt (B, Lc, 2h) for this TP rank's h heads -> y (B, Lc, h*p). Lc may differ between ranks (identity
    scan orders only; the model cuts equal slices).
    """
    ctx, p, n = layer.ctx, layer.headdim, layer.d_state
    h = layer.h_local
    perm = grid.slice_perm(scan_order, ctx.cp, ctx.cp_rank)  # None: the slice is in scan order already
    if perm is not None:
        x, bc, dt = (apply_scan(t, perm[0], perm[1]) for t in (x, bc, dt))
    xbc = torch.cat([x, bc], dim=-1)  # (B, Lc, conv_dim)
    from_prev, from_next = exchange_with_neighbours(*halo_rows(xbc, layer.d_conv // 2), ctx.cp_group)
    s = slice_scan(torch.cat([from_prev, xbc, from_next], dim=1), dt, layer.conv1d.weight, layer.conv1d.bias,
                   layer.dt_bias, decay_rates(layer.A_log), headdim=p, d_state=n, chunk_size=layer.chunk_size,
                   scan_impl=layer.ssd_impl)
    summaries = gather_along(s.summary.unsqueeze(0), ctx.cp_group, dim=0)  # (cp, 2B, h, p*n + 1)
    scan = correct_scan(s, incoming_state(summaries, ctx.cp_rank, n)).to(x.dtype)  # (2B, Lc, h*p)
    edge_prev, edge_next = exchange_with_neighbours(*edge_rows(scan), ctx.cp_group)
    partial = torch.nn.functional.linear(s.x, layer.fc_D.weight.to(s.x.dtype))  # (B, Lc, nheads)
    if ctx.tp > 1:  # fc_D sums over every channel of a token: this TP rank holds h*p of them
        partial = reduce_scatter_along(partial, ctx.tp_group, dim=-1)  # (B, Lc, h)
    diag = partial + layer.D.to(partial.dtype)
    y = combine(scan, s.x, diag, shift_in=torch.cat([edge_prev, edge_next], dim=0))  # (B, Lc, h*p)
    assert y.shape[-1] == h * p
    return y if perm is None else apply_scan(y, perm[1], perm[0])
