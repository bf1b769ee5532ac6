"""``PipelineStep``: parallel.pp > 1. This rank's ``PipelineStage`` under the backend, ``parallel.micro_batches``
micro-batches per step through ``megassm.parallel.pipeline.train_step_pipeline`` (1F1B or interleaved).

- the full model is built (same seed everywhere) and warm-started by the Trainer, TP/CP-parallelized here
  (its TP / CP groups lie within a stage), then cut to this rank's stage before the backend wraps it;
- only the first stage reads data and draws t / noise / caption dropout (``flow_batch``, keyed on the
  global sample index, so that the TP x CP ranks of a stage draw alike);
- the EMA of each stage is its own file, ``ema/mp_rank_XX.safetensors`` (XX = pp_rank*tp + tp_rank);
- periodic preview samples need the whole model and are skipped (``previews = False``).

The backend's model-state files are DeepSpeed's ``mp_rank_XX_model_states.pt`` with HTHModel names;
``checkpoint/zero.consolidate_pipeline_checkpoint`` turns them into one full state dict.
config/validate.py has checked the regime: zero_stage == 1 (ZeRO-0's clipping would leave later stages out
of the norm), grad_accum == 1 and the interleaving rules.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from megassm.checkpoint.snapshot import FileSink
from megassm.config.schema import RunConfig
from megassm.parallel.apply import parallelize_hth
from megassm.parallel.comm import all_reduce_
from megassm.parallel.pipeline import (
    PipelinePlan,
    PipelineStage,
    partition_blocks,
    train_step_pipeline,
    typical_seq_len,
)
from megassm.parallel.pipeline_checkpoint import stage_owns
from megassm.parallel.pipeline_comm import PipeGroup
from megassm.train.ema import ShardedEMA
from megassm.train.steps import SampleIndices, flow_batch, next_batch


class StageEMA(ShardedEMA):
    """EMA of one stage's (TP shard of its) parameters, whole tensors, one file per (pp, tp) position."""

    def __init__(self, model, decay: float, mesh, group=None, shards=None):
        super().__init__(model, decay, group, shards)
        self.mesh = mesh

    def _path(self, directory: Path) -> Path:
        return Path(directory) / "ema" / f"mp_rank_{self.mesh.get_model_parallel_rank():02d}.safetensors"

    def save(self, directory: Path, shard_rank: int, write: bool, mp_rank: int = 0, mp_world: int = 1,
             sink: FileSink | None = None) -> None:
        """Trainer.save's ``shard_rank`` / ``write`` describe the ZeRO-3 layout; here the first DP x CP
        rank of each (pp, tp) position writes its stage (every rank calls: ZeRO-1's fragments are summed).
        A deferred ``sink``: snapshotted here, written by the background writer (``ShardedEMA.save``)."""
        sink = sink or FileSink()
        state = self.full_shadow()
        if self.mesh.get_sequence_data_parallel_rank() != 0:
            return
        path = self._path(directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {n: list(p.shape) for n, p in self.params.items()}
        metadata = {"shapes": json.dumps(meta), "partitioned": "False", "decay": str(self.decay), "layout": "pipeline"}
        sink.put_tensors(path, {n: t.contiguous() for n, t in state.items()},
                         lambda t: save_file(t, str(path), metadata=metadata))

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


class PipelineStep:
    previews = False

    def __init__(self, cfg: RunConfig, mesh, backend, device: torch.device, log):
        self.cfg, self.mesh, self.backend, self.device, self.log = cfg, mesh, backend, device, log
        self.pipe = PipeGroup.from_mesh(mesh)
        self.micro_batches = cfg.parallel.micro_batches
        self.reads_data = self.pipe.rank == 0  # only the first stage reads; no loader workers elsewhere
        self._plan = None

    @property
    def plan(self) -> PipelinePlan:
        """Blocks per stage, balanced at the data's typical tokens per sample (made at first use)."""
        if self._plan is None:
            cfg, p = self.cfg, self.cfg.parallel
            self._plan = partition_blocks(cfg.model, p.pp, typical_seq_len(cfg.model, cfg.data),
                                          virtual=p.virtual_stages)
        return self._plan

    def owns(self, name: str) -> bool:
        return stage_owns(name, self.plan, self.pipe.rank)

    def parallelize(self, model: nn.Module) -> None:
        p = self.cfg.parallel
        if p.tp * p.cp > 1:
            # its first-forward input check hooks HTHModel.forward, which stages never call
            parallelize_hth(model, self.mesh, cp_grad_scale=self.backend.cp_grad_scale(), check_inputs=False,
                            pipeline=True, cp_impl=p.cp_impl)

    def wrap(self, model: nn.Module, load_universal: bool = False) -> nn.Module:
        p = self.cfg.parallel
        stage = PipelineStage(model, self.plan, self.pipe.rank)
        schedule = "1F1B" if p.virtual_stages == 1 else f"interleaved 1F1B, {p.virtual_stages} chunks per rank"
        self.log(f"pipeline: {p.pp} stages x {p.micro_batches} micro-batches ({schedule}), blocks per stage "
                 f"{[hi - lo for lo, hi in self.plan.bounds]} {list(self.plan.bounds)}, cost imbalance "
                 f"{self.plan.imbalance:.2f}")
        if p.micro_batches < p.pp:
            self.log(f"parallel.micro_batches={p.micro_batches} < pp={p.pp}: the pipeline idles "
                     f"{(p.pp - 1) / (p.micro_batches + p.pp - 1):.0%} of the time; use micro_batches >= 4*pp")
        return self.backend.prepare(stage, self.micro_batches, load_universal)

    def build_ema(self, decay: float) -> StageEMA:
        b = self.backend
        return StageEMA(b.module, decay, self.mesh, group=b.reduction_group(), shards=b.shards())

    def _micro_batches(self, data_iter, sample_indices: SampleIndices) -> tuple[list, float]:
        """The first stage's micro-batches for one step, and the time spent waiting for data."""
        batches, wait = [], 0.0
        for m in range(self.micro_batches):
            batch, waited = next_batch(data_iter)
            wait += waited
            fb, _ = flow_batch(batch, self.backend.module.patch_embed, self.device, self.backend.bf16,
                               self.cfg.diffusion, sample_indices(m, batch["latents"].shape[0]), self.cfg.train.seed)
            batches.append(fb)
        return batches, wait

    def run(self, data_iter, sample_indices: SampleIndices, stop: bool, step: int) -> dict:
        b = self.backend
        batches, wait = self._micro_batches(data_iter, sample_indices) if self.reads_data else (None, 0.0)
        dtype = torch.bfloat16 if b.bf16 else torch.float32
        res = train_step_pipeline(b, b.module, self.pipe, self.micro_batches, batches, dtype)
        # one collective: a non-finite loss anywhere, the replicas' loss sum, a stop request
        flags = torch.tensor([float(not all(math.isfinite(v) for v in res.losses)), res.loss, float(stop)],
                             device=self.device)
        all_reduce_(flags)  # SUM over the world: every rank of a replica holds its losses
        n_bad, loss_sum, n_stop = flags.tolist()
        lr = b.lr()
        # ZeRO-1 reduced the gradients in the last backward; its step() finds non-finite ones (a
        # non-finite loss makes them so) and skips, clearing its accumulators: it runs either way
        result = b.step()
        ok = n_bad == 0 and not result.skipped
        # one data-parallel replica's work (Trainer.fit scales by dp and divides FLOPs by pp x tp x cp)
        return {"loss": loss_sum / dist.get_world_size() if ok else float("nan"), "ok": ok, "lr": lr,
                "grad_norm": result.grad_norm, "tokens": res.tokens, "samples": res.samples, "data_wait": wait,
                "seq_len": res.tokens // max(res.samples, 1), "bubble": res.bubble_fraction, "stop": n_stop > 0}
