"""LoRA fine-tuning of HTH models: low-rank adapters on chosen linears of a frozen base (``finetune.lora``)."""

from megassm.lora.adapters import (
    adapter_state_dict,
    attach_lora,
    load_adapters,
    merge_lora,
    read_adapters,
    save_adapters,
    target_kinds,
)
from megassm.lora.layers import LoRALinear
from megassm.lora.parallel import register_adapter_grad_sums  # noqa: F401  registers LoRA's TP twins with parallel/

__all__ = ["LoRALinear", "target_kinds", "adapter_state_dict", "attach_lora", "load_adapters", "merge_lora",
           "read_adapters", "save_adapters"]
