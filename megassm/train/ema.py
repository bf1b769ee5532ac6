"""EMA of the weights that works on ZeRO-3 partitions.

Under ZeRO-3 each rank owns a flat slice (``param.ds_tensor``) of every parameter; the EMA keeps
an fp32 copy of exactly that slice, so it costs 4 bytes/param / (DP x CP) per rank and never needs a
gather to update. Without ZeRO-3 each rank holds whole tensors. Saving writes this rank's slices;
``ShardedEMA.consolidate`` (or ``full_state_dict``) rebuilds whole tensors.
"""

from __future__ import annotations

import json
import math
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

    def save(self, directory: Path, shard_rank: int, write: bool) -> None:
        """Write this rank's slices as ``ema/shard_{shard_rank}.safetensors`` (``write``: this rank's turn)."""
        if not write:
            return
        d = Path(directory) / "ema"
        d.mkdir(parents=True, exist_ok=True)
        meta = {n: list(p.ds_shape if hasattr(p, "ds_shape") else p.shape) for n, p in self.params.items()}
        save_file({n: t.contiguous() for n, t in self.shadow.items()}, str(d / f"shard_{shard_rank:05d}.safetensors"),
                  metadata={"shapes": json.dumps(meta), "partitioned": str(self.partitioned), "decay": str(self.decay)})

    def load(self, directory: Path, shard_rank: int) -> None:
        path = Path(directory) / "ema" / f"shard_{shard_rank:05d}.safetensors"
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
    def consolidate(directory: Path) -> dict[str, torch.Tensor]:
        """Whole fp32 tensors from all ``ema/shard_*.safetensors`` of a checkpoint (rank order)."""
        from safetensors import safe_open

        files = sorted((Path(directory) / "ema").glob("shard_*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no EMA shards under {directory}/ema")
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
