"""Self-attention under TP (+SP) and Ulysses CP; cross-attention and the FFN under TP (+SP).

Self-attention: qkv column-parallel (this TP rank's heads) -> all-to-all over CP to the full
sequence of hc = heads/(tp*cp) heads -> qk-norm, RoPE for the full canonical-order sequence, attention
-> all-to-all back -> proj row-parallel. Attention is permutation-equivariant, so no scan order.

Cross-attention keeps the model's own forward behind the SP all-gather (q column-parallel on the
residual stream, kv column-parallel on the replicated text, proj row-parallel); under CP each
rank's local queries attend to the whole (replicated) text, with no communication.
"""

from __future__ import annotations

from torch import Tensor, nn

from megassm.models.attention import CrossAttention, SelfAttention, attend
from megassm.models.block import FeedForward
from megassm.parallel.context import heads_to_seq, seq_to_heads
from megassm.parallel.tensor import ColumnParallelLinear, ParallelContext, RowParallelLinear, enter_tp


def parallelize_self_attention(attn: SelfAttention, ctx: ParallelContext, model_cfg=None) -> ParallelSelfAttention:
    """The attention mixer kind's parallel adapter (``megassm.models.mixers.attention``)."""
    return ParallelSelfAttention(attn, ctx)


class ParallelSelfAttention(nn.Module):
    """Takes over an (already TP-sharded) SelfAttention's parameters; same parameter names."""

    def __init__(self, attn: SelfAttention, ctx: ParallelContext):
        super().__init__()
        self.ctx = ctx
        self.num_heads, self.head_dim, self.backend = attn.num_heads, attn.head_dim, attn.backend
        self.qkv = ColumnParallelLinear.from_linear(attn.qkv, ctx)
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.proj = RowParallelLinear.from_linear(attn.proj, ctx)

    def mix(self, x: Tensor, grid, scan_order=None) -> Tensor:
        return self(x, grid)

    def forward(self, x: Tensor, grid, scan_order=None) -> Tensor:
        """x: (B, L/cp, d), or (B, L/(cp*tp), d) under SP, canonical order -> same shape."""
        qkv = self.qkv(x)  # (B, L/cp, 3*h*hd), h = this TP rank's heads
        B, Lc = qkv.shape[:2]
        qkv = qkv.view(B, Lc, 3, -1, self.head_dim)  # (B, L/cp, 3, h, hd)
        if self.ctx.cp > 1:
            qkv = seq_to_heads(qkv, self.ctx.cp_group, head_dim=3)  # (B, L, 3, h/cp, hd)
        # RoPE for the whole canonical sequence, qk-norm, the backend's kernel (as SelfAttention)
        out = attend(qkv, grid.rope(), self.q_norm, self.k_norm, self.backend)  # (B, L, hc, hd)
        if self.ctx.cp > 1:
            out = heads_to_seq(out, self.ctx.cp_group, head_dim=2)  # (B, L/cp, h, hd)
        return self.proj(out.reshape(B, Lc, -1))


class ParallelCrossAttention(CrossAttention):
    """CrossAttention's own forward on the gathered queries (its ``.view(B, L, ...)`` needs the
    tokens it projects): q keeps its local heads' rows, kv takes the replicated text, proj is
    row-parallel. Built from a CrossAttention whose parameters are already TP-sharded; same names."""

    def __init__(self, attn: CrossAttention, ctx: ParallelContext):
        nn.Module.__init__(self)  # not CrossAttention.__init__: the layers are attn's, not new ones
        self.ctx = ctx
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.q, self.q_norm, self.k_norm = attn.q, attn.q_norm, attn.k_norm
        self.kv = ColumnParallelLinear.from_linear(attn.kv, ctx, sequence_input=False)
        self.proj = RowParallelLinear.from_linear(attn.proj, ctx)
        self.train(attn.training)

    def forward(self, x: Tensor, text: Tensor, text_mask=None) -> Tensor:
        """x: (B, L/cp, d), or (B, L/(cp*tp), d) under SP; text (B, Lt, d) replicated -> x's shape."""
        return super().forward(enter_tp(x, self.ctx), text, text_mask)


def parallelize_cross_attention(attn: CrossAttention, ctx: ParallelContext) -> ParallelCrossAttention:
    """A ParallelCrossAttention owning ``attn``'s (already TP-sharded) parameters; same names."""
    return ParallelCrossAttention(attn, ctx)


def parallelize_feed_forward(mlp: FeedForward, ctx: ParallelContext) -> FeedForward:
    """In place: fc1 column-parallel (hidden split), fc2 row-parallel."""
    mlp.fc1 = ColumnParallelLinear.from_linear(mlp.fc1, ctx)
    mlp.fc2 = RowParallelLinear.from_linear(mlp.fc2, ctx)
    return mlp
