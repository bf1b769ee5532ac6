"""LoRA inside ``megassm train`` and the tools around it: adapters exported with each checkpoint, the
merge into a consolidated checkpoint (``megassm convert merge-lora``)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from torch import nn

from megassm.config.schema import LoRAConfig
from megassm.lora.adapters import adapter_state_dict, load_adapters, merge_lora, save_adapters

ADAPTER_DIR = "lora"  # inside each checkpoints/step_* directory


def export_adapters(module: nn.Module, tag_dir: Path, cfg: LoRAConfig, base: str, is_writer: bool,
                    gathered: Callable[[list], AbstractContextManager] = lambda params: nullcontext()) -> None:
    """Write ``tag_dir/lora`` from the live (backend-wrapped) module; every rank must call it.

    ``gathered(params)``: the backend's context in which ``params`` are whole on every rank (ZeRO-3 holds a
    slice of each parameter per rank: the adapters, a small fraction of the model, are gathered for the write).
    """
    params = [p for n, p in module.named_parameters() if n.endswith((".lora_A", ".lora_B"))]
    with gathered(params):
        state = {k: v.clone() for k, v in adapter_state_dict(module).items()} if is_writer else {}
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

