"""Analytic parameters, FLOPs and activation memory of an HTH config.

FLOPs count multiply-adds as 2 and only matmul-like work (linear layers, convolutions, the SSD
scan's contractions, attention scores and values); element-wise work is left out, as MFU
conventions do. A training step costs 3x the forward (backward = 2x forward).

The SSD scan is counted as mamba-ssm's chunked kernel computes it, per direction and token:
    C.B^T within the chunk      2 * chunk * d_state * ngroups
    (C.B^T * decay) @ x         2 * chunk * headdim * nheads
    chunk states B^T x          2 * d_state * headdim * nheads
    state -> output C.h         2 * d_state * headdim * nheads
(lower-triangular halves are counted whole, as the kernels compute whole tiles).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megassm.config.schema import ModelConfig


@dataclass
class HydraDims:
    d_inner: int
    nheads: int
    d_in_proj: int
    conv_dim: int

    @classmethod
    def of(cls, m: ModelConfig) -> HydraDims:
        d_inner = m.expand * m.d_model
        nheads = d_inner // m.headdim
        d_bc = 2 * m.ngroups * m.d_state
        return cls(d_inner, nheads, 2 * d_inner + 2 * d_bc + 2 * nheads, d_inner + 2 * d_bc)


def _linear(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


def param_counts(m: ModelConfig) -> dict[str, int]:
    """Exact parameter count per component of ``HTHModel(m)``."""
    d = m.d_model
    hd = HydraDims.of(m)
    hidden = int(d * m.mlp_ratio)
    head_dim = d // m.num_heads
    qk = 2 * head_dim if m.qk_norm else 0
    hydra = (_linear(d, hd.d_in_proj, False) + hd.conv_dim * m.d_conv + hd.conv_dim + 3 * hd.nheads
             + _linear(hd.d_inner, hd.nheads, False) + hd.d_inner + _linear(hd.d_inner, d, False))
    attn = _linear(d, 3 * d) + qk + _linear(d, d)
    cross = _linear(d, d) + _linear(d, 2 * d) + qk + _linear(d, d) + 2 * d  # + norm2 affine
    ffn = _linear(d, hidden) + _linear(hidden, d)
    per_block_common = cross + ffn + 6 * d
    n_hydra = sum(c != "A" for c in m.pattern)
    n_attn = len(m.pattern) - n_hydra
    out = {
        "patch_embed": _linear(m.in_channels * math.prod(m.patch_size), d),
        "timestep": _linear(256, d) + _linear(d, d) + _linear(d, 6 * d),
        "text": _linear(m.text_dim, d) + _linear(d, d) + m.max_text_len * m.text_dim,
        "hydra_mixers": n_hydra * hydra,
        "attention_mixers": n_attn * attn,
        "cross_attention": len(m.pattern) * cross,
        "ffn": len(m.pattern) * ffn,
        "modulation_tables": len(m.pattern) * 6 * d,
        "final_layer": 2 * d + _linear(d, m.in_channels * math.prod(m.patch_size)),
    }
    out["total"] = sum(out.values())
    assert per_block_common  # keeps the per-block breakdown explicit for readers
    return out


def mixer_flops_per_token(m: ModelConfig, symbol: str, seq_len: int) -> int:
    """Forward FLOPs per token of one block's token mixer."""
    d = m.d_model
    if symbol == "A":
        return 2 * d * 3 * d + 4 * seq_len * d + 2 * d * d
    hd = HydraDims.of(m)
    cs = min(m.chunk_size, seq_len)
    scan_one_dir = 2 * cs * m.d_state * m.ngroups + hd.nheads * (2 * cs * m.headdim + 4 * m.d_state * m.headdim)
    return (2 * d * hd.d_in_proj + 2 * hd.conv_dim * m.d_conv + 2 * scan_one_dir
            + 2 * hd.d_inner * hd.nheads + 2 * hd.d_inner * d)


def block_flops_per_token(m: ModelConfig, symbol: str, seq_len: int, text_len: int | None = None) -> int:
    d = m.d_model
    lt = m.max_text_len if text_len is None else text_len
    hidden = int(d * m.mlp_ratio)
    cross = 2 * d * d + (2 * lt * d * 2 * d) / seq_len + 4 * lt * d + 2 * d * d
    return int(mixer_flops_per_token(m, symbol, seq_len) + cross + 4 * d * hidden)


def forward_flops(m: ModelConfig, seq_len: int, batch: int = 1, text_len: int | None = None) -> int:
    """Forward FLOPs of the whole model for ``batch`` samples of ``seq_len`` tokens."""
    d = m.d_model
    patch = m.in_channels * math.prod(m.patch_size)
    per_token = 2 * patch * d + 2 * d * patch + sum(block_flops_per_token(m, s, seq_len, text_len)
                                                    for s in m.pattern)
    lt = m.max_text_len if text_len is None else text_len
    per_sample = 2 * lt * (m.text_dim * d + d * d) + 2 * (256 * d + d * d + d * 6 * d)
    return int(batch * (seq_len * per_token + per_sample))


def train_flops(m: ModelConfig, seq_len: int, batch: int = 1, recompute: bool = False) -> int:
    """FLOPs of forward + backward (x3; x4 with full activation recomputation, for hardware FLOPs)."""
    return (4 if recompute else 3) * forward_flops(m, seq_len, batch)


def activation_bytes_per_token(m: ModelConfig, symbol: str, bytes_per_el: int = 2) -> int:
    """Activation memory one block keeps for backward, per token (no recomputation), block input included.

    Tensor by tensor what autograd keeps (checked against torch.cuda.memory_allocated on an H100 at
    hth-5b width: within 1% for 'h' and 'A', benchmarks/results/layers_h100.json, memory_plan rows):
      every block   input, LayerNorm outputs and modulated inputs (x3 norms), the mixer output under
                    its gate, cross-attention (input, q, normed q, SDPA out, head-merge copy), FFN hidden
                    before/after GELU and its output under the gate: 14 d + 2 hidden; 12 d + 2 hidden
                    with ``fuse_elementwise`` (megassm.ops.modulate keeps no LayerNorm outputs)
      'A'           qkv (3d), roped q and k (2d), SDPA output (d), head-merge copy (d): 7 d
      Hydra (fused path, megassm.ops.hydra_fused, what CUDA runs): in_proj output, x in both scan
                    orders, B/C, dt, the scan output, diag, the normed output: d_in_proj + 2 d_inner
                    + 2 d_bc + 2 h + 2 d_inner + h + d_inner
    plus fp32 statistics (norm rstd, attention log-sum-exp), a few hundred bytes.
    """
    d = m.d_model
    hidden = int(d * m.mlp_ratio)
    heads = m.num_heads
    common = (12 if m.fuse_elementwise else 14) * d + 2 * hidden
    fp32_extra = 4 * (2 * 3 + 2 * heads + 2 * heads)  # LayerNorm stats, cross-attn q-norm rstd + lse
    if symbol == "A":
        mixer = 7 * d
        fp32_extra += 4 * (2 * heads + heads)  # q/k-norm rstd, lse
    else:
        hd = HydraDims.of(m)
        d_bc = 2 * m.ngroups * m.d_state
        mixer = hd.d_in_proj + 2 * hd.d_inner + 2 * d_bc + 2 * hd.nheads + 2 * hd.d_inner + hd.nheads + hd.d_inner
        fp32_extra += 4  # gated-norm rstd
    return (common + mixer) * bytes_per_el + fp32_extra


def summary(m: ModelConfig, seq_len: int) -> dict:
    p = param_counts(m)
    return {
        "params": p,
        "forward_flops_per_token": forward_flops(m, seq_len) / seq_len,
        "train_flops_per_token": train_flops(m, seq_len) / seq_len,
        "per_block_flops_per_token": {s: block_flops_per_token(m, s, seq_len) for s in sorted(set(m.pattern))},
    }
