"""Host snapshots of checkpoint state, and where a save's files go (``FileSink``).

Used by the trainer's non-blocking saves (``megassm/train/checkpoint_writer.py``): the training thread
copies what a checkpoint holds to host memory with ``host_snapshot`` and ``put``s closures that write
those copies; the background writer runs them. Here (below ``train/``) so that the writers of the
checkpoint's parts -- the EMA, the LoRA export, the backend -- can take a sink without importing the trainer.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

# -- host snapshot -------------------------------------------------------------------------------------


def host_snapshot(obj):
    """A deep copy of ``obj`` whose tensors live in fresh host memory: later in-place updates of the
    originals (optimizer step, EMA lerp, RNG draws) do not reach it.

    Tensors that share a storage (views of one flat buffer) share one copy of it, with their offsets
    and strides, so ``torch.save`` writes what it would have written for the originals (whole storages)
    and a load sees the same aliasing. Containers and other values are ``copy.deepcopy``'d; a tensor
    hidden inside an object the walk does not open is deep-copied by torch itself (correct, on its device).
    """
    storages: dict[tuple, torch.UntypedStorage] = {}
    memo: dict[int, object] = {}
    for t in _tensors(obj):
        if id(t) not in memo:
            memo[id(t)] = _host_tensor(t, storages)
    return copy.deepcopy(obj, memo)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _tensors(v)


def _host_tensor(t: torch.Tensor, storages: dict) -> torch.Tensor:
    if t.layout != torch.strided or t.is_quantized or type(t) not in (torch.Tensor, torch.nn.Parameter):
        return t.detach().to("cpu", copy=True)
    s = t.untyped_storage()
    # the storage's identity (as torch.save keys it), not its address: empty storages all have address 0
    key = (s.device, s._cdata)
    if key not in storages:
        pin = s.device.type == "cuda"  # page-locked: the device-to-host copy runs at full PCIe rate
        host = torch.empty(s.nbytes(), dtype=torch.uint8, pin_memory=pin).untyped_storage()
        host.copy_(s)
        storages[key] = host
    out = torch.empty(0, dtype=t.dtype).set_(storages[key], t.storage_offset(), t.size(), t.stride())
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(out, requires_grad=t.requires_grad)
    return out.requires_grad_(t.requires_grad) if t.is_leaf else out


# -- where a save's files go ---------------------------------------------------------------------------


@dataclass
class FileSink:
    """A save's files: written at once (``deferred=False``, the synchronous save) or queued for the
    background thread. Whoever ``put``s a deferred write must have snapshotted what it writes
    (``host_snapshot``): the closure runs while training goes on."""

    deferred: bool = False
    jobs: list[tuple[Path, Callable[[], None]]] = field(default_factory=list)

    def put(self, path: Path, write: Callable[[], None]) -> None:
        """``write()`` creates ``path`` (a file, or a directory of files)."""
        if self.deferred:
            self.jobs.append((Path(path), write))
        else:
            write()


def fsync_tree(path: Path) -> int:
    """fsync ``path`` (a file, or every file under a directory); returns the bytes they hold."""
    files = [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.is_file()]
    total = 0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        total += f.stat().st_size
    return total


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
