"""Warm start by a whole state dict: the path the Trainer ran before partitioned construction (issue 27).

The Trainer reads ``init_from`` by slices (``megassm/train/build.py``); this is only the measured "before"
of ``benchmarks/bench_init.py`` (phase ``warm_old``).
"""

from __future__ import annotations

from torch import nn

from megassm.checkpoint.load import CheckpointError, load_weights
from megassm.config.schema import ModelConfig


def warm_start(model: nn.Module, model_cfg: ModelConfig, path: str, use_ema: bool = False) -> list[str]:
    """Load weights into ``model`` (built from ``model_cfg``, not yet wrapped by the backend); return a report
    of what changed."""
    loaded = load_weights(path, want_ema=use_ema)
    weights = loaded.ema if (use_ema and loaded.ema) else loaded.model
    report = [f"warm start from {loaded.source} (step {loaded.step})"]
    own = model.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in weights.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"init_from={path}: shapes differ from the model config: " + "; ".join(bad[:8]))
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
    src_pattern = (loaded.config or {}).get("model", {}).get("pattern")
    if src_pattern and src_pattern != model_cfg.pattern:
        changes = [f"block {i}: '{a}' -> '{b}'" for i, (a, b) in enumerate(zip(src_pattern, model_cfg.pattern))
                   if a != b]
        report.append(f"layer pattern {src_pattern} -> {model_cfg.pattern}: " + (", ".join(changes) or "none"))
    if missing:
        report.append(f"{len(missing)} tensors not in the checkpoint, initialised fresh: {missing[:6]}")
    if unexpected:
        report.append(f"{len(unexpected)} checkpoint tensors unused by this model: {unexpected[:6]}")
    report.append(f"loaded {len(own) - len(missing)}/{len(own)} tensors")
    return report
