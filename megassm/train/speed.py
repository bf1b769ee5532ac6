"""The model's fast paths a run turns on before the backend wraps it (``model.fp8``, ``model.compile``).

    fp8       the blocks' token linears become torchao Float8Linears (megassm/ops/fp8.py), same Parameters
    compile   every HTHBlock's forward is compiled (megassm/models/block.py: regional, static shapes);
              under ZeRO-3 the blocks become ZeRO-3 leaf modules (``mark_model``): their parameters are
              gathered once at block entry, so no DeepSpeed hook splits the compiled region

Both keep the reference path one config key away (``none``) and leave parameter names unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from megassm.config.schema import ModelConfig


def apply_speed(model: nn.Module, m: ModelConfig, device: torch.device) -> list[str]:
    """Apply ``m.fp8`` and ``m.compile`` to ``model`` in place; returns report lines for the log."""
    notes = []
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
