"""What every encoder loader shares: local directories only (never downloaded), identities, devices."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class EncoderError(ValueError):
    """An encoder directory is missing, incomplete or of an unsupported kind."""


def fingerprint(path: Path) -> str:
    """sha256 of the config files and of the weight files' names and sizes (cheap, not the bytes)."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(path)).encode()
            if p.suffix in (".json", ".txt", ".model"):
                h.update(rel + b"\0" + p.read_bytes())
            else:
                h.update(rel + b"\0" + str(p.stat().st_size).encode())
    return h.hexdigest()[:16]


def _read_config(path: Path, what: str) -> dict:
    cfg = path / "config.json"
    if not path.is_dir():
        raise EncoderError(f"{what} directory {path} does not exist (pass a local save_pretrained directory)")
    if not cfg.is_file():
        raise EncoderError(f"{what} directory {path} has no config.json; expected a diffusers/transformers "
                           "save_pretrained directory (a 'vae' or 'text_encoder' subfolder of a pipeline works)")
    return json.loads(cfg.read_text())


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda:<local rank> when CUDA is present (srun/torchrun tasks), else cpu."""
    import os

    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def identity_summary(identity: dict[str, Any]) -> dict[str, Any]:
    """The short identity stored in every sample's metadata."""
    return {k: identity[k] for k in ("class", "name", "fingerprint") if k in identity}
