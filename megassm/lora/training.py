"""LoRA inside ``megassm train`` and the tools around it: adapters exported with each checkpoint, the
merge into a consolidated checkpoint (``megassm convert merge-lora``)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from megassm.config.schema import LoRAConfig
from megassm.lora.adapters import adapter_state_dict, load_adapters, merge_lora, save_adapters

ADAPTER_DIR = "lora"  # inside each checkpoints/step_* directory


def export_adapters(module: nn.Module, tag_dir: Path, cfg: LoRAConfig, base: str, is_writer: bool) -> None:
    """Write ``tag_dir/lora`` from the live (DeepSpeed-wrapped) module; every rank must call it.

    Under ZeRO-3 each rank holds a slice of every parameter: the adapters (a small fraction of the
    model) are gathered for the write; other stages hold them whole.
    """
    params = [p for n, p in module.named_parameters() if n.endswith((".lora_A", ".lora_B"))]
    if params and hasattr(params[0], "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            state = {k: v.clone() for k, v in adapter_state_dict(module).items()} if is_writer else {}
    else:
        state = adapter_state_dict(module)
    if is_writer:
        save_adapters(tag_dir / ADAPTER_DIR, state, cfg, base)


def merge_lora_checkpoint(base: str | Path, adapters: str | Path, out: str | Path, *, use_ema: bool = True,
                          force: bool = False) -> tuple[dict, list[str]]:
    """Base checkpoint (any layout) + adapter directory -> consolidated checkpoint with the adapters folded in."""
    from megassm.checkpoint.writers import save_consolidated
    from megassm.config.load import to_dict
    from megassm.sample import load_model_for_sampling

    model, cfg, info = load_model_for_sampling(base, use_ema=use_ema)
    report = load_adapters(model, adapters)
    n = merge_lora(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = save_consolidated(Path(out), state, to_dict(cfg), force=force,
                             meta={"merged_lora": str(adapters), "base_weights": info["weights"]})
    return {**meta, "step": info["step"], "parameters": sum(v.numel() for v in state.values()),
            "tensors": len(state)}, [report, f"merged {n} adapters into {info['weights']} weights of {base}"]

