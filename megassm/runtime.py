"""Where megassm computes and in which dtype: the one place that decides.

``MEGASSM_DEVICE=cpu`` keeps a process on the CPU even where CUDA is available (tests, CPU smoke runs on
GPU nodes); otherwise CUDA is used when present. ``precision``: ``auto`` is bf16 on CUDA and fp32 on the
CPU; ``bf16`` / ``fp32`` force one.
"""

from __future__ import annotations

import os

import torch


def cuda_enabled() -> bool:
    return torch.cuda.is_available() and os.environ.get("MEGASSM_DEVICE", "") != "cpu"


def default_device(local_rank: int | None = None) -> torch.device:
    """The process's compute device: ``cuda:<local_rank>`` (or the current CUDA device), else the CPU."""
    if not cuda_enabled():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device() if local_rank is None else local_rank)


def use_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    return torch.bfloat16 if use_bf16(precision, device) else torch.float32
