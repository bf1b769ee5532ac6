"""FP8 linears for training (``model.fp8``): torchao's float8 training on the blocks' projections and FFN.

    none         bf16 everywhere (the reference path)
    tensorwise   one dynamic scale per tensor (e4m3 forward, e5m2 gradients): the fastest on Hopper
    rowwise      one scale per row: more accurate, slower on Hopper with torch 2.11 (docs/performance.md)

Which linears: every ``nn.Linear`` inside ``blocks`` that is *called* on the image/video tokens -- the
mixers' projections (Hydra in_proj / out_proj, attention qkv / proj), cross-attention's q / proj and the
FFN. Kept in bf16 (``SKIP``): Hydra's fc_D (the fused path reads its weight without calling it),
cross-attention's kv (text tokens, a small GEMM), and everything outside the blocks (patch and text
embeddings, timestep MLP, final layer). Norms are not linears and stay as they are.

FP8 GEMMs (``torch._scaled_mm``) need every dimension divisible by 16. Weights whose shape is not are
left in bf16 (reported); the token dimension is padded with zero rows to a multiple of 16 and the padding
is sliced off after (``TokenPaddedFloat8Linear``): zero rows change neither the output's other rows nor
the weight's gradient, nor the dynamic scales (amax ignores zeros), so padding is exact. Stage 3 under
cp 4 has 7,260 tokens per rank, which needs it.

Off CUDA, torchao's emulation runs the same casts and scales with a high-precision matmul (the CPU tests).
Parameter names and shapes are unchanged: checkpoints do not know whether a run used FP8.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megassm.config.schema import FP8_RECIPES as RECIPES
from megassm.config.schema import TORCHAO_PIN

SKIP = {"mixer.fc_D": "Hydra's fused path reads the weight without calling the module",
        "cross_attn.kv": "text tokens: a small GEMM"}


def torchao_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def _import_torchao():
    """Import torchao.float8 without its warnings about the MX / CUTLASS extensions float8 training never uses."""
    quiet = logging.getLogger("torchao")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        import torchao.float8  # noqa: F401
    finally:
        quiet.setLevel(level)


def _float8_config(recipe: str, emulate: bool):
    _import_torchao()
    from torchao.float8 import Float8LinearConfig

    return dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)


@cache  # one class, so that isinstance and pickling see the same type every time
def _padded_class():
    _import_torchao()
    from torchao.float8.float8_linear import Float8Linear

    class TokenPaddedFloat8Linear(Float8Linear):
        """torchao's Float8Linear with the token dimension padded to a multiple of 16 (module doc)."""

        def forward(self, x: Tensor) -> Tensor:  # x (..., in) -> (..., out)
            lead, k = x.shape[:-1], x.shape[-1]
            m = x.numel() // k
            pad = -m % 16
            if pad == 0:
                return super().forward(x)
            y = super().forward(F.pad(x.reshape(m, k), (0, 0, 0, pad)))
            return y[:m].view(*lead, y.shape[-1])

    return TokenPaddedFloat8Linear


def fp8_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """(names of the linears FP8 takes, names left in bf16 with the reason) under ``model.blocks``."""
    take, keep = [], []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or not name.startswith("blocks."):
            continue
        leaf = ".".join(name.split(".")[2:])  # blocks.<i>.<leaf>
        if leaf in SKIP:
            keep.append(f"{name} ({SKIP[leaf]})")
        elif mod.in_features % 16 or mod.out_features % 16:
            keep.append(f"{name} ({mod.in_features}x{mod.out_features}: FP8 GEMMs need multiples of 16)")
        else:
            take.append(name)
    return take, keep


def convert_to_fp8(model: nn.Module, recipe: str, emulate: bool | None = None) -> str:
    """Swap the target linears (``fp8_targets``) for FP8 ones in place, keeping the Parameter objects;
    returns a one-line report. ``emulate``: None = emulate unless CUDA is available."""
    if recipe not in RECIPES:
        raise ValueError(f"model.fp8={recipe!r}; valid: {', '.join(RECIPES)}")
    if recipe == "none":
        return "fp8: none"
    if not torchao_available():
        raise ImportError(f"model.fp8={recipe} needs torchao: pip install {TORCHAO_PIN}")
    emulate = not torch.cuda.is_available() if emulate is None else emulate
    config, cls = _float8_config(recipe, emulate), _padded_class()
    take, keep = fp8_targets(model)
    for name in take:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, cls.from_float(model.get_submodule(name), config=config))
    model.fp8_recipe = recipe
    kept = sorted({k.split(".", 2)[2] for k in keep})  # "<leaf> (<reason>)", once per kind
    kept = f"; kept in bf16: {'; '.join(kept)}" if kept else ""
    return f"fp8: {recipe}{' (emulated)' if emulate else ''} on {len(take)} linears{kept}"
