"""Point-to-point messages between pipeline stages: packing and batched isend/irecv.

A message is several tensors of one micro-batch (activations, conditioning, target; or their
gradients) flattened into one buffer of the compute dtype, so each boundary crossing is one send.
Both ends know the parts' shapes (``pipeline._Shapes``), so nothing but the payload travels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from megassm.parallel.comm import send_recv


@dataclass(frozen=True)
class PipeGroup:
    """This rank's pipeline group: the global ranks of stages 0..pp-1 that share its (dp, cp, tp)."""

    rank: int  # pipeline rank of this process
    ranks: tuple[int, ...]  # global rank of each pipeline rank
    group: object = None  # torch.distributed process group over ``ranks``

    @property
    def size(self) -> int:
        return len(self.ranks)

    @classmethod
    def from_mesh(cls, mesh) -> PipeGroup:
        return cls(mesh.coords["pp"], tuple(mesh.ranks("pp")), mesh.group("pp"))


def pack(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """Concatenate flattened, detached ``tensors`` (bools become 0/1) into one ``dtype`` buffer."""
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])


def unpack(flat: Tensor, shapes: Sequence[tuple[int, ...]]) -> list[Tensor]:
    """Views of ``flat`` with ``shapes`` (the inverse of ``pack``)."""
    sizes = [math.prod(s) for s in shapes]
    if flat.numel() != sum(sizes):
        raise ValueError(f"pipeline message has {flat.numel()} elements, the shapes {list(shapes)} need {sum(sizes)}")
    return [part.view(s) for part, s in zip(flat.split(sizes), shapes)]


def exchange(group: PipeGroup, sends: Sequence[tuple[int, Tensor]], recvs: Sequence[tuple[int, Tensor]]) -> list:
    """Post all ``sends`` (pipeline rank, tensor) and ``recvs`` (pipeline rank, buffer) as one batch;
    wait for the receives and return the send handles (their buffers must live until waited)."""
    n_ops = len(sends) + len(recvs)
    if not n_ops:
        return []
    works = send_recv([(group.ranks[r], t) for r, t in sends], [(group.ranks[r], t) for r, t in recvs], group.group)
    if len(works) != n_ops:  # a coalesced backend (NCCL) may return one handle for the batch
        for w in works:
            w.wait()
        return []
    for w in works[len(sends):]:
        w.wait()
    return list(zip(works[: len(sends)], [t for _, t in sends]))
