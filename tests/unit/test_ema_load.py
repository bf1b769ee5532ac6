"""``ShardedEMA`` loads at another layout (megassm/train/ema.py): a ZeRO-3 rank reads only its own partition
of each tensor from the old layout's shards, and a tensor that is not this rank's parameter shape raises.

``Zero3`` plays the partitioned ``LocalShards`` of rank r of N: ZeRO-3's split, ceil(numel / N) flat
elements per rank, the last partition zero-padded."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from megassm.checkpoint.errors import bytes_read
from megassm.train.backends.base import PlainShards
from megassm.train.ema import ShardedEMA


class Zero3(PlainShards):
    def __init__(self, rank: int, world: int):
        self.rank, self.world, self._parts = rank, world, {}

    def layout(self, p):
        return "partitioned"

    def master(self, p):  # this rank's flat fp32 partition, one tensor per parameter
        if p not in self._parts:
            self._parts[p] = partition(p.detach().reshape(-1), self.rank, self.world)
        return self._parts[p]

    def partition(self, p):
        return self.rank, self.world


def partition(flat: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per = math.ceil(flat.numel() / world)
    return nn.functional.pad(flat, (0, per * world - flat.numel()))[rank * per:(rank + 1) * per].clone()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))  # 35, 7, 21, 3 elements: uneven splits


def _saved(tmp_path, model, world: int):
    """An ``ema/`` directory as ZeRO-3 at ``world`` ranks writes it, the EMA = the weights + 1."""
    for r in range(world):
        ema = ShardedEMA(model, 0.9, shards=Zero3(r, world))
        for t in ema.shadow.values():
            t.add_(1.0)
        ema.save(tmp_path, shard_rank=r, write=True)
    return tmp_path


@pytest.mark.parametrize("old,new", [(2, 3), (4, 1), (3, 2)])
def test_a_zero3_rank_reads_only_its_partition_at_another_layout(tmp_path, old, new):
    """dp old -> new: each new rank's EMA is its partition of the whole tensors, zero-padded, and the bytes it
    read are that partition's (before, every rank consolidated -- read -- the whole EMA)."""
    model = _model()
    d = _saved(tmp_path, model, old)
    whole = {n: p.detach() + 1.0 for n, p in model.named_parameters()}
    for r in range(new):
        ema = ShardedEMA(model, 0.9, shards=Zero3(r, new))
        for t in ema.shadow.values():
            t.fill_(-7.0)
        before = bytes_read()
        ema.load_sliced(d)
        read = bytes_read() - before
        own = 0
        for n, t in ema.shadow.items():
            want = partition(whole[n].reshape(-1), r, new)
            torch.testing.assert_close(t, want, rtol=0, atol=0)
            own += min(whole[n].numel(), (r + 1) * t.numel()) - min(whole[n].numel(), r * t.numel())
        assert read == 4 * own, (r, read, own)


def test_the_whole_layout_reads_whole_tensors(tmp_path):
    model = _model()
    d = _saved(tmp_path, model, 2)
    ema = ShardedEMA(model, 0.9)
    ema.load_sliced(d)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ema.shadow[n], p.detach() + 1.0, rtol=0, atol=0)


def test_a_foreign_shape_raises_instead_of_being_cropped():
    """A tensor-parallel-merged (or another model's) EMA tensor raises, naming it; the partitioned load_full
    cropped it silently (a negative pad)."""
    model = _model()
    merged = {n: p.detach().float() for n, p in model.named_parameters()}
    merged["0.weight"] = torch.zeros(14, 5)  # two TP ranks' rows of a (7, 5) weight
    part = ShardedEMA(model, 0.9, shards=Zero3(0, 2))
    with pytest.raises(ValueError, match=r"0.weight: \(14, 5\) there, \(7, 5\) here"):
        part.load_full(merged)
