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


# DeepSpeed versions megassm is proven with: the CI suite runs 0.19.8 (constraints.txt). 0.18.9 failed the
# two-rank ZeRO / EMA engine test (and read no pipeline checkpoint before torchzip took protocol-2 sets), so the
# range starts at the proven release; pyproject.toml states the same range
DEEPSPEED_RANGE = ("0.19.8", "0.20")


def check_deepspeed(installed: str | None = None) -> str:
    """The installed DeepSpeed's version, or a RuntimeError naming it and the supported range (before any
    process group exists: DeepSpeed's engine, ZeRO-3 partitioning and checkpoint layout differ by version)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    lo, hi = DEEPSPEED_RANGE
    if installed is None:
        try:
            installed = version("deepspeed")
        except PackageNotFoundError:
            raise RuntimeError(f"DeepSpeed is not installed; megassm trains with deepspeed>={lo},<{hi}: "
                               f"pip install 'deepspeed>={lo},<{hi}' (or: pip install -e . -c constraints.txt)"
                               ) from None
    if not Version(lo) <= Version(installed) < Version(hi):
        raise RuntimeError(f"DeepSpeed {installed} is installed; megassm is proven with deepspeed>={lo},<{hi} "
                           f"(engine, ZeRO-3 partitions and checkpoint files differ by version): "
                           f"pip install 'deepspeed>={lo},<{hi}'")
    return installed
