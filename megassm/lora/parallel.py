"""LoRA adapters on megassm's tensor-parallel linears, laid out by the shard plan (``parallel/sharding.py``).

``attach_lora`` runs on the unsharded model; ``parallelize_hth`` then cuts ``lora_A`` / ``lora_B`` with
``sharding.adapter_spec`` (the base's split, read off the plan) and ``ColumnParallelLinear`` /
``RowParallelLinear.from_linear`` hand a ``LoRALinear`` to the twins here, which keep its Parameters.
For TP rank t of T, W (out, in) and y = x W^T + s x A^T B^T (s = alpha / r):

    column-parallel (Hydra in_proj, qkv, q, kv, fc1): W's rows split (per segment: in_proj is
        z | x | B/C | dt, B/C kept whole when ngroups is not split)
        lora_A (r, in) replicated; lora_B (out/T, r) this rank's rows, the same segments as W
        y_t = x W_t^T + s (x A^T) B_t^T               x: the gathered input (as the base's)
    row-parallel (Hydra out_proj, proj, fc2): W's input columns split
        lora_A (r, in/T) this rank's columns; lora_B (out, r) replicated
        y = reduce(x_t W_t^T) + s reduce(x_t A_t^T) B^T    reduce: all-reduce, or reduce-scatter over the
                                                           sequence under SP (its own collective, r wide)

Gradients (the same contract as the base's, docs/parallelism.md): a replicated lora_A of a column-parallel
base gets from each rank only its output rows' part, summed over TP (``register_adapter_grad_sums``);
so do lora_B's rows of a replicated segment (Hydra's B/C with ngroups=1), by the rule for in_proj's own
rows (``sharding.replicated_rows``, hooked by ``parallelize_hth``); a replicated lora_B of a row-parallel
base is complete on every rank, except under SP, where each rank sees a slice of the tokens.
Cross-attention's ``q`` stays a ``LoRALinear`` (its input is gathered before it): a column-parallel layer
in effect, with the same layout and sums. CP needs nothing of its own:
adapters are parameters like any other, their gradients partial over CP ranks and reduced by the engine.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from megassm.lora.layers import LoRALinear, lora_down, lora_up
from megassm.parallel.apply import register_tp_grad_sums
from megassm.parallel.comm import sum_grad_hook
from megassm.parallel.sharding import ADAPTER_SUFFIXES, shard_spec
from megassm.parallel.tensor import (
    ColumnParallelLinear,
    ParallelContext,
    RowParallelLinear,
    _adopt,
    exit_tp,
    register_linear_twins,
)


def _adopt_adapter(cls, lora: LoRALinear, **attrs):
    """A ``cls`` owning ``lora``'s base and adapter Parameters (already cut to this TP rank's shard)."""
    if not isinstance(lora, LoRALinear):
        raise TypeError(f"{cls.__name__}.adopt takes a LoRALinear, got {type(lora).__name__}")
    new = _adopt(cls, lora, rank=lora.rank, scaling=lora.scaling, dropout=lora.dropout, **attrs)
    new.lora_A, new.lora_B = lora.lora_A, lora.lora_B
    new.train(lora.training)
    return new


class LoRAColumnParallelLinear(ColumnParallelLinear):
    """ColumnParallelLinear + adapter: lora_A (r, in) replicated, lora_B (out/tp, r) this rank's rows."""

    rank: int
    scaling: float
    dropout: float

    @classmethod
    def adopt(cls, lora: LoRALinear, ctx: ParallelContext, sequence_input: bool = True):
        return _adopt_adapter(cls, lora, ctx=ctx, sequence_input=sequence_input)

    def forward(self, x: Tensor) -> Tensor:
        x = self.gather_input(x)  # (B, L/cp, in), the same on every TP rank
        return F.linear(x, self.weight, self.bias) + lora_up(lora_down(x, self), self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


class LoRARowParallelLinear(RowParallelLinear):
    """RowParallelLinear + adapter: lora_A (r, in/tp) this rank's columns, lora_B (out, r) replicated."""

    rank: int
    scaling: float
    dropout: float

    @classmethod
    def adopt(cls, lora: LoRALinear, ctx: ParallelContext):
        return _adopt_adapter(cls, lora, ctx=ctx)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, L/cp, in/tp) -> (B, L/cp, out), or (B, L/(cp*tp), out) under SP."""
        y = exit_tp(F.linear(x, self.weight), self.ctx)
        a = exit_tp(lora_down(x, self), self.ctx)  # A x from this rank's input columns, summed: (B, ·, r)
        y = y + lora_up(a, self)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def register_adapter_grad_sums(model: nn.Module, model_cfg, ctx: ParallelContext) -> list[str]:
    """Hook the replicated adapter factors whose gradient each TP rank holds only part of (module doc; the
    replicated rows of a TP-split lora_B are ``parallelize_hth``'s); returns what was hooked.

    ``model``: a model whose parameters ``parallelize_hth`` has cut (names as in the unsharded model).
    """
    if ctx.tp == 1:
        return []
    hooked = []
    for name, p in model.named_parameters():
        if not name.endswith(ADAPTER_SUFFIXES):
            continue
        if shard_spec(name, model_cfg, ctx.tp) is not None:
            continue  # split: its replicated rows (if any) are the shard plan's, hooked by parallelize_hth
        module, _, factor = name.rpartition(".")
        base_split = shard_spec(module + ".weight", model_cfg, ctx.tp) is not None
        # column-parallel lora_A: each rank back-propagates through its rows of B only; a replicated factor
        # of a replicated base (or row-parallel lora_B) is partial only when SP splits the tokens
        if (factor == "lora_A" and base_split) or ctx.sequence_parallel:
            p.register_hook(sum_grad_hook(ctx.tp_group))
            hooked.append(name)
    return hooked



# parallel/ knows no LoRA: its layers and parallelize_hth find the twins and the gradient rule registered here
register_linear_twins(LoRALinear, column=LoRAColumnParallelLinear.adopt, row=LoRARowParallelLinear.adopt)
register_tp_grad_sums(register_adapter_grad_sums)
