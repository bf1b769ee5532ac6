"""DeepSpeed engine construction: config dict, AdamW parameter groups, LR schedule, mpu wiring."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from megassm.config.schema import OptimConfig, ParallelConfig, RunConfig
from megassm.runtime import use_bf16

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


def deepspeed_config(cfg: RunConfig, device: torch.device, dp_world: int,
                     load_universal: bool = False) -> dict[str, Any]:
    p: ParallelConfig = cfg.parallel
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, contiguous_gradients=True,
                    overlap_comm=device.type == "cuda")
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    ds = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.micro_batch_size * cfg.train.grad_accum * dp_world,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(cfg.train.precision, device)},
        # a torch.optim.AdamW is passed in: no JIT-compiled FusedAdam, and ZeRO accepts it with this flag
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if load_universal:  # a resume at another layout (megassm/train/elastic.py)
        ds["checkpoint"] = {"load_universal": True}
    if p.pp > 1:  # pipeline (megassm/parallel/pipeline_trainer.py): one step accumulates its micro-batches
        ds["gradient_accumulation_steps"] = p.micro_batches
        ds["train_batch_size"] = cfg.train.micro_batch_size * p.micro_batches * dp_world
        ds["bf16"]["check_grad_overflow"] = True  # ZeRO-1's step() then skips non-finite gradients under bf16 too
    return ds


def build_engine(model: nn.Module, cfg: RunConfig, device: torch.device, mesh, load_universal: bool = False):
    """Wrap ``model`` in a DeepSpeed engine with AdamW + LambdaLR; returns (engine, scheduler)."""
    import deepspeed

    o = cfg.optim
    # fused: one multi-tensor kernel for the whole update on CUDA (torch's foreach path launches several)
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                            fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o, cfg.train.steps))
    # ZeRO shards and gradients reduce over DP x CP. Under ZeRO-3 with CP the mpu folds CP into data
    # parallelism (docs/parallelism.md §5), so DeepSpeed's batch bookkeeping counts the mpu's DP world.
    mpu = mesh.deepspeed_mpu()
    ds_cfg = deepspeed_config(cfg, device, mpu.get_data_parallel_world_size(), load_universal)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg, mpu=mpu, dist_init_required=False,
    )
    return engine, scheduler


def skip_update(engine) -> None:
    """Close a gradient-accumulation window without an optimizer step (a micro-batch of it was non-finite).

    Every micro-batch went through ``backward`` and all but the last through ``step``; instead of the
    boundary ``step`` this drops the accumulated gradients and counts the micro-step, so the next
    micro-batch opens a new window. The LR schedule and ``global_steps`` do not move (no update).
    """
    engine.optimizer.zero_grad()
    engine.micro_steps += 1
