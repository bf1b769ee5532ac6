"""The model's fast paths a run turns on before the backend wraps it (``model.fp8``, ``model.compile``).

    fp8       the blocks' token linears become torchao Float8Linears (megassm/ops/fp8.py), same Parameters
    compile   every HTHBlock's forward is compiled (megassm/models/block.py: regional, static shapes);
              under ZeRO-3 the blocks become ZeRO-3 leaf modules (``mark_model``): their parameters are
              gathered once at block entry, so no DeepSpeed hook splits the compiled region

Both keep the reference path one config key away (``none``) and leave parameter names unchanged.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from megassm.config.schema import ModelConfig

log = logging.getLogger("megassm.train")
# What one H100 showed at the stage-3 shape (docs/performance.md, "Training fast paths"): said on CUDA runs.
CUDA_CAVEAT = ("model.compile / model.fp8 are new on CUDA: on one H100 at stage 3's shape (29,040 tokens, depth 8, "
               "ZeRO-3 on one rank) compiled blocks step 1.11x faster than eager and compiled + FP8 tensorwise "
               "1.15x (1.15x at stage 2's 16,384 tokens, depth 12), but neither has run a long training on a GPU "
               "or under CP/TP over NCCL, and FP8's one 300-step comparison with bf16 ended at the same loss yet "
               "missed its pre-set tolerance (it descended faster); see docs/performance.md (Training fast paths) "
               "and time your shape with benchmarks/bench_step.py before a long run")


def apply_speed(model: nn.Module, m: ModelConfig, device: torch.device) -> list[str]:
    """Apply ``m.fp8`` and ``m.compile`` to ``model`` in place; returns report lines for the log."""
    notes = []
    first_rank = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if device.type == "cuda" and (m.fp8 != "none" or m.compile != "none") and first_rank:
        log.warning(CUDA_CAVEAT)
    if m.fp8 != "none":
        from megassm.ops.fp8 import convert_to_fp8

        notes.append(convert_to_fp8(model, m.fp8, emulate=device.type != "cuda"))
    if m.compile == "blocks":
        from megassm.models.block import compile_blocks

        n = compile_blocks(model)
        notes.append(f"compile: {n} blocks (torch.compile per block, static shapes; the first step compiles)")
    return notes


def compiled_blocks(model: nn.Module) -> bool:
    return any(getattr(mod, "compile_backend", None) is not None for mod in model.modules())
