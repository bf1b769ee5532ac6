"""Attach, save, load and merge LoRA adapters on an HTH model, by module kind.

Adapters are saved in peft's LoRA layout, so peft and diffusers tooling can read them:

    DIR/adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "lora_dropout", "target_modules",
                                    "bias": "none", ..., "megassm_targets": [kinds]}
    DIR/adapter_model.safetensors  base_model.model.<module>.lora_A.weight (r, in) / .lora_B.weight (out, r)
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from megassm.config.schema import LoRAConfig
from megassm.lora.layers import LoRALinear
from megassm.models.mixers import mixer_kinds

# the block's own target kinds -> module names (suffixes inside a block); a mixer kind's are on its MixerSpec
BLOCK_TARGETS: dict[str, tuple[str, ...]] = {
    "cross_attention": ("cross_attn.q", "cross_attn.kv", "cross_attn.proj"),
    "ffn": ("mlp.fc1", "mlp.fc2"),
}


def target_kinds() -> dict[str, tuple[str, ...]]:
    """Target kind -> module names (suffixes inside a block) it covers: every registered mixer kind with
    ``MixerSpec.lora_targets`` (e.g. hydra: mixer.in_proj / mixer.out_proj), then cross-attention and FFN."""
    kinds = {spec.name: tuple(f"mixer.{n}" for n in spec.lora_targets) for spec in mixer_kinds() if spec.lora_targets}
    return {**kinds, **BLOCK_TARGETS}
CONFIG_FILE, WEIGHTS_FILE, PEFT_PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."


class AdapterError(ValueError):
    """An adapter directory is missing, malformed, or does not fit the model."""


def target_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the nn.Linear modules of ``model.blocks`` that ``targets`` (kinds) select, in model order."""
    kinds = target_kinds()
    suffixes = tuple(s for k in targets for s in kinds[k])
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")
            and n.split(".", 2)[-1] in suffixes]  # blocks.<i>.<suffix>


def attach_lora(model: nn.Module, cfg: LoRAConfig, names: list[str] | None = None) -> str:
    """Freeze every parameter of ``model`` and put a trainable adapter on each target; returns a report."""
    names = target_modules(model, cfg.targets) if names is None else names
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if isinstance(base, LoRALinear):
            raise AdapterError(f"{name} already has an adapter")
        setattr(parent, child, LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout).train(base.training))
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    return (f"LoRA rank {cfg.rank}, alpha {cfg.alpha:g} on {len(names)} linears ({', '.join(cfg.targets)}): "
            f"{n_lora:,} trainable of {n_all:,} parameters ({100 * n_lora / n_all:.2f}%); base frozen")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights under megassm names (``<module>.lora_A`` (r, in), ``<module>.lora_B`` (out, r))."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def save_adapters(directory: str | Path, state: dict[str, torch.Tensor], cfg: LoRAConfig, base: str = "") -> Path:
    """Write ``state`` (adapter_state_dict) and its config in peft's layout."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    save_file({PEFT_PREFIX + k + ".weight": v.detach().float().cpu().contiguous() for k, v in state.items()},
              str(d / WEIGHTS_FILE))
    (d / CONFIG_FILE).write_text(json.dumps({
        "peft_type": "LORA", "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": modules, "bias": "none", "task_type": None, "base_model_name_or_path": base,
        "fan_in_fan_out": False, "init_lora_weights": True, "megassm_targets": list(cfg.targets)}, indent=1))
    return d


# peft LoraConfig options that change what the stored tensors mean, with the value that megassm reads
_PEFT_PLAIN = {"bias": "none", "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
               "rank_pattern": {}, "alpha_pattern": {}}


def _peft_targeted(name: str, target_modules: list[str] | str) -> bool:
    """peft's rule: a list entry names a module by its full name or a dotted suffix; a string is a regex that
    must match the whole name."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _check_peft_options(meta: dict, where: Path) -> None:
    if meta.get("peft_type") != "LORA":
        raise AdapterError(f"{where}: peft_type={meta.get('peft_type')!r}, only LORA is supported")
    for key, plain in _PEFT_PLAIN.items():
        value = meta.get(key, plain)
        if value != plain and not (plain in (None, {}) and not value):
            raise AdapterError(f"{where}: {key}={value!r} is not supported (megassm reads plain LoRA adapters: "
                               f"{key}={plain!r}); save the adapters with peft's LoraConfig({key}={plain!r})")


def read_adapters(directory: str | Path) -> tuple[LoRAConfig, list[str], dict[str, torch.Tensor]]:
    """-> (config, adapted module names, state under megassm names). Reads megassm's files and peft's own
    (``PeftModel.save_pretrained``: ``target_modules`` as name suffixes or a regex, rsLoRA's alpha / sqrt(r)):
    the adapted modules are those with tensors in the weights file, each of them one that target_modules names."""
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / CONFIG_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise AdapterError(f"{d}: expected {CONFIG_FILE} and {WEIGHTS_FILE} (a LoRA adapter directory written by "
                           "megassm train with finetune.lora, or by peft)")
    meta = json.loads((d / CONFIG_FILE).read_text())
    _check_peft_options(meta, d / CONFIG_FILE)
    rank, alpha = int(meta["r"]), float(meta["lora_alpha"])
    if meta.get("use_rslora"):  # scale alpha / sqrt(r) = alpha' / r
        alpha *= math.sqrt(rank)
    cfg = LoRAConfig(rank=rank, alpha=alpha, dropout=float(meta.get("lora_dropout", 0.0)),
                     targets=list(meta.get("megassm_targets") or target_kinds()))
    stored = load_file(str(d / WEIGHTS_FILE))
    state = {k.removeprefix(PEFT_PREFIX).removesuffix(".weight"): v for k, v in stored.items()}
    names = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    targets = meta.get("target_modules") or []
    stray = [n for n in names if not _peft_targeted(n, targets)]
    if stray:
        raise AdapterError(f"{d}: {WEIGHTS_FILE} holds adapters for {stray[:5]}, which target_modules={targets!r} "
                           "does not name")
    return cfg, names, state


def load_adapters(model: nn.Module, directory: str | Path) -> str:
    """Attach the adapters stored in ``directory`` to ``model`` (unmerged) and load their weights."""
    cfg, names, state = read_adapters(directory)
    own = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [n for n in names if n not in own]
    if missing:
        raise AdapterError(f"{directory}: adapters for modules the model does not have: {missing[:5]}")
    report = attach_lora(model, cfg, names)
    expected = set(adapter_state_dict(model))
    if set(state) != expected:
        raise AdapterError(f"{directory}: adapter tensors {sorted(set(state) ^ expected)[:5]} do not match "
                           "target_modules")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise AdapterError(f"{directory}: {str(e).splitlines()[-1].strip()}") from None
    return report


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight (W += alpha / r * B A); returns how many were merged."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, m in found:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, m.merged())
    return len(found)
