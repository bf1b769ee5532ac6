"""configs/stage3_video_joint.yaml in miniature: two image sizes and two clip lengths, one bucket per step,
trained at the config's own layout (cp 4 on 4 gloo ranks) from real shards (written by the shard writer,
as stage configs read), in the config's `data.order: global` (the step's bucket and sample indices the
schedule's, each sample the global order's).

The config's own settings stay: grad_accum 4, ZeRO-3, EMA, token-mean loss, the token budget; the model,
the shapes, the budget, the preview clips (3 frames) and the preview sampler's steps shrink; previews every
SAMPLE_EVERY steps as the config's cadence scaled. Four launches shared by all assertions:
- ``ref``: one process, ZeRO-0, cp 1, one micro-batch holding each step's whole global batch;
- ``killed``: cp 4 on 4 ranks, SIGKILLed right after step KILL_AT (not a checkpoint step), then resumed;
- ``elastic``: a copy of the killed run resumed at dp 2 x cp 2 (grad_accum 2) on the same 4 ranks.
The budget gives two buckets a global batch that 4 micro-batches do not split evenly (10 -> 3,3,2,2 and
6 -> 2,2,1,1): without the loss normalisation (diffusion/flow.py::step_loss_scale) DeepSpeed's mean of
micro-batch means would differ from ``ref``'s mean over the step.
"""

from __future__ import annotations

import math

import pytest

from megassm.data.testing import write_synthetic_dataset
from megassm.data.token_budget import BucketTable
from megassm.run_config import load_config
from tests.conftest import TINY_OVERRIDES, read_metrics, run_train

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

CONFIG = "configs/stage3_video_joint.yaml"
STEPS, CKPT_EVERY, SAMPLE_EVERY, KILL_AT = 5, 2, 2, 3
BUCKETS = ("[{name: img8, shape: [1, 8, 8], weight: 0.3}, {name: img16, shape: [1, 16, 16], weight: 0.2}, "
           "{name: vid3, shape: [3, 8, 8], weight: 0.25}, {name: vid5, shape: [5, 8, 8], weight: 0.25}]")
# tokens per sample (patch 1x2x2): 16, 64, 48, 80 -> global samples per step 32, 8, 10, 6
SHAPES = [(3, 1, 8, 8), (3, 1, 16, 16), (3, 3, 8, 8), (3, 5, 8, 8)]


def _overrides(data_dir) -> list[str]:
    tiny = [o for o in TINY_OVERRIDES if not o.startswith(("train.micro_batch_size", "data."))]
    # the config's own layout, cp 4 (4 ranks); 4 attention heads so that cp 4 divides them
    return [*tiny, "model.pattern=htvA", "model.num_heads=4", f"data.paths=[{data_dir}]", "data.weights=[1.0]",
            "data.num_workers=1", "data.shuffle_buffer=20", f"data.buckets={BUCKETS}", "data.tokens_per_step=512",
            f"train.steps={STEPS}", f"train.ckpt_every={CKPT_EVERY}", f"train.sample_every={SAMPLE_EVERY}",
            "train.preview_latent_shape=[3, 8, 8]",  # the config's 33x44x80 preview clips, in miniature
            # 2 sampler steps, as test_configs_miniature.py: the previews' cadence, clip shape and path to
            # TensorBoard are what is tested, not the sampler (30 steps cost ~3.5 s per preview at cp 4)
            "diffusion.sample_steps=2",
            "train.ema_decay=0.8", "optim.warmup_steps=3", "optim.lr=1e-3", "train.keep_last=10"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    data = root / "shards"
    write_synthetic_dataset(data, SHAPES, num_samples=240, samples_per_shard=30, text_dim=16, max_text=8)
    common = _overrides(data)
    cfg = load_config(CONFIG, common)
    assert cfg.parallel.cp == 4 and cfg.train.grad_accum == 4 and cfg.parallel.zero_stage == 3
    assert cfg.train.loss_reduction == "token"
    run_train(CONFIG, *common, f"run_dir={root / 'ref'}", "parallel.zero_stage=0", "parallel.cp=1",
              "train.grad_accum=1", "data.num_workers=0")
    killed = run_train(CONFIG, *common, f"run_dir={root / 'run'}", nproc=4, check=False,
                       env={"MEGASSM_FAULT_SIGKILL_AT_STEP": str(KILL_AT)})
    assert killed.returncode != 0, "the run was to be killed at step KILL_AT"
    import shutil

    shutil.copytree(root / "run", root / "elastic")  # the same checkpoints, resumed at another dp below
    run_train(CONFIG, *common, f"run_dir={root / 'run'}", nproc=4)
    # elastic: (dp 1, cp 4, grad_accum 4) -> (dp 2, cp 2, grad_accum 2) on the same 4 ranks; the bucket
    # table, so every step's global batch, is unchanged
    elastic = run_train(CONFIG, *common, f"run_dir={root / 'elastic'}", "parallel.cp=2", "train.grad_accum=2",
                        nproc=4)
    return {"cfg": cfg, "ref": root / "ref", "run": root / "run", "elastic": root / "elastic",
            "elastic_log": elastic.stderr}


def _rows(run_dir):
    return [r for r in read_metrics(run_dir) if "loss" in r]


def test_each_step_trains_the_drawn_bucket_and_matches_one_process(runs):
    """Every step trained the bucket BucketTable.draw(seed, step) names (its tokens per sample, logged as
    seq_len; the trainer's per-step check fails the run if ranks' micro-batches do not cover the step's
    global batch), and its token-mean loss equals the one-process mean over the same global batch. fp32 on
    CPU; the layouts differ in summation order only (CP's sequence shards, ZeRO-3's reduce-scatter, four
    accumulated micro-batches against one): ~1e-7 relative per step, carried through Adam (2e-5 allowed,
    as tests/integration/test_configs_miniature.py)."""
    table = BucketTable.from_config(runs["cfg"].data, runs["cfg"].model.patch_size)
    ref = {r["step"]: r for r in _rows(runs["ref"])}
    got = {r["step"]: r for r in _rows(runs["run"])}  # the resumed run's rows win
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    drawn = [table.buckets[table.draw(runs["cfg"].train.seed, s - 1)] for s in range(1, STEPS + 1)]
    assert [ref[s]["seq_len"] for s in ref] == [got[s]["seq_len"] for s in got] == [b.tokens for b in drawn]
    assert len({b.name for b in drawn}) >= 3, [b.name for b in drawn]  # the seed mixes shapes in these steps
    assert any(b.samples % 4 for b in drawn), "an uneven split must be among the steps"
    for s in ref:
        assert math.isclose(got[s]["loss"], ref[s]["loss"], rel_tol=2e-5), (s, got[s]["loss"], ref[s]["loss"])


def test_resume_after_sigkill_is_bit_identical(runs):
    """The first launch logged steps 1..KILL_AT and died; the resumed one re-ran the steps after the last
    checkpoint: same bucket, same samples, same loss bit for bit (the data position is the bucketed global
    cursor: the per-stream counts at the checkpoint's step)."""
    rows = _rows(runs["run"])
    first = {}
    for r in rows:
        if r["step"] in first:
            break
        first[r["step"]] = r
    assert max(first) == KILL_AT
    resumes = [r["step"] for r in read_metrics(runs["run"]) if r.get("event") == "resume"]
    assert resumes == [KILL_AT - KILL_AT % CKPT_EVERY], resumes
    again = {r["step"]: r for r in rows}
    redone = [s for s in first if s > resumes[0]]
    assert redone
    for s in redone:
        assert (again[s]["loss"], again[s]["seq_len"]) == (first[s]["loss"], first[s]["seq_len"]), s


def test_resume_at_another_dp_continues_the_run(runs):
    """The killed run's checkpoint (step 2, dp 1 x cp 4) resumed at dp 2 x cp 2: DeepSpeed's universal
    checkpoint re-partitions model / masters / Adam, the EMA is re-sliced, and the bucketed global cursor
    (the same on every rank and layout) continues the data; every later step trains the bucket drawn for it
    on the samples of the one-process run, so the losses agree within the layouts' rounding (2e-5 relative,
    as above); a lost or per-rank cursor would train other samples (losses differ by >= 1e-2 here)."""
    assert "elastic resume from" in runs["elastic_log"], runs["elastic_log"][-2000:]
    events = [r for r in read_metrics(runs["elastic"]) if r.get("event") == "resume"]
    assert events[-1]["step"] == KILL_AT - KILL_AT % CKPT_EVERY and events[-1].get("elastic"), events
    ref = {r["step"]: r for r in _rows(runs["ref"])}
    got = {r["step"]: r for r in _rows(runs["elastic"])}
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(events[-1]["step"] + 1, STEPS + 1):
        assert got[s]["seq_len"] == ref[s]["seq_len"], s
        assert math.isclose(got[s]["loss"], ref[s]["loss"], rel_tol=2e-5), (s, got[s]["loss"], ref[s]["loss"])


def test_previews_of_the_configs_clip_shape_reach_tensorboard(runs):
    """The config previews video clips (train.preview_latent_shape, shrunk to 3 frames): generated with the
    EMA weights at cp 4 every SAMPLE_EVERY steps, also after the resume, and logged as images."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["run"] / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert "samples" in acc.Tags()["images"], acc.Tags()
    steps = sorted({e.step for e in acc.Images("samples")})
    assert steps == [s for s in range(1, STEPS + 1) if s % SAMPLE_EVERY == 0], steps
