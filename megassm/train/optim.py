"""The optimizer and LR schedule every backend wraps: AdamW parameter groups and a warmup + cosine/constant
multiplier. Backend-agnostic (``megassm/train/backends/`` hands them to DeepSpeed)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from megassm.config.schema import OptimConfig

# Parameters that never get weight decay (besides biases and every 1-D tensor): SSM dynamics
# and modulation tables.
NO_DECAY_NAMES = ("A_log", "D", "dt_bias", "scale_shift_table", "y_null")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() < 2 or leaf in NO_DECAY_NAMES or getattr(p, "_no_weight_decay", False):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Multiplier of cfg.lr at optimizer step s: linear warmup, then constant or cosine to min_lr."""
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_optimizer(model: nn.Module, cfg: OptimConfig, total_steps: int, device: torch.device,
                    adamw: type | None = None):
    """(AdamW over ``param_groups``, LambdaLR of ``lr_lambda``). ``adamw``: another AdamW implementation taking
    torch's arguments (a backend's: DeepSpeed's CPUAdam under optimizer offload); default torch's."""
    groups, hyper = param_groups(model, cfg.weight_decay), dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    # fused: one multi-tensor kernel for the whole update on CUDA (torch's foreach path launches several)
    opt = adamw(groups, **hyper) if adamw else torch.optim.AdamW(groups, **hyper, fused=device.type == "cuda")
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
