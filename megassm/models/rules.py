"""ModelConfig's rules, next to the models: the pattern's symbols and each mixer kind's own rules (the registry,
``models/mixers/``), the patch and head sizes, the kernels. Run by the config gate (``megassm/run_config.py``,
before any model or process group exists) and by ``HTHModel`` for a config built in code."""

from __future__ import annotations

import importlib.util

from megassm.config.schema import ATTENTION_BACKENDS, FP8_RECIPES, HYDRA_PATHS, TORCHAO_PIN, ModelConfig
from megassm.config.validate import ConfigError, check_choice
from megassm.models.mixers import pattern_errors, spec_errors  # the registry of mixer kinds


def validate_model(m: ModelConfig) -> None:
    """ModelConfig's rules (module doc); raises ``ConfigError`` naming the key and what would be valid."""

    for msg in pattern_errors(m.pattern):
        raise ConfigError(msg)
    if len(m.patch_size) != 3 or any(p < 1 for p in m.patch_size):
        raise ConfigError(f"model.patch_size={list(m.patch_size)} must be three positive ints (pt, ph, pw)")
    if m.d_model % m.num_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}")
    for msg in spec_errors(m):  # each kind's own rules (Hydra's widths, RoPE's even head dim, ...)
        raise ConfigError(msg)
    check_choice("model.ssd_impl", m.ssd_impl, ["auto", "ref", "triton"])
    check_choice("model.attention_backend", m.attention_backend, list(ATTENTION_BACKENDS))
    check_choice("model.hydra_path", m.hydra_path, list(HYDRA_PATHS))
    check_choice("model.fp8", m.fp8, list(FP8_RECIPES))
    check_choice("model.compile", m.compile, ["none", "blocks"])
    if m.fp8 != "none" and importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"model.fp8={m.fp8} needs torchao, which is not installed: pip install {TORCHAO_PIN} "
                          "(or set model.fp8=none)")
    if m.attention_backend == "fa4":  # on a GPU machine: installed, and a GPU that has the kernels
        import torch

        from megassm.ops.flash4 import fa4_unsupported

        reason = fa4_unsupported(torch.device("cuda")) if torch.cuda.is_available() else None
        if reason:
            raise ConfigError(f"{reason} (or set model.attention_backend=auto: cuDNN / FlashAttention-2 via SDPA)")
    for k in ("d_model", "d_state", "chunk_size", "text_dim", "max_text_len"):
        if getattr(m, k) < 1:
            raise ConfigError(f"model.{k}={getattr(m, k)} must be >= 1")
