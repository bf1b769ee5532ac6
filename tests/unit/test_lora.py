"""LoRA adapters: target selection by kind, frozen base, identity at attach, merge == unmerged, peft-layout
save / load round trip, and config errors."""

import json

import pytest
import torch

from megassm.config.schema import LoRAConfig
from megassm.config.validate import ConfigError
from megassm.lora import LoRALinear, adapter_state_dict, attach_lora, load_adapters, merge_lora, save_adapters
from megassm.lora.adapters import AdapterError, read_adapters, target_modules
from megassm.models import build_model
from megassm.run_config import load_config
from tests.conftest import TINY_OVERRIDES


def _model(seed=0):
    cfg = load_config("configs/smoke.yaml", TINY_OVERRIDES)  # pattern hvAh: 3 Hydra blocks, 1 attention
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():  # open the zero-initialised gates so every block shapes the output
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 3, 1, 8, 8, generator=g), torch.tensor([0.3, 0.9]), torch.randn(2, 8, 16, generator=g),
            torch.tensor([[True] * 5 + [False] * 3, [True] * 8]))


def _randomise_adapters(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=g))


@pytest.mark.parametrize("targets, count", [(["hydra"], 6), (["attention"], 2), (["cross_attention"], 12),
                                            (["ffn"], 8), (["hydra", "attention", "cross_attention", "ffn"], 28)])
def test_targets_by_kind_and_frozen_base(targets, count):
    model = _model()
    x = _inputs()
    ref = model(*x)
    attach_lora(model, LoRAConfig(rank=4, alpha=8, targets=targets))
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(names) == count and names == target_modules(model, targets)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    torch.testing.assert_close(model(*x), ref, rtol=0, atol=0)  # B = 0: attaching changes nothing


def test_merge_equals_unmerged_and_keeps_names():
    model = _model()
    base_names = set(model.state_dict())
    attach_lora(model, LoRAConfig(rank=4, alpha=16, dropout=0.1))
    _randomise_adapters(model)
    x = _inputs()
    with torch.no_grad():
        unmerged = model(*x)  # eval(): dropout off
        assert merge_lora(model) == 28
        merged = model(*x)
    assert set(model.state_dict()) == base_names and not any(isinstance(m, LoRALinear) for m in model.modules())
    # fp32; W + s B A folded once vs. added per call: summation order only
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_in_peft_layout(tmp_path):
    model = _model()
    cfg = LoRAConfig(rank=2, alpha=4, targets=["attention", "ffn"])
    attach_lora(model, cfg)
    _randomise_adapters(model)
    save_adapters(tmp_path / "a", adapter_state_dict(model), cfg, base="ckpt")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == 2 and meta["lora_alpha"] == 4
    assert "blocks.2.mixer.qkv" in meta["target_modules"] and len(meta["target_modules"]) == 10
    _, _, state = read_adapters(tmp_path / "a")
    assert set(state) == set(adapter_state_dict(model))
    fresh = _model()
    load_adapters(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(*_inputs()), model(*_inputs()), rtol=0, atol=0)
    with pytest.raises(AdapterError, match="adapter_config.json"):
        load_adapters(_model(), tmp_path)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_files_load_both_ways(tmp_path, rslora):
    """An adapter directory written by peft's own save_pretrained (target_modules as name suffixes; rsLoRA's
    alpha / sqrt(r)) loads with load_adapters (what `sample --lora` and `merge-lora` call), and megassm's loads in
    peft: the same outputs. Tolerance 1e-5: fp32, the adapter's product in another order."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    x = _inputs()
    cfg = PeftLoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "mixer.proj", "qkv"], init_lora_weights=False,
                         use_rslora=rslora)
    peft_model = get_peft_model(_model(), cfg)
    peft_model.save_pretrained(tmp_path / "peft")
    meta = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sorted(meta["target_modules"]) == ["fc1", "mixer.proj", "qkv"]  # suffixes, not module names
    ours = _model()
    report = load_adapters(ours, tmp_path / "peft")
    assert "on 6 linears" in report
    names = {n for n, m in ours.named_modules() if isinstance(m, LoRALinear)}  # hvAh: block 2 is attention
    assert names == {*(f"blocks.{i}.mlp.fc1" for i in range(4)), "blocks.2.mixer.proj", "blocks.2.mixer.qkv"}
    with torch.no_grad():
        torch.testing.assert_close(ours(*x), peft_model(*x), rtol=1e-5, atol=1e-5)
        save_adapters(tmp_path / "ours", adapter_state_dict(ours), read_adapters(tmp_path / "peft")[0])
        back = PeftModel.from_pretrained(_model(), tmp_path / "ours")
        torch.testing.assert_close(back(*x), ours(*x), rtol=1e-5, atol=1e-5)


def test_peft_options_megassm_does_not_read_are_named(tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    get_peft_model(_model(), PeftLoraConfig(r=2, target_modules=["fc1"], use_dora=True)).save_pretrained(tmp_path)
    with pytest.raises(AdapterError, match=r"use_dora=True is not supported"):
        load_adapters(_model(), tmp_path)


def test_config_errors_name_the_key():
    assert load_config("configs/smoke.yaml", ["finetune.lora={}", "parallel.zero_stage=2"]).finetune.lora.rank == 8
    with pytest.raises(ConfigError, match="valid kinds"):
        load_config("configs/smoke.yaml", ["finetune.lora={targets: [mlp]}"])
    with pytest.raises(ConfigError, match="rank=0"):
        load_config("configs/smoke.yaml", ["finetune.lora.rank=0"])
    # every adapter kind under ZeRO-3 with TP and CP loads; PP and TP-inconsistent dropout do not
    assert load_config("configs/smoke.yaml", ["finetune.lora={}", "parallel.zero_stage=3", "parallel.tp=2",
                                              "parallel.cp=2", "model.num_heads=4"]).parallel.tp == 2
    with pytest.raises(ConfigError, match="pp=2 is not supported yet"):
        load_config("configs/smoke.yaml", ["finetune.lora={}", "parallel.pp=2", "parallel.zero_stage=1"])
    with pytest.raises(ConfigError, match="dropout=0.1 with parallel.tp=2"):
        load_config("configs/smoke.yaml", ["finetune.lora={dropout: 0.1}", "parallel.tp=2"])
