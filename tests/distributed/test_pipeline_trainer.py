"""`megassm train ... parallel.pp=2 parallel.zero_stage=1` on two gloo ranks: trains, checkpoints,
resumes bit for bit, and its checkpoints move to and from non-pipeline runs (consolidated format)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from megassm.checkpoint.zero import consolidate_pipeline_checkpoint
from megassm.run_config import load_config
from megassm.train import checkpoint as ckpt
from tests.conftest import SMOKE, TINY_OVERRIDES, losses_by_step, read_metrics, run_train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
PP = ["parallel.pp=2", "parallel.zero_stage=1", "parallel.micro_batches=4", "train.ema_decay=0.9",
      "train.ckpt_every=2", "train.keep_last=3", "diffusion.caption_dropout=0.3"]


def _stage_weights(run, step: int) -> dict:
    cfg = load_config(run / "config.yaml")
    return consolidate_pipeline_checkpoint(run / "checkpoints" / ckpt.tag_for(step), cfg.model, pp=2)


def test_pipeline_training_resumes_exactly_and_converts(tmp_path):
    ref = tmp_path / "ref"
    # the step-2 checkpoint is written in the background (train.async_save), the final one synchronously:
    # the resume below starts from the async one
    proc = run_train(SMOKE, *TINY_OVERRIDES, f"run_dir={ref}", *PP, "train.steps=4", "train.sample_every=2",
                     "train.async_save=true", nproc=2)
    assert "pipeline: 2 stages x 4 micro-batches" in proc.stderr
    # no previews under PP, and the log says so at every preview step
    assert [f"step {s}: no preview samples" in proc.stderr for s in (2, 4)] == [True, True]
    losses = losses_by_step(ref)
    assert sorted(losses) == [1, 2, 3, 4] and all(v == v for v in losses.values())  # finite (NaN != NaN)
    for r in (r for r in read_metrics(ref) if "loss" in r):  # throughput counts the whole replica's batch once
        assert r["samples_per_s"] * r["step_time_s"] == pytest.approx(4 * 4), r  # micro-batch 4 x 4 micro-batches
    assert {p.name for p in (ref / "checkpoints").glob("step_*")} == {"step_00000002", "step_00000004"}
    assert [r["mode"] for r in read_metrics(ref) if r.get("event") == "checkpoint"] == ["async"]
    for f in ("mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt", "ema/mp_rank_00.safetensors",
              "ema/mp_rank_01.safetensors"):
        assert (ref / "checkpoints" / "step_00000004" / f).is_file(), f

    # resume: the same run stopped after its step-2 checkpoint, continued to step 4
    run = tmp_path / "resumed"
    shutil.copytree(ref, run)
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    (run / "checkpoints" / "latest").write_text("step_00000002")
    (run / "DONE").unlink()
    metrics = run / "metrics.jsonl"  # keep steps 1-2 only: steps 3-4 must come from the resumed run
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                               if json.loads(line).get("step", 0) <= 2 and "event" not in json.loads(line)))
    run_train(SMOKE, *TINY_OVERRIDES, f"run_dir={run}", *PP, "train.steps=4", nproc=2)
    assert [r["step"] for r in read_metrics(run) if r.get("event") == "resume"] == [2]
    got = losses_by_step(run)
    # fp32 on CPU, one thread per rank: the resumed steps are bit-identical
    assert [got[s] for s in (3, 4)] == [losses[s] for s in (3, 4)]
    want_w, got_w = _stage_weights(ref, 4), _stage_weights(run, 4)
    assert all(torch.equal(got_w[k], want_w[k]) for k in want_w)

    # PP -> non-PP: the consolidated weights warm-start a single-process run, every tensor found
    consolidated = tmp_path / "consolidated"
    consolidated.mkdir()
    save_file(want_w, str(consolidated / "model.safetensors"))
    shutil.copy(ref / "config.yaml", consolidated / "config.yaml")
    flat = tmp_path / "flat"
    proc = run_train(SMOKE, *TINY_OVERRIDES, f"run_dir={flat}", f"init_from={consolidated}", "train.steps=1",
                     "parallel.zero_stage=1")
    n = len(want_w)
    assert f"loaded {n}/{n} tensors" in proc.stderr and "initialised fresh" not in proc.stderr

    # non-PP -> PP: a pipeline run warm-starts from the single-process run's DeepSpeed checkpoint
    proc = run_train(SMOKE, *TINY_OVERRIDES, f"run_dir={tmp_path / 'pp_again'}", f"init_from={flat}", *PP,
                     "train.steps=1", nproc=2)
    assert f"loaded {n}/{n} tensors" in proc.stderr and "initialised fresh" not in proc.stderr
