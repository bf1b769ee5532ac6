"""Self-attention with axial RoPE and cross-attention to text, both through SDPA.

``backend`` picks SDPA's kernel for self-attention on CUDA (``model.attention_backend``):
  auto      cuDNN first on Hopper and newer (measured faster than FlashAttention-2 on an H100:
            docs/performance.md), then flash, memory-efficient, math; torch's own order elsewhere;
  default   torch's own order; flash | cudnn | efficient | math: only that kernel (an error if it
            cannot run these inputs). On CPU every choice is torch's math/flash CPU kernel.
  fa4       FlashAttention-4's CuTe kernels, not through SDPA (``megassm.ops.flash4``: Hopper and newer, in the
            tokens-first layout); off CUDA the same op runs its PyTorch reference.
Cross-attention (a padding mask over ~300 text tokens) always uses torch's own order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from megassm.config.schema import ATTENTION_BACKENDS
from megassm.models.embed import apply_rope
from megassm.ops.flash4 import fa4_attention

_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
_AUTO_HOPPER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]


def _kernels(backend: str, device: torch.device) -> list | None:
    """The SDPA kernels to allow (in priority order) for ``backend`` on ``device``; None = torch's default."""
    if device.type != "cuda" or backend == "default":
        return None
    if backend == "auto":
        return _AUTO_HOPPER if torch.cuda.get_device_capability(device)[0] >= 9 else None
    if backend not in _KERNELS:  # "fa4" is not an SDPA kernel: attend() takes it before SDPA
        raise ValueError(f"attention backend {backend!r}; valid: {', '.join(ATTENTION_BACKENDS)}")
    return [_KERNELS[backend]]


def self_attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "auto") -> Tensor:
    """Unmasked SDPA over (B, heads, L, hd) with the kernel ``backend`` picks (module docstring).

    Traced by torch.compile (``model.compile: blocks``): Dynamo keeps the ``sdpa_kernel`` priority list, so a
    compiled attention block is one graph calling the same kernel as eager (tests/gpu/test_block_cuda.py checks
    the kernel; tests/unit/models/test_attention.py the single graph)."""
    kernels = _kernels(backend, q.device)
    if kernels is None:
        return F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel(kernels, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v)


def attend(qkv: Tensor, rope: Tensor | None, q_norm: nn.Module, k_norm: nn.Module, backend: str = "auto") -> Tensor:
    """qkv (B, L, 3, heads, hd), the qkv projection's output -> (B, L, heads, hd): qk-norm, RoPE (``rope``:
    (L, hd/2) angles, or None), unmasked attention with ``backend``'s kernel. SDPA's kernels take heads before
    tokens (a transpose each way); FA4 takes the projection's own layout."""
    if backend == "fa4":
        q, k, v = qkv.unbind(2)  # each (B, L, heads, hd)
        q, k = q_norm(q), k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope, tokens_first=True), apply_rope(k, rope, tokens_first=True)
        return fa4_attention(q, k, v)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, L, hd)
    q, k = q_norm(q), k_norm(k)
    if rope is not None:
        q, k = apply_rope(q, rope), apply_rope(k, rope)
    return self_attention(q, k, v, backend).transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, qk_norm: bool = True, backend: str = "auto"):
        super().__init__()
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"SelfAttention: backend {backend!r}; valid: {', '.join(ATTENTION_BACKENDS)}")
        self.backend = backend
        if d_model % num_heads:
            raise ValueError(f"SelfAttention: d_model={d_model} not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(d_model, d_model)

    def mix(self, x: Tensor, grid, scan_order: str | None = None) -> Tensor:
        """x: (B, L, d) in canonical order over ``grid`` (a TokenGrid: its RoPE angles); no scan order."""
        return self(x, grid.rope())

    def forward(self, x: Tensor, rope: Tensor | None = None) -> Tensor:
        """x: (B, L, d); rope: (L, head_dim/2) angles for the tokens' positions."""
        B, L, _ = x.shape
        qkv = self.qkv(x).view(B, L, 3, -1, self.head_dim)  # (B, L, 3, heads, hd); heads may be a TP shard
        out = attend(qkv, rope, self.q_norm, self.k_norm, self.backend)  # (B, L, heads, hd)
        return self.proj(out.reshape(B, L, -1))


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
