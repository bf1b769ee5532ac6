"""Hydra (``megassm.models.hydra``) as a kind of mixer: symbols 'h', 'v', 't' (one scan order each).

Everything megassm computes about a Hydra block from the model config lives here: parameters, FLOPs,
activation memory, its TP shard plan, the parallel-degree rules and its collectives; the widths
themselves come from ``HydraDims`` (one place). The parallel twin is ``megassm.parallel.hydra``.
"""

from __future__ import annotations

from megassm.config.schema import HYDRA_PATHS
from megassm.models.hydra import Hydra, HydraDims
from megassm.models.mixers.spec import CollectiveTuple, DivisibilityCheck, MixerSpec, ShardSpec, register_mixer


def build(m) -> Hydra:
    return Hydra(m.d_model, d_state=m.d_state, d_conv=m.d_conv, expand=m.expand, headdim=m.headdim,
                 ngroups=m.ngroups, chunk_size=m.chunk_size, ssd_impl=m.ssd_impl, fused=HYDRA_PATHS[m.hydra_path])


def params(m) -> int:
    """in_proj (no bias), depthwise conv1d (+ bias), dt_bias / A_log / D, fc_D, the norm's weight, out_proj."""
    hd = HydraDims.of(m)
    return (m.d_model * hd.d_in_proj + hd.conv_dim * m.d_conv + hd.conv_dim + 3 * hd.nheads
            + hd.d_inner * hd.nheads + hd.d_inner + hd.d_inner * m.d_model)


def flops(m, seq_len: int) -> int:
    """Projections, the conv, fc_D and the SSD scan both ways, counted as mamba-ssm's chunked kernel
    computes it, per direction and token (lower-triangular halves counted whole, as the kernels compute
    whole tiles):
        C.B^T within the chunk      2 * chunk * d_state * ngroups
        (C.B^T * decay) @ x         2 * chunk * headdim * nheads
        chunk states B^T x          2 * d_state * headdim * nheads
        state -> output C.h         2 * d_state * headdim * nheads
    """
    d, hd = m.d_model, HydraDims.of(m)
    cs = min(m.chunk_size, seq_len)
    scan_one_dir = 2 * cs * m.d_state * m.ngroups + hd.nheads * (2 * cs * m.headdim + 4 * m.d_state * m.headdim)
    return (2 * d * hd.d_in_proj + 2 * hd.conv_dim * m.d_conv + 2 * scan_one_dir
            + 2 * hd.d_inner * hd.nheads + 2 * hd.d_inner * d)


def activation_bytes(m, bytes_per_el: int) -> int:
    """The fused path (megassm.ops.hydra_fused, what CUDA runs) keeps: in_proj output, x in both scan
    orders, B/C, dt, the scan output, diag, the normed output: d_in_proj + 2 d_inner + 2 d_bc + 2 h
    + 2 d_inner + h + d_inner; plus the gated norm's fp32 rstd."""
    hd = HydraDims.of(m)
    kept = hd.d_in_proj + 2 * hd.d_inner + 2 * hd.d_bc + 2 * hd.nheads + 2 * hd.d_inner + hd.nheads + hd.d_inner
    return kept * bytes_per_el + 4


def bc_sharded(m, tp_size: int) -> bool:
    """Hydra's B/C groups are split over TP when ngroups is a multiple of tp, else replicated."""
    return tp_size > 1 and m.ngroups % tp_size == 0


def shard_specs(m, tp_size: int) -> dict[str, ShardSpec]:
    """in_proj rows: z, x, dt by head, B/C by group (replicated when ngroups=1); conv1d channels: x by head,
    B/C as in_proj; dt_bias / A_log / D by head; fc_D's input channels (it maps all of d_inner to every
    head: row-parallel); the norm's channels; out_proj's input columns."""
    hd = HydraDims.of(m)
    gn = m.ngroups * m.d_state
    bc = bc_sharded(m, tp_size)
    di, h = (hd.d_inner, True), (hd.nheads, True)
    rows = (di, di, (gn, bc), (gn, bc), (gn, bc), (gn, bc), h, h)
    conv = (di, (gn, bc), (gn, bc), (gn, bc), (gn, bc))
    return {
        "in_proj.weight": ShardSpec(0, rows), "in_proj.bias": ShardSpec(0, rows),
        "conv1d.weight": ShardSpec(0, conv), "conv1d.bias": ShardSpec(0, conv),
        "dt_bias": ShardSpec(0, (h,)), "A_log": ShardSpec(0, (h,)), "D": ShardSpec(0, (h,)),
        "fc_D.weight": ShardSpec(1, (di,)),
        "norm.weight": ShardSpec(0, (di,)),
        "out_proj.weight": ShardSpec(1, (di,)),
    }


def divisibility(m, tp: int) -> list[DivisibilityCheck]:
    heads = HydraDims.of(m).nheads
    return [("tp", "Hydra heads (expand*d_model/headdim)", heads),
            ("cp", "Hydra heads per TP rank (expand*d_model/headdim/tp)", heads // tp)]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_errors(m, tp: int, cp: int) -> list[str]:
    if tp > 1 and m.ngroups > 1 and m.ngroups % tp:
        return [f"parallel.tp={tp} does not divide the Hydra B/C groups (model.ngroups) = {m.ngroups}: groups are "
                f"split over TP ranks, or replicated on each when ngroups=1; valid parallel.tp: "
                f"{_divisors(m.ngroups)}, or set model.ngroups=1"]
    if cp > 1:
        # Ulysses: each CP rank scans nheads/(tp*cp) heads, which must fall in whole B/C groups or inside
        # one group (B/C are all-gathered along the sequence and the needed groups kept).
        g_local = m.ngroups // tp if m.ngroups % tp == 0 else m.ngroups
        if g_local % cp and cp % g_local:
            per_tp = HydraDims.of(m).nheads // tp
            valid = [c for c in _divisors(per_tp) if g_local % c == 0 or c % g_local == 0]
            return [f"parallel.cp={cp} with {g_local} Hydra B/C group(s) per TP rank: a CP rank's heads must "
                    f"cover whole groups (cp divides {g_local}) or lie inside one group (cp a multiple of "
                    f"{g_local}); valid parallel.cp: {valid}"]
    return []


def config_errors(m) -> list[str]:
    hd = HydraDims.of(m)
    if hd.d_inner % m.headdim:
        return [f"Hydra inner width expand*d_model={hd.d_inner} is not divisible by model.headdim={m.headdim}"]
    if hd.nheads % m.ngroups:
        return [f"Hydra heads ({hd.nheads}) not divisible by model.ngroups={m.ngroups}"]
    if m.d_conv % 2 == 0:
        return [f"model.d_conv={m.d_conv} must be odd (non-causal 'same' convolution)"]
    return []


def collectives(m, B: int, L: int, tp: int, cp: int, sp: bool, act_bytes: int,
                param_bytes: int, cp_impl: str = "ulysses") -> list[CollectiveTuple]:
    """The gated norm's sum of squares over TP, the replicated B/C rows' gradients, and under CP either
    (``cp_impl="ulysses"``) fc_D's reduce-scatter over TP x CP and Ulysses' all-to-alls of x, dt, y plus the
    B/C all-gather, or (``"state_passing"``, megassm/parallel/hydra_state.py) fc_D's reduce-scatter over TP,
    the all-gather of the slice summaries and the neighbour messages ("send": the conv halo and the shift's
    edge rows to ranks r-1 and r+1; the first / last CP rank sends only one of each)."""
    hd = HydraDims.of(m)
    Lc = L // cp
    bc_split = bc_sharded(m, tp)
    bc_width = 4 * (m.ngroups // tp if bc_split else m.ngroups) * m.d_state  # B/C columns per TP rank
    out: list[CollectiveTuple] = []
    if tp > 1:
        out.append(("all_reduce", "tp", B * Lc * 4, "gated-norm sum of squares (fp32), fwd"))
        out.append(("all_reduce", "tp", B * Lc * 4, "gated-norm sum of squares grad, bwd"))
        if not bc_split:  # B/C replicated over TP: their rows of in_proj and conv1d
            out.append(("all_reduce", "tp", bc_width * m.d_model * param_bytes, "in_proj B/C rows grad"))
            out.append(("all_reduce", "tp", bc_width * m.d_conv * param_bytes, "conv1d B/C rows weight grad"))
            out.append(("all_reduce", "tp", bc_width * param_bytes, "conv1d B/C rows bias grad"))
    if cp > 1 and cp_impl == "state_passing":
        return out + _state_passing_collectives(m, B, Lc, tp, cp, act_bytes, bc_width)
    if tp * cp > 1:
        out.append(("reduce_scatter", "tpcp", B * L * hd.nheads * act_bytes, "fc_D partial products, fwd"))
        out.append(("all_gather", "tpcp", B * L * hd.nheads * act_bytes, "fc_D grad, bwd"))
    if cp > 1:
        for what, width in (("x", hd.d_inner // tp), ("dt", 2 * hd.nheads // tp), ("y", hd.d_inner // tp)):
            out.append(("all_to_all", "cp", B * Lc * width * act_bytes, f"{what}, fwd"))
            out.append(("all_to_all", "cp", B * Lc * width * act_bytes, f"{what} grad, bwd"))
        out.append(("all_gather", "cp", B * L * bc_width * act_bytes, "B/C, fwd"))
        out.append(("reduce_scatter", "cp", B * L * bc_width * act_bytes, "B/C grad, bwd"))
    return out


def _state_passing_collectives(m, B: int, Lc: int, tp: int, cp: int, act_bytes: int,
                               bc_width: int) -> list[CollectiveTuple]:
    """Per block: no term grows with L except the fc_D reduce-scatter over TP (as under TP alone). The
    summaries are [final state | total log-decay] per direction and head, kept in fp32 (fp64 stays)."""
    hd = HydraDims.of(m)
    h, di = hd.nheads // tp, hd.d_inner // tp
    out: list[CollectiveTuple] = []
    if tp > 1:
        out.append(("reduce_scatter", "tp", B * Lc * hd.nheads * act_bytes, "fc_D partial products, fwd"))
        out.append(("all_gather", "tp", B * Lc * hd.nheads * act_bytes, "fc_D grad, bwd"))
    summary = cp * 2 * B * h * (m.headdim * m.d_state + 1) * max(act_bytes, 4)
    out.append(("all_gather", "cp", summary, "scan state summaries, fwd"))
    out.append(("reduce_scatter", "cp", summary, "scan state summaries grad, bwd"))
    halo = B * (m.d_conv // 2) * (di + bc_width) * act_bytes
    edge = B * di * act_bytes
    for what, n in (("conv halo", halo), ("shift edge row", edge)):
        for peer in ("r-1", "r+1"):
            out.append(("send", "cp", n, f"{what} to rank {peer}, fwd"))
            out.append(("send", "cp", n, f"{what} grad to rank {peer}, bwd"))
    return out


HYDRA = register_mixer(MixerSpec(
    name="hydra", label="Hydra mixers",
    symbols={"h": "row", "v": "col", "t": "temporal"},
    descriptions={"h": "Hydra, row-major raster scan (t, h, w)", "v": "Hydra, column-major raster scan (t, w, h)",
                  "t": "Hydra, temporal-major scan (h, w, t)"},
    build=build, parallel="megassm.parallel.hydra:parallelize_hydra",
    params=params, flops=flops, activation_bytes=activation_bytes, shard_specs=shard_specs,
    divisibility=divisibility, layout_errors=layout_errors, config_errors=config_errors, collectives=collectives,
    keep_init=("fc_D",),  # fc_D keeps nn.Linear's default init (as the reference); every other linear is xavier
    lora_targets=("in_proj", "out_proj"),
))
