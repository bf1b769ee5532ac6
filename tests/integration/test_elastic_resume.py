"""Resume at another (dp, cp) with the same global batch: dp 2 -> 4, dp 4 -> 1, (dp 2, cp 1) -> (dp 1, cp 2).

Every case trains steps 1-2 at one layout, is resumed at another for steps 3-4, and is compared with one
uninterrupted single-process ZeRO-0 run of the same global batch (8 samples) from the same data: a small
shard dataset of 32 samples (one epoch in 4 steps) read in ``data.order=global``, whose sample g is a
function of (seed, g) whatever the layout, and every draw keyed on g. Model, fp32 masters, Adam moments,
step, LR schedule (DeepSpeed's universal checkpoint) and the EMA and the data cursor (megassm's own path)
must carry over for the losses of steps 3-4 and the final weights to agree. (That the cursor consumes the
epoch exactly once across a dp change: tests/unit/test_data_global_order.py.)
"""

from __future__ import annotations

import math

import pytest

from megassm.checkpoint.load import load_weights
from tests.conftest import SMOKE, TINY_OVERRIDES, losses_by_step, read_metrics, run_train

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
TINY = [o for o in TINY_OVERRIDES if not o.startswith("train.micro_batch_size")]
COMMON = [*TINY, "train.ckpt_every=2", "train.ema_decay=0.8", "optim.warmup_steps=2", "parallel.zero_stage=3",
          "data.kind=shards", "data.order=global", "data.resampled=false"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """32 samples of the tiny model's latent (3, 1, 8, 8) and text (16 wide, <= 8 tokens), 8 shards."""
    from megassm.data.testing import write_synthetic_dataset

    d = tmp_path_factory.mktemp("data") / "lat"
    write_synthetic_dataset(d, [(3, 1, 8, 8)], num_samples=32, samples_per_shard=4, text_dim=16, max_text=8,
                            dtype=__import__("torch").float32)
    return [f"data.paths=[{d}]"]

# (ranks, overrides) before -> after; global batch 8 throughout
CASES = {
    "dp2_to_dp4": ((2, ["train.micro_batch_size=2", "train.grad_accum=2"]), (4, ["train.micro_batch_size=2"])),
    "dp4_to_dp1": ((4, ["train.micro_batch_size=2"]), (1, ["train.micro_batch_size=2", "train.grad_accum=4"])),
    "dp2cp1_to_dp1cp2": ((2, ["train.micro_batch_size=4"]),
                         (2, ["train.micro_batch_size=4", "train.grad_accum=2", "parallel.cp=2"])),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards):
    run = tmp_path_factory.mktemp("ref")
    run_train(SMOKE, *COMMON, *shards, f"run_dir={run}", "parallel.zero_stage=0", "train.micro_batch_size=8",
              "train.steps=4")
    return run


def _final(run, step: int = 4):
    w = load_weights(run / "checkpoints" / f"step_{step:08d}")
    return w.model, w.ema


@pytest.mark.parametrize("case", list(CASES))
def test_resume_at_another_layout_continues_the_run(case, reference, shards, tmp_path):
    (n0, before), (n1, after) = CASES[case]
    run = tmp_path / case
    run_train(SMOKE, *COMMON, *shards, f"run_dir={run}", *before, "train.steps=2", nproc=n0)
    proc = run_train(SMOKE, *COMMON, *shards, f"run_dir={run}", *after, "train.steps=4", nproc=n1)
    assert "elastic resume from" in proc.stderr and "universal" in proc.stderr, proc.stderr[-2000:]
    events = [r for r in read_metrics(run) if r.get("event") == "resume"]
    assert [e["step"] for e in events] == [2] and events[0].get("elastic"), events
    ref, got = losses_by_step(reference), losses_by_step(run)
    # fp32; the layouts sum in other orders (ZeRO reduce-scatter, accumulation, CP shards: ~1e-7 relative,
    # tests/integration/test_configs_miniature.py measures <= 2e-7): far below what a lost Adam moment,
    # EMA, LR step or data position would change (>= 1e-3 here)
    for s in (1, 2, 3, 4):
        assert math.isclose(got[s], ref[s], rel_tol=2e-5), (case, s, got[s], ref[s])
    (w_ref, e_ref), (w_got, e_got) = _final(reference), _final(run)
    (w_mid, e_mid) = _final(reference, 2)
    diff = max((w_got[k] - w_ref[k]).abs().max().item() for k in w_ref)
    ema_diff = max((e_got[k] - e_ref[k]).abs().max().item() for k in e_ref)
    # Against what steps 3-4 change (~3e-3 here): what a lost Adam moment, EMA, LR step or data position
    # would get wrong is of that size. The layouts' other summation orders reach Adam's m / sqrt(v), which
    # for an element whose gradient nearly cancels turns a rounding difference into up to lr x its relative
    # size: measured 1.7e-6 at most (y_embedder, |w| 0.09), so an absolute 1e-6 is within rounding of
    # failing; 1e-3 of the change (3e-6) is the bound, 1000x below a real defect.
    change = max((w_ref[k] - w_mid[k]).abs().max().item() for k in w_ref)
    ema_change = max((e_ref[k] - e_mid[k]).abs().max().item() for k in e_ref)
    assert diff < 1e-3 * change and ema_diff < 1e-3 * ema_change, (case, diff, change, ema_diff, ema_change)


def test_what_cannot_be_bridged_fails_before_anything_is_written(reference, shards, tmp_path):
    """Another global batch, another model: a clear error, the checkpoint directory untouched. Then, in
    process (``plan_resume`` is the gate and reads only JSON): another data.order, and the bucketed run's
    global batch, which comes from its bucket table, not dp (more cases: tests/unit/test_elastic_plan.py)."""
    import re
    import shutil

    from megassm.run_config import load_config
    from megassm.train.elastic import ElasticResumeError, layout_of, plan_resume

    run = tmp_path / "copy"
    shutil.copytree(reference, run)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    for extra, message in ((["train.micro_batch_size=4"], r"global batch of 8"),
                           (["train.micro_batch_size=8", "model.d_model=48"], r"another model \(model.d_model")):
        proc = run_train(SMOKE, *COMMON, *shards, f"run_dir={run}", "parallel.zero_stage=0", *extra,
                         "train.steps=6", check=False)
        assert proc.returncode == 2 and re.search(message, proc.stderr), proc.stderr[-2000:]
    at_dp2 = [*COMMON, *shards, "parallel.zero_stage=0", "train.micro_batch_size=4", f"run_dir={run}"]
    assert plan_resume(load_config(SMOKE, at_dp2, world=2), run / "checkpoints", 2).elastic  # the bridge
    with pytest.raises(ElasticResumeError, match=r"written with data.order=global; this run has data.order=rank"):
        plan_resume(load_config(SMOKE, [*at_dp2, "data.order=rank"], world=2), run / "checkpoints", 2)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    buckets = ["data.kind=procedural", "data.buckets=[{name: a, shape: [1, 8, 8], weight: 1, samples: 8}]"]
    dp1 = layout_of(load_config(SMOKE, [*TINY, *buckets, "train.grad_accum=2"], world=1), 1)
    dp4 = layout_of(load_config(SMOKE, [*TINY, *buckets], world=4), 4)
    assert dp1["global_batch"] == dp4["global_batch"] == "buckets a:8", (dp1, dp4)
