"""train.eval_every: the held-out loss, and CLIP score / KID of the eval prompts, logged beside the loss.

    every rank:  EMA weights swapped in (``ema.applied``, ZeRO-3's persistent parameters included) -->
                 held-out loss (the same number of forwards on every rank) --> weights restored
    with CLIP or Inception + reference configured:
                 the eval prompts generated as training previews are (``Previews``: split over DP replicas,
                 each TP x CP group together, EMA weights, rank-0 decode)
    rank 0 only: CLIP / InceptionV3 loaded once (bf16 on GPUs) and kept; the reference features computed once;
                 CLIP score and KID. FID needs thousands of samples and stays offline (``megassm eval``).

A metric that fails logs an error and is left out of that evaluation; training goes on. The held-out loss
fails on every rank together (its ranks agree before each ZeRO-3 forward, ``comm.failed_ranks``), so
one rank's failure leaves no other waiting in a gather; every rank logs it. (A failure inside a forward on one
rank only, e.g. out of memory, cannot be agreed on: the others are already in that forward's gathers.)
"""

from __future__ import annotations

import contextlib
import logging

import torch

from megassm.config.schema import RunConfig
from megassm.config.validate import read_prompt_lines
from megassm.eval.heldout import HeldOutLoss, heldout_batches
from megassm.eval.suite import FeatureModels, compute, wanted
from megassm.train.ema import ShardedEMA, applied
from megassm.train.preview import Previews, preview_prompts

log = logging.getLogger("megassm.eval")


def eval_prompts(cfg: RunConfig) -> list[str]:
    """eval.prompts, else the lines of eval.prompts_file, else the previews' prompts."""
    if cfg.eval.prompts is not None:
        return list(cfg.eval.prompts)
    if cfg.eval.prompts_file is not None:
        return read_prompt_lines(cfg.eval.prompts_file)
    return preview_prompts(cfg)


def _report(name: str, exc: Exception) -> None:
    log.error("evaluation: %s failed, left out of this evaluation (training goes on): %s: %s", name,
              type(exc).__name__, exc)


class TrainingEvaluator:
    """Build once per run (nothing is loaded until the first call); call on every rank at the same step."""

    def __init__(self, cfg: RunConfig, mesh, device: torch.device, dtype: torch.dtype, rank: int):
        self.cfg, self.rank = cfg, rank
        leader = mesh.coords["tp"] == 0 and mesh.coords["cp"] == 0
        dp_rank, dp_size = mesh.get_data_parallel_rank(), mesh.get_data_parallel_world_size()
        self.heldout = HeldOutLoss(heldout_batches(cfg), cfg.diffusion, cfg.eval.seed, device, dtype, dp_rank,
                                   dp_size, leader)
        self.names = wanted(cfg.eval, videos=False, offline=False)
        self.prompts = eval_prompts(cfg) if self.names else []
        self.previews = Previews.for_mesh(cfg, mesh, device, dtype, prompts=self.prompts) if self.names else None
        self.models = FeatureModels(cfg.eval, device, cfg) if rank == 0 and self.names else None

    def __call__(self, model: torch.nn.Module, ema: ShardedEMA | None = None) -> dict[str, float]:
        """{metric: value} on rank 0 (what succeeded), {} on the other ranks."""
        out: dict[str, float] = {}
        was_training = model.training
        model.eval()
        try:
            with applied(ema) if ema is not None else contextlib.nullcontext():
                out["heldout_loss"] = self.heldout(model)
        except Exception as exc:  # noqa: BLE001 -- a metric never stops training
            _report("heldout_loss", exc)
        finally:
            model.train(was_training)
        if self.previews is None:
            return out if self.rank == 0 else {}
        try:
            clips = self.previews.pixels(model, ema)  # (T, 3, H, W) per prompt on rank 0
        except Exception as exc:  # noqa: BLE001
            _report("generation for " + "/".join(self.names), exc)
            clips = None
        if self.rank != 0:
            return {}
        if clips is not None:
            results = compute(self.names, self.models, clips, self.prompts, on_error=_report)
            out.update({k: r["value"] for k, r in results.items()})
        return out
