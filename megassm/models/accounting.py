"""Analytic parameters, FLOPs and activation memory of an HTH config.

FLOPs count multiply-adds as 2 and only matmul-like work (linear layers, convolutions, the SSD
scan's contractions, attention scores and values); element-wise work is left out, as MFU
conventions do. A training step costs 3x the forward (backward = 2x forward).

Each kind of token mixer counts itself (``megassm.models.mixers``: ``params``, ``flops``,
``activation_bytes`` of its ``MixerSpec``); this file adds the parts every block and the model share.
"""

from __future__ import annotations

import math

from megassm.config.schema import ModelConfig
from megassm.models.hydra import HydraDims
from megassm.models.mixers import mixer_for_symbol, mixer_kinds

__all__ = ["HydraDims", "activation_bytes_per_token", "block_flops_per_token", "forward_flops",
           "mixer_flops_per_token", "param_counts", "summary", "train_flops"]


def _linear(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


def param_counts(m: ModelConfig) -> dict[str, int]:
    """Exact parameter count per component of ``HTHModel(m)``; the mixers as ``{kind}_mixers`` for every
    registered kind (``megassm.models.mixers``)."""
    d = m.d_model
    hidden = int(d * m.mlp_ratio)
    head_dim = d // m.num_heads
    qk = 2 * head_dim if m.qk_norm else 0
    cross = _linear(d, d) + _linear(d, 2 * d) + qk + _linear(d, d) + 2 * d  # + norm2 affine
    ffn = _linear(d, hidden) + _linear(hidden, d)
    mixers = {f"{spec.name}_mixers": 0 for spec in mixer_kinds()}
    for s in m.pattern:
        spec = mixer_for_symbol(s)
        mixers[f"{spec.name}_mixers"] += spec.params(m)
    out = {
        "patch_embed": _linear(m.in_channels * math.prod(m.patch_size), d),
        "timestep": _linear(256, d) + _linear(d, d) + _linear(d, 6 * d),
        "text": _linear(m.text_dim, d) + _linear(d, d) + m.max_text_len * m.text_dim,
        **mixers,
        "cross_attention": len(m.pattern) * cross,
        "ffn": len(m.pattern) * ffn,
        "modulation_tables": len(m.pattern) * 6 * d,
        "final_layer": 2 * d + _linear(d, m.in_channels * math.prod(m.patch_size)),
    }
    out["total"] = sum(out.values())
    return out


def mixer_flops_per_token(m: ModelConfig, symbol: str, seq_len: int) -> int:
    """Forward FLOPs per token of one block's token mixer."""
    return mixer_for_symbol(symbol).flops(m, seq_len)


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
      the mixer     its kind's ``activation_bytes`` (megassm/models/mixers/)
    plus fp32 statistics (norm rstd, attention log-sum-exp), a few hundred bytes.
    """
    d = m.d_model
    hidden = int(d * m.mlp_ratio)
    heads = m.num_heads
    common = (12 if m.fuse_elementwise else 14) * d + 2 * hidden
    fp32_extra = 4 * (2 * 3 + 2 * heads + 2 * heads)  # LayerNorm stats, cross-attn q-norm rstd + lse
    return common * bytes_per_el + fp32_extra + mixer_for_symbol(symbol).activation_bytes(m, bytes_per_el)


def summary(m: ModelConfig, seq_len: int) -> dict:
    p = param_counts(m)
    return {
        "params": p,
        "forward_flops_per_token": forward_flops(m, seq_len) / seq_len,
        "train_flops_per_token": train_flops(m, seq_len) / seq_len,
        "per_block_flops_per_token": {s: block_flops_per_token(m, s, seq_len) for s in sorted(set(m.pattern))},
    }
