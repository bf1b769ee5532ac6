"""Read model weights from any megassm checkpoint location.

Accepted: a run directory (uses checkpoints/latest), a run's checkpoints/ directory, one DeepSpeed
tag directory (step_*), or a consolidated directory (model.safetensors [+ ema.safetensors] + config).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from megassm.train import checkpoint as ckpt


class CheckpointError(ValueError):
    pass


@dataclass
class LoadedWeights:
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    config: dict | None  # the RunConfig dict stored with the checkpoint, if any
    step: int | None
    source: str


def _read_config(*candidates: Path) -> dict | None:
    for c in candidates:
        if c.is_file():
            return yaml.safe_load(c.read_text()) if c.suffix in (".yaml", ".yml") else json.loads(c.read_text())
    return None


def _load_safetensors_dir(d: Path, stem: str) -> dict[str, torch.Tensor] | None:
    single = d / f"{stem}.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = d / f"{stem}.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out = {}
        for f in files:
            out.update(load_file(str(d / f)))
        return out
    return None


def _resolve_tag_dir(path: Path) -> Path:
    if (path / ckpt.COMPLETE).is_file():
        return path
    for ckpt_dir in (path, path / "checkpoints"):
        if (ckpt_dir / ckpt.LATEST).is_file():
            return ckpt_dir / ckpt.read_latest(ckpt_dir)
    raise CheckpointError(
        f"{path} is not a megassm checkpoint: expected a consolidated directory (model.safetensors), a run "
        "directory with checkpoints/latest, a checkpoints/ directory with 'latest', or a step_* directory "
        "with a COMPLETE file"
    )


def load_weights(path: str | Path, want_ema: bool = True) -> LoadedWeights:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path does not exist: {path}")
    try:
        model = _load_safetensors_dir(path, "model")
    except Exception as e:  # safetensors raises on truncated/corrupt headers
        raise CheckpointError(f"{path}: model weights are unreadable ({e}); the file is truncated or corrupt") from None
    if model is not None:
        ema = _load_safetensors_dir(path, "ema") if want_ema else None
        meta = _read_config(path / "meta.json") or {}
        cfg = _read_config(path / "config.yaml", path / "config.json")
        return LoadedWeights(model, ema, cfg, meta.get("step"), f"consolidated:{path}")

    tag_dir = _resolve_tag_dir(path)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    model = {k: v.float().contiguous() for k, v in model.items()}
    ema = None
    if want_ema and (tag_dir / "ema").is_dir():
        from megassm.train.ema import ShardedEMA

        ema = ShardedEMA.consolidate(tag_dir)
    run_dir = tag_dir.parent.parent
    cfg = _read_config(run_dir / "config.yaml")
    step = int(tag_dir.name.split("_")[-1]) if tag_dir.name.startswith("step_") else None
    return LoadedWeights(model, ema, cfg, step, f"deepspeed:{tag_dir}")
