"""Self-attention with axial RoPE (``megassm.models.attention.SelfAttention``) as a kind of mixer: symbol 'A'.

Attention is permutation-equivariant, so it has no scan order: it sees the canonical token order and
the RoPE angles of the token grid. The parallel twin is ``megassm.parallel.attention``.
"""

from __future__ import annotations

from megassm.models.attention import SelfAttention
from megassm.models.mixers.spec import CollectiveTuple, DivisibilityCheck, MixerSpec, ShardSpec, register_mixer


def build(m) -> SelfAttention:
    return SelfAttention(m.d_model, m.num_heads, m.qk_norm, m.attention_backend)


def params(m) -> int:
    d = m.d_model
    qk = 2 * (d // m.num_heads) if m.qk_norm else 0
    return (d * 3 * d + 3 * d) + qk + (d * d + d)


def flops(m, seq_len: int) -> int:
    """qkv and output projections, scores and values over ``seq_len`` keys."""
    d = m.d_model
    return 2 * d * 3 * d + 4 * seq_len * d + 2 * d * d


def activation_bytes(m, bytes_per_el: int) -> int:
    """qkv (3d), roped q and k (2d), SDPA output (d), head-merge copy (d): 7 d; fp32 q/k-norm rstd and lse."""
    return 7 * m.d_model * bytes_per_el + 4 * (2 * m.num_heads + m.num_heads)


def shard_specs(m, tp_size: int) -> dict[str, ShardSpec]:
    """qkv rows by head (each of q, k, v split), proj's input columns; q_norm / k_norm replicated."""
    d = m.d_model
    return {
        "qkv.weight": ShardSpec(0, ((d, True),) * 3), "qkv.bias": ShardSpec(0, ((d, True),) * 3),
        "proj.weight": ShardSpec(1, ((d, True),)),
    }


def divisibility(m, tp: int) -> list[DivisibilityCheck]:
    # tp must divide num_heads in every block anyway (cross-attention); CP splits each TP rank's heads
    return [("cp", "attention heads per TP rank (num_heads/tp)", m.num_heads // tp)]


def config_errors(m) -> list[str]:
    head_dim = m.d_model // m.num_heads
    return [f"attention head dim d_model/num_heads={head_dim} must be even for RoPE"] if head_dim % 2 else []


def collectives(m, B: int, L: int, tp: int, cp: int, sp: bool, act_bytes: int,
                param_bytes: int, cp_impl: str = "ulysses") -> list[CollectiveTuple]:
    """Under TP the qk-norm weights' and (SP) proj bias's gradients; Ulysses' all-to-alls of qkv and the output
    (whatever ``cp_impl`` says: it chooses how Hydra blocks run)."""
    d, Lc = m.d_model, L // cp
    out: list[CollectiveTuple] = []
    if tp > 1 and m.qk_norm:
        hd = d // m.num_heads
        out += [("all_reduce", "tp", hd * param_bytes, "mixer.q_norm.weight grad"),
                ("all_reduce", "tp", hd * param_bytes, "mixer.k_norm.weight grad")]
    if tp > 1 and sp:
        out.append(("all_reduce", "tp", d * param_bytes, "mixer.proj.bias grad"))
    if cp > 1:
        for what, width in (("qkv", 3 * d // tp), ("attention output", d // tp)):
            out.append(("all_to_all", "cp", B * Lc * width * act_bytes, f"{what}, fwd"))
            out.append(("all_to_all", "cp", B * Lc * width * act_bytes, f"{what} grad, bwd"))
    return out


ATTENTION = register_mixer(MixerSpec(
    name="attention", label="self-attention mixers",
    symbols={"A": None}, descriptions={"A": "self-attention (axial RoPE)"},
    build=build, parallel="megassm.parallel.attention:parallelize_self_attention",
    params=params, flops=flops, activation_bytes=activation_bytes, shard_specs=shard_specs,
    divisibility=divisibility, config_errors=config_errors, collectives=collectives,
    lora_targets=("qkv", "proj"),
))
