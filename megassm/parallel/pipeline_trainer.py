"""``megassm train`` with ``parallel.pp > 1``: the Trainer whose DeepSpeed engine holds one pipeline stage.

Differences from ``megassm.train.loop.Trainer`` (everything else -- checkpoints, resume, signals,
metrics, warm start -- is inherited):

- the full model is built (same seed everywhere), warm-started, TP/CP-parallelized, then cut
  to this rank's ``PipelineStage`` before DeepSpeed wraps it (``_build_engine``);
- one optimizer step runs ``parallel.micro_batches`` micro-batches through ``train_step_pipeline``;
  only the first stage reads data and draws t / noise / caption dropout (seeded by the data-parallel
  rank, so that the TP x CP ranks of a stage draw alike);
- the EMA of each stage is its own file, ``ema/mp_rank_XX.safetensors`` (XX = pp_rank*tp + tp_rank);
- periodic preview samples need the whole model and are skipped.

The engine's model-state files are DeepSpeed's ``mp_rank_XX_model_states.pt`` with HTHModel
names; ``pipeline_checkpoint.consolidate_pipeline_checkpoint`` turns them into one full state dict.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from megassm.config.schema import RunConfig
from megassm.diffusion.flow import prepare_batch
from megassm.parallel.pipeline import PipelineStage, partition_blocks, train_step_pipeline
from megassm.parallel.pipeline_comm import PipeGroup
from megassm.train.ema import ShardedEMA
from megassm.train.engine import build_engine
from megassm.train.loop import Trainer

log = logging.getLogger("megassm.train")


class StageMeshView:
    """The mesh as ``parallelize_hth`` sees it inside one stage: the real TP / CP groups (which
    already stay within a stage), dims with pp = 1 (it shards a model, not a pipeline)."""

    def __init__(self, mesh):
        self._mesh = mesh
        self.dims = dataclasses.replace(mesh.dims, world=mesh.dims.world // mesh.dims.pp, pp=1)

    def __getattr__(self, name):
        return getattr(self._mesh, name)


def typical_seq_len(cfg: RunConfig) -> int:
    """Tokens per sample that stage balancing assumes: the procedural data's, or the most common
    latent shape in the shard manifests."""
    pt, ph, pw = cfg.model.patch_size
    if cfg.data.kind == "procedural":
        return max(1, getattr(cfg.data, "frames", 1) // pt) * (cfg.data.image_size // ph) * (cfg.data.image_size // pw)
    from megassm.data.format import parse_shape_key
    from megassm.data.manifest import load_manifest

    hist: Counter[str] = Counter()
    for path in cfg.data.paths:
        hist.update(load_manifest(path).get("shape_histogram", {}))
    if not hist:
        return 4096
    _, T, H, W = parse_shape_key(hist.most_common(1)[0][0])
    return (T // pt) * (H // ph) * (W // pw)


class StageEMA(ShardedEMA):
    """EMA of one stage's (TP shard of its) parameters, whole tensors, one file per (pp, tp) position."""

    def __init__(self, model, decay: float, mesh, group=None):
        super().__init__(model, decay, group)
        self.mesh = mesh

    def _path(self, directory: Path) -> Path:
        return Path(directory) / "ema" / f"mp_rank_{self.mesh.get_model_parallel_rank():02d}.safetensors"

    def save(self, directory: Path, shard_rank: int, write: bool, mp_rank: int = 0, mp_world: int = 1) -> None:
        """Trainer.save's ``shard_rank`` / ``write`` describe the ZeRO-3 layout; here the first DP x CP
        rank of each (pp, tp) position writes its stage (every rank calls: ZeRO-1's fragments are summed)."""
        state = self.full_shadow()
        if self.mesh.get_sequence_data_parallel_rank() != 0:
            return
        path = self._path(directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {n: list(p.shape) for n, p in self.params.items()}
        save_file({n: t.contiguous() for n, t in state.items()}, str(path),
                  metadata={"shapes": json.dumps(meta), "partitioned": "False", "decay": str(self.decay),
                            "layout": "pipeline"})

    def load(self, directory: Path, shard_rank: int, mp_rank: int = 0, mp_world: int = 1) -> None:
        path = self._path(directory)
        if not path.is_file():
            raise FileNotFoundError(f"EMA of this stage missing: {path} (written with ema_decay=0, or by a run "
                                    "with another pp x tp layout?)")
        state = load_file(str(path))
        for n, t in self.shadow.items():
            if n not in state or state[n].shape != t.shape:
                raise ValueError(f"{path}: {n} missing or shaped {tuple(state[n].shape) if n in state else None}, "
                                 f"this stage expects {tuple(t.shape)} (different pipeline plan?)")
            t.copy_(state[n])
        self.refresh()


class _NoData:
    """The data loader of stages that never read data (their checkpointed data position is empty)."""

    def __iter__(self):
        return iter(())

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PipelineTrainer(Trainer):
    """``Trainer`` for ``parallel.pp > 1`` (module docstring: what differs)."""

    def _apply_parallelism(self, model) -> None:
        p = self.cfg.parallel
        if p.tp * p.cp > 1:
            from megassm.parallel.apply import parallelize_hth

            # its first-forward input check hooks HTHModel.forward, which stages never call
            parallelize_hth(model, StageMeshView(self.mesh), check_inputs=False)

    def _build_engine(self, model):
        cfg, p = self.cfg, self.cfg.parallel
        # config/load.py has checked zero_stage == 1 (ZeRO-0's clipping would leave later stages out of
        # the norm), grad_accum == 1 and the interleaving rules
        self.pipe = PipeGroup.from_mesh(self.mesh)
        self.plan = partition_blocks(cfg.model, p.pp, typical_seq_len(cfg), virtual=p.virtual_stages)
        stage = PipelineStage(model, self.plan, self.pipe.rank)
        schedule = "1F1B" if p.virtual_stages == 1 else f"interleaved 1F1B, {p.virtual_stages} chunks per rank"
        self._info(f"pipeline: {p.pp} stages x {p.micro_batches} micro-batches ({schedule}), blocks per stage "
                   f"{[hi - lo for lo, hi in self.plan.bounds]} {list(self.plan.bounds)}, cost imbalance "
                   f"{self.plan.imbalance:.2f}")
        if p.micro_batches < p.pp:
            self._info(f"parallel.micro_batches={p.micro_batches} < pp={p.pp}: the pipeline idles "
                       f"{(p.pp - 1) / (p.micro_batches + p.pp - 1):.0%} of the time; use micro_batches >= 4*pp")
        return build_engine(stage.to(self.device), cfg, self.device, self.mesh)

    def resume(self) -> None:
        # Trainer.__init__ calls resume() once, last: set up what differs under PP before a checkpoint
        # (if any) restores its state.
        if self.ema is not None and not isinstance(self.ema, StageEMA):
            self.ema = StageEMA(self.model, self.cfg.train.ema_decay, self.mesh,
                                getattr(self.engine.optimizer, "dp_process_group", None))
        if not self.is_first_stage:
            self.data = _NoData()  # only the first stage reads; no loader workers elsewhere
        super().resume()

    @property
    def micro_batches_per_step(self) -> int:
        return self.cfg.parallel.micro_batches

    @property
    def is_first_stage(self) -> bool:
        return self.pipe.rank == 0

    def _micro_batches(self, data_iter) -> tuple[list, float]:
        """The first stage's micro-batches for one step, and the time spent waiting for data."""
        batches, wait = [], 0.0
        bf16 = self.engine.bfloat16_enabled()
        for m in range(self.cfg.parallel.micro_batches):
            tw = time.perf_counter()
            batch = next(data_iter)
            wait += time.perf_counter() - tw
            x0, text = batch["latents"].to(self.device), batch["text"].to(self.device)
            if bf16:
                x0, text = x0.bfloat16(), text.bfloat16()
            seq_len = math.prod(self.model.patch_embed.grid(x0.shape))
            batches.append(prepare_batch(x0, text, batch["text_mask"].to(self.device), self.cfg.diffusion, seq_len,
                                         self.sample_indices(m, x0.shape[0]), self.cfg.train.seed))
        return batches, wait

    def train_step(self, data_iter) -> dict:
        t0 = time.perf_counter()
        batches, wait = self._micro_batches(data_iter) if self.is_first_stage else (None, 0.0)
        dtype = torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float32
        res = train_step_pipeline(self.engine, self.model, self.pipe, self.cfg.parallel.micro_batches, batches,
                                  dtype)
        # one collective: a non-finite loss anywhere, the replicas' loss sum, a stop request
        stop = self._stop is not None and self._stop.signum is not None
        flags = torch.tensor([float(not all(math.isfinite(v) for v in res.losses)), res.loss, float(stop)],
                             device=self.device)
        dist.all_reduce(flags)  # SUM over the world: every rank of a replica holds its losses
        n_bad, loss_sum, n_stop = flags.tolist()
        lr = self.scheduler.get_last_lr()[0]
        # ZeRO-1 reduced the gradients in the last backward; its step() finds non-finite ones (a
        # non-finite loss makes them so) and skips, clearing its accumulators: it runs either way
        skipped_before = self.engine.skipped_steps
        self.engine.step()
        ok = n_bad == 0 and self.engine.skipped_steps == skipped_before
        if ok and self.ema is not None:
            self.ema.update()
        # one data-parallel replica's work (Trainer.fit scales by dp and divides FLOPs by pp x tp x cp)
        return {"loss": loss_sum / dist.get_world_size() if ok else float("nan"), "ok": ok, "lr": lr,
                "time": time.perf_counter() - t0, "tokens": res.tokens, "samples": res.samples, "data_wait": wait,
                "seq_len": res.tokens // max(res.samples, 1), "bubble": res.bubble_fraction, "stop": n_stop > 0}

    def log_samples(self) -> None:
        # said at every preview step, so that a log read from any point shows why no images appear
        self._info(f"step {self.step}: no preview samples (train.sample_every={self.cfg.train.sample_every}): "
                   "they need the whole model and are skipped under parallel.pp > 1; sample a checkpoint with "
                   "`megassm sample`")
