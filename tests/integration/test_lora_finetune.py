"""LoRA fine-tuning end to end on the demo model: train adapters from a consolidated checkpoint (one rank;
ZeRO-3 for attention / cross-attention / FFN adapters, ZeRO-2 with Hydra ones), the base frozen, adapters
exported beside the DeepSpeed checkpoint, ``merge-lora`` folds them in, and ``megassm sample --lora``
(unmerged) gives the merged checkpoint's latents."""

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from megassm.config import load_config, to_dict
from megassm.lora.adapters import read_adapters
from megassm.lora.training import merge_lora_checkpoint
from megassm.models import build_model
from megassm.sample import SampleSpec, TextEncoder, generate, load_model_for_sampling
from tests.conftest import TINY_OVERRIDES, run_train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("zero, targets, n_adapted", [(3, "[attention, cross_attention, ffn]", 2 + 12 + 8),
                                                       (2, "[hydra, attention, cross_attention, ffn]", 28)])
def test_lora_train_merge_and_sample(zero, targets, n_adapted, tmp_path, cli):
    cfg = load_config("configs/smoke.yaml", TINY_OVERRIDES)
    torch.manual_seed(0)
    base_model = build_model(cfg.model)
    with torch.no_grad():  # a "trained" base: open the zero-initialised gates
        for p in base_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    base = tmp_path / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in base_model.state_dict().items()}, str(base / "model.safetensors"))
    (base / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))

    run = tmp_path / "run"
    proc = run_train("configs/smoke.yaml", *TINY_OVERRIDES, f"init_from={base}", f"run_dir={run}",
                     f"finetune.lora={{rank: 4, alpha: 8, targets: {targets}}}", f"parallel.zero_stage={zero}",
                     "train.steps=3",
                     "train.ckpt_every=3", "train.ema_decay=0.5", "optim.lr=1e-2")
    assert "LoRA rank 4" in proc.stderr + proc.stdout
    (adapters,) = (run / "checkpoints").glob("step_*/lora")
    lcfg, names, state = read_adapters(adapters)
    assert lcfg.rank == 4 and len(names) == n_adapted  # hvAh: 3 Hydra x 2, 1 attention x 2, 4 x (3 cross, 2 FFN)
    assert max(v.abs().max().item() for k, v in state.items() if k.endswith(".lora_B")) > 0  # B moved off zero

    merged_dir = tmp_path / "merged"
    merge_lora_checkpoint(base, adapters, merged_dir)
    merged, ref = load_file(str(merged_dir / "model.safetensors")), base_model.state_dict()
    changed = {k for k in ref if not torch.equal(merged[k], ref[k])}
    assert changed == {f"{n}.weight" for n in names}  # only the adapted weights, never biases or others

    cli("sample", base, "--lora", adapters, "--prompt", "a red square at the top left", "--seed", "3",
        "--steps", "4", "--save-latents", "--out", tmp_path / "s.png")
    model, mcfg, _ = load_model_for_sampling(merged_dir)
    lat = generate(model, mcfg, [SampleSpec("a red square at the top left", seed=3)],
                   TextEncoder(mcfg.encoders, mcfg.model, torch.device("cpu")), 4, mcfg.diffusion.cfg_scale,
                   (8, 8))
    unmerged = load_file(str(tmp_path / "s.latents.safetensors"))["latents"]
    # fp32: W + s B A folded once vs. the adapter path added per call differ by summation order only
    torch.testing.assert_close(unmerged, lat[0], rtol=1e-5, atol=1e-5)
