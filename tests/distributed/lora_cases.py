"""Worker-side checks for the LoRA TP / CP test: the unsharded LoRA model (adapters on every target kind,
lora_B random -- B = 0 at init would hide a wrong B path or a missing sum) against the same model
parallelized, on every rank: output, every adapter gradient, the live shards against the shard plan,
and the adapters consolidated back to the unsharded ones. Failure strings as in ``parallel_cases``."""

from __future__ import annotations

import copy

import parallel_cases as pc
import torch

from megassm.config.schema import LORA_TARGETS, LoRAConfig
from megassm.lora import attach_lora
from megassm.lora.parallel import LoRAColumnParallelLinear, LoRARowParallelLinear
from megassm.parallel.apply import parallelize_hth
from megassm.parallel.sharding import ADAPTER_SUFFIXES, shard_spec, shard_tensor
from megassm.train.lora_export import consolidate_over_tp


def build_lora_reference(cfg, seed: int = 0):
    model = pc.build_reference(cfg, seed)
    attach_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=list(LORA_TARGETS)))
    gen = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".lora_B"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def check_lora_model(world: int, tp: int, cp: int, sp: bool, grid, cfg) -> tuple[list, dict]:
    failures, stats = [], {}
    ref = build_lora_reference(cfg)
    par = copy.deepcopy(ref)
    ctx = parallelize_hth(par, pc.make_mesh(world, tp, cp), sequence_parallel=sp, check_inputs=False)
    # every Hydra / attention / FFN / cross-attention kv and proj linear kept its adapter through the swap
    n_twins = sum(isinstance(m, (LoRAColumnParallelLinear, LoRARowParallelLinear)) for m in par.modules())
    want_twins = 2 * len(cfg.pattern) + (4 * len(cfg.pattern) if tp > 1 else 0)
    if n_twins != want_twins:
        failures.append(f"{n_twins} parallel LoRA linears, expected {want_twins}")
    latents, t, text, mask = pc.model_inputs(cfg, grid)
    out_r = ref(latents, t, text, mask)
    out_p = par(latents, t, text, mask)
    w = pc._randn(*out_r.shape, generator=torch.Generator().manual_seed(11))
    (out_r * w).sum().backward()
    (out_p * w).sum().backward()
    stats["out"] = pc._close("model output", out_p, out_r, failures, pc.OUT_TOL)
    ref_named = dict(ref.named_parameters())
    for name, p in par.named_parameters():
        if not p.requires_grad:
            if p.grad is not None:
                failures.append(f"frozen {name} got a gradient")
            continue
        want = ref_named[name].grad
        spec = shard_spec(name, cfg, tp) if tp > 1 else None
        if spec is not None:
            want = shard_tensor(want, spec, ctx.tp_rank, tp, name)
        err = pc._close(f"grad {name}", pc._cp_sum(p.grad, ctx), want, failures, pc.GRAD_TOL)
        if err >= stats.get("grad", 0.0):
            stats["grad"], stats["worst_grad"] = err, name
    full = {n: v for n, v in ref.state_dict().items() if n.endswith(ADAPTER_SUFFIXES)}
    local = {n: v for n, v in par.state_dict().items() if n.endswith(ADAPTER_SUFFIXES)}
    for n, v in local.items():
        spec = shard_spec(n, cfg, tp) if tp > 1 else None
        if not torch.equal(v, full[n] if spec is None else shard_tensor(full[n], spec, ctx.tp_rank, tp, n)):
            failures.append(f"live adapter {n} is not the shard plan's piece of the unsharded one")
    merged = consolidate_over_tp(local, par)
    if set(merged) != set(full) or any(not torch.equal(merged[n], full[n]) for n in full):
        failures.append("consolidate_over_tp does not give back the unsharded adapters")
    stats["adapters"] = len(full)
    return failures, stats


# (tp, cp, sp, grid, ngroups): TP with the B/C groups replicated (ngroups 1: in_proj's lora_B B/C rows are
# summed over TP) and split (ngroups 2), TP with and without Megatron-SP, CP on an image and a video grid
LAYOUTS = {"tp2 image g1": (2, 1, False, pc.IMAGE, 1), "tp2 sp video g1": (2, 1, True, pc.VIDEO, 1),
           "tp2 sp image g2": (2, 1, True, pc.IMAGE, 2), "cp2 image g1": (1, 2, False, pc.IMAGE, 1),
           "cp2 video g1": (1, 2, False, pc.VIDEO, 1)}

# teeth: each adapter-specific reduction, skipped, must fail the same checks that pass for its layout above
LORA_BREAKS = {
    # name: (patch target, replacement, layout)
    "adapter TP gradient sums skipped": ("megassm.lora.parallel:sum_grad_hook", pc._no_sum_hook, "tp2 image g1"),
    "row-parallel A x not all-reduced": ("megassm.lora.parallel:exit_tp", lambda x, ctx: x, "tp2 image g1"),
    "row-parallel A x not reduce-scattered (SP)": ("megassm.lora.parallel:exit_tp",
                                                   lambda x, ctx: pc._slice_only(x, ctx.tp_group), "tp2 sp video g1"),
}


def _check(world: int, layout: str) -> tuple[list, dict]:
    tp, cp, sp, grid, ngroups = LAYOUTS[layout]
    return check_lora_model(world, tp, cp, sp, grid, pc.tiny_cfg(ngroups=ngroups))


def run_lora_checks(rank: int, world: int) -> dict:
    """{"layouts": {layout: {failures, errors}}, "breaks": {break: {broken: count, example}}}."""
    layouts = {}
    for name in LAYOUTS:
        f, s = _check(world, name)
        layouts[name] = {"failures": f, **s}
    breaks = {}
    for name, (target, value, layout) in LORA_BREAKS.items():
        undo = pc._patch(target, value)
        try:
            broken, _ = _check(world, layout)
        finally:
            undo()
        breaks[name] = {"layout": layout, "broken": len(broken), "example": broken[:2]}
    return {"layouts": layouts, "breaks": breaks}
