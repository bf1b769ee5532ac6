"""FlashAttention-4 (``flash-attn-4``, CuTe DSL) for self-attention: ``model.attention_backend: fa4``.

Two custom ops, so that a compiled attention block stays one graph (Dynamo does not trace into the CuTe DSL, and
FA4's own ``FlashAttnFunc`` is an autograd.Function it would try to):

    megassm::fa4_fwd(q, k, v)                  -> (out, lse)     q, k, v, out: (B, L, heads, hd); lse (B, heads, L) fp32
    megassm::fa4_bwd(dout, q, k, v, out, lse)  -> (dq, dk, dv)

On CUDA they call FA4's forward and backward (``flash_attn.cute.interface``, pinned: its entry points are not a
public API yet); anywhere else they run ``reference``, the same maths in PyTorch (softmax in fp32), which is also
the oracle the CUDA test compares the kernels with (tests/gpu/test_block_cuda.py). Unmasked, non-causal, softmax
scale 1/sqrt(hd): what SDPA computes for megassm's self-attention.

The layout is FA4's, tokens before heads: the qkv projection's output is already in it, and the output goes into
the out projection without the transpose SDPA's (B, heads, L, hd) needs.
"""

from __future__ import annotations

import importlib.util
import math
from functools import cache

import torch
from torch import Tensor

FA4_PIN = "flash-attn-4==4.0.0b40 nvidia-cutlass-dsl[cu13]==4.8.1"


@cache
def fa4_available() -> bool:
    """flash-attn-4's CuTe interface is importable (not whether this GPU runs it: ``fa4_unsupported``)."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        from flash_attn.cute import interface  # noqa: F401
    except Exception:  # a broken or partial install (the CuTe DSL's native libraries) is "not available"
        return False
    return True


def fa4_unsupported(device: torch.device) -> str | None:
    """Why FA4 cannot run self-attention on ``device`` (None: it can). FA4 has Hopper (sm90) and Blackwell
    kernels, forward and backward; it is not installed on CPU machines, where ``reference`` runs instead."""
    if device.type != "cuda":
        return None
    if not fa4_available():
        return f"model.attention_backend=fa4 needs flash-attn-4's CuTe kernels: pip install {FA4_PIN}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return f"model.attention_backend=fa4 needs a Hopper or newer GPU (sm90+); this one is sm{major}{minor}"
    return None


def reference(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(out, lse) of softmax(q k^T / sqrt(hd)) v in PyTorch; q, k, v (B, L, heads, hd); softmax in fp32 (fp64 for
    fp64 inputs); lse in that precision (fp32 for FA4's bf16 / fp16)."""
    scale, acc = 1.0 / math.sqrt(q.shape[-1]), torch.promote_types(q.dtype, torch.float32)
    s = torch.einsum("blhd,bmhd->bhlm", q.to(acc), k.to(acc)) * scale
    lse = torch.logsumexp(s, dim=-1)  # (B, heads, L)
    p = torch.exp(s - lse[..., None])
    out = torch.einsum("bhlm,bmhd->blhd", p, v.to(acc))
    return out.to(q.dtype).contiguous(), lse.contiguous()


def reference_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, ...]:
    """(dq, dk, dv) of ``reference`` from the saved (out, lse), as the kernels do it: P recomputed from lse,
    dS = P * (dO V^T - rowsum(dO * O))."""
    dtype, scale, acc = q.dtype, 1.0 / math.sqrt(q.shape[-1]), torch.promote_types(q.dtype, torch.float32)
    q, k, v, out, dout = (t.to(acc) for t in (q, k, v, out, dout))
    p = torch.exp(torch.einsum("blhd,bmhd->bhlm", q, k) * scale - lse.to(acc)[..., None])  # (B, h, L, L)
    dv = torch.einsum("bhlm,blhd->bmhd", p, dout)
    dp = torch.einsum("blhd,bmhd->bhlm", dout, v)
    ds = p * (dp - (dout * out).sum(-1).transpose(1, 2)[..., None])
    dq = torch.einsum("bhlm,bmhd->blhd", ds, k) * scale
    dk = torch.einsum("bhlm,blhd->bmhd", ds, q) * scale
    return tuple(t.to(dtype).contiguous() for t in (dq, dk, dv))


@torch.library.custom_op("megassm::fa4_fwd", mutates_args=())
def fa4_fwd(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    if q.is_cuda:
        from flash_attn.cute.interface import _flash_attn_fwd

        out, lse = _flash_attn_fwd(q, k, v, return_lse=True)[:2]
        return out.contiguous(), lse.contiguous()  # no-ops: FA4 allocates both contiguous (the fakes say so)
    return reference(q, k, v)


@fa4_fwd.register_fake
def _(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    B, L, H, _ = q.shape
    return q.new_empty(B, L, H, v.shape[-1]), q.new_empty(B, H, L, dtype=torch.promote_types(q.dtype, torch.float32))


@torch.library.custom_op("megassm::fa4_bwd", mutates_args=())
def fa4_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if q.is_cuda:
        from flash_attn.cute.interface import _flash_attn_bwd

        dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse)[:3]
        return dq.contiguous(), dk.contiguous(), dv.contiguous()
    return tuple(reference_backward(dout, q, k, v, out, lse))


@fa4_bwd.register_fake
def _(dout, q, k, v, out, lse) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous


def _setup_context(ctx, inputs, output) -> None:
    q, k, v = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)


def _backward(ctx, dout: Tensor, dlse: Tensor | None):  # lse is an internal output: its gradient is never used
    q, k, v, out, lse = ctx.saved_tensors
    return fa4_bwd(dout.contiguous(), q, k, v, out, lse)


fa4_fwd.register_autograd(_backward, setup_context=_setup_context)


def fa4_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Unmasked self-attention over (B, L, heads, hd) tensors -> (B, L, heads, hd), FA4's kernels on CUDA."""
    return fa4_fwd(q, k, v)[0]
