"""ZeRO-3 leaf modules: what DeepSpeed gathers whole at their entry (``DeepSpeedBackend.prepare``'s marks).

Both Hydra paths read submodule weights (fc_D; conv1d / norm when fused) without calling them, so Hydra and
ParallelHydra are leaves; under a frozen base (LoRA) the leaves that hold adapters need their inputs to
require grad (``feed_grad_into_zero3_leaves``).
"""

from __future__ import annotations

import torch
from torch import nn


def mark_zero3_leaves(model: nn.Module) -> None:
    from deepspeed.utils import set_z3_leaf_modules

    from megassm.models.block import HTHBlock
    from megassm.models.hydra import Hydra
    from megassm.parallel.hydra import ParallelHydra
    from megassm.train.speed import compiled_blocks

    # both Hydra paths read submodule weights (fc_D; conv1d / norm when fused) without calling them;
    # compiled blocks are leaves whole: no hook inside the compiled region (megassm/train/speed.py)
    leaves = [HTHBlock] if compiled_blocks(model) else [Hydra, ParallelHydra]
    set_z3_leaf_modules(model, leaves, raise_if_not_found=False)
    if any(not p.requires_grad for p in model.parameters()):  # a frozen base (LoRA) around adapter leaves
        feed_grad_into_zero3_leaves(model)


def feed_grad_into_zero3_leaves(model: nn.Module) -> int:
    """Make the frozen inputs of ZeRO-3 leaf modules that hold adapters require grad; returns how many leaves.

    DeepSpeed reduces a leaf module's gradients (Hydra is one, ``_z3_leaf``) in a full backward hook on it.
    When no input of the module requires grad -- the first Hydra of a LoRA model, everything before it
    frozen -- torch runs that hook as soon as the *output's* gradient arrives, before the module's own
    backward: DeepSpeed then reduces gradients that do not exist yet and re-partitions the weights the
    backward still needs (it fails on an empty partition). A forward pre-hook hands the module a detached
    copy of such an input that requires grad, so the hook fires after the module's backward, as it does
    for every later block; it costs the input gradient of that one layer.
    """
    leaves = [m for m in model.modules() if getattr(m, "_z3_leaf", False)
              and any(p.requires_grad for p in m.parameters())]
    for m in leaves:
        m.register_forward_pre_hook(_inputs_require_grad)
    return len(leaves)


def _inputs_require_grad(module: nn.Module, args: tuple) -> tuple | None:
    if not torch.is_grad_enabled() or any(torch.is_tensor(a) and a.requires_grad for a in args):
        return None
    return tuple(a.detach().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
