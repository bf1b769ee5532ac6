"""Pipeline parallelism for HTH: cost-balanced stages and a 1F1B (optionally interleaved) step.

    typical_seq_len(model_cfg, data_cfg)      -> tokens per sample that stage balancing assumes
    partition_blocks(model_cfg, pp, seq_len)  -> PipelinePlan (block ranges per virtual stage)
    PipelineStage(model, plan, pp_rank)       -> this rank's part of an HTHModel (global names kept)
    train_step_pipeline(engine, stage, ...)   -> forward + backward of m micro-batches, grads left
                                                 in place for engine.step()

What crosses a stage boundary (one packed message per micro-batch and direction, see
``pipeline_comm``): the residual stream x (B, L/n, d) (n = CP x TP-under-SP sequence shards), the
timestep modulation t_mod (B, 6d) and embedding t_emb (B, d), the embedded text y (B, Lt, d) and its
mask, and the flow-matching target (B, C, T, H, W) for the loss on the last stage; backwards go the
gradients of x, t_mod, t_emb and y. The embedders run once, on the first stage, and their gradients
come back with the activations' -- no tied copies, no extra all-reduce, no parameter counted twice
in the gradient norm (docs/pipeline.md explains the choice). All randomness of a step (t, noise,
caption dropout) is drawn on the first stage only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from megassm.config.schema import DataConfig, ModelConfig
from megassm.diffusion.flow import FlowBatch, velocity_loss
from megassm.models.accounting import block_flops_per_token
from megassm.models.block import TokenGrid
from megassm.models.embed import unpatchify
from megassm.models.hth import embed_text
from megassm.parallel.comm import broadcast_
from megassm.parallel.mesh import MeshError
from megassm.parallel.pipeline_comm import PipeGroup, exchange, pack, unpack
from megassm.parallel.pipeline_schedule import Exchange, Timeline, schedule, simulate


# -- partitioning ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PipelinePlan:
    """Blocks [lo, hi) of every virtual stage; virtual stage ``vs`` runs on rank ``vs % pp``."""

    pp: int
    virtual: int
    bounds: tuple[tuple[int, int], ...]
    costs: tuple[float, ...]  # forward FLOPs per token of each virtual stage (embedders, head included)

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual

    def virtual_stages(self, rank: int) -> list[int]:
        return [c * self.pp + rank for c in range(self.virtual)]

    def blocks_of(self, rank: int) -> list[int]:
        return [i for vs in self.virtual_stages(rank) for i in range(*self.bounds[vs])]

    @property
    def imbalance(self) -> float:
        """Slowest stage / mean stage: the pipeline runs at the pace of the slowest."""
        return max(self.costs) / (sum(self.costs) / len(self.costs))


def stage_costs(m: ModelConfig, seq_len: int, text_len: int | None = None) -> tuple[list[float], float, float]:
    """(per-block, first-stage extra, last-stage extra) forward FLOPs per token (models.accounting)."""
    lt = m.max_text_len if text_len is None else text_len
    patch = m.in_channels * math.prod(m.patch_size)
    d = m.d_model
    blocks = [float(block_flops_per_token(m, s, seq_len, text_len)) for s in m.pattern]
    per_sample = 2 * lt * (m.text_dim * d + d * d) + 2 * (256 * d + d * d + d * 6 * d)  # text + timestep
    first = 2 * patch * d + per_sample / seq_len
    return blocks, first, 2 * d * patch


def typical_seq_len(m: ModelConfig, data: DataConfig) -> int:
    """Tokens per sample that stage balancing assumes: the procedural data's, or the most common
    latent shape in the shard manifests."""
    pt, ph, pw = m.patch_size
    if data.kind == "procedural":
        return max(1, getattr(data, "frames", 1) // pt) * (data.image_size // ph) * (data.image_size // pw)
    from megassm.data.manifest import most_common_latent_shape

    shape = most_common_latent_shape(list(data.paths))
    if shape is None:
        return 4096
    T, H, W = shape
    return (T // pt) * (H // ph) * (W // pw)


def partition_blocks(m: ModelConfig, pp: int, seq_len: int, virtual: int = 1,
                     text_len: int | None = None) -> PipelinePlan:
    """Cut ``m.pattern`` into ``pp * virtual`` contiguous stages minimising the costliest stage.

    Costs are forward FLOPs per token at ``seq_len`` tokens (attention blocks grow with the
    sequence, Hydra blocks do not); the first stage also pays the patch/timestep/text embedders,
    the last the final layer. Exact (dynamic programming over cut points); among equally balanced
    cuts the later stages take more blocks (1F1B keeps the most activations on the first stages).
    """
    S = pp * virtual
    n = len(m.pattern)
    if S > n:
        raise MeshError(f"parallel.pp={pp} x virtual stages {virtual} = {S} stages but the model has {n} blocks "
                        f"(model.pattern={m.pattern!r}); each stage needs at least one block")
    blocks, first, last = stage_costs(m, seq_len, text_len)
    prefix = [0.0]
    for c in blocks:
        prefix.append(prefix[-1] + c)

    def cost(k: int, lo: int, hi: int) -> float:  # stage k holds blocks [lo, hi)
        return prefix[hi] - prefix[lo] + (first if k == 0 else 0.0) + (last if k == S - 1 else 0.0)

    # best[k][j]: the smallest max-stage cost placing blocks [0, j) into stages 0..k
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(S)]
    cut = [[0] * (n + 1) for _ in range(S)]
    for j in range(1, n + 1):
        best[0][j] = cost(0, 0, j)
    for k in range(1, S):
        for j in range(k + 1, n + 1):
            for i in range(k, j):
                c = max(best[k - 1][i], cost(k, i, j))
                if c < best[k][j] - 1e-9 * c:
                    best[k][j], cut[k][j] = c, i
    bounds, j = [], n
    for k in range(S - 1, -1, -1):
        i = cut[k][j] if k else 0
        bounds.append((i, j))
        j = i
    bounds.reverse()
    return PipelinePlan(pp, virtual, tuple(bounds), tuple(cost(k, lo, hi) for k, (lo, hi) in enumerate(bounds)))


# -- the stage module -----------------------------------------------------------------------------
class PipelineStage(nn.Module):
    """The modules of ``model`` that pipeline rank ``rank`` runs, under their HTHModel names:
    ``blocks.{i}`` for its blocks, plus ``patch_embed``, ``t_embedder``, ``t_block``, ``y_embedder``,
    ``y_null`` on the rank of virtual stage 0 and ``final_layer`` on the rank of the last.

    So ``stage.state_dict()`` is a subset of ``model.state_dict()`` (same keys, same tensors), and a
    TP/CP-parallelized model (``parallelize_hth``) keeps its hooks: they sit on these submodules.
    """

    def __init__(self, model: nn.Module, plan: PipelinePlan, rank: int):
        super().__init__()
        if not 0 <= rank < plan.pp:
            raise ValueError(f"pipeline rank {rank} not in [0, {plan.pp})")
        if plan.bounds[-1][1] != len(model.blocks):
            raise ValueError(f"plan covers {plan.bounds[-1][1]} blocks, the model has {len(model.blocks)}")
        self.cfg: ModelConfig = model.cfg
        self.plan, self.rank = plan, rank
        self.vstages = plan.virtual_stages(rank)
        self.parallel_context = getattr(model, "parallel_context", None)
        if 0 in self.vstages:
            self.patch_embed, self.t_embedder, self.t_block = model.patch_embed, model.t_embedder, model.t_block
            self.y_embedder, self.y_null = model.y_embedder, model.y_null
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in plan.blocks_of(rank)})
        if plan.num_stages - 1 in self.vstages:
            self.final_layer = model.final_layer

    @property
    def seq_shards(self) -> int:
        ctx = self.parallel_context
        return 1 if ctx is None else ctx.seq_shards

    def token_grid(self, grid: tuple[int, int, int], device) -> TokenGrid:
        return TokenGrid.for_blocks(grid, device, self.cfg, self.blocks.values())

    def embed(self, latents: Tensor, t: Tensor, text: Tensor, text_mask: Tensor | None):
        """HTHModel.forward up to the blocks: (x (B, L/n, d), t_mod (B, 6d), t_emb (B, d), y (B, Lt, d), mask)."""
        x = self.patch_embed(latents)  # (B, L, d); parallelize_hth's hook cuts it to (B, L/n, d)
        t_emb = self.t_embedder(t)  # (B, d)
        t_mod = self.t_block(t_emb)  # (B, 6d)
        y, y_mask = embed_text(self.cfg, self.y_null, self.y_embedder, text, text_mask)
        return x, t_mod, t_emb, y, y_mask

    def forward(self, chunk: int, *inputs: Tensor, grid: tuple[int, int, int]):
        """Run virtual stage ``self.vstages[chunk]``.

        First stage: inputs = (latents (B, C, T, H, W), t (B,), text (B, Lt, text_dim), text_mask (B, Lt)).
        Others:      inputs = (x (B, L/n, d), t_mod (B, 6d), t_emb (B, d), y (B, Lt, d), y_mask (B, Lt)).
        Returns the predicted velocity (B, C, T, H, W) on the last stage, else the next stage's inputs.
        """
        vs = self.vstages[chunk]
        if vs == 0:
            if tuple(self.patch_embed.grid(inputs[0].shape)) != tuple(grid):
                raise ValueError(f"latents {tuple(inputs[0].shape)} do not make the token grid {grid}")
            x, t_mod, t_emb, y, y_mask = self.embed(*inputs)
        else:
            x, t_mod, t_emb, y, y_mask = inputs
        tg = self.token_grid(grid, x.device)
        lo, hi = self.plan.bounds[vs]
        for i in range(lo, hi):
            x = self.blocks[str(i)](x, t_mod, y, y_mask, tg)
        if vs < self.plan.num_stages - 1:
            return x, t_mod, t_emb, y, y_mask
        x = self.final_layer(x, t_emb)  # (B, L, C*pt*ph*pw), gathered over CP/SP by parallelize_hth
        return unpatchify(x, tg.grid, self.cfg.patch_size, self.cfg.in_channels)


# -- inputs of one micro-batch --------------------------------------------------------------------
# The first stage's input per micro-batch is a ``megassm.diffusion.flow.FlowBatch`` (noisy latents, fp32 t,
# text, dropped mask, target), drawn once by ``prepare_batch`` -- the same draws as the dense trainer.
MicroBatch = FlowBatch


# -- one training step ----------------------------------------------------------------------------
@dataclass
class PipelineStepResult:
    losses: list[float]  # per micro-batch, on every rank (sent from the last stage)
    bubble_fraction: float  # of the schedule (forward 1, backward 2 time units)
    samples: int  # in all micro-batches
    tokens: int

    @property
    def loss(self) -> float:
        return sum(self.losses) / len(self.losses)


def _meta(batches: list[MicroBatch] | None, m: int, group: PipeGroup, device) -> list[list[int]]:
    """[B, C, T, H, W, Lt] of every micro-batch, from the first stage to all stages."""
    meta = torch.zeros(m, 6, dtype=torch.int64, device=device)
    if group.rank == 0:
        if batches is None or len(batches) != m:
            raise ValueError(f"the first pipeline stage needs {m} micro-batches, got "
                             f"{None if batches is None else len(batches)}")
        for i, b in enumerate(batches):
            meta[i] = torch.tensor([*b.xt.shape, b.text.shape[1]])
    if group.size > 1:
        broadcast_(meta, group.ranks[0], group.group)
    return meta.tolist()


class _Shapes:
    """Shapes of the packed messages of each micro-batch (both ends compute them alike)."""

    def __init__(self, cfg: ModelConfig, meta: list[list[int]], seq_shards: int):
        self.cfg, self.meta, self.n = cfg, meta, seq_shards

    def grid(self, mb: int) -> tuple[int, int, int]:
        _, _, T, H, W, _ = self.meta[mb]
        pt, ph, pw = self.cfg.patch_size
        return T // pt, H // ph, W // pw

    def activations(self, mb: int) -> list[tuple[int, ...]]:
        B, C, T, H, W, Lt = self.meta[mb]
        d, L = self.cfg.d_model, math.prod(self.grid(mb))
        if L % self.n:
            raise MeshError(f"micro-batch {mb}: {L} tokens do not split into {self.n} sequence shards")
        return [(B, L // self.n, d), (B, 6 * d), (B, d), (B, Lt, d), (B, Lt), (B, C, T, H, W)]

    def gradients(self, mb: int) -> list[tuple[int, ...]]:
        return self.activations(mb)[:4]


def train_step_pipeline(
    engine, stage: PipelineStage, group: PipeGroup, micro_batches: int,
    batches: list[MicroBatch] | None = None, dtype: torch.dtype = torch.float32,
    timeline: Timeline | None = None,
) -> PipelineStepResult:
    """Forward and backward of ``micro_batches`` micro-batches through the pipeline (1F1B, or
    interleaved 1F1B when the plan has virtual stages); gradients are left for ``engine.step()``.

    engine: ``engine(chunk, *inputs, grid=...)`` runs ``stage``; ``engine.backward(loss, scale_wrt_gas=...)``,
        ``set_gradient_accumulation_boundary`` and ``gradient_accumulation_steps()`` as a ``TrainBackend``
        (megassm/train/backends/base.py) or a DeepSpeed engine has them (its gradient_accumulation_steps must
        be ``micro_batches``: the loss is averaged over them).
    batches: the first stage's micro-batches (``megassm.diffusion.flow.prepare_batch``); other stages pass None.
    dtype: the compute dtype of messages (the model's: bf16 under DeepSpeed bf16).
    """
    m, plan = micro_batches, stage.plan
    if engine.gradient_accumulation_steps() != m:
        raise ValueError(f"engine accumulates {engine.gradient_accumulation_steps()} micro-batches per step, "
                         f"the pipeline runs {m} (set gradient_accumulation_steps = parallel.micro_batches)")
    device = next(stage.parameters()).device
    shapes = _Shapes(stage.cfg, _meta(batches, m, group, device), stage.seq_shards)
    timeline = timeline or simulate(schedule(plan.pp, m, plan.virtual), plan.virtual)
    run = _Executor(engine, stage, group, shapes, batches, dtype, device)
    n_backward = sum(1 for e in timeline.events[group.rank] if not isinstance(e, Exchange) and e.kind == "B")
    for ev in timeline.events[group.rank]:
        if isinstance(ev, Exchange):
            run.exchange(ev)
        elif ev.kind == "F":
            run.forward(ev.chunk, ev.mb)
        else:
            run.backward(ev.chunk, ev.mb, boundary=run.backwards_done == n_backward - 1)
    run.finish()
    losses = torch.zeros(m, dtype=torch.float64, device=device)
    if plan.num_stages - 1 in stage.vstages:
        losses.copy_(torch.stack([run.losses[i] for i in range(m)]))
    if group.size > 1:
        broadcast_(losses, group.ranks[(plan.num_stages - 1) % plan.pp], group.group)
    samples = sum(shapes.meta[i][0] for i in range(m))
    tokens = sum(shapes.meta[i][0] * math.prod(shapes.grid(i)) for i in range(m))
    return PipelineStepResult(losses.tolist(), timeline.bubble_fraction, samples, tokens)


class _Executor:
    """Runs one rank's events; holds the in-flight micro-batches' autograd state and messages."""

    def __init__(self, engine, stage, group, shapes: _Shapes, batches, dtype, device):
        self.engine, self.stage, self.group, self.shapes = engine, stage, group, shapes
        self.batches, self.dtype, self.device = batches, dtype, device
        self.S, self.pp = stage.plan.num_stages, stage.plan.pp
        self.saved: dict[tuple[int, int], tuple] = {}  # (vs, mb) -> (input leaves, outputs or loss)
        self.outbox: dict[tuple[str, int, int], Tensor] = {}
        self.inbox: dict[tuple[str, int, int], Tensor] = {}
        self.losses: dict[int, Tensor] = {}
        self.sends: list = []
        self.backwards_done = 0

    def exchange(self, ev: Exchange) -> None:
        # the previous exchange's sends: their receivers posted them at that exchange and need nothing
        # from this rank after it, so waiting here cannot deadlock; it frees their buffers
        self._wait_sends()
        sends = [(msg.dst, self.outbox.pop((msg.kind, msg.vs, msg.mb))) for msg in ev.sends]
        recvs = []
        for msg in ev.recvs:
            parts = self.shapes.activations(msg.mb) if msg.kind == "F" else self.shapes.gradients(msg.mb)
            buf = torch.empty(sum(math.prod(s) for s in parts), dtype=self.dtype, device=self.device)
            self.inbox[(msg.kind, msg.vs, msg.mb)] = buf
            recvs.append((msg.src, buf))
        self.sends += exchange(self.group, sends, recvs)

    def forward(self, chunk: int, mb: int) -> None:
        vs = self.stage.vstages[chunk]
        if vs == 0:
            b = self.batches[mb]
            inputs, leaves, target = (b.xt, b.t, b.text, b.text_mask), [], b.target
        else:
            x, t_mod, t_emb, y, y_mask, target = unpack(self.inbox.pop(("F", vs - 1, mb)),
                                                        self.shapes.activations(mb))
            leaves = [t.detach().requires_grad_() for t in (x, t_mod, t_emb, y)]
            inputs = (*leaves, y_mask > 0.5)
        out = self.engine(chunk, *inputs, grid=self.shapes.grid(mb))
        if vs == self.S - 1:
            loss = velocity_loss(out, target)
            self.losses[mb] = loss.detach().double()
            self.saved[(vs, mb)] = (leaves, loss)
        else:
            self.saved[(vs, mb)] = (leaves, out[:4])
            x, t_mod, t_emb, y, y_mask = out
            self.outbox[("F", vs, mb)] = pack([x, t_mod, t_emb, y, y_mask, target], self.dtype)

    def backward(self, chunk: int, mb: int, boundary: bool) -> None:
        vs = self.stage.vstages[chunk]
        leaves, outputs = self.saved.pop((vs, mb))
        self.engine.set_gradient_accumulation_boundary(boundary)
        if vs == self.S - 1:
            self.engine.backward(outputs)  # the loss; DeepSpeed divides it by the micro-batch count
        else:
            grads = unpack(self.inbox.pop(("B", vs + 1, mb)), self.shapes.gradients(mb))
            # d(sum o*g)/do = g: the received gradients, already divided by the micro-batch count
            surrogate = sum((o * g).sum() for o, g in zip(outputs, grads) if o.requires_grad)
            self.engine.backward(surrogate, scale_wrt_gas=False)
        self.backwards_done += 1
        if vs > 0:
            self.outbox[("B", vs, mb)] = pack(
                [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves], self.dtype)

    def _wait_sends(self) -> None:
        for work, _buffer in self.sends:
            work.wait()
        self.sends = []

    def finish(self) -> None:
        self._wait_sends()
        if self.saved or self.inbox or self.outbox:
            raise RuntimeError(f"pipeline step ended with state left: saved {list(self.saved)}, "
                               f"inbox {list(self.inbox)}, outbox {list(self.outbox)}")
