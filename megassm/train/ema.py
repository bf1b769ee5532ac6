"""EMA of the optimizer's fp32 master weights, kept where the optimizer keeps them.

The EMA follows the fp32 masters, never the bf16 module weights: at lr 2e-5 most updates are smaller
than one bf16 step, and an EMA of bf16 values would move in a staircase. Three layouts, by what the
backend's optimizer holds on this rank (``LocalShards``, megassm/train/backends/base.py, says which):

- ``partitioned`` (ZeRO-3): each rank's flat fp32 master partition of every parameter; 4 bytes/param /
  (DP x CP) per rank, no gather to update; saved per rank.
- ``fragment`` (ZeRO-1/2, and ZeRO-0 under bf16, whose optimizer partitions the fp32 masters): whole
  fp32 tensors, of which each rank updates the fragment its optimizer owns; saving sums the fragments
  over the optimizer's data-parallel group (a collective) and the first rank writes one file.
- ``whole`` (ZeRO-0 in fp32, or no backend): the module parameters are the masters; one file.

One ``torch._foreach_lerp_`` call updates every tensor. ``ShardedEMA.consolidate`` rebuilds whole
tensors from a checkpoint's ``ema/`` files.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from megassm.checkpoint.snapshot import FileSink
from megassm.parallel.comm import all_reduce_
from megassm.train.backends.base import LocalShards, PlainShards


class ShardedEMA:
    def __init__(self, model: nn.Module, decay: float, group=None, shards: LocalShards | None = None):
        """``group``: the process group over which the optimizer partitions its fp32 masters (fragment layout);
        ``shards``: where this rank's masters live (the backend's; default: plain parameters)."""
        self.decay, self.group = decay, group
        self.local = shards if shards is not None else PlainShards()
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        layouts = {self.local.layout(p) for p in self.params.values()}
        if len(layouts) > 1:
            raise RuntimeError(f"EMA: parameters are held in mixed layouts {sorted(layouts)}; expected one")
        self.layout = layouts.pop() if layouts else "whole"
        self.partitioned = self.layout == "partitioned"
        self._sources: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []
        if self.partitioned:
            self.shadow = {n: self.local.master(p).detach().float().clone() for n, p in self.params.items()}
        else:
            self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}
        self.refresh()

    def refresh(self) -> None:
        """(Re)collect the views of the fp32 masters and the EMA tensors they feed (after a checkpoint load)."""
        self._sources, self._targets = [], []
        for n, p in self.params.items():
            source = self.local.master(p)
            if source is None:  # fragment layout: no fragment of this parameter in this rank's partition
                continue
            self._sources.append(source)
            if self.layout == "fragment":
                start, numel = self.local.fragment(p)
                self._targets.append(self.shadow[n].view(-1).narrow(0, start, numel))
            else:
                self._targets.append(self.shadow[n])
        bad = [t.dtype for t in self._sources if t.dtype != torch.float32]
        if bad:
            raise RuntimeError(f"EMA: expected fp32 master weights, found {bad[0]} ({self.layout} layout)")

    @torch.no_grad()
    def update(self) -> None:
        if self._targets:
            torch._foreach_lerp_(self._targets, self._sources, 1.0 - self.decay)

    @torch.no_grad()
    def full_shadow(self) -> dict[str, torch.Tensor]:
        """This rank's EMA tensors as they are saved; for the fragment layout a collective over ``group``
        (every rank of it must call) that sums each rank's fragments into whole tensors."""
        if self.layout != "fragment":
            return self.shadow
        out = {n: torch.zeros_like(t) for n, t in self.shadow.items()}
        for n, p in self.params.items():
            frag = self.local.fragment(p)
            if frag is not None:
                out[n].view(-1).narrow(0, *frag).copy_(self.shadow[n].view(-1).narrow(0, *frag))
        if dist.is_initialized():  # world 1 included: a single-GPU run takes the cluster's path
            flat = torch.cat([t.view(-1) for t in out.values()])
            all_reduce_(flat, self.group)
            offset = 0
            for t in out.values():
                t.view(-1).copy_(flat[offset:offset + t.numel()])
                offset += t.numel()
        return out

    @staticmethod
    def filename(shard_rank: int, mp_rank: int = 0, mp_world: int = 1) -> str:
        """``shard_R`` (R: rank in the ZeRO partition group); ``mp_M_shard_R`` under TP/PP (M: model-parallel rank)."""
        stem = f"shard_{shard_rank:05d}" if mp_world == 1 else f"mp_{mp_rank:02d}_shard_{shard_rank:05d}"
        return stem + ".safetensors"

    def save(self, directory: Path, shard_rank: int, write: bool, mp_rank: int = 0, mp_world: int = 1,
             sink: FileSink | None = None) -> None:
        """Write this rank's EMA to ``ema/<filename>`` if ``write`` (partitioned: every rank of the ZeRO
        partition group; otherwise its first rank). Every rank must call it (the fragment layout gathers).
        ``sink`` (``checkpoint_writer.FileSink``): deferred, the shadow is copied to host memory here and
        written by the background writer, while ``update`` goes on changing the live one."""
        sink = sink or FileSink()
        state = self.full_shadow()
        if not write:
            return
        d = Path(directory) / "ema"
        d.mkdir(parents=True, exist_ok=True)
        meta = {n: list(self.local.full_shape(p)) for n, p in self.params.items()}
        path = d / self.filename(shard_rank if self.partitioned else 0, mp_rank, mp_world)
        metadata = {"shapes": json.dumps(meta), "partitioned": str(self.partitioned), "decay": str(self.decay)}
        sink.put_tensors(path, {n: t.contiguous() for n, t in state.items()},
                         lambda t: save_file(t, str(path), metadata=metadata))

    def load(self, directory: Path, shard_rank: int, mp_rank: int = 0, mp_world: int = 1) -> None:
        """Partitioned: this rank's shard; otherwise the one whole-tensor file, read by every rank."""
        path = Path(directory) / "ema" / self.filename(shard_rank if self.partitioned else 0, mp_rank, mp_world)
        if not path.is_file():
            raise FileNotFoundError(f"EMA shard missing: {path} (was the checkpoint written with ema_decay=0?)")
        state = load_file(str(path))
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA shard {path} lacks {sorted(missing)[:5]}...")
        for n in self.shadow:
            if state[n].shape != self.shadow[n].shape:
                raise ValueError(f"EMA shard {path}: {n} has shape {tuple(state[n].shape)}, "
                                 f"this run expects {tuple(self.shadow[n].shape)} (different parallel layout?)")
            self.shadow[n].copy_(state[n])
        self.refresh()

    @torch.no_grad()
    def load_full(self, full: dict[str, torch.Tensor]) -> None:
        """Set the EMA from whole tensors (``consolidate``'s output), sliced into this layout's partitions
        (ZeRO-3: rank r of the parameter's partition group takes flat elements [r x n, (r + 1) x n), n its
        partition size, zero-padded at the end) -- for a resume at another layout. A tensor whose shape is
        not this rank's whole parameter (a TP-merged one, another model) raises."""
        self._check_shapes({n: tuple(t.shape) for n, t in full.items()}, "EMA to load")
        for n, t in self.shadow.items():
            src = full[n].float().reshape(-1)
            if self.partitioned:
                r, world = self.local.partition(self.params[n])
                src = torch.nn.functional.pad(src, (0, t.numel() * world - src.numel()))
                t.copy_(src[r * t.numel():(r + 1) * t.numel()])
            else:
                t.copy_(src.reshape(t.shape))
        self.refresh()

    @torch.no_grad()
    def load_sliced(self, directory: Path) -> None:
        """Set the EMA from the ``ema/`` shards of a checkpoint written at another (dp, cp) layout, reading only
        what this rank keeps: partitioned (ZeRO-3), its flat range [r x n, (r + 1) x n) of each tensor from
        the old shards that hold it (~1/N of the EMA per rank, not all of it); otherwise whole tensors, one at
        a time. TP / PP shards (``mp_*``) are refused (``plan_resume`` refuses such a resume first)."""
        from megassm.checkpoint.sources import EmaShards

        ema_dir = Path(directory) / "ema"
        if any(ema_dir.glob("mp_*_shard_*.safetensors")):
            raise ValueError(f"{ema_dir} holds tensor/pipeline-parallel EMA shards (mp_*); a resume at another "
                             "layout re-slices only tp=1, pp=1 ones: resume at the checkpoint's own layout")
        files = sorted(ema_dir.glob("shard_*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no EMA shards under {ema_dir} (was the checkpoint written with ema_decay=0?)")
        src = EmaShards(files)
        self._check_shapes({n: s.shape for n, s in src.specs.items()}, str(ema_dir))
        for n, t in self.shadow.items():
            if not self.partitioned:
                t.copy_(src.read(n).reshape(t.shape))
                continue
            r, numel = self.local.partition(self.params[n])[0], math.prod(src.specs[n].shape)
            lo, hi = min(numel, r * t.numel()), min(numel, (r + 1) * t.numel())
            flat = t.view(-1)
            flat[:hi - lo].copy_(src.read_flat(n, lo, hi - lo))
            flat[hi - lo:].zero_()  # ZeRO-3's padding of the last partition
        self.refresh()

    def _check_shapes(self, shapes: dict[str, tuple], where: str) -> None:
        missing = set(self.shadow) - set(shapes)
        if missing:
            raise KeyError(f"{where} lacks {sorted(missing)[:5]}...")
        bad = [f"{n}: {tuple(shapes[n])} there, {tuple(self.local.full_shape(p))} here" for n, p in self.params.items()
               if tuple(shapes[n]) != tuple(self.local.full_shape(p))]
        if bad:
            raise ValueError(f"{where}: EMA tensors do not have this rank's parameter shapes ({'; '.join(bad[:3])}"
                             f"{'...' if len(bad) > 3 else ''}): a tensor-parallel checkpoint merged, or another "
                             "model. A resume at another layout keeps tp and the model")

    @staticmethod
    def consolidate(directory: Path, model_cfg=None) -> dict[str, torch.Tensor]:
        """Whole fp32 tensors from a checkpoint's ``ema/`` shards (rank order); TP shards are merged with
        ``megassm.parallel.sharding.merge_state_dicts`` (needs ``model_cfg``)."""
        ema_dir = Path(directory) / "ema"
        mp_files = sorted(ema_dir.glob("mp_*_shard_*.safetensors"))
        if not mp_files:
            return ShardedEMA._consolidate_files(sorted(ema_dir.glob("shard_*.safetensors")), ema_dir)
        if model_cfg is None:
            raise ValueError(f"{ema_dir} holds tensor-parallel EMA shards; pass the model config to merge them")
        from megassm.parallel.sharding import merge_state_dicts

        ranks = sorted({f.name.split("_")[1] for f in mp_files})
        per_mp = [ShardedEMA._consolidate_files(sorted(ema_dir.glob(f"mp_{m}_shard_*.safetensors")), ema_dir)
                  for m in ranks]
        return merge_state_dicts(per_mp, model_cfg)

    @staticmethod
    def _consolidate_files(files: list[Path], where: Path) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        if not files:
            raise FileNotFoundError(f"no EMA shards under {where}")
        with safe_open(str(files[0]), "pt") as f:
            meta = f.metadata()
        shapes = json.loads(meta["shapes"])
        if meta.get("partitioned") != "True":
            return load_file(str(files[0]))
        parts = [load_file(str(f)) for f in files]
        out = {}
        for n, shape in shapes.items():
            flat = torch.cat([p[n].reshape(-1) for p in parts])
            out[n] = flat[: math.prod(shape)].reshape(shape).clone()
        return out


# -- sampling with the EMA weights (training previews) -------------------------------------------------


def _write_local(ema: ShardedEMA, values: dict[str, torch.Tensor], gathered: list[nn.Parameter]) -> None:
    """Copy ``values`` into each parameter's local weights (partitioned: its partition); afterwards exactly the
    partitioned parameters ``gathered`` hold whole tensors (showing the new values). Collective under the
    partitioned layout (every rank of the partition group calls it)."""
    ema.local.release(ema.local.resident(list(ema.params.values())))  # the partitions stay as they are
    for n, p in ema.params.items():
        local = ema.local.local_weights(p)
        local.copy_(values[n].reshape(local.shape))
    ema.local.gather(gathered)


@contextmanager
def applied(ema: ShardedEMA):
    """``with applied(ema):`` the module computes with the EMA weights, its training weights restored on exit.

    The shadow is cast to each parameter's dtype and written to its local weights (partitioned: the
    partition, which the next gather reads; otherwise ``data``). Costs one copy of the local weights (the
    training values, kept for the restore). Partitioned, the parameters gathered on entry (ZeRO-3's
    persistent ones between steps) are re-gathered on both sides, and only they are left gathered on exit
    (a no-grad forward may leave others gathered). Collective when partitioned, and in the fragment layout, whose
    ranks each hold current EMA values only in their optimizer's fragment (``full_shadow`` sums them over the
    group): all ranks enter and leave.
    """
    gathered = ema.local.resident(list(ema.params.values()))
    saved = {n: ema.local.local_weights(p).detach().clone() for n, p in ema.params.items()}
    shadow = ema.full_shadow()  # not ema.shadow: outside this rank's fragment its values are stale
    with torch.no_grad():
        _write_local(ema, shadow, gathered)
    try:
        yield
    finally:
        with torch.no_grad():
            _write_local(ema, saved, gathered)
