"""Every shipped config, in miniature: the trainer does what the config says at the config's own settings.

Each config keeps its layout -- tp, cp, pp, ZeRO stage, micro-batch, grad_accum, EMA on, the
checkpoint / preview cadence scaled down -- and shrinks only the model width and depth, the data
(procedural squares at the config's token layout) and the step count. It runs on the fewest gloo ranks
that layout needs, never fewer than two for a stage config, so that ZeRO partitions for real.

Per config, three runs are shared by all assertions:
- ``ref``: one process, ZeRO-0, one micro-batch holding the whole global batch (micro x accum x dp);
- ``killed``: the config's layout, SIGKILLed on every rank right after step KILL_AT (not a checkpoint
  step), then started again, resuming from the last checkpoint and running to STEPS.
Assertions: (a) per-step losses and final weights and EMA equal ``ref``; (b) one optimizer step per
train step and the LR schedule step by step; (c) the step that ran both before the kill and after the
resume gives the same loss bit for bit, and the resumed run ends where ``ref`` does; (d) previews are
written at the scaled cadence and TensorBoard reads them back.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from megassm.checkpoint.load import load_weights
from megassm.run_config import load_config
from megassm.train.optim import lr_lambda
from tests.conftest import TINY_OVERRIDES, read_metrics, run_train

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS, CKPT_EVERY, SAMPLE_EVERY, KILL_AT = 7, 2, 3, 5
TINY = [o for o in TINY_OVERRIDES if not o.startswith("train.micro_batch_size")]  # keep each config's

# name -> (ranks, overrides that shrink depth / data but keep the layout)
MINIATURES = {
    "smoke": (1, ["model.pattern=hvAh"]),
    "stage0_256px": (2, ["model.pattern=hvAh"]),  # dp 2: ZeRO-3 partitions over two ranks
    "stage1_1k": (2, ["model.pattern=hvAh"]),  # cp 2
    "stage2_2k": (2, ["model.pattern=hvAh"]),  # cp 2, grad_accum 2
    # cp 4, grad_accum 4, video clips; 4 attention heads so that cp 4 divides them
    "stage3_video": (4, ["model.pattern=htvA", "model.num_heads=4", "data.frames=3"]),
}


def _common(name: str) -> list[str]:
    return [*TINY, *MINIATURES[name][1], f"train.steps={STEPS}", f"train.ckpt_every={CKPT_EVERY}",
            f"train.sample_every={SAMPLE_EVERY}", "train.ema_decay=0.8", "optim.warmup_steps=3",
            "diffusion.sample_steps=2", "train.keep_last=10"]


def _cfg(name: str):
    return load_config(f"configs/{name}.yaml", _common(name))


@pytest.fixture(scope="module", params=list(MINIATURES))
def runs(request, tmp_path_factory):
    name = request.param
    nproc = MINIATURES[name][0]
    cfg = _cfg(name)
    p, t = cfg.parallel, cfg.train
    assert p.tp * p.cp * p.pp <= nproc and nproc % (p.tp * p.cp * p.pp) == 0
    dp = nproc // (p.tp * p.cp * p.pp)
    root = tmp_path_factory.mktemp(name)
    config = f"configs/{name}.yaml"
    global_batch = t.micro_batch_size * t.grad_accum * dp
    run_train(config, *_common(name), f"run_dir={root / 'ref'}", "parallel.zero_stage=0", "parallel.tp=1",
              "parallel.cp=1", "parallel.pp=1", "train.grad_accum=1", f"train.micro_batch_size={global_batch}",
              "train.sample_every=0")
    killed = run_train(config, *_common(name), f"run_dir={root / 'killed'}", nproc=nproc, check=False,
                       env={"MEGASSM_FAULT_SIGKILL_AT_STEP": str(KILL_AT)})
    assert killed.returncode != 0, "the run was to be killed at step KILL_AT"
    run_train(config, *_common(name), f"run_dir={root / 'killed'}", nproc=nproc)
    return {"name": name, "cfg": cfg, "ref": root / "ref", "run": root / "killed", "dp": dp, "nproc": nproc}


def _rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


def _latest_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(run_dir)}


def _weights(run_dir: Path, step: int):
    w = load_weights(run_dir / "checkpoints" / f"step_{step:08d}")
    return w.model, w.ema


def test_losses_weights_and_ema_match_one_process(runs):
    """(a) fp32 on CPU. The layouts differ from the reference only in summation order: ZeRO-3's
    reduce-scatter and the data-parallel mean, CP's sequence shards of the loss and of the weight
    gradients, and accumulation summing micro-batch gradients where the reference sums one batch
    (each ~1e-7 relative). Adam carries that through the steps. Measured worst cases over the five
    configs: 1.6e-7 relative on losses, 1.2e-7 absolute on weights and EMA, against 1e-4..7e-3 of movement
    over the last five steps."""
    ref, got = _latest_losses(runs["ref"]), _latest_losses(runs["run"])
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(ref)
    for s in ref:
        assert math.isclose(got[s], ref[s], rel_tol=2e-5), (runs["name"], s, got[s], ref[s])
    (w_ref, e_ref), (w_got, e_got) = _weights(runs["ref"], STEPS), _weights(runs["run"], STEPS)
    assert set(w_ref) == set(w_got) and set(e_ref) == set(e_got)
    w_early = _weights(runs["ref"], CKPT_EVERY)[0]
    moved = max((w_ref[k] - w_early[k]).abs().max().item() for k in w_ref)  # the last steps' largest change
    diff = max((w_got[k] - w_ref[k]).abs().max().item() for k in w_ref)
    ema_diff = max((e_got[k] - e_ref[k]).abs().max().item() for k in e_ref)
    # the layouts agree to a small fraction of what the weights moved in the last steps (at the stage
    # configs' LRs, 2e-5..1e-4, that movement itself is only ~1e-4)
    assert diff <= 1e-2 * moved and ema_diff <= 1e-2 * moved, (runs["name"], diff, ema_diff, moved)


def test_one_optimizer_step_per_train_step_and_the_lr_schedule(runs):
    """(b) no step skipped here, so optimizer steps = train steps; the logged LR (the rate each step's
    update applied) is the schedule at the number of updates before it."""
    cfg = runs["cfg"]
    f = lr_lambda(cfg.optim, cfg.train.steps)
    rows = {r["step"]: r for r in _rows(runs["run"])}
    for s, r in sorted(rows.items()):
        assert r["optimizer_steps"] == s - r["skipped_steps"], (runs["name"], r)
        assert math.isclose(r["lr"], cfg.optim.lr * f(r["optimizer_steps"] - 1), rel_tol=1e-9), (runs["name"], r)


def test_resume_after_sigkill_reproduces_the_run(runs):
    """(c) the first launch logged steps 1..KILL_AT and died; the second resumed from the last checkpoint
    before it and re-ran the steps after it: each re-run step's loss equals the first run's, bit for bit
    (fp32, same ranks and threads), and the run then continues to the reference's end state (test (a))."""
    rows = _rows(runs["run"])
    first = {}
    for r in rows:  # the first launch's rows come first in the append-only log
        if r["step"] in first:
            break
        first[r["step"]] = r["loss"]
    assert max(first) == KILL_AT, sorted(first)
    resumes = [r["step"] for r in read_metrics(runs["run"]) if r.get("event") == "resume"]
    assert resumes == [KILL_AT - KILL_AT % CKPT_EVERY], resumes
    again = _latest_losses(runs["run"])
    redone = [s for s in first if s > resumes[0]]
    assert redone, "the kill must fall after a checkpoint step"
    for s in redone:
        assert again[s] == first[s], (runs["name"], s, first[s], again[s])


def test_previews_are_written_and_tensorboard_reads_them(runs):
    """(d) previews at the scaled cadence (every SAMPLE_EVERY steps) reach TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["run"] / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert "samples" in acc.Tags()["images"], (runs["name"], acc.Tags())
    steps = sorted({e.step for e in acc.Images("samples")})
    assert steps == [s for s in range(1, STEPS + 1) if s % SAMPLE_EVERY == 0], steps
