"""Analytic communication volume of HTH under TP, TP+SP and CP (Ulysses or, for Hydra blocks, state
passing) (docs/parallelism.md §4).

``block_collectives`` lists every collective one block issues in one training step (forward +
backward, no activation recomputation; with recomputation the forward ones happen twice), with
its payload S in bytes:

    all_reduce      S = the tensor          wire bytes per rank (ring) 2 (n-1)/n S
    all_gather      S = the gathered output                               (n-1)/n S
    reduce_scatter  S = the full input                                    (n-1)/n S
    all_to_all      S = the input (= output)                              (n-1)/n S
    send            S = one point-to-point message                        S

Groups: "tp" (the TP ranks), "cp" (the CP ranks), "tpcp" (all TP x CP ranks of a sample).
Tests count the real collectives and compare them with this model, entry by entry. State passing's
neighbour messages are listed for a rank with two neighbours (what = "... to rank r-1 / r+1"); the first
and last CP ranks send only the half towards their one neighbour.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from megassm.models.mixers import mixer_for_symbol

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send")


@dataclass(frozen=True)
class Collective:
    op: str  # one of OPS
    group: str  # "tp" | "cp" | "tpcp"
    nbytes: int  # payload S
    what: str  # which tensor, and forward / backward


def block_collectives(
    model_cfg, symbol: str, batch: int, seq_len: int, text_len: int, tp: int = 1, cp: int = 1,
    sequence_parallel: bool = True, act_bytes: int = 2, param_bytes: int = 2, cp_impl: str = "ulysses",
) -> list[Collective]:
    """Collectives of one block (any mixer symbol of ``model.pattern``) per training step.

    seq_len: tokens per sample (L); text_len: text tokens (Lt); act_bytes / param_bytes: element
    sizes of activations and of parameter gradients (2 for bf16, 4 for fp32); cp_impl: how this block runs
    under CP, "ulysses" or "state_passing" (``block_cp_impl`` resolves parallel.cp_impl per block).
    """
    m = model_cfg
    B, L, Lt, d = batch, seq_len, text_len, m.d_model
    Lc = L // cp  # tokens of one CP rank (all of its TP ranks together)
    sp = sequence_parallel and tp > 1
    act = B * Lc * d * act_bytes  # one residual-stream tensor of a CP rank
    out: list[Collective] = []
    add = lambda op, group, n, what: out.append(Collective(op, group, int(n), what))

    if tp > 1:  # Megatron around mixer, cross-attention and FFN
        for sub in ("mixer", "cross_attn", "mlp"):
            if sp:
                add("all_gather", "tp", act, f"{sub} input, fwd")
                add("reduce_scatter", "tp", act, f"{sub} input grad, bwd")
                add("reduce_scatter", "tp", act, f"{sub} output, fwd")
                add("all_gather", "tp", act, f"{sub} output grad, bwd")
            else:
                add("all_reduce", "tp", act, f"{sub} input grad, bwd")
                add("all_reduce", "tp", act, f"{sub} output, fwd")
        add("all_reduce", "tp", B * Lt * d * act_bytes, "cross_attn text grad, bwd")
        if m.qk_norm:
            hd = d // m.num_heads
            add("all_reduce", "tp", hd * param_bytes, "cross_attn.q_norm.weight grad")
            add("all_reduce", "tp", hd * param_bytes, "cross_attn.k_norm.weight grad")
        if sp:
            add("all_reduce", "tp", 6 * d * param_bytes, "scale_shift_table grad")
            add("all_reduce", "tp", d * param_bytes, "norm2.weight grad")
            add("all_reduce", "tp", d * param_bytes, "norm2.bias grad")
            add("all_reduce", "tp", d * param_bytes, "cross_attn.proj.bias grad")
            add("all_reduce", "tp", d * param_bytes, "mlp.fc2.bias grad")
    # the mixer's own (megassm/models/mixers/: Hydra's norm / fc_D / all-to-alls, attention's all-to-alls, ...)
    extra = {"cp_impl": cp_impl} if cp_impl != "ulysses" else {}  # mixers without state passing omit it
    for op, group, n, what in mixer_for_symbol(symbol).collectives(m, B, L, tp, cp, sp, act_bytes, param_bytes,
                                                                   **extra):
        add(op, group, n, what)
    return out


def block_cp_impl(model_cfg, symbol: str, cp_impl: str, grid: tuple[int, int, int] | None, tp: int, cp: int,
                  sequence_parallel: bool = True) -> str:
    """How a block runs under CP for ``parallel.cp_impl`` on a token grid (T', H', W') (None: only the
    'row' scan is known to keep slices contiguous): "state_passing" for a Hydra block whose scan order keeps
    every rank's slice contiguous (``models.scan.keeps_slices_contiguous``) -- under "auto" only when that
    moves no more bytes per rank than Ulysses -- else "ulysses" (attention, 't' on video, 'v' cut mid-frame)."""
    from megassm.models.scan import keeps_slices_contiguous

    spec = mixer_for_symbol(symbol)
    if cp == 1 or cp_impl == "ulysses" or spec.name != "hydra":
        return "ulysses"
    order = spec.symbols[symbol]
    ok = order == "row" if grid is None else keeps_slices_contiguous(order, tuple(grid), cp)
    if not ok or cp_impl == "state_passing":
        return cp_impl if ok else "ulysses"
    L = grid[0] * grid[1] * grid[2] if grid is not None else cp
    sizes = {"tp": tp, "cp": cp, "tpcp": tp * cp}
    cost = {impl: wire_bytes([Collective(*c) for c in spec.collectives(
        model_cfg, 1, L, tp, cp, sequence_parallel and tp > 1, 2, 2, cp_impl=impl)], sizes)
        for impl in ("ulysses", "state_passing")}
    return "state_passing" if cost["state_passing"] <= cost["ulysses"] else "ulysses"


def model_collectives(
    model_cfg, batch: int, seq_len: int, text_len: int, tp: int = 1, cp: int = 1,
    sequence_parallel: bool = True, act_bytes: int = 2, param_bytes: int = 2, cp_impl: str = "ulysses",
    grid: tuple[int, int, int] | None = None,
) -> list[Collective]:
    """Every block's collectives plus the model-level ones (token gather, SP timestep/embedding grads).
    ``cp_impl`` (parallel.cp_impl) is resolved per block on the token ``grid`` (``block_cp_impl``).

    Not included: the one-off input check of the first forward, and DeepSpeed's gradient reduction
    over DP x CP (about the local parameter bytes, reduce-scattered or all-reduced per step).
    """
    import math

    m = model_cfg
    out = [c for s in m.pattern for c in block_collectives(
        m, s, batch, seq_len, text_len, tp, cp, sequence_parallel, act_bytes, param_bytes,
        block_cp_impl(m, s, cp_impl, grid, tp, cp, sequence_parallel))]
    sp = sequence_parallel and tp > 1
    d, c_out = m.d_model, m.in_channels * math.prod(m.patch_size)
    if sp or cp > 1:
        out.append(Collective("all_gather", "tpcp" if sp else "cp", batch * seq_len * c_out * act_bytes,
                              "final layer tokens, fwd"))
    if sp:
        out.append(Collective("all_reduce", "tp", batch * 6 * d * act_bytes, "t_mod grad, bwd"))
        out.append(Collective("all_reduce", "tp", batch * d * act_bytes, "t_emb grad (final layer), bwd"))
        for name, numel in (("patch_embed.proj.weight", c_out * d), ("patch_embed.proj.bias", d),
                            ("final_layer.linear.weight", d * c_out), ("final_layer.linear.bias", c_out),
                            ("final_layer.scale_shift_table", 2 * d)):
            out.append(Collective("all_reduce", "tp", numel * param_bytes, f"{name} grad"))
    return out


def summarize(collectives: list[Collective]) -> dict[tuple[str, str], tuple[int, int]]:
    """{(op, group): (number of calls, total payload bytes)}."""
    acc: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for c in collectives:
        acc[(c.op, c.group)][0] += 1
        acc[(c.op, c.group)][1] += c.nbytes
    return {k: (v[0], v[1]) for k, v in acc.items()}


def wire_bytes(collectives: list[Collective], group_sizes: dict[str, int]) -> float:
    """Bytes each rank sends with bandwidth-optimal (ring / pairwise) algorithms."""
    total = 0.0
    for c in collectives:
        n = group_sizes[c.group]
        if c.op == "send":
            total += c.nbytes
        elif n > 1:
            total += (2 if c.op == "all_reduce" else 1) * (n - 1) / n * c.nbytes
    return total


def step_wire_bytes(model_cfg, seq_len: int, tp: int, cp: int, cp_impl: str = "ulysses",
                    grid: tuple[int, int, int] | None = None, batch: int = 1, text_len: int | None = None,
                    sequence_parallel: bool = True, act_bytes: int = 2) -> tuple[float, int]:
    """(bytes each rank sends per training step of ``batch`` samples -- every block and the model-level
    collectives, DeepSpeed's gradient reduction excluded --, number of blocks that pass states) for
    ``parallel.cp_impl`` on the token ``grid`` (None: only 'row' blocks are known to keep slices contiguous)."""
    m = model_cfg
    text_len = m.max_text_len if text_len is None else text_len
    colls = model_collectives(m, batch, seq_len, text_len, tp, cp, sequence_parallel, act_bytes, act_bytes,
                              cp_impl, grid)
    passing = sum(block_cp_impl(m, s, cp_impl, grid, tp, cp, sequence_parallel) == "state_passing" for s in m.pattern)
    return wire_bytes(colls, {"tp": tp, "cp": cp, "tpcp": tp * cp}), passing
