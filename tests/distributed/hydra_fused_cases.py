"""Worker-side checks of the fused ParallelHydra (the Triton kernels of ``megassm.ops.hydra_fused``, cut at
the cross-rank reductions): each rank runs every Hydra mixer of a model with one block per scan order
('h', 'v', 't'; those that differ on the grid) three ways, same weights and inputs --

    the single-process Hydra (reference path)  |  ParallelHydra, reference parts  |  ParallelHydra, fused parts

-- and compares outputs, input gradients and every parameter gradient (``parallel_cases`` helpers).
The ranks are spawned with TRITON_INTERPRET=1: the kernels run in Triton's interpreter on CPU tensors,
the SSD scan inside them in PyTorch (``fused_scan_impl="ref"``: the interpreter cannot run mamba-ssm's).
Each mixer records the path it took, so a check cannot pass on the reference path by accident.
"""

from __future__ import annotations

import copy

import parallel_cases as pc
import torch

from megassm.parallel.apply import parallelize_hth

# Tolerances: pc.OUT_TOL / pc.GRAD_TOL (max-abs error relative to the tensor's scale), the suite's fp32
# bounds for a parallel layer against the single process, for both comparisons. The fused kernels compute
# in fp32 like the reference parts but sum in another order (the norm's statistic in one tree per row, conv
# taps and weight partials per program), adding rounding of the same size: measured max 4.6e-7 (outputs) and
# 3.6e-6 (gradients) against the single process over these cases (reference parts: 3.6e-7 / 1e-6), 3.3e-6
# fused against reference parts. A skipped or doubled reduction, or a wrong slice or flip, is off by O(1)
# (0.28 to 1.1 relative in the teeth checks below).

RAGGED2, RAGGED4, ONE = (1, 2, 3), (1, 3, 4), (1, 1, 1)  # 6 and 12 tokens: not whole chunks; L = 1
# (tp, cp, sp, token grid, config overrides). tiny_cfg: chunk 4, 8 heads of 8, d_conv 3.
CASES = {
    2: [
        (2, 1, False, ONE, {}),  # L = 1 (no sequence split without SP)
        (2, 1, False, pc.IMAGE, {"ngroups": 2}),  # B/C groups split over TP
        (2, 1, True, pc.VIDEO, {}),  # + SP
        (1, 2, False, pc.IMAGE, {}),
        (1, 2, False, pc.VIDEO, {"ngroups": 2}),  # each CP rank's heads read one B/C group
        (1, 2, False, RAGGED2, {}),  # 3 tokens per rank, 6 scanned
    ],
    4: [
        (2, 2, True, pc.VIDEO, {}),
        (2, 2, False, RAGGED4, {"ngroups": 2}),
        (4, 1, True, pc.VIDEO, {}),
        (1, 4, False, RAGGED4, {"chunk_size": 8}),
    ],
}


def _grads(module) -> dict:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in module.named_parameters()}


def check_mixers(world: int, tp: int, cp: int, sp: bool, grid, cfg, paths=("reference", "fused")) -> tuple[list, dict]:
    """Every Hydra mixer of ``cfg``: ParallelHydra on each of ``paths`` against the single process, and
    (with both paths) fused against reference parts, rank by rank."""
    failures, stats = [], {}
    ref = pc.build_reference(cfg)
    par = copy.deepcopy(ref)
    ctx = parallelize_hth(par, pc.make_mesh(world, tp, cp), sequence_parallel=sp, check_inputs=False)
    tg = pc.token_grid(cfg, grid)
    gen = torch.Generator().manual_seed(7)
    B, L, d = 2, tg.seq_len, cfg.d_model
    for i, (rb, pb) in enumerate(zip(ref.blocks, par.blocks)):
        if rb.symbol == "A":
            continue
        x, w = pc._randn(B, L, d, generator=gen), pc._randn(B, L, d, generator=gen)  # input, cotangent
        xr = x.clone().requires_grad_()
        out_r = rb.mix(xr, tg)
        (out_r * w).sum().backward()
        got = {}
        for path in paths:
            pb.mixer.fused, pb.mixer.fused_scan_impl = path == "fused", "ref"
            for p in pb.mixer.parameters():
                p.grad = None
            xp = pc._slice(x, ctx).clone().requires_grad_()
            out_p = pb.mix(xp, tg)
            (out_p * pc._slice(w, ctx)).sum().backward()
            tag = f"block {i} ({rb.symbol}) {path}"
            if pb.mixer.path_taken != path:
                failures.append(f"{tag}: ParallelHydra took the {pb.mixer.path_taken} path")
            err = pc._close(f"{tag} output", out_p, pc._slice(out_r, ctx), failures, pc.OUT_TOL)
            stats[f"{path} out"] = max(stats.get(f"{path} out", 0.0), err)
            pc._close(f"{tag} input grad", xp.grad, pc._slice(xr.grad, ctx), failures, pc.GRAD_TOL)
            pstats = {}
            pc._check_param_grads(f"blocks.{i}.mixer.", pb.mixer, rb.mixer, cfg, ctx, failures, pstats)
            stats[f"{path} grad"] = max(stats.get(f"{path} grad", 0.0), pstats.get("grad", 0.0))
            got[path] = (out_p.detach(), xp.grad, _grads(pb.mixer))
        if len(got) == 2:  # fused vs reference parts on this rank, before any CP sum
            (o_f, x_f, g_f), (o_r, x_r, g_r) = got["fused"], got["reference"]
            errs = [pc._close(f"block {i} fused vs reference output", o_f, o_r, failures, pc.OUT_TOL)]
            errs.append(pc._close(f"block {i} fused vs reference input grad", x_f, x_r, failures, pc.GRAD_TOL))
            errs += [pc._close(f"block {i} fused vs reference grad {n}", g_f[n], g_r[n], failures, pc.GRAD_TOL)
                     for n in g_r]
            stats["fused vs reference"] = max([stats.get("fused vs reference", 0.0)] + errs)
    return failures, stats


def run_fused_checks(rank: int, world: int) -> dict:
    report = {}
    for tp, cp, sp, grid, over in CASES[world]:
        # one block per distinct scan order: on one frame 't' is 'h', on one token every order is
        cfg = pc.tiny_cfg(pattern="h" if grid == ONE else "hv" if grid[0] == 1 else "hvt", **over)
        f, s = check_mixers(world, tp, cp, sp, grid, cfg)
        report[f"tp{tp} cp{cp} sp{int(sp)} grid {grid} {over or ''}"] = {"failures": f, **s}
    return report


def _norm_backward_unsummed():
    """GatedNormFn.backward with its cross-rank sum skipped (the forward's kept): a fused-only break."""
    from megassm.ops.hydra_fused import GatedNormFn

    orig = GatedNormFn.backward

    def backward(ctx, dout):
        ctx.sum_over_ranks = None
        return orig(ctx, dout)

    return staticmethod(backward)


FUSED_BREAKS = {"fused norm backward: row sum not reduced over TP": (
    "megassm.ops.hydra_fused:GatedNormFn.backward", _norm_backward_unsummed, (2, 1, True))}


def run_broken_fused_checks(rank: int, world: int) -> dict:
    """``parallel_cases.BREAKS`` and ``FUSED_BREAKS`` on the fused path: each break must make the fused
    mixer's checks fail, which pass unbroken (a temporal-scan Hydra on a video grid)."""
    cfg = pc.tiny_cfg(pattern="t")
    report, clean = {}, {}
    breaks = {**pc.BREAKS, **{k: (t, make(), lay) for k, (t, make, lay) in FUSED_BREAKS.items()}}
    for name, (target, value, layout) in breaks.items():
        if layout not in clean:
            clean[layout] = len(check_mixers(world, *layout, pc.VIDEO, cfg, paths=("fused",))[0])
        undo = pc._patch(target, value)
        try:
            broken, _ = check_mixers(world, *layout, pc.VIDEO, cfg, paths=("fused",))
        finally:
            undo()
        report[name] = {"clean": clean[layout], "broken": len(broken), "example": broken[:2]}
    return report
