"""Worker-side checks for state-passing CP (parallel.cp_impl=state_passing, megassm/parallel/hydra_state.py):
Hydra blocks and whole HTH models against the single-process model in fp64, on gloo.

fp64: the parallel model computes the same function with sums in another order (the chunk boundaries move
to the slice edges, the incoming state is added afterwards), so it agrees to ~1e-13 relative; a dropped
message is off by O(1) (the teeth checks).
"""

from __future__ import annotations

import copy

import torch
from parallel_cases import (
    IMAGE,
    VIDEO,
    _check_param_grads,
    _close,
    _patch,
    _randn,
    _slice,
    build_reference,
    make_mesh,
    model_inputs,
    tiny_cfg,
    token_grid,
)

from megassm.parallel.apply import parallelize_hth

TOL = 1e-10


def _check_grads(prefix, par, ref, cfg, ctx, failures: list, tol: float) -> None:
    """``parallel_cases._check_param_grads`` (CP-summed, TP-sharded) at tolerance ``tol``."""
    import parallel_cases

    saved = parallel_cases.GRAD_TOL
    parallel_cases.GRAD_TOL = tol
    try:
        _check_param_grads(prefix, par, ref, cfg, ctx, failures, {})
    finally:
        parallel_cases.GRAD_TOL = saved


def _ref64(cfg):
    return build_reference(cfg).double()


def check_mixers(world: int, tp: int, cp: int, grid, cfg, impl: str = "state_passing") -> tuple[list, dict]:
    """Each block's mixer alone: output, input gradient, parameter gradients; and which path each block took."""
    failures, paths = [], {}
    ref = _ref64(cfg)
    par = copy.deepcopy(ref)
    ctx = parallelize_hth(par, make_mesh(world, tp, cp), sequence_parallel=tp > 1, check_inputs=False, cp_impl=impl)
    tg = token_grid(cfg, grid)
    gen = torch.Generator().manual_seed(7)
    B, L, d = 2, tg.seq_len, cfg.d_model
    for i, (rb, pb) in enumerate(zip(ref.blocks, par.blocks)):
        x = _randn(B, L, d, generator=gen).double()
        w = _randn(B, L, d, generator=gen).double()
        xr, xp = x.clone().requires_grad_(), _slice(x, ctx).clone().requires_grad_()
        out_r, out_p = rb.mix(xr, tg), pb.mix(xp, tg)
        (out_r * w).sum().backward()
        (out_p * _slice(w, ctx)).sum().backward()
        tag = f"block {i} ({rb.symbol})"
        paths[tag] = getattr(pb.mixer, "path_taken", "attention")
        _close(f"{tag} output", out_p, _slice(out_r, ctx), failures, TOL)
        _close(f"{tag} input grad", xp.grad, _slice(xr.grad, ctx), failures, TOL)
        _check_grads(f"blocks.{i}.mixer.", pb.mixer, rb.mixer, cfg, ctx, failures, TOL)
    return failures, paths


def check_uneven(world: int, bounds: list[int], cfg) -> list:
    """One 'h' block with rank r holding tokens [bounds[r], bounds[r+1]) (the layer takes any slice lengths
    in the row scan; the model itself cuts equal ones)."""
    from megassm.parallel.tensor import ParallelContext

    failures = []
    ref = _ref64(cfg)
    par = copy.deepcopy(ref)
    ctx = parallelize_hth(par, make_mesh(world, 1, world), check_inputs=False, cp_impl="state_passing")
    assert isinstance(ctx, ParallelContext)
    L = bounds[-1]
    tg = token_grid(cfg, (1, 1, L))
    gen = torch.Generator().manual_seed(3)
    x = _randn(2, L, cfg.d_model, generator=gen).double()
    w = _randn(2, L, cfg.d_model, generator=gen).double()
    a, b = bounds[ctx.cp_rank], bounds[ctx.cp_rank + 1]
    xr, xp = x.clone().requires_grad_(), x[:, a:b].clone().requires_grad_()
    rb, pb = ref.blocks[0], par.blocks[0]
    out_r, out_p = rb.mixer.mix(xr, tg, "row"), pb.mixer.mix(xp, tg, "row")
    (out_r * w).sum().backward()
    (out_p * w[:, a:b]).sum().backward()
    _close(f"uneven {bounds} output", out_p, out_r[:, a:b], failures, TOL)
    _close(f"uneven {bounds} input grad", xp.grad, xr.grad[:, a:b], failures, TOL)
    _check_grads("blocks.0.mixer.", pb.mixer, rb.mixer, cfg, ctx, failures, TOL)
    if pb.mixer.path_taken != "state_passing":
        failures.append(f"uneven: path {pb.mixer.path_taken}")
    return failures


def check_model(world: int, tp: int, cp: int, grid, cfg, impl: str = "state_passing", recompute: bool = False) -> list:
    """The whole HTH model: output and every parameter's gradient; ``recompute``: activation checkpointing in
    every block (the neighbour messages and the all-gather run again inside backward)."""
    failures = []
    ref = _ref64(cfg)
    par = copy.deepcopy(ref)
    ctx = parallelize_hth(par, make_mesh(world, tp, cp), sequence_parallel=tp > 1, cp_impl=impl)
    for blk in par.blocks:
        blk.grad_checkpoint = recompute
    latents, t, text, mask = (v.double() if v.is_floating_point() else v for v in model_inputs(cfg, grid))
    out_r, out_p = ref(latents, t, text, mask), par(latents, t, text, mask)
    w = _randn(*out_r.shape, generator=torch.Generator().manual_seed(11)).double()
    (out_r * w).sum().backward()
    (out_p * w).sum().backward()
    _close("model output", out_p, out_r, failures, TOL)
    _check_grads("", par, ref, cfg, ctx, failures, TOL)
    return failures


# -- spawned entry points ------------------------------------------------------------------------
STAGE3 = "hthAvtvA"
AUTO_GRID = (2, 8, 8)  # configs/stage3_video.yaml's pattern, one period


def run_mixer_checks(rank: int, world: int) -> dict:
    report = {}
    layouts = [(1, 2)] if world == 2 else [(1, 4), (2, 2)]
    for tp, cp in layouts:
        for gname, grid in (("image", IMAGE), ("video", VIDEO)):
            for cname, cfg in (("g1", tiny_cfg(pattern="hvt")), ("g2 d_conv5", tiny_cfg(pattern="hvt", ngroups=2,
                                                                                          d_conv=5))):
                f, paths = check_mixers(world, tp, cp, grid, cfg)
                report[f"tp{tp} cp{cp} {gname} {cname}"] = {"failures": f, "paths": paths}
        # auto: at 128 tokens the comm model picks state passing for 'h' (and 'v' when frame-aligned)
        f, paths = check_mixers(world, tp, cp, AUTO_GRID, tiny_cfg(pattern="hvt"), impl="auto")
        report[f"tp{tp} cp{cp} auto {AUTO_GRID}"] = {"failures": f, "paths": paths}
    return report


def run_uneven_checks(rank: int, world: int) -> dict:
    cases = {2: [[0, 3, 13], [0, 10, 11]], 4: [[0, 2, 9, 10, 17], [0, 6, 7, 12, 14]]}[world]
    return {str(b): {"failures": check_uneven(world, b, tiny_cfg(pattern="h"))} for b in cases}


def run_model_checks(rank: int, world: int) -> dict:
    report = {}
    layouts = [(1, 2)] if world == 2 else [(1, 4), (2, 2)]
    for tp, cp in layouts:
        for gname, grid in (("image", IMAGE), ("video", VIDEO)):
            for impl in ("state_passing", "auto"):
                f = check_model(world, tp, cp, grid, tiny_cfg(pattern=STAGE3), impl)
                report[f"tp{tp} cp{cp} {gname} {impl}"] = {"failures": f}
    if world == 2:
        f = check_model(world, 1, 2, VIDEO, tiny_cfg(pattern=STAGE3), recompute=True)
        report["tp1 cp2 video, activation checkpointing"] = {"failures": f}
    return report


# -- teeth: drop one message; the mixer checks must then fail --------------------------------------
def _own_summary_only(x, group, dim=0):  # an all-gather that never happened: every slot holds this rank's
    import torch.distributed as dist

    return torch.cat([x] * dist.get_world_size(group), dim=dim)


DROPS = {
    "state exchange dropped": ("megassm.parallel.hydra_state:gather_along", lambda: _own_summary_only),
    "conv halo dropped": ("megassm.parallel.hydra_state:halo_rows", lambda: _zeroed("halo_rows")),
    "shift message dropped": ("megassm.parallel.hydra_state:edge_rows", lambda: _zeroed("edge_rows")),
}


def _zeroed(name: str):
    import megassm.ops.hydra_state_passing as sp

    orig = getattr(sp, name)
    return lambda *a: tuple(torch.zeros_like(t) for t in orig(*a))


def run_drop_checks(rank: int, world: int) -> dict:
    cfg = tiny_cfg(pattern="h")
    clean = len(check_mixers(world, 1, world, VIDEO, cfg)[0])
    report = {}
    for name, (target, make) in DROPS.items():
        undo = _patch(target, make())
        try:
            broken = check_mixers(world, 1, world, VIDEO, cfg)[0]
        finally:
            undo()
        report[name] = {"clean": clean, "broken": len(broken), "example": broken[:2]}
    return report


# -- communication accounting ------------------------------------------------------------------------
def _for_rank(collectives, cp_rank: int, cp: int):
    """comm_model lists a CP rank with two neighbours; the first / last one sends only towards the other."""
    drop = (["to rank r-1"] if cp_rank == 0 else []) + (["to rank r+1"] if cp_rank == cp - 1 else [])
    return [c for c in collectives if not any(d in c.what for d in drop)]


def check_comm(world: int, tp: int, cp: int, sp: bool, cfg, grid) -> list:
    """Counted bytes per (op, group) of each block and of the whole model under cp_impl=state_passing (fp32)
    against comm_model, which resolves each block's implementation on the grid."""
    from comm_cases import CommCounter, _fmt

    from megassm.parallel.comm_model import block_collectives, block_cp_impl, model_collectives, summarize

    failures = []
    par = build_reference(cfg)
    ctx = parallelize_hth(par, make_mesh(world, tp, cp), sequence_parallel=sp, check_inputs=False,
                          cp_impl="state_passing")
    tg = token_grid(cfg, grid)
    B, L, d, Lt = 2, tg.seq_len, cfg.d_model, 5
    gen = torch.Generator().manual_seed(5)
    sends = 0
    for i, blk in enumerate(par.blocks):
        x = _slice(_randn(B, L, d, generator=gen), ctx).requires_grad_()
        t_mod = _randn(B, 6 * d, generator=gen).requires_grad_()
        text = _randn(B, Lt, d, generator=gen).requires_grad_()
        mask = torch.ones(B, Lt, dtype=torch.bool, device=x.device)
        with CommCounter(ctx) as counter:
            blk(x, t_mod, text, mask, tg).square().sum().backward()
        impl = block_cp_impl(cfg, blk.symbol, "state_passing", grid, tp, cp, sp)
        want = summarize(_for_rank(block_collectives(cfg, blk.symbol, B, L, Lt, tp, cp, sp, 4, 4, impl), ctx.cp_rank,
                                   cp))
        sends += sum(1 for c in counter.calls if c[0] == "send")
        if counter.summary() != want:
            failures.append(f"block {i} ({blk.symbol}, {impl}): counted {_fmt(counter.summary())} != "
                            f"model {_fmt(want)}")
    if not sends:
        failures.append("no point-to-point message was counted: no block passed states, or the counter is not wired")
    latents, t, text, mask = model_inputs(cfg, grid)
    with CommCounter(ctx) as counter:
        par(latents, t, text, mask).square().sum().backward()
    want = summarize(_for_rank(model_collectives(cfg, B, L, text.shape[1], tp, cp, sp, 4, 4, "state_passing", grid),
                               ctx.cp_rank, cp))
    if counter.summary() != want:
        failures.append(f"whole model: counted {_fmt(counter.summary())} != model {_fmt(want)}")
    return failures


def run_comm_checks(rank: int, world: int) -> dict:
    layouts = [(1, 2, False)] if world == 2 else [(1, 4, False), (2, 2, True)]
    report = {}
    for tp, cp, sp in layouts:
        for cname, cfg in (("g1", tiny_cfg(pattern="hvtA")), ("g2", tiny_cfg(pattern="hv", ngroups=2))):
            report[f"tp{tp} cp{cp} sp{int(sp)} {cname}"] = {"failures": check_comm(world, tp, cp, sp, cfg, VIDEO)}
    return report
