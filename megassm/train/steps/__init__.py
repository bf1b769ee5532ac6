"""Step strategies: how one parallelism regime builds its model and runs one optimizer step.

The Trainer (``megassm/train/loop.py``) owns everything a run has once: construction, resume, the fit
loop, metrics, checkpoints, signals, previews, evaluation. It is given one ``StepStrategy``:

- ``DenseStep`` (dense.py): pp = 1, the whole model on every rank (ZeRO + TP + CP + DP), ``train.grad_accum``
  micro-batches per step;
- ``PipelineStep`` (pipeline.py): pp > 1, this rank's ``PipelineStage`` (ZeRO-1 + TP + CP + DP),
  ``parallel.micro_batches`` micro-batches through the 1F1B schedule.

Both draw a sample's timestep, noise and caption dropout with ``megassm.diffusion.flow.prepare_batch``
(``flow_batch`` below) and score it with ``velocity_loss``; both talk to the optimizer only through the
backend (``megassm/train/backends/``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch import nn

from megassm.config.schema import DiffusionConfig, RunConfig, TrainConfig
from megassm.diffusion.flow import FlowBatch, prepare_batch
from megassm.train.ema import ShardedEMA

# sample_indices(micro, batch_size) -> the global sample indices of this rank's micro-batch (Trainer)
SampleIndices = Callable[[int, int], list[int]]


class StepStrategy(Protocol):
    micro_batches: int  # per optimizer step and data-parallel rank
    reads_data: bool  # this rank consumes the data loader
    previews: bool  # the live module can generate preview samples (the whole model is on this rank)

    def owns(self, name: str) -> bool:
        """Whether this rank keeps parameter ``name`` (HTHModel naming) after ``wrap``."""

    def parallelize(self, model: nn.Module) -> None:
        """Shard the (warm-started) full model in place for this regime's TP / CP."""

    def wrap(self, model: nn.Module, load_universal: bool = False) -> nn.Module:
        """Hand this rank's part of the parallelized model to the backend; returns the wrapped module."""

    def build_ema(self, decay: float) -> ShardedEMA: ...

    def run(self, data_iter: Iterator, sample_indices: SampleIndices, stop: bool, step: int) -> dict:
        """Optimizer step ``step + 1`` (``step`` steps done before it). Returns loss (the global-batch mean,
        NaN when skipped), ok (updated), lr, grad_norm, tokens / samples (of this data-parallel replica),
        seq_len, data_wait, stop (any rank)."""


def apply_activation_checkpointing(model: nn.Module, train: TrainConfig) -> None:
    mode, k = train.activation_checkpointing, train.checkpoint_every_k
    for i, blk in enumerate(model.blocks):
        blk.grad_checkpoint = mode == "all" or (mode == "every_k" and i % k == 0)


def next_batch(data_iter: Iterator) -> tuple[dict, float]:
    """The next batch and the seconds spent waiting for it."""
    tw = time.perf_counter()
    batch = next(data_iter)
    return batch, time.perf_counter() - tw


def flow_batch(batch: dict, patch_embed: nn.Module, device: torch.device, bf16: bool, diffusion: DiffusionConfig,
               sample_index: list[int], seed: int) -> tuple[FlowBatch, int]:
    """A loader batch moved to ``device`` (latents and text in bf16 when the model computes in it), with its
    flow-matching draws (``prepare_batch``); and its tokens per sample."""
    x0, text = batch["latents"].to(device), batch["text"].to(device)
    if bf16:
        x0, text = x0.bfloat16(), text.bfloat16()
    seq_len = math.prod(patch_embed.grid(x0.shape))
    return prepare_batch(x0, text, batch["text_mask"].to(device), diffusion, seq_len, sample_index, seed), seq_len


def check_same_bucket(b_sum: float, b_sq: float, world: int, step: int) -> None:
    """data.buckets: the per-step all-reduce summed each rank's bucket number b (1-based; 0 without buckets)
    and b^2; they are all equal iff world x sum(b^2) = sum(b)^2 (zero variance; exact for small integers)."""
    if world * b_sq != b_sum * b_sum:
        raise RuntimeError(f"step {step + 1}: the ranks trained different buckets (mean bucket number "
                           f"{b_sum / world:.3f}, variance {b_sq / world - (b_sum / world) ** 2:.3f}): their data "
                           "positions or bucket tables differ")


def make_step(cfg: RunConfig, mesh, backend, device: torch.device, log: Callable[[str], None]) -> StepStrategy:
    """The strategy of ``cfg``'s regime: ``PipelineStep`` for parallel.pp > 1, else ``DenseStep``."""
    if cfg.parallel.pp > 1:
        from megassm.train.steps.pipeline import PipelineStep

        return PipelineStep(cfg, mesh, backend, device, log)
    from megassm.train.steps.dense import DenseStep

    return DenseStep(cfg, mesh, backend, device)
