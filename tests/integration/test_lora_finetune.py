"""LoRA fine-tuning end to end on the demo model: train adapters from a consolidated checkpoint, the base
frozen, adapters (and their EMA) exported consolidated beside the DeepSpeed checkpoint, ``merge-lora`` folds
them in, and ``megassm sample --lora`` (unmerged) gives the merged checkpoint's latents.

Two layouts: one rank under ZeRO-2 (single-process sampling), and ``stage2_2k`` in miniature -- its own
layout, ZeRO-3 + CP 2 + grad_accum 2 on 2 gloo ranks, Hydra adapters inside the ZeRO-3 leaf -- checked
against a one-process ZeRO-0 run of the same global batch, and sampled with CP 2."""

import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from megassm.config import to_dict
from megassm.encoders import TextEncoder
from megassm.lora.adapters import read_adapters
from megassm.models import build_model
from megassm.run_config import load_config
from megassm.sample import SampleSpec, generate, load_model_for_sampling, merge_lora_checkpoint
from tests.conftest import REPO, TINY_OVERRIDES, child_env, losses_by_step, run_train, torchrun

pytestmark = pytest.mark.slow

ALL_KINDS = "[hydra, attention, cross_attention, ffn]"
PROMPT = "a red square at the top left"


def _base(cfg, directory):
    """A "trained" consolidated base of ``cfg.model``: random weights with the zero-initialised gates opened."""
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    return model.state_dict()


def _check_merge_and_sample(base, base_sd, adapters, tmp_path, nproc: int):
    """merge-lora changes exactly the adapted weights; ``sample --lora`` on ``nproc`` ranks (CP over them)
    gives the merged checkpoint's latents."""
    _, names, _ = read_adapters(adapters)
    merged_dir = tmp_path / "merged"
    merge_lora_checkpoint(base, adapters, merged_dir)
    merged = load_file(str(merged_dir / "model.safetensors"))
    changed = {k for k in base_sd if not torch.equal(merged[k], base_sd[k])}
    assert changed == {f"{n}.weight" for n in names}  # only the adapted weights, never biases or others

    args = ["sample", str(base), "--lora", str(adapters), "--prompt", PROMPT, "--seed", "3", "--steps", "4",
            "--save-latents", "--out", str(tmp_path / "s.png")]
    launch = torchrun(nproc) if nproc > 1 else [sys.executable]
    proc = subprocess.run([*launch, "-m", "megassm", *args], cwd=REPO,
                          env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    model, mcfg, _ = load_model_for_sampling(merged_dir)
    lat = generate(model, mcfg, [SampleSpec(PROMPT, seed=3)],
                   TextEncoder(mcfg.encoders, mcfg.model, torch.device("cpu")), 4, mcfg.diffusion.cfg_scale, (8, 8))
    unmerged = load_file(str(tmp_path / "s.latents.safetensors"))["latents"]
    # fp32: W + s B A folded once vs. the adapter path added per call differ by summation order only (and CP
    # by the order inside the scan and attention)
    torch.testing.assert_close(unmerged, lat[0], rtol=1e-5, atol=1e-5)


def test_lora_one_rank_zero2_train_merge_and_sample(tmp_path):
    cfg = load_config("configs/smoke.yaml", TINY_OVERRIDES)
    base_sd = _base(cfg, tmp_path / "base")
    run = tmp_path / "run"
    proc = run_train("configs/smoke.yaml", *TINY_OVERRIDES, f"init_from={tmp_path / 'base'}", f"run_dir={run}",
                     f"finetune.lora={{rank: 4, alpha: 8, targets: {ALL_KINDS}}}", "parallel.zero_stage=2",
                     "train.steps=3", "train.ckpt_every=3", "train.ema_decay=0.5", "optim.lr=1e-2")
    assert "LoRA rank 4" in proc.stderr + proc.stdout
    (adapters,) = (run / "checkpoints").glob("step_*/lora")
    lcfg, names, state = read_adapters(adapters)
    assert lcfg.rank == 4 and len(names) == 28  # hvAh: 3 Hydra x 2, 1 attention x 2, 4 x (3 cross, 2 FFN)
    assert max(v.abs().max().item() for k, v in state.items() if k.endswith(".lora_B")) > 0  # B moved off zero
    _, _, ema = read_adapters(adapters.parent / "lora_ema")
    assert set(ema) == set(state) and any(not torch.equal(ema[k], state[k]) for k in state)  # decay 0.5: behind
    _check_merge_and_sample(tmp_path / "base", base_sd, adapters, tmp_path, nproc=1)
    _check_lora_run_is_usable_as_it_is(run, tmp_path)


def _check_lora_run_is_usable_as_it_is(run, tmp_path):
    """The run directory itself goes to sample / convert / inspect: its base (init_from) with its adapters
    (the EMA's by default) applied; the ZeRO-2 step holds the adapters alone, which inspect calls healthy."""
    from megassm.checkpoint.errors import CheckpointError
    from megassm.cli import main
    from megassm.diffusers.convert import to_diffusers

    step = next((run / "checkpoints").glob("step_*"))
    assert main(["inspect", "checkpoint", str(run)]) == 0
    merge_lora_checkpoint(tmp_path / "base", step / "lora_ema", tmp_path / "merged_ema")
    want = load_file(str(tmp_path / "merged_ema" / "model.safetensors"))
    model, _, info = load_model_for_sampling(run, merge=True)
    assert info["lora"] == str(step / "lora_ema")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0)
    to_diffusers(str(run), tmp_path / "diffusers")
    assert (tmp_path / "diffusers" / "transformer").is_dir()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "init_from": str(tmp_path / "gone")}))
    with pytest.raises(CheckpointError, match=r"is a LoRA run.*not on this machine.*megassm sample BASE --lora"):
        load_model_for_sampling(run)


# stage2_2k's own layout (cp 2, ZeRO-3, micro-batch 1, grad_accum 2), tiny widths; lr high enough that the
# adapters move visibly in 3 steps
STAGE2 = [o for o in TINY_OVERRIDES if not o.startswith("train.micro_batch_size")] + [
    "model.pattern=hvAh", "train.steps=3", "train.ckpt_every=3", "train.sample_every=0", "train.ema_decay=0.5",
    "optim.lr=1e-3", "optim.warmup_steps=0", f"finetune.lora={{rank: 4, alpha: 8, targets: {ALL_KINDS}}}"]


def test_lora_stage2_layout_zero3_cp2_matches_one_process(tmp_path):
    cfg = load_config("configs/stage2_2k.yaml", STAGE2)
    p, t = cfg.parallel, cfg.train
    assert (p.zero_stage, p.cp, p.tp, t.micro_batch_size, t.grad_accum) == (3, 2, 1, 1, 2)
    base_sd = _base(cfg, tmp_path / "base")
    common = ["configs/stage2_2k.yaml", *STAGE2, f"init_from={tmp_path / 'base'}"]
    run, ref = tmp_path / "run", tmp_path / "ref"
    run_train(*common, f"run_dir={run}", nproc=2)
    run_train(*common, f"run_dir={ref}", "parallel.zero_stage=0", "parallel.cp=1", "train.grad_accum=1",
              "train.micro_batch_size=2")
    # fp32; the layouts differ in summation order only (CP's sequence shards, ZeRO-3's reduce-scatter,
    # accumulation): ~1e-7 relative per step, as in test_configs_miniature
    got, want = losses_by_step(run), losses_by_step(ref)
    assert sorted(got) == sorted(want) == [1, 2, 3]
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=2e-5), (s, got[s], want[s])
    step = run / "checkpoints" / "step_00000003"
    for kind in ("lora", "lora_ema"):
        _, names, state = read_adapters(step / kind)
        _, _, ref_state = read_adapters(ref / "checkpoints" / "step_00000003" / kind)
        assert len(names) == 28 and set(state) == set(ref_state)
        # consolidated: whole tensors (ZeRO-3 gathered), the unsharded model's shapes
        assert all(state[k].shape == ref_state[k].shape for k in state)
        moved = max(ref_state[k].abs().max().item() for k in ref_state if k.endswith(".lora_B"))
        diff = max((state[k] - ref_state[k]).abs().max().item() for k in state)
        # Adam turns the ~1e-7 gradient differences into weight differences far below the 3 steps' movement
        assert moved > 1e-3 and diff <= 1e-2 * moved, (kind, diff, moved)
    _check_merge_and_sample(tmp_path / "base", base_sd, step / "lora", tmp_path, nproc=2)
