"""Self-attention with axial RoPE and cross-attention to text, both through SDPA."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from megassm.models.embed import apply_rope


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"SelfAttention: d_model={d_model} not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, rope: Tensor | None = None) -> Tensor:
        """x: (B, L, d); rope: (L, head_dim/2) angles for the tokens' positions."""
        B, L, _ = x.shape
        qkv = self.qkv(x).view(B, L, 3, -1, self.head_dim)  # (B, L, 3, heads, hd); heads may be a TP shard
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, L, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, hd)
        return self.proj(out.transpose(1, 2).reshape(B, L, -1))


class CrossAttention(nn.Module):
    """Image/video tokens attend to text tokens; padded text positions are masked out."""

    def __init__(self, d_model: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"CrossAttention: d_model={d_model} not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor | None = None) -> Tensor:
        """x: (B, L, d); text: (B, Lt, d); text_mask: (B, Lt) bool, True = valid token."""
        B, L, _ = x.shape
        Lt = text.shape[1]
        q = self.q_norm(self.q(x).view(B, L, -1, self.head_dim).transpose(1, 2))  # (B, heads, L, hd)
        kv = self.kv(text).view(B, Lt, 2, -1, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4)  # (B, heads, Lt, hd)
        k = self.k_norm(k)
        mask = None
        if text_mask is not None:
            # a sample with no valid text token (dropped caption) attends to all (zero) embeddings
            keep = text_mask | ~text_mask.any(dim=1, keepdim=True)
            mask = keep[:, None, None, :]  # (B, 1, 1, Lt)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, L, -1))
