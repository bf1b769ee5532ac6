"""EMA of the weights that works on ZeRO-3 partitions.

Under ZeRO-3 each rank owns a flat slice (``param.ds_tensor``) of every parameter; the EMA keeps
an fp32 copy of exactly that slice, so it costs 4 bytes/param / (DP x CP) per rank and never needs a
gather to update. Without ZeRO-3 each rank holds whole tensors. Saving writes this rank's slices;
``ShardedEMA.consolidate`` (or ``full_state_dict``) rebuilds whole tensors.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def _local(p: nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class ShardedEMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: _local(p).detach().float().clone() for n, p in self.params.items()}
        self.partitioned = any(hasattr(p, "ds_tensor") for p in self.params.values())

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params.items():
            self.shadow[n].lerp_(_local(p).float(), 1.0 - self.decay)

    @staticmethod
    def filename(shard_rank: int, mp_rank: int = 0, mp_world: int = 1) -> str:
        """``shard_R`` (R: rank in the ZeRO partition group); ``mp_M_shard_R`` under TP/PP (M: model-parallel rank)."""
        stem = f"shard_{shard_rank:05d}" if mp_world == 1 else f"mp_{mp_rank:02d}_shard_{shard_rank:05d}"
        return stem + ".safetensors"

    def save(self, directory: Path, shard_rank: int, write: bool, mp_rank: int = 0, mp_world: int = 1) -> None:
        """Write this rank's slices to ``ema/<filename>`` (``write``: this rank's turn)."""
        if not write:
            return
        d = Path(directory) / "ema"
        d.mkdir(parents=True, exist_ok=True)
        meta = {n: list(p.ds_shape if hasattr(p, "ds_shape") else p.shape) for n, p in self.params.items()}
        path = d / self.filename(shard_rank, mp_rank, mp_world)
        save_file({n: t.contiguous() for n, t in self.shadow.items()}, str(path),
                  metadata={"shapes": json.dumps(meta), "partitioned": str(self.partitioned), "decay": str(self.decay)})

    def load(self, directory: Path, shard_rank: int, mp_rank: int = 0, mp_world: int = 1) -> None:
        path = Path(directory) / "ema" / self.filename(shard_rank, mp_rank, mp_world)
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


def _zero3_resident(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """ZeRO-3 parameters whose whole tensor is gathered right now (the persistent small ones between steps):
    their ``data`` is a copy of the partitions that a write to ``ds_tensor`` would leave stale."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return [p for p in params if hasattr(p, "ds_tensor") and p.ds_status == ZeroParamStatus.AVAILABLE]


def _write_local(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor],
                 gathered: list[nn.Parameter]) -> None:
    """Copy ``values`` into each parameter's local weights (ZeRO-3: its partition); afterwards exactly the ZeRO-3
    parameters ``gathered`` hold whole tensors (showing the new values). Collective under ZeRO-3 (every rank
    of the partition group calls it)."""
    resident = _zero3_resident(list(params.values()))
    if resident:
        resident[0].partition(resident)  # frees the gathered copies; the partitions stay as they are
    for n, p in params.items():
        local = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        local.copy_(values[n].reshape(local.shape))
    if gathered:
        gathered[0].all_gather(gathered)


@contextmanager
def applied(ema: ShardedEMA):
    """``with applied(ema):`` the module computes with the EMA weights, its training weights restored on exit.

    The shadow is cast to each parameter's dtype and written to its local weights (under ZeRO-3 the
    partition ``ds_tensor``, which the next gather reads; otherwise ``data``). Costs one copy of the local
    weights (the training values, kept for the restore). Under ZeRO-3 the parameters gathered on entry (the
    persistent ones between steps) are re-gathered on both sides, and only they are left gathered on exit
    (a no-grad forward may leave others gathered). Collective under ZeRO-3: all ranks enter and leave.
    """
    gathered = _zero3_resident(list(ema.params.values()))
    saved = {n: (p.ds_tensor if hasattr(p, "ds_tensor") else p.data).detach().clone() for n, p in ema.params.items()}
    with torch.no_grad():
        _write_local(ema.params, ema.shadow, gathered)
    try:
        yield
    finally:
        with torch.no_grad():
            _write_local(ema.params, saved, gathered)
