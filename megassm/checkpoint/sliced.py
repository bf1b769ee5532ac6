"""Read one TP rank's slice of each tensor of a checkpoint by byte offset, never the whole model.

``open_checkpoint`` gives unsharded, lazy weight sets; ``SlicedWeights`` cuts TP rank r's piece of
a tensor (``parallel/sharding.py``'s plan, the one the live model uses) out of them with offset
reads: a split along dim 0 is one contiguous range of rows, a split along dim 1 one range per row.

    consolidated safetensors    offset reads (``SafetensorsDir.read_range``)
    DeepSpeed ZeRO-1/2/3        offset reads of the fp32 partitions (``MPRankReader.read_flat``)
                                when the checkpoint has no TP of its own
    anything else (a TP-sharded directory, a TP>1 DeepSpeed run, EMA shards)
                                the one tensor is read whole and cut: memory and bytes are bounded
                                by the largest parameter, not the model

``megassm.checkpoint.errors.bytes_read()`` counts what a process read (tests check it per rank).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from megassm.checkpoint.safetensors_io import SafetensorsDir
from megassm.checkpoint.sources import FileWeights, WeightSet
from megassm.checkpoint.zero import MPRankReader
from megassm.parallel.sharding import ShardSpec, shard_tensor


class SlicedWeights:
    """Offset reads of TP slices from an unsharded ``WeightSet`` (see the module docstring)."""

    def __init__(self, weights: WeightSet):
        self.weights = weights
        self.specs = weights.specs

    def _flat(self, name: str, start: int, count: int) -> Tensor | None:
        ws = self.weights
        if isinstance(ws, SafetensorsDir):
            return ws.read_range(name, start, count)
        if isinstance(ws, FileWeights):
            return ws.file.read(name, start, count)
        if isinstance(ws, MPRankReader):
            return ws.read_flat(name, start, count)
        return None

    def read_shard(self, name: str, spec: ShardSpec | None, tp_rank: int, tp: int) -> Tensor:
        """TP rank ``tp_rank``'s piece of ``name`` (the whole tensor when ``spec`` is None or tp is 1)."""
        shape = self.specs[name].shape
        if spec is None or tp == 1:
            whole = self._flat(name, 0, math.prod(shape))
            return whole.view(shape) if whole is not None else self.weights.read(name)
        if spec.dim > 1 or (spec.dim == 1 and len(shape) != 2):
            return shard_tensor(self.weights.read(name), spec, tp_rank, tp, name)
        pieces, start = [], 0
        for n, split in spec.segments:
            lo, size = (start + tp_rank * (n // tp), n // tp) if split else (start, n)
            piece = self._rows(name, shape, lo, size) if spec.dim == 0 else self._cols(name, shape, shape[0], lo, size)
            if piece is None:  # this kind of file cannot be read by offset: one tensor, whole
                return shard_tensor(self.weights.read(name), spec, tp_rank, tp, name)
            pieces.append(piece)
            start += n
        return torch.cat(pieces, dim=spec.dim).contiguous()

    def read_shard_rows(self, name: str, spec: ShardSpec | None, tp_rank: int, tp: int, lo: int, hi: int) -> Tensor:
        """Rows [lo, hi) (along dim 0) of TP rank ``tp_rank``'s piece of ``name``: what a ZeRO-3 rank reads
        to fill its 1/N of the flattened piece (``train/build.py``)."""
        shape = self.specs[name].shape
        if len(shape) < 2 and (spec is None or tp == 1):
            flat = self._flat(name, lo, hi - lo)
            return flat if flat is not None else self.weights.read(name)[lo:hi]
        if spec is None or tp == 1:
            rows = self._rows(name, shape, lo, hi - lo)
            return rows if rows is not None else self.weights.read(name)[lo:hi]
        if spec.dim == 1 and len(shape) == 2:
            pieces, start = [], 0
            for n, split in spec.segments:
                c0, size = (start + tp_rank * (n // tp), n // tp) if split else (start, n)
                cols = self._cols(name, shape, hi - lo, c0, size, first_row=lo)
                if cols is None:
                    return self.read_shard(name, spec, tp_rank, tp)[lo:hi]
                pieces.append(cols)
                start += n
            return torch.cat(pieces, dim=1)
        if spec.dim != 0:
            return self.read_shard(name, spec, tp_rank, tp)[lo:hi]
        pieces, start, local = [], 0, 0
        for n, split in spec.segments:  # local rows [local, local + size) are full rows [src, src + size)
            src, size = (start + tp_rank * (n // tp), n // tp) if split else (start, n)
            a, b = max(lo, local), min(hi, local + size)
            if a < b:
                rows = self._rows(name, shape, src + a - local, b - a)
                if rows is None:
                    return self.read_shard(name, spec, tp_rank, tp)[lo:hi]
                pieces.append(rows)
            start, local = start + n, local + size
        return torch.cat(pieces, dim=0) if pieces else torch.empty(0, *shape[1:])

    def _rows(self, name: str, shape, lo: int, size: int) -> Tensor | None:
        per_row = math.prod(shape[1:])
        flat = self._flat(name, lo * per_row, size * per_row)
        return None if flat is None else flat.view(size, *shape[1:])

    def _cols(self, name: str, shape, rows: int, lo: int, size: int, first_row: int = 0) -> Tensor | None:
        cols = shape[1]
        parts = []
        for r in range(first_row, first_row + rows):  # one range per row: [r * cols + lo, + size)
            flat = self._flat(name, r * cols + lo, size)
            if flat is None:
                return None
            parts.append(flat)
        return torch.stack(parts) if parts else torch.empty(0, size)


def fill_meta_model(model: torch.nn.Module, weights: WeightSet, where: str,
                    dtype: torch.dtype = torch.float32) -> None:
    """Give every meta-device parameter of ``model`` its tensor from ``weights`` (same names, in ``dtype``), one
    tensor at a time: the model is the only copy in memory (no state dict beside it). Names and shapes
    must match exactly (a CheckpointError lists the differences)."""
    from megassm.checkpoint.errors import CheckpointError

    own = dict(model.named_parameters())
    missing, unexpected = sorted(set(own) - set(weights.specs)), sorted(set(weights.specs) - set(own))
    bad = [f"{n}: checkpoint {tuple(weights.specs[n].shape)} vs model {tuple(p.shape)}"
           for n, p in own.items() if n in weights.specs and tuple(weights.specs[n].shape) != tuple(p.shape)]
    if missing or unexpected or bad:
        raise CheckpointError(f"{where}: weights do not match the stored config (missing {missing[:4]}, unexpected "
                              f"{unexpected[:4]}, shapes {bad[:4]})")
    for name, p in own.items():
        values = weights.read(name).to(dtype).reshape(p.shape)
        attrs = dict(p.__dict__)
        torch.utils.swap_tensors(p, torch.nn.Parameter(values, requires_grad=p.requires_grad))
        p.__dict__.update(attrs)
