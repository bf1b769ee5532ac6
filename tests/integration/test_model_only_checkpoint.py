"""Model-only checkpoints (``train.save_optimizer_state=false``; CPU, gloo, ZeRO-3 with EMA as configs/smoke.yaml).

A run saves steps 2 and 3 model-only, then resumes from step 2 (``train.resume_from``) with the optimizer
state saved again. Step 3's loss depends only on the weights, the data position and the RNG at step 2
(it is computed before step 3's update), so the resumed run's step-3 loss equals the first run's bit for
bit when the fp32 master weights came back exactly (fp32 on CPU, same thread count). The Adam state after
the resume counts its updates from the resume (fresh), while DeepSpeed's step and the LR schedule go on.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megassm.checkpoint.model_only import optimizer_state_count, optimizer_states, saved_optimizer_state
from megassm.checkpoint.snapshot import tree_bytes
from megassm.checkpoint.torchzip import TorchFile
from megassm.checkpoint.verify import damaged_files
from megassm.train import checkpoint as ckpt
from tests.conftest import SMOKE, TINY_OVERRIDES, read_metrics, run_train

pytestmark = pytest.mark.slow
COMMON = [*TINY_OVERRIDES, "train.ckpt_every=2", "train.keep_last=10"]


def _adam_steps(tag_dir: Path) -> list[int]:
    """The per-parameter Adam ``step`` in every DeepSpeed file of the checkpoint, read without unpickling."""
    steps = []
    for f in sorted(tag_dir.glob("*.pt")):
        tf = TorchFile(f)
        for sd in optimizer_states(tf.obj):
            steps += [int(tf.load(st["step"])) if not isinstance(st["step"], (int, float)) else int(st["step"])
                      for st in sd["state"].values()]
    return steps


def _moments(tag_dir: Path) -> int:
    return sum(optimizer_state_count(TorchFile(f).obj) for f in sorted(tag_dir.glob("*.pt")))


def _losses_at(run: Path, step: int) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if r.get("step") == step and "loss" in r]


def _save_model_only_then_resume(run: Path, nproc: int, *overrides: str, first: tuple[str, ...] = ()):
    """Steps 1-3 saving model-only (steps 2, 3; ``first``: overrides of this run only), then a resume from
    step 2 to ``train.steps=4`` with the optimizer state saved. Returns (a copy of the model-only step-2
    directory, the resumed run's stderr)."""
    proc = run_train(SMOKE, *COMMON, *overrides, f"run_dir={run}", "train.steps=3",
                     "train.save_optimizer_state=false", *first, nproc=nproc)
    assert "(final, model-only: no optimizer state) at step 3" in proc.stderr, proc.stderr[-3000:]
    step2 = run / "checkpoints" / "step_00000002"
    assert not saved_optimizer_state(step2) and _moments(step2) == 0
    states = [json.loads(f.read_text()) for f in sorted((step2 / "trainer").glob("rank_*.json"))]
    assert len(states) == nproc and all(s["optimizer_state"] is False for s in states)
    assert damaged_files(step2) == []  # the resume's check accepts the model-only layout
    kept = run.parent / "kept" / "checkpoints" / step2.name  # the resume below replaces step 2's line of saves
    shutil.copytree(step2, kept)
    shutil.copy(run / "config.yaml", kept.parent.parent / "config.yaml")  # what convert / inspect read
    proc = run_train(SMOKE, *COMMON, *overrides, f"run_dir={run}", "train.steps=4",
                     "train.resume_from=step_00000002", nproc=nproc)
    assert "a model-only checkpoint (saved with train.save_optimizer_state=false)" in proc.stderr, proc.stderr[-3000:]
    assert "the optimizer starts afresh" in proc.stderr
    assert [(r["step"], r.get("optimizer")) for r in read_metrics(run) if r.get("event") == "resume"] == [(2, "fresh")]
    first, again = _losses_at(run, 3)  # before the resume, and after it
    assert first == again  # weights, data position and RNG restored exactly
    assert sorted({r["step"] for r in read_metrics(run) if "loss" in r}) == [1, 2, 3, 4]
    step4 = run / "checkpoints" / "step_00000004"
    assert saved_optimizer_state(step4) and _moments(step4) > 0
    assert set(_adam_steps(step4)) == {2}  # 2 updates since the resume: a fresh optimizer, not 4
    assert ckpt.read_latest(run / "checkpoints") == "step_00000004"
    return kept, proc.stderr


@pytest.mark.parametrize("zero", [3, 2])
def test_model_only_checkpoint_resumes_exact_weights_with_a_fresh_optimizer(tmp_path, zero):
    step2, _ = _save_model_only_then_resume(tmp_path / "run", 1, f"parallel.zero_stage={zero}")
    full = tmp_path / "run" / "checkpoints" / "step_00000004"
    # the optimizer file keeps the fp32 masters only: a third of the full one (masters + 2 moments)
    (o_small,), (o_full,) = step2.glob("*optim_states.pt"), full.glob("*optim_states.pt")
    assert o_small.stat().st_size < 0.4 * o_full.stat().st_size
    if zero == 3:  # with the EMA (model-sized) and ZeRO-3's small model states (ZeRO-2's hold the module too)
        assert tree_bytes(step2) < 0.6 * tree_bytes(full)

    from megassm.checkpoint.inspection import format_report, inspect_checkpoint

    summary, problems = inspect_checkpoint(step2)
    assert problems == [] and summary["optimizer_state"] is False and summary["ema"]
    assert "optimizer   none: a model-only checkpoint" in format_report(summary, problems)

    # a damaged model-only checkpoint is still refused, naming the file
    ckpts = tmp_path / "copy" / "checkpoints"
    tag_dir = ckpts / step2.name
    shutil.copytree(step2, tag_dir)
    o = next(tag_dir.glob("*optim_states.pt"))
    o.write_bytes(o.read_bytes()[: o.stat().st_size // 2])
    with pytest.raises(ckpt.ResumeError, match=rf"step_00000002: the checkpoint is damaged: {o}: unreadable"):
        ckpt.resume_tag(ckpts, "step_00000002")
    o.unlink()  # a model-only checkpoint still needs its optimizer files: they hold the fp32 masters
    by = "ZeRO-3" if zero == 3 else "ZeRO-1/2"
    assert damaged_files(tag_dir) == [f"{tag_dir}: no [bf16_]zero_pp_rank_*_mp_rank_00_optim_states.pt although a "
                                      f"{by} optimizer wrote its model states: they hold the fp32 master weights "
                                      "(in a model-only checkpoint too)"]


@pytest.mark.distributed
def test_zero3_two_ranks_model_only_resume_and_convert(tmp_path):
    # the periodic step-2 save non-blocking: the snapshot path (SnapshotCheckpointEngine, deferred sink)
    step2, _ = _save_model_only_then_resume(tmp_path / "run", 2, first=("train.async_save=true",))
    assert any(r.get("event") == "checkpoint" and r.get("mode") == "async" and r.get("tag") == "step_00000002"
               for r in read_metrics(tmp_path / "run"))
    assert len(list(step2.glob("*optim_states.pt"))) == 2 and len(list((step2 / "ema").glob("shard_*"))) == 2
    # megassm convert reads the model-only checkpoint: the fp32 masters of both partitions, equal to
    # DeepSpeed's own consolidation of the same files, plus the EMA
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from megassm.cli import main

    assert main(["convert", "zero-to-consolidated", str(step2), str(tmp_path / "c")]) == 0
    model = load_file(str(tmp_path / "c" / "model.safetensors"))
    reference = get_fp32_state_dict_from_zero_checkpoint(str(step2.parent), tag=step2.name)
    assert set(model) == set(reference)
    for name, t in model.items():
        assert torch.equal(t, reference[name]), name
    assert (tmp_path / "c" / "ema.safetensors").is_file()
