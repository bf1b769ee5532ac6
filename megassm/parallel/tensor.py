"""Megatron tensor parallelism (+ sequence parallelism) for HTH: the parallel context, column- and
row-parallel linears, and the TP gated RMSNorm.

With sequence parallelism (SP) the residual stream between sub-layers holds a 1/tp slice of the
tokens (norms, modulation, gates and residual adds run on the slice); a column-parallel layer
all-gathers the sequence first and a row-parallel layer reduce-scatters its partial sums back to
slices. Without SP the stream is replicated, the column-parallel input is an identity whose
gradient is all-reduced and the row-parallel output is all-reduced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from megassm.ops.hydra_mix import gated_norm
from megassm.parallel.comm import (
    all_reduce_sum,
    copy_to_group,
    gather_along,
    reduce_from_group,
    reduce_scatter_along,
)


@dataclass(frozen=True)
class ParallelContext:
    """The groups a parallel layer talks to, passed explicitly (no global state).

    ``seq_*``: the group over which the residual stream's sequence is split: TP x CP ranks under
    SP (rank order cp-major, tp-minor = chunk order), else the CP ranks.
    """

    tp: int = 1
    tp_rank: int = 0
    tp_group: Any = None
    cp: int = 1
    cp_rank: int = 0
    cp_group: Any = None
    tpcp_group: Any = None  # all TP x CP ranks of this (dp, pp) position, rank = cp*tp_size + tp
    sequence_parallel: bool = False
    cp_impl: str = "ulysses"  # how Hydra blocks run under CP: ulysses | state_passing | auto (parallel.cp_impl)

    @classmethod
    def from_mesh(cls, mesh, sequence_parallel: bool = True, cp_impl: str = "ulysses") -> ParallelContext:
        d = mesh.dims
        return cls(cp_impl=cp_impl,
            tp=d.tp, tp_rank=mesh.coords["tp"], tp_group=mesh.group("tp") if d.tp > 1 else None,
            cp=d.cp, cp_rank=mesh.coords["cp"], cp_group=mesh.group("cp") if d.cp > 1 else None,
            tpcp_group=mesh.group("tp", "cp") if d.tp * d.cp > 1 else None,
            sequence_parallel=sequence_parallel and d.tp > 1,
        )

    def __deepcopy__(self, memo):  # process groups are handles: copies of a model share them
        return self

    @property
    def seq_shards(self) -> int:
        return self.cp * (self.tp if self.sequence_parallel else 1)

    @property
    def seq_rank(self) -> int:
        return self.cp_rank * self.tp + self.tp_rank if self.sequence_parallel else self.cp_rank

    @property
    def seq_group(self):
        return self.tpcp_group if self.sequence_parallel else self.cp_group


def enter_tp(x: Tensor, ctx: ParallelContext) -> Tensor:
    """Input of a column-parallel layer. x: (B, L/(cp*tp), d) under SP else (B, L/cp, d) -> (B, L/cp, d)."""
    if ctx.tp == 1:
        return x
    return gather_along(x, ctx.tp_group, dim=1) if ctx.sequence_parallel else copy_to_group(x, ctx.tp_group)


def exit_tp(x: Tensor, ctx: ParallelContext) -> Tensor:
    """Output of a row-parallel layer (partial sums). (B, L/cp, d) -> (B, L/(cp*tp), d) under SP."""
    if ctx.tp == 1:
        return x
    return reduce_scatter_along(x, ctx.tp_group, dim=1) if ctx.sequence_parallel else reduce_from_group(x, ctx.tp_group)


def replicated_input(x: Tensor, ctx: ParallelContext) -> Tensor:
    """Input of a column-parallel layer that is never sequence-split (the text for cross-attention)."""
    return copy_to_group(x, ctx.tp_group) if ctx.tp > 1 else x


# nn.Linear subclasses that carry more than a weight (a LoRA adapter) -> their column / row-parallel twin's
# constructor ``adopt(linear, ctx=, ...)``; registered by their owner, so these layers know no such kind
_LINEAR_TWINS: dict[type, dict[str, Any]] = {}


def register_linear_twins(linear_type: type, *, column, row) -> None:
    """``ColumnParallelLinear.from_linear`` / ``RowParallelLinear.from_linear`` of a ``linear_type`` return
    ``column(linear, ctx=, sequence_input=)`` / ``row(linear, ctx=)`` instead of a plain parallel linear."""
    _LINEAR_TWINS[linear_type] = {"column": column, "row": row}


def _twin_of(linear: nn.Linear, kind: str):
    for t in type(linear).__mro__:
        if t in _LINEAR_TWINS:
            return _LINEAR_TWINS[t][kind]
    return None


class ColumnParallelLinear(nn.Linear):
    """Output features split over TP (weight/bias rows hold this rank's shard).

    ``sequence_input``: the input is the (SP-split) residual stream; False for replicated inputs.
    """

    ctx: ParallelContext
    sequence_input: bool

    @classmethod
    def from_linear(cls, linear: nn.Linear, ctx: ParallelContext, sequence_input: bool = True):
        twin = _twin_of(linear, "column")  # e.g. a LoRA adapter comes along (megassm/lora/parallel.py)
        if twin is not None:
            return twin(linear, ctx=ctx, sequence_input=sequence_input)
        return _adopt(cls, linear, ctx=ctx, sequence_input=sequence_input)

    def gather_input(self, x: Tensor) -> Tensor:
        """(B, L/(cp*tp), in) under SP, else (B, L/cp, in) or a replicated input -> (B, L/cp, in) on every TP rank."""
        return enter_tp(x, self.ctx) if self.sequence_input else replicated_input(x, self.ctx)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.gather_input(x), self.weight, self.bias)


class RowParallelLinear(nn.Linear):
    """Input features split over TP; partial products are summed (SP: reduce-scattered), then the
    replicated bias is added once."""

    ctx: ParallelContext

    @classmethod
    def from_linear(cls, linear: nn.Linear, ctx: ParallelContext):
        twin = _twin_of(linear, "row")
        if twin is not None:
            return twin(linear, ctx=ctx)
        return _adopt(cls, linear, ctx=ctx)

    def forward(self, x: Tensor) -> Tensor:
        y = exit_tp(F.linear(x, self.weight), self.ctx)
        return y if self.bias is None else y + self.bias


def _adopt(cls, linear: nn.Linear, **attrs):
    """A ``cls`` instance that owns ``linear``'s Parameter objects (names, hooks and attributes kept)."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.weight, new.bias = linear.weight, linear.bias
    new.out_features, new.in_features = linear.weight.shape
    for k, v in attrs.items():
        object.__setattr__(new, k, v)  # plain attributes, not submodules / buffers
    return new


def gated_rms_norm_tp(
    x: Tensor, z: Tensor, weight: Tensor, eps: float, width: int, ctx: ParallelContext,
    group_size: int | None = None, fused: bool = False,
) -> Tensor:
    """``megassm.ops.hydra_mix.gated_norm`` on a TP channel shard. x, z: (B, L, width/tp); weight (width/tp,).

    With ``group_size=None`` (normalise over all ``width`` channels, the reference's default) the
    sum of squares is all-reduced over TP ranks; grouped norms must not straddle ranks.
    ``fused``: the Triton kernels (``megassm.ops.hydra_fused.gated_norm_fused``), same reduction.
    """
    if group_size is not None and x.shape[-1] % group_size:
        raise ValueError(f"gated norm group_size={group_size} straddles TP shards of width {x.shape[-1]}")
    sum_over_ranks = None
    if ctx.tp > 1 and group_size is None:
        def sum_over_ranks(s: Tensor) -> Tensor:  # each rank scales its own channels by the total
            return all_reduce_sum(s, ctx.tp_group)
    return gated_norm(x, z, weight, eps, width, sum_over_ranks, group_size, fused=fused)
