"""Worker-side checks for the TP / SP / CP tests: each rank builds the single-process reference
(same seed, same weights), the parallel model, and compares outputs and every gradient.

Checks return a list of failure strings (empty = pass) so that the "teeth" tests can assert that
a deliberately broken collective makes them fail.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist

from megassm.config.schema import ModelConfig
from megassm.models.block import TokenGrid
from megassm.models.hth import HTHModel
from megassm.parallel.apply import parallelize_hth
from megassm.parallel.mesh import ParallelDims, ParallelMesh
from megassm.parallel.sharding import merge_state_dicts, shard_spec, shard_state_dict, shard_tensor

# fp32 throughout; errors are measured relative to the tensor's scale, max|got - want| / max|want|
# (gradients summed over many tokens reach O(100), where elementwise rtol is meaningless for the
# small entries next to them). The parallel layers compute the same function with the sums in
# another order (partial products summed over ranks, the RMS statistic as sum/width, matmuls over
# fewer rows), so they carry fp32 rounding of the same size as the single-process model's own:
# on these inputs that model differs from an fp64 evaluation by up to 1.5e-6 (outputs) and 2.2e-5
# (gradients, through 4 blocks). We allow ~5x that. A missing or doubled reduction or a wrong
# slice is off by O(1) relative (the "teeth" test shows every such break fails).
OUT_TOL, GRAD_TOL = 1e-5, 1e-4

IMAGE, VIDEO = (1, 4, 4), (2, 2, 4)


def dev() -> torch.device:
    """cpu + gloo by default; MEGASSM_TEST_DEVICE=cuda runs the same checks on GPUs over NCCL."""
    return torch.device(os.environ.get("MEGASSM_TEST_DEVICE", "cpu"))


def _randn(*shape, generator) -> torch.Tensor:  # drawn on the CPU: identical on every rank and device
    return torch.randn(*shape, generator=generator).to(dev())  # token grids (T', H', W'): 16 tokens, 1 frame / 2 frames


def tiny_cfg(pattern: str = "hvtA", **kw) -> ModelConfig:
    base = dict(name="dist-tiny", in_channels=4, patch_size=[1, 2, 2], d_model=32, pattern=pattern, d_state=8,
                d_conv=3, expand=2, headdim=8, ngroups=1, chunk_size=4, num_heads=4, mlp_ratio=2.0, text_dim=16,
                max_text_len=8, ssd_impl="ref")
    base.update(kw)
    return ModelConfig(**base)


def build_reference(cfg: ModelConfig, seed: int = 0) -> HTHModel:
    """The model with every parameter perturbed (zero-init gates would hide most gradients)."""
    torch.manual_seed(seed)
    model = HTHModel(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.to(dev())


def make_mesh(world: int, tp: int, cp: int) -> ParallelMesh:
    return ParallelMesh(ParallelDims(world, tp=tp, cp=cp))


def model_inputs(cfg: ModelConfig, grid, batch: int = 2, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    T, H, W = grid
    pt, ph, pw = cfg.patch_size
    latents = _randn(batch, cfg.in_channels, T * pt, H * ph, W * pw, generator=gen)
    t = torch.rand(batch, generator=gen)
    text = _randn(batch, 5, cfg.text_dim, generator=gen)
    mask = torch.ones(batch, 5, dtype=torch.bool, device=dev())
    mask[0, 3:] = False
    mask[1] = False  # a dropped caption: the model uses y_null
    return latents, t.to(dev()), text, mask


def token_grid(cfg: ModelConfig, grid) -> TokenGrid:
    return TokenGrid(tuple(grid), dev(), rope_head_dim=cfg.d_model // cfg.num_heads,
                     rope_theta=cfg.rope_theta)


def _slice(x: torch.Tensor, ctx) -> torch.Tensor:
    n = ctx.seq_shards
    L = x.shape[1] // n
    return x.narrow(1, ctx.seq_rank * L, L)


def _close(name: str, got, want, failures: list, tol: float) -> float:
    """Record a failure unless max|got - want| <= tol * max|want|; returns that relative error."""
    if got is None:
        got = torch.zeros_like(want)
    if got.shape != want.shape:
        failures.append(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
        return float("inf")
    if got.numel() == 0:
        return 0.0
    scale = want.abs().max().item()
    err = (got - want).abs().max().item() / max(scale, 1e-30)
    if not err <= tol:  # also catches NaN
        failures.append(f"{name}: relative error {err:.3g} > {tol:g} (max |want| {scale:.3g})")
    return err


def _cp_sum(g: torch.Tensor, ctx) -> torch.Tensor:
    """Each CP rank holds a partial gradient; the full one is their sum."""
    g = g.clone()
    if ctx.cp > 1:
        dist.all_reduce(g, group=ctx.cp_group)
    return g


def _check_param_grads(prefix: str, par_module, ref_module, cfg, ctx, failures: list, stats: dict) -> None:
    ref_named = dict(ref_module.named_parameters())
    for name, p in par_module.named_parameters():
        full = f"{prefix}{name}"
        want = ref_named[name].grad
        spec = shard_spec(full, cfg, ctx.tp) if ctx.tp > 1 else None
        if spec is not None:
            want = shard_tensor(want, spec, ctx.tp_rank, ctx.tp, full)
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        err = _close(f"grad {full}", _cp_sum(got, ctx), want, failures, GRAD_TOL)
        if err >= stats.get("grad", 0.0):
            stats["grad"], stats["worst_grad"] = err, full


def check_layers(world: int, tp: int, cp: int, sp: bool, grid, cfg: ModelConfig) -> tuple[list, dict]:
    """Each block's mixer (in its scan order), cross-attention and FFN on their own: output, input
    gradient and parameter gradients against the unsharded layer."""
    failures, stats = [], {}
    ref = build_reference(cfg)
    par = copy.deepcopy(ref)
    ctx = parallelize_hth(par, make_mesh(world, tp, cp), sequence_parallel=sp, check_inputs=False)
    tg = token_grid(cfg, grid)
    gen = torch.Generator().manual_seed(7)
    B, L, d = 2, tg.seq_len, cfg.d_model
    for i, (rb, pb) in enumerate(zip(ref.blocks, par.blocks)):
        text = _randn(B, 5, d, generator=gen)
        mask = torch.tensor([[True] * 3 + [False] * 2, [False] * 5], device=dev())
        for part in ("mixer", "cross_attn", "mlp"):
            x = _randn(B, L, d, generator=gen)
            w = _randn(B, L, d, generator=gen)  # fixed cotangent: loss = <out, w>
            xr, yr = x.clone().requires_grad_(), text.clone().requires_grad_()
            xp, yp = _slice(x, ctx).clone().requires_grad_(), text.clone().requires_grad_()
            if part == "mixer":
                out_r, out_p = rb.mix(xr, tg), pb.mix(xp, tg)
            elif part == "cross_attn":
                out_r, out_p = rb.cross_attn(xr, yr, mask), pb.cross_attn(xp, yp, mask)
            else:
                out_r, out_p = rb.mlp(xr), pb.mlp(xp)
            (out_r * w).sum().backward()
            (out_p * _slice(w, ctx)).sum().backward()
            tag = f"block {i} ({rb.symbol}) {part}"
            err = _close(f"{tag} output", out_p, _slice(out_r, ctx), failures, OUT_TOL)
            stats["out"] = max(stats.get("out", 0.0), err)
            _close(f"{tag} input grad", xp.grad, _slice(xr.grad, ctx), failures, GRAD_TOL)
            if part == "cross_attn":
                _close(f"{tag} text grad", _cp_sum(yp.grad, ctx), yr.grad, failures, GRAD_TOL)
            _check_param_grads(f"blocks.{i}.{part}.", getattr(pb, part), getattr(rb, part), cfg, ctx, failures, stats)
    return failures, stats


def check_model(world: int, tp: int, cp: int, sp: bool, grid, cfg: ModelConfig,
                cp_grad_scale: float = 1.0, recompute: bool = False) -> tuple[list, dict]:
    """The whole model: output on every rank, every parameter's gradient, and the state dict
    against ``shard_state_dict`` / ``merge_state_dicts``. ``recompute``: activation checkpointing
    in every block (the forward collectives run again inside backward)."""
    failures, stats = [], {}
    ref = build_reference(cfg)
    par = copy.deepcopy(ref)
    ctx = parallelize_hth(par, make_mesh(world, tp, cp), sequence_parallel=sp, cp_grad_scale=cp_grad_scale)
    for blk in par.blocks:
        blk.grad_checkpoint = recompute
    latents, t, text, mask = model_inputs(cfg, grid)
    out_r = ref(latents, t, text, mask)
    out_p = par(latents, t, text, mask)
    w = _randn(*out_r.shape, generator=torch.Generator().manual_seed(11))
    (out_r * w).sum().backward()
    (out_p * w).sum().backward()
    stats["out"] = _close("model output", out_p, out_r, failures, OUT_TOL)
    _check_param_grads("", par, ref, cfg, ctx, failures, stats)
    # the live sharded parameters are exactly the sharding functions' output
    local = shard_state_dict(ref.state_dict(), cfg, ctx.tp_rank, ctx.tp)
    for name, v in par.state_dict().items():
        if not torch.equal(v, local[name]):
            failures.append(f"state dict {name} differs from shard_state_dict")
    if tp > 1:
        sds = [None] * tp
        dist.all_gather_object(sds, {k: v.cpu() for k, v in par.state_dict().items()}, group=ctx.tp_group)
        merged = merge_state_dicts(sds, cfg, check_replicated=True)
        for name, v in ref.state_dict().items():
            if not torch.equal(merged[name], v.cpu()):
                failures.append(f"merge_state_dicts {name} differs from the unsharded tensor")
    return failures, stats


# -- spawned entry points ------------------------------------------------------------------------
# (tp, cp, sp) -> token grids; 2 ranks: each layout on both grids, with ngroups 1 and 2 (B/C groups
# split over TP, or selected per CP rank); 4 ranks: tp2 x cp2 on both grids, tp4 / cp4 on one each
# (tp2 x cp2 without SP: the whole-model test)
LAYER_CASES = {
    2: {(2, 1, False): (IMAGE, VIDEO), (2, 1, True): (IMAGE, VIDEO), (1, 2, False): (IMAGE, VIDEO)},
    4: {(2, 2, True): (IMAGE, VIDEO), (4, 1, True): (VIDEO,), (1, 4, False): (IMAGE,)},
}


def run_layer_checks(rank: int, world: int) -> dict:
    report = {}
    for (tp, cp, sp), grids in LAYER_CASES[world].items():
        for grid in grids:
            gname = "image" if grid == IMAGE else "video"
            cfgs = [("g1", tiny_cfg())] + ([("g2", tiny_cfg(ngroups=2))] if world == 2 else [])
            if world == 2 and grid == VIDEO:  # FA4's tokens-first path (its op's reference off CUDA) under TP / CP
                cfgs.append(("fa4", tiny_cfg(attention_backend="fa4")))
            for cname, cfg in cfgs:
                f, s = check_layers(world, tp, cp, sp, grid, cfg)
                report[f"tp{tp} cp{cp} sp{int(sp)} {gname} {cname}"] = {"failures": f, **s}
    return report


def run_model_checks(rank: int, world: int) -> dict:
    report = {}
    layouts = [(2, 1, True), (1, 2, False)] if world == 2 else [(2, 2, True), (2, 2, False)]
    for tp, cp, sp in layouts:
        for gname, grid in (("image", IMAGE), ("video", VIDEO)):
            f, s = check_model(world, tp, cp, sp, grid, tiny_cfg())
            report[f"tp{tp} cp{cp} sp{int(sp)} {gname}"] = {"failures": f, **s}
    if world == 2:
        for tp, cp, sp in layouts:
            f, s = check_model(world, tp, cp, sp, VIDEO, tiny_cfg(), recompute=True)
            report[f"tp{tp} cp{cp} sp{int(sp)} video, activation checkpointing"] = {"failures": f, **s}
        report["odd token count is rejected"] = {"failures": _check_odd_length_rejected(world)}
    return report


def _check_odd_length_rejected(world: int) -> list:
    from megassm.parallel.mesh import MeshError

    cfg = tiny_cfg()
    model = build_reference(cfg)
    parallelize_hth(model, make_mesh(world, 1, world), check_inputs=False)
    try:
        model(*model_inputs(cfg, (1, 3, 5)))
    except MeshError as e:
        want = "15 tokens, not divisible by cp = 2; nearest valid lengths: 14 or 16 tokens; e.g. a token grid"
        return [] if want in str(e) else [f"unexpected message: {e}"]
    return ["a 15-token grid on cp=2 was not rejected"]


# -- "teeth": break one collective at a time; the same checks must then fail ------------------------
def _no_sum_hook(group, rows=None):
    return lambda g: g


def _slice_only(x, group, dim=1):  # a reduce-scatter that forgets to sum
    from megassm.parallel.comm import _own_slice

    return _own_slice(x, group, dim) if dist.get_world_size(group) > 1 else x


def _identity_backward(ctx, g):
    return g, None


def _slice_backward(ctx, g):  # all-gather whose backward forgets to sum over ranks
    from megassm.parallel.comm import _own_slice

    return _own_slice(g, ctx.group, ctx.dim).contiguous(), None, None


BREAKS = {
    # name: (patch target "module:attr", replacement, layout (tp, cp, sp))
    # the hooks live in apply.py (replicated rows of split parameters, qk-norms, SP-replicated parameters)
    "TP gradient sum of replicated params skipped": ("megassm.parallel.apply:sum_grad_hook", _no_sum_hook,
                                                     (2, 1, False)),
    "gated-norm sum of squares not all-reduced": ("megassm.parallel.tensor:all_reduce_sum", lambda x, g: x,
                                                  (2, 1, True)),
    "fc_D partial products not summed": ("megassm.parallel.hydra:reduce_scatter_along", _slice_only, (1, 2, False)),
    "column-parallel input gradient not all-reduced": ("megassm.parallel.comm:_CopyToGroup.backward",
                                                        staticmethod(_identity_backward), (2, 1, False)),
    "CP all-gather of B/C: backward not reduce-scattered": ("megassm.parallel.comm:_GatherAlong.backward",
                                                             staticmethod(_slice_backward), (1, 2, False)),
}


def _patch(target: str | tuple[str, ...], value):
    """Set ``module:attr`` (or each of several) to value; returns the undo."""
    import importlib

    if isinstance(target, tuple):
        undos = [_patch(t, value) for t in target]
        return lambda: [u() for u in reversed(undos)]
    mod_name, attr = target.split(":")
    obj = importlib.import_module(mod_name)
    *path, leaf = attr.split(".")
    for p in path:
        obj = getattr(obj, p)
    old = obj.__dict__[leaf] if isinstance(obj, type) else getattr(obj, leaf)
    setattr(obj, leaf, value)
    return lambda: setattr(obj, leaf, old)


def run_broken_checks(rank: int, world: int) -> dict:
    """For each break: the failure count of the layer checks with the break (must be > 0) and
    without it (must be 0), on a Hydra + attention model and a video grid."""
    cfg = tiny_cfg(pattern="tA")
    report = {}
    clean = {}
    for name, (target, value, layout) in BREAKS.items():
        if layout not in clean:
            clean[layout] = len(check_layers(world, *layout, VIDEO, cfg)[0])
        undo = _patch(target, value)
        try:
            broken, _ = check_layers(world, *layout, VIDEO, cfg)
        finally:
            undo()
        report[name] = {"clean": clean[layout], "broken": len(broken), "example": broken[:2]}
    # the CP gradient contract: a gradient scale the reducer does not undo must be caught
    failures, _ = check_model(world, 1, 2, False, IMAGE, cfg, cp_grad_scale=2.0)
    report["CP gradient scale 2 not undone by the reducer"] = {"clean": 0, "broken": len(failures),
                                                               "example": failures[:2]}
    return report
