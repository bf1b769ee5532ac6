"""The seam between the trainer and the library that owns the optimizer state: ``TrainBackend``.

The Trainer (``megassm/train/loop.py``) and the step strategies (``megassm/train/steps/``) talk to the
backend only through the methods below; nothing else in megassm names DeepSpeed
(``megassm/train/backends/deepspeed.py`` is the one implementation today).

One optimizer step, as the strategies drive it::

    for each micro-batch m of the step:
        loss = backend(*inputs)                 # the wrapped module's forward
        backend.backward(loss)                  # scaled by 1 / micro_batches
        if m < last: backend.accumulate()       # not a boundary: count the micro-step
    if every rank's losses were finite:
        result = backend.step()                 # reduce, clip, update, LR schedule: (skipped, grad norm)
    else:
        backend.skip()                          # drop the window's gradients, no update

Where an FSDP2 backend (``torch.distributed.fsdp.fully_shard``) would go, method by method:

- ``cp_grad_scale`` / ``reduction_group``: FSDP2 reduce-scatters over the mesh's ("dp", "cp") group and
  averages, so it would return ``cp`` (as DeepSpeed's ZeRO-3 does) and that group;
- ``prepare``: ``fully_shard`` each block then the root (after ``parallelize_hth``), the optimizer built
  on the DTensor parameters (``megassm/train/optim.py`` is backend-agnostic);
- ``backward`` / ``accumulate``: ``loss / micro_batches`` then ``backward`` with
  ``set_requires_gradient_sync(False)`` on all but the last micro-batch;
- ``step``: ``clip_grad_norm_`` over the DTensor gradients (its total norm, non-finite = skipped),
  ``optimizer.step``, ``scheduler.step``, ``zero_grad``;
- ``save`` / ``load``: ``torch.distributed.checkpoint`` of ``get_state_dict(model, optimizer)`` under the
  tag directory, beside the trainer's own files; a deferred ``sink`` (non-blocking save): the local
  shards ``host_snapshot``-ed and DCP's per-rank write ``put`` on the sink, its collective planning done
  here (DCP's own ``async_save`` would commit by itself, before megassm's COMPLETE);
- ``gathered``: ``DTensor.full_tensor()`` copies of the parameters;
- ``shards``: a ``LocalShards`` over each DTensor's ``to_local()`` fp32 shard (``partitioned`` layout);
  the EMA (``megassm/train/ema.py``) then needs nothing else.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class StepResult:
    skipped: bool  # the backend's own overflow check discarded the update
    grad_norm: float  # of the step's (clipped) gradients; NaN where the backend reports none


class LocalShards(Protocol):
    """Where this rank's part of each parameter lives, for the EMA of the fp32 master weights.

    ``layout`` is one of ``partitioned`` (each rank holds a flat fp32 partition of every parameter),
    ``fragment`` (whole tensors, of which this rank's optimizer owns a contiguous fragment) or ``whole``
    (the module parameters are the fp32 masters).
    """

    def layout(self, p: nn.Parameter) -> str: ...

    def master(self, p: nn.Parameter) -> Tensor | None:
        """The fp32 master this rank updates: the flat partition (partitioned), the fragment's flat view
        (fragment; None where this rank owns none), or ``p.data`` (whole)."""

    def fragment(self, p: nn.Parameter) -> tuple[int, int] | None:
        """(start, numel) of this rank's fragment in the flattened whole tensor (fragment layout), else None."""

    def full_shape(self, p: nn.Parameter) -> torch.Size: ...

    def partition(self, p: nn.Parameter) -> tuple[int, int]:
        """(rank, world) of this rank in the group that partitions ``p`` (partitioned layout)."""

    def local_weights(self, p: nn.Parameter) -> Tensor:
        """The tensor the module's weights live in on this rank (its partition, or ``p.data``)."""

    def resident(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        """The partitioned parameters gathered whole right now (their ``data`` copies the partitions)."""

    def release(self, params: list[nn.Parameter]) -> None:
        """Free the gathered copies of ``params`` (collective over the partition group)."""

    def gather(self, params: list[nn.Parameter]) -> None:
        """Gather ``params`` whole from their partitions (collective over the partition group)."""


class PlainShards:
    """``LocalShards`` of an unwrapped module: every parameter whole, its own fp32 master."""

    def layout(self, p):
        return "whole"

    def master(self, p):
        return p.data

    def fragment(self, p):
        return None

    def full_shape(self, p):
        return p.shape

    def partition(self, p):
        return 0, 1

    def local_weights(self, p):
        return p.data

    def resident(self, params):
        return []

    def release(self, params):
        pass

    def gather(self, params):
        pass


class TrainBackend(Protocol):
    """What the trainer needs from the library that shards, reduces and updates (module doc)."""

    module: nn.Module  # the wrapped model, after ``prepare``
    bf16: bool  # the module computes in bf16
    optimizer_steps: int  # updates applied so far

    def cp_grad_scale(self) -> float:
        """The factor ``parallelize_hth`` multiplies gradients by under CP so that this backend's reduction
        yields the data-parallel mean of the full-sequence gradient: 1 if it sums over CP ranks, cp if it
        averages over DP x CP."""

    def prepare(self, model: nn.Module, micro_batches: int, load_universal: bool = False) -> nn.Module:
        """Wrap the (already TP/CP-parallelized) ``model`` with optimizer and LR schedule; returns ``module``.
        ``micro_batches``: micro-batches per optimizer step (the loss scale)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def backward(self, loss: Tensor, scale_wrt_gas: bool = True) -> None:
        """Accumulate gradients of ``loss`` / micro_batches (of ``loss`` as is with ``scale_wrt_gas=False``)."""

    def set_gradient_accumulation_boundary(self, boundary: bool) -> None:
        """For schedules that interleave micro-batches (the pipeline): whether the next backward closes the step."""

    def gradient_accumulation_steps(self) -> int: ...

    def accumulate(self) -> None:
        """End a micro-batch that does not close the step."""

    def step(self) -> StepResult:
        """Close the step: reduce, clip, update, advance the LR schedule (unless ``skipped``)."""

    def skip(self) -> None:
        """Close the step without an update: drop its gradients; the LR schedule does not move."""

    def nonfinite_grads(self) -> Tensor:
        """0-d bool: a local gradient is non-finite, where the backend's step does not check that itself."""

    def lr(self) -> float:
        """The learning rate the next update applies."""

    def reduction_group(self) -> Any:
        """The process group over which the optimizer partitions its fp32 masters (fragment layout), or None."""

    def shards(self) -> LocalShards: ...

    def gathered(self, params: list[nn.Parameter]) -> AbstractContextManager:
        """A context in which ``params`` hold whole tensors on every rank, for reading (collective)."""

    def save(self, ckpt_dir: Path, tag: str, client_state: dict, sink: Any = None,
             optimizer_state: bool = True) -> None:
        """Write model, optimizer and LR-schedule state into ``ckpt_dir / tag`` (every rank calls). With a
        deferred ``sink`` (``megassm.checkpoint.snapshot.FileSink``) copy it to host memory and ``put`` the
        writes instead: they run on a background thread, so they must not call a collective.
        ``optimizer_state=False`` (``train.save_optimizer_state``): the fp32 master weights, parameter groups
        and LR schedule but no per-parameter optimizer state; ``load`` of such a checkpoint restores the
        weights exactly and leaves the optimizer fresh (FSDP2: ``get_state_dict`` with the optimizer's
        ``state`` emptied, its fp32 parameters kept)."""

    def load(self, ckpt_dir: Path, tag: str) -> None:
        """Restore what ``save`` wrote, at the same layout (a model-only save's fresh optimizer too); the next
        micro-batch opens a step."""

    def load_resharded(self, ckpt_dir: Path, tag: str, is_writer: bool) -> None:
        """Restore a checkpoint written at another (dp, cp) layout (``megassm/train/elastic.py``)."""
