"""Read model weights from any megassm checkpoint location.

Accepted: a run directory (uses checkpoints/latest), a run's checkpoints/ directory, one DeepSpeed
tag directory (step_*), a consolidated directory (model.safetensors [+ ema.safetensors] + config) or a
TP-sharded directory (layout.json, written by ``megassm convert reshard --tp K``; merged on load).

DeepSpeed files are read by ``megassm.checkpoint.zero`` (no pickle code runs; the result equals
DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megassm.checkpoint.errors import CheckpointError
from megassm.checkpoint.sources import open_checkpoint

__all__ = ["CheckpointError", "LoadedWeights", "load_weights"]


@dataclass
class LoadedWeights:
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    config: dict | None  # the RunConfig dict stored with the checkpoint, if any
    step: int | None
    source: str


def load_weights(path: str | Path, want_ema: bool = True) -> LoadedWeights:
    ckpt = open_checkpoint(Path(path))
    cast = (lambda t: t.float().contiguous()) if ckpt.kind == "deepspeed" else (lambda t: t)
    model = {n: cast(ckpt.model.read(n)) for n in ckpt.model.specs}
    ema = {n: cast(ckpt.ema.read(n)) for n in ckpt.ema.specs} if (want_ema and ckpt.ema is not None) else None
    return LoadedWeights(model, ema, ckpt.config, ckpt.step, f"{ckpt.kind}:{ckpt.path}")
