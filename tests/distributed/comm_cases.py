"""Worker-side checks: communication bytes against ``comm_model``, and DeepSpeed's gradient
reduction over DP x CP against the single-process gradient (see parallel_cases for the rest)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from parallel_cases import (
    GRAD_TOL,
    IMAGE,
    VIDEO,
    _close,
    _randn,
    _slice,
    build_reference,
    dev,
    make_mesh,
    model_inputs,
    tiny_cfg,
    token_grid,
)

from megassm.config.schema import ModelConfig
from megassm.parallel.apply import parallelize_hth


# -- communication accounting --------------------------------------------------------------------
class CommCounter:
    """Wraps torch.distributed's collectives and records (op, group name, payload bytes); point-to-point
    messages posted through ``batch_isend_irecv`` count as ("send", group, bytes sent)."""

    WRAPPED = {"all_reduce": ("all_reduce", 0), "all_gather_into_tensor": ("all_gather", 0),
               "all_gather_single": ("all_gather", 0), "reduce_scatter_tensor": ("reduce_scatter", 1),
               "reduce_scatter_single": ("reduce_scatter", 1), "all_to_all_single": ("all_to_all", 1)}

    def __init__(self, ctx):
        self.names = {id(g): n for n, g in (("tp", ctx.tp_group), ("cp", ctx.cp_group), ("tpcp", ctx.tpcp_group))
                      if g is not None}
        self.calls: list[tuple[str, str, int]] = []

    def __enter__(self):
        self._orig = {}
        for fn_name, (op, arg) in self.WRAPPED.items():
            orig = getattr(dist, fn_name, None)
            if orig is None:  # all_gather_single / reduce_scatter_single: torch >= 2.13
                continue
            self._orig[fn_name] = orig

            def wrapper(*args, _orig=orig, _op=op, _arg=arg, **kwargs):
                t = args[_arg]  # the full tensor: all-reduce's, all-gather's output, the others' input
                self.calls.append((_op, self.names.get(id(kwargs.get("group")), "other"), t.numel() * t.element_size()))
                return _orig(*args, **kwargs)

            setattr(dist, fn_name, wrapper)
        self._orig["batch_isend_irecv"] = orig_p2p = dist.batch_isend_irecv

        def p2p(ops, _orig=orig_p2p):  # state-passing CP's neighbour messages: count what is sent
            for op in ops:
                if op.op is dist.isend:
                    self.calls.append(("send", self.names.get(id(op.group), "other"),
                                       op.tensor.numel() * op.tensor.element_size()))
            return _orig(ops)

        dist.batch_isend_irecv = p2p
        return self

    def __exit__(self, *exc):
        for fn_name, orig in self._orig.items():
            setattr(dist, fn_name, orig)

    def summary(self) -> dict:
        acc = {}
        for op, group, n in self.calls:
            c, b = acc.get((op, group), (0, 0))
            acc[(op, group)] = (c + 1, b + n)
        return acc


def _fmt(summary: dict) -> dict:
    return {f"{op}/{g}": list(v) for (op, g), v in sorted(summary.items())}


def check_comm(world: int, tp: int, cp: int, sp: bool, cfg: ModelConfig, grid=VIDEO) -> list:
    """Counted bytes per collective for one block of each kind, and for the whole model, against
    ``comm_model``; returns failure strings."""
    from megassm.parallel.comm_model import block_collectives, model_collectives, summarize

    failures = []
    par = build_reference(cfg)
    ctx = parallelize_hth(par, make_mesh(world, tp, cp), sequence_parallel=sp, check_inputs=False)
    tg = token_grid(cfg, grid)
    B, L, d, Lt = 2, tg.seq_len, cfg.d_model, 5
    gen = torch.Generator().manual_seed(5)
    for i, blk in enumerate(par.blocks):
        x = _slice(_randn(B, L, d, generator=gen), ctx).requires_grad_()
        t_mod = _randn(B, 6 * d, generator=gen).requires_grad_()
        text = _randn(B, Lt, d, generator=gen).requires_grad_()
        mask = torch.ones(B, Lt, dtype=torch.bool, device=dev())
        with CommCounter(ctx) as counter:
            blk(x, t_mod, text, mask, tg).square().sum().backward()
        want = summarize(block_collectives(cfg, blk.symbol, B, L, Lt, tp, cp, sp, act_bytes=4, param_bytes=4))
        if not counter.calls:
            failures.append(f"block {i}: no collective was counted (is the counter wired?)")
        if counter.summary() != want:
            failures.append(f"block {i} ({blk.symbol}): counted {_fmt(counter.summary())} != model {_fmt(want)}")
    latents, t, text, mask = model_inputs(cfg, grid)
    with CommCounter(ctx) as counter:
        par(latents, t, text, mask).square().sum().backward()
    want = summarize(model_collectives(cfg, B, L, text.shape[1], tp, cp, sp, act_bytes=4, param_bytes=4))
    if counter.summary() != want:
        failures.append(f"whole model: counted {_fmt(counter.summary())} != model {_fmt(want)}")
    return failures


def run_comm_checks(rank: int, world: int) -> dict:
    layouts = [(2, 1, False), (2, 1, True), (1, 2, False)] if world == 2 else [(2, 2, True), (2, 2, False)]
    report = {}
    for tp, cp, sp in layouts:
        for cname, cfg in (("g1", tiny_cfg(pattern="hA")), ("g2", tiny_cfg(pattern="t", ngroups=2))):
            if world == 4 and not sp and cname == "g2":
                continue  # B/C-group handling is covered by the SP layout
            report[f"tp{tp} cp{cp} sp{int(sp)} {cname}"] = check_comm(world, tp, cp, sp, cfg)
    return report


# -- DeepSpeed's reduction over DP x CP ------------------------------------------------------------
DS_CASES = {  # name: (zero stage, hand DeepSpeed the backend's deepspeed_mpu(mesh, stage) (True) or the mesh itself)
    "zero0": (0, True), "zero2": (2, True), "zero3 (CP folded)": (3, True),
    "zero3 with DeepSpeed's sequence-parallel path": (3, False),
}


def run_deepspeed_cp_check(rank: int, world: int) -> dict:
    """cp=world, dp=1: the gradient DeepSpeed hands the optimizer (after its DP x CP reduction)
    against the single-process gradient, with parallelize_hth's default CP scale."""
    import os

    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from megassm.train.backends.deepspeed import cp_grad_scale, deepspeed_mpu

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    cfg = tiny_cfg(pattern="hA")
    latents, t, text, mask = model_inputs(cfg, IMAGE)
    ref = build_reference(cfg)
    out_r = ref(latents, t, text, mask)
    w = _randn(*out_r.shape, generator=torch.Generator().manual_seed(11))
    (out_r * w).sum().backward()
    report = {}
    for name, (stage, use_mpu) in DS_CASES.items():
        mesh = make_mesh(world, 1, world)
        mpu = deepspeed_mpu(mesh, stage) if use_mpu else mesh
        par = build_reference(cfg)
        parallelize_hth(par, mesh, cp_grad_scale=cp_grad_scale(mesh, stage) if use_mpu else 1.0)
        ds_cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                  "train_batch_size": 2 * mpu.get_data_parallel_world_size(),
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                  "steps_per_print": 10**9}
        opt = torch.optim.SGD(par.parameters(), lr=0.0)
        engine, *_ = deepspeed.initialize(model=par, optimizer=opt, config=ds_cfg, mpu=mpu, dist_init_required=False)
        engine.backward((engine(latents, t, text, mask) * w).sum())
        failures = []
        for (pname, p), (_, q) in zip(engine.module.named_parameters(), ref.named_parameters()):
            g = safe_get_full_grad(p) if stage > 0 else p.grad
            _close(f"{name} grad {pname}", g, q.grad, failures, GRAD_TOL)
        report[name] = failures
    return report


