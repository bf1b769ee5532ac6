"""Hydra under TP (+SP) and Ulysses CP, computing exactly ``megassm.models.hydra.Hydra``.

Per block, for TP rank t of T and CP rank c of C (h = nheads/T local heads, hc = h/C):

    u (B, L/C[/T], d) --enter_tp--> (B, L/C, d) --in_proj (column-parallel)--> z, x, B/C, dt
    x, dt:  all-to-all over CP -> (B, L, hc heads)       B/C: all-gather over CP -> (B, L, all groups)
    scan permutation -> local_mix: depthwise conv (this rank's channels), SSD both directions (hc heads),
              and fc_D's partial products over this rank's channels (B, L, nheads)
    (under parallel.cp_impl state_passing / auto, a block whose scan order keeps each CP rank's slice
    contiguous runs ``megassm.parallel.hydra_state`` instead: no all-to-all, states passed between ranks)
    diagonal  fc_D(x) + D sums over *all* channels: the partial products are reduce-scattered over
              TP x CP to this rank's hc heads
    combine   y = shift/flip/sum of the scan + x * diag
    inverse permutation -> all-to-all back -> (B, L/C, h*p)
    gated RMSNorm over all d_inner: sum of squares all-reduced over TP
    out_proj (row-parallel) --exit_tp--> (B, L/C[/T], d)

local_mix / combine / gated norm are ``megassm.ops.hydra_mix``'s parts, the functions the single-process
Hydra runs; with the fused path (``fused``, as Hydra decides it) their Triton kernels, cut at the same
two reductions. z never leaves its rank (the norm is token-local). B/C with ngroups=1 are replicated
over TP and shared by all heads: ``parallelize_hth`` sums their rows' gradients over TP (the shard plan's
replicated rows, ``sharding.replicated_rows``).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from megassm.models.hydra import Hydra, decay_rates
from megassm.models.mixers.hydra import HYDRA, bc_sharded
from megassm.models.scan import apply_scan
from megassm.ops.hydra_mix import combine, default_fused_scan_impl, local_mix, use_fused_path
from megassm.parallel.comm import reduce_scatter_along
from megassm.parallel.comm_model import block_cp_impl
from megassm.parallel.context import gather_seq, heads_to_seq, seq_to_heads
from megassm.parallel.hydra_state import state_passing_mix
from megassm.parallel.tensor import ColumnParallelLinear, ParallelContext, RowParallelLinear, gated_rms_norm_tp

log = logging.getLogger(__name__)
_LOGGED: set = set()  # (grid, scan order, cp_impl) already reported
_SYMBOL_OF = {order: sym for sym, order in HYDRA.symbols.items()}  # scan order -> pattern symbol


def parallelize_hydra(hydra: Hydra, ctx: ParallelContext, model_cfg) -> ParallelHydra:
    """The Hydra mixer kind's parallel adapter (``megassm.models.mixers.hydra``)."""
    twin = ParallelHydra(hydra, ctx, bc_sharded(model_cfg, ctx.tp))
    twin.model_cfg = model_cfg
    return twin


class ParallelHydra(nn.Module):
    """Takes over an (already TP-sharded) Hydra's parameters; same parameter names."""

    def __init__(self, hydra: Hydra, ctx: ParallelContext, bc_sharded: bool):
        super().__init__()
        self.ctx = ctx
        for k in ("d_model", "d_state", "d_conv", "headdim", "ngroups", "d_inner", "nheads", "chunk_size",
                  "ssd_impl", "fused", "fused_scan_impl"):
            setattr(self, k, getattr(hydra, k))
        self.path_taken: str | None = None  # "fused", "reference" or "state_passing" after a forward
        self.model_cfg = None  # the ModelConfig (parallelize_hydra sets it): the comm model's choice of cp_impl
        self._cp_impls: dict = {}  # (grid, scan order) -> "ulysses" | "state_passing"
        self.in_proj = ColumnParallelLinear.from_linear(hydra.in_proj, ctx)
        self.conv1d = hydra.conv1d
        self.dt_bias, self.A_log, self.D = hydra.dt_bias, hydra.A_log, hydra.D
        self.fc_D, self.norm = hydra.fc_D, hydra.norm
        self.out_proj = RowParallelLinear.from_linear(hydra.out_proj, ctx)
        tp, cp = ctx.tp, ctx.cp
        self.h_local = self.nheads // tp  # heads of this TP rank
        self.g_local = self.ngroups // tp if bc_sharded else self.ngroups
        self.h_cp = self.h_local // cp  # heads this rank scans under CP
        self.bc_local = 4 * self.g_local * self.d_state  # [B_f | C_f | B_b | C_b] width on this TP rank
        # B/C groups covering this CP rank's heads (all of them without CP)
        per_group = self.h_local // self.g_local
        g0 = ctx.cp_rank * self.h_cp // per_group
        g1 = ((ctx.cp_rank + 1) * self.h_cp - 1) // per_group + 1
        self.groups = (g0, g1)
        n = self.d_state
        bc_idx = torch.cat([s * self.g_local * n + torch.arange(g0 * n, g1 * n) for s in range(4)])
        keep_all = g1 - g0 == self.g_local
        di_local = self.h_local * self.headdim
        x_rows = torch.arange(ctx.cp_rank * self.h_cp * self.headdim, (ctx.cp_rank + 1) * self.h_cp * self.headdim)
        conv_rows = torch.cat([x_rows, di_local + bc_idx])  # conv channels of [x (my heads) | B/C]
        # index buffers (not in the state dict) follow the model to its device; None: take everything
        self.register_buffer("_bc_idx", None if keep_all else bc_idx, persistent=False)
        self.register_buffer("_conv_rows", None if keep_all and cp == 1 else conv_rows, persistent=False)

    def _split_heads_over_cp(self, x: Tensor, bc: Tensor, dt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L/cp, ·) token slices -> full sequence: x (B, L, hc*p), bc (B, L, kept groups), dt (B, L, 2hc)."""
        B, Lc = x.shape[:2]
        g = self.ctx.cp_group
        x = seq_to_heads(x.view(B, Lc, self.h_local, self.headdim), g, head_dim=2)  # (B, L, hc, p)
        dt = seq_to_heads(dt.view(B, Lc, 2, self.h_local), g, head_dim=3)  # (B, L, 2, hc): [fwd | bwd]
        bc = gather_seq(bc, g)  # (B, L, bc_local): shared by all heads, so every rank needs it whole
        if self._bc_idx is not None:
            bc = bc.index_select(-1, self._bc_idx)
        L = x.shape[1]
        return x.reshape(B, L, self.h_cp * self.headdim), bc, dt.reshape(B, L, 2 * self.h_cp)

    def _diagonal(self, partial: Tensor) -> Tensor:
        """fc_D(x) + D for this rank's heads, from this rank's channels' partial products (B, L, nheads)
        (``local_mix``'s diag_partial) -> (B, L, hc)."""
        ctx = self.ctx
        if ctx.tp * ctx.cp > 1:
            B, L = partial.shape[:2]
            # global head blocks are ordered (tp, cp); the TP x CP group's ranks are ordered (cp, tp)
            partial = partial.view(B, L, ctx.tp, ctx.cp, self.h_cp).transpose(2, 3).reshape(B, L, self.nheads)
            partial = reduce_scatter_along(partial, ctx.tpcp_group, dim=-1)  # (B, L, hc), summed over channels
        h0 = ctx.cp_rank * self.h_cp
        return partial + self.D[h0 : h0 + self.h_cp].to(partial.dtype)

    def mix(self, u: Tensor, grid, scan_order: str) -> Tensor:
        return self(u, grid, scan_order)

    def cp_impl_for(self, grid, scan_order: str, symbol: str) -> str:
        """"ulysses" or "state_passing": how this block runs under CP on ``grid`` (``comm_model.block_cp_impl``)."""
        key = (tuple(grid.grid), scan_order)
        if key not in self._cp_impls:
            ctx = self.ctx
            impl = block_cp_impl(self.model_cfg, symbol, ctx.cp_impl, grid.grid, ctx.tp, ctx.cp, ctx.sequence_parallel)
            self._cp_impls[key] = impl
            if ctx.cp_rank == ctx.tp_rank == 0 and (key, ctx.cp_impl) not in _LOGGED:  # once per kind of block
                _LOGGED.add((key, ctx.cp_impl))
                log.info("parallel.cp_impl=%s: Hydra '%s' blocks on token grid %s over cp=%d run %s", ctx.cp_impl,
                         symbol, key[0], ctx.cp, impl)
        return self._cp_impls[key]

    def forward(self, u: Tensor, grid, scan_order: str) -> Tensor:
        """u: (B, L/cp, d), or (B, L/(cp*tp), d) under SP, canonical token order -> same shape."""
        ctx, p = self.ctx, self.headdim
        di = self.h_local * p
        z, x, bc, dt = torch.split(self.in_proj(u), [di, di, self.bc_local, 2 * self.h_local], dim=-1)
        if ctx.cp > 1 and self.cp_impl_for(grid, scan_order, _SYMBOL_OF[scan_order]) == "state_passing":
            self.path_taken = "state_passing"
            y = state_passing_mix(self, x, bc, dt, grid, scan_order)
            y = gated_rms_norm_tp(y, z, self.norm.weight, self.norm.eps, self.d_inner, ctx, self.norm.group_size)
            return self.out_proj(y)
        fused = use_fused_path(self.fused, self.ssd_impl, self.d_conv, self.norm.group_size, u.device)
        self.path_taken = "fused" if fused else "reference"
        if ctx.cp > 1:
            x, bc, dt = self._split_heads_over_cp(x, bc, dt)
        perm = grid.perm(scan_order)
        if perm is not None:  # the conv and scan run in scan order; everything else is token-local
            x, bc, dt = (apply_scan(t, perm[0], perm[1]) for t in (x, bc, dt))
        w, b = self.conv1d.weight, self.conv1d.bias
        if self._conv_rows is not None:
            w = w.index_select(0, self._conv_rows)
            b = None if b is None else b.index_select(0, self._conv_rows)
        h0 = ctx.cp_rank * self.h_cp  # this rank's heads within the TP shard: [h0, h0 + hc)
        scan_impl = self.ssd_impl
        if fused:
            scan_impl = self.fused_scan_impl or default_fused_scan_impl(self.ssd_impl, u.device)
        mix = local_mix(
            torch.cat([x, bc], dim=-1), dt, w, b, self.dt_bias[h0 : h0 + self.h_cp],
            decay_rates(self.A_log[h0 : h0 + self.h_cp]), self.fc_D.weight[:, h0 * p : (h0 + self.h_cp) * p],
            headdim=p, d_state=self.d_state, chunk_size=self.chunk_size, fused=fused, scan_impl=scan_impl,
        )
        y = combine(mix.scan, mix.x, self._diagonal(mix.diag_partial), fused=fused)  # (B, L, hc*p)
        if perm is not None:
            y = apply_scan(y, perm[1], perm[0])
        if ctx.cp > 1:
            B, L = y.shape[:2]
            y = heads_to_seq(y.view(B, L, self.h_cp, p), ctx.cp_group, head_dim=2).reshape(B, -1, di)
        y = gated_rms_norm_tp(y, z, self.norm.weight, self.norm.eps, self.d_inner, ctx, self.norm.group_size,
                              fused=fused)
        return self.out_proj(y)
