"""``parallelize_hth``: apply TP (+ Megatron-SP) and Ulysses CP to an unsharded HTHModel, in place.

Called once, before the training backend wraps the model, on a model with identical weights on every rank
(torchtitan's ``parallelize_llama`` pattern). The model code stays free of parallelism:

1. parameters are cut to this TP rank's shard (``sharding.shard_state_dict``'s plan);
2. each mixer becomes its kind's parallel twin (``MixerSpec.parallelize``, megassm/models/mixers/:
   ``ParallelHydra``, ``ParallelSelfAttention``; they own their layout and have the same ``mix``),
   cross-attention and FFN linears become column/row-parallel;
3. gradient hooks sum over TP the gradients that each TP rank holds only part of (the rows of a TP-split
   parameter that every rank holds whole come from the plan: ``sharding.replicated_rows``);
4. forward hooks cut the token sequence after ``patch_embed`` and gather it after ``final_layer``.

Gradient contract (docs/parallelism.md): after backward, a TP-sharded parameter's grad is its
shard of the full gradient and a TP-replicated one's is the full gradient; over CP each rank holds
a partial gradient, and their sum over CP ranks is ``cp_grad_scale`` times the full gradient
(scale 1: the reducer must SUM over CP; a reducer that averages over DP x CP needs scale cp -- the
training backend says which, ``TrainBackend.cp_grad_scale`` in megassm/train/backends/base.py).
"""

from __future__ import annotations

import torch
from torch import nn

from megassm.config.schema import CP_IMPLS
from megassm.models.mixers import mixer_for_symbol
from megassm.parallel.attention import parallelize_cross_attention, parallelize_feed_forward
from megassm.parallel.comm import all_reduce_, copy_to_group, gather_replicated, sum_grad_hook
from megassm.parallel.mesh import MeshError
from megassm.parallel.sharding import ADAPTER_SUFFIXES, ShardSpec, replicated_rows, shard_spec, shard_tensor
from megassm.parallel.tensor import ParallelContext


def parallelize_hth(
    model: nn.Module,
    mesh,
    *,
    sequence_parallel: bool = True,
    cp_grad_scale: float = 1.0,
    check_inputs: bool = True,
    pipeline: bool = False,
    cp_impl: str = "ulysses",
) -> ParallelContext | None:
    """Shard ``model`` (an HTHModel) in place for ``mesh``'s TP and CP degrees; returns the context.

    sequence_parallel: Megatron-SP on top of TP (ignored when tp=1).
    cp_grad_scale:     multiplies every gradient under CP (see module doc): 1 for a reducer that sums over
                       CP ranks (and for inference), the backend's ``cp_grad_scale()`` when training.
    check_inputs:      on the first forward, verify that all TP x CP ranks of a sample got the same
                       latents, t, text and mask (their losses must be one loss); raises if not.
    pipeline:          the model is cut into ``PipelineStage``s afterwards (megassm/train/steps/pipeline.py):
                       the TP / CP groups lie within a stage, so only they shard it (pp is the stages').
    cp_impl:           how Hydra blocks run under CP (``parallel.cp_impl``): "ulysses", "state_passing" or
                       "auto" (``megassm.parallel.hydra_state``); parameters are the same either way.
    """
    dims = mesh.dims
    if dims.pp > 1 and not pipeline:
        raise NotImplementedError(
            f"parallel.pp={dims.pp}: pipeline stages are not built by parallelize_hth (the pipeline "
            "schedule lives in megassm.parallel.pipeline); use pp=1 with tp/cp, or the pipeline engine")
    if dims.tp == 1 and dims.cp == 1:
        return None
    if getattr(model, "parallel_context", None) is not None:
        raise RuntimeError("parallelize_hth was already applied to this model")
    cfg = model.cfg
    dims.check_model(cfg)
    if cp_impl not in CP_IMPLS:
        raise ValueError(f"parallelize_hth: cp_impl={cp_impl!r}; valid: {list(CP_IMPLS)}")
    ctx = ParallelContext.from_mesh(mesh, sequence_parallel, cp_impl)

    sharded = _shard_parameters(model, cfg, ctx)
    for blk in model.blocks:
        blk.mixer = mixer_for_symbol(blk.symbol).parallelize(blk.mixer, ctx, cfg)
        if ctx.tp > 1:
            blk.cross_attn = parallelize_cross_attention(blk.cross_attn, ctx)
            parallelize_feed_forward(blk.mlp, ctx)
    if ctx.tp > 1:
        _register_tp_grad_sums(model, ctx, sharded)
    _split_sequence(model, ctx, float(cp_grad_scale), check_inputs)
    model.parallel_context = ctx
    return ctx


def _shard_parameters(model: nn.Module, cfg, ctx: ParallelContext) -> dict[str, ShardSpec]:
    """Cut every TP-split parameter to this rank's shard, keeping the Parameter objects; returns their plans."""
    sharded: dict[str, ShardSpec] = {}
    if ctx.tp == 1:
        return sharded
    with torch.no_grad():
        for name, p in model.named_parameters():
            spec = shard_spec(name, cfg, ctx.tp)
            if spec is None:
                continue
            p.data = shard_tensor(p.data, spec, ctx.tp_rank, ctx.tp, name).clone()
            sharded[name] = spec
    return sharded


def _register_tp_grad_sums(model: nn.Module, ctx: ParallelContext, sharded: dict[str, ShardSpec]) -> list[str]:
    """Hook every TP-replicated parameter (or rows) whose gradient each TP rank holds only part of; returns names.

    Always: what is shared by heads that TP splits -- the replicated rows of TP-split parameters
    (``sharding.replicated_rows``: Hydra's B/C rows of in_proj / conv1d with ngroups=1 and the lora_B rows
    that follow them) and qk-norm weights (attention, cross-attention). Under SP also everything that
    acts on sequence slices: the blocks' replicated parameters (modulation table, norm2, biases of
    row-parallel layers), patch embedding and final layer. (The timestep modulation is summed as an
    activation, see ``_split_sequence``; the text path is never sequence-split.)
    """
    hooked = []

    def hook(name: str, p: nn.Parameter, rows=None):
        if not p.requires_grad:  # frozen (a LoRA base): no gradient to sum
            return
        p.register_hook(sum_grad_hook(ctx.tp_group, rows))
        hooked.append(name if rows is None else f"{name}[{rows[0]}:{rows[1]}]")

    params = dict(model.named_parameters())
    for name, spec in sharded.items():
        for rows in replicated_rows(spec, ctx.tp, name):
            hook(name, params[name], rows)
    for i, blk in enumerate(model.blocks):
        prefix = f"blocks.{i}."
        for name, p in blk.named_parameters():
            is_sharded = prefix + name in sharded
            if name.endswith(ADAPTER_SUFFIXES):  # replicated LoRA factors: megassm/lora/parallel.py hooks them
                continue
            if ".q_norm." in f".{name}" or ".k_norm." in f".{name}" or (ctx.sequence_parallel and not is_sharded):
                hook(prefix + name, p)
    if ctx.sequence_parallel:
        for mod_name in ("patch_embed", "final_layer"):
            for name, p in getattr(model, mod_name).named_parameters():
                hook(f"{mod_name}.{name}", p)
    for rule in _GRAD_SUM_RULES:
        hooked += rule(model, model.cfg, ctx)
    return hooked


# further TP gradient-sum rules ``(model, model_cfg, ctx) -> hooked names``, registered by their owners
# (LoRA's replicated factors: megassm/lora/parallel.py), so parallel/ knows no such kind
_GRAD_SUM_RULES: list = []


def register_tp_grad_sums(rule) -> None:
    """Run ``rule(model, model_cfg, ctx)`` in every ``parallelize_hth`` at tp > 1, after the built-in hooks."""
    if rule not in _GRAD_SUM_RULES:
        _GRAD_SUM_RULES.append(rule)


def _split_sequence(model: nn.Module, ctx: ParallelContext, grad_scale: float, check_inputs: bool) -> None:
    """Cut the tokens after patch_embed and gather them after final_layer (forward hooks)."""
    n, r = ctx.seq_shards, ctx.seq_rank

    def cut_tokens(module, args, out):  # (B, L, d) -> (B, L/n, d), this rank's contiguous slice
        L = out.shape[1]
        if L % n:
            raise MeshError(_seq_len_message(module.grid(args[0].shape), n, ctx))
        return out.narrow(1, r * (L // n), L // n)

    def gather_tokens(module, args, out):  # (B, L/n, c) -> (B, L, c) on every rank
        return gather_replicated(out, ctx.seq_group, dim=1, grad_scale=grad_scale)

    model.patch_embed.register_forward_hook(cut_tokens)
    model.final_layer.register_forward_hook(gather_tokens)
    if ctx.sequence_parallel:
        # t_mod and t_emb are replicated but meet sequence slices: their gradients are partial on each
        # TP rank. Summing the (B, 6d) / (B, d) activation gradients is far cheaper than summing
        # the gradients of t_block's 6d x d weight.
        model.t_block.register_forward_hook(lambda m, a, out: copy_to_group(out, ctx.tp_group))
        model.final_layer.register_forward_pre_hook(lambda m, a: (a[0], copy_to_group(a[1], ctx.tp_group), *a[2:]))
    if check_inputs and ctx.tpcp_group is not None:
        handle = None

        def check(module, args, kwargs):
            handle.remove()  # first forward only: a per-rank seeding bug shows at once
            _check_same_inputs([*args, *kwargs.values()], ctx.tpcp_group)

        handle = model.register_forward_pre_hook(check, with_kwargs=True)


def _check_same_inputs(inputs, group) -> None:
    sig = torch.stack([t.detach().double().sum() for t in inputs if torch.is_tensor(t)])
    both = torch.cat([sig, -sig])
    all_reduce_(both, group, op="max")
    if not (torch.equal(both[: len(sig)], sig) and torch.equal(-both[len(sig) :], sig)):
        raise RuntimeError(
            "parallelize_hth: the TP/CP ranks of one sample got different model inputs (latents, t, text or "
            "mask); they compute one sample together, so its noise, timestep and caption dropout must be drawn "
            "identically on them (seed those generators by the data-parallel rank, not the global rank)")


def _seq_len_message(grid: tuple[int, int, int], n: int, ctx: ParallelContext) -> str:
    T, H, W = grid
    L = T * H * W
    what = f"cp*tp = {ctx.cp}*{ctx.tp} = {n}" if ctx.sequence_parallel else f"cp = {n}"
    near = [v for v in (L // n * n, (L // n + 1) * n) if v > 0]
    hint = ""
    for dw in range(1, W + 1):  # nearest token grid that differs in the width only
        for w in (W - dw, W + dw):
            if w > 0 and (T * H * w) % n == 0:
                hint = f"; e.g. a token grid (T', H', W') = ({T}, {H}, {w})"
                break
        if hint:
            break
    return (f"token grid (T', H', W') = {grid} has {L} tokens, not divisible by {what}; nearest valid "
            f"lengths: {' or '.join(map(str, near))} tokens{hint}. Sequences are not padded under CP/SP "
            f"(docs/parallelism.md): change the latent size or the parallel degrees")
