"""Joint image + video training by token budget (megassm/data/token_budget.py): the per-step bucket draw,
its layout over micro-batches and data-parallel ranks, the procedural and shard readers that serve it,
the loss normalisation, config-load errors and `megassm plan`'s bucket table."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megassm.config import ConfigError
from megassm.config.schema import BucketConfig, DataConfig
from megassm.data.procedural import ProceduralShapes
from megassm.data.reader import build_shard_loader
from megassm.data.testing import write_synthetic_dataset
from megassm.data.token_budget import BucketSchedule, BucketTable
from megassm.diffusion.flow import step_loss_scale
from megassm.run_config import load_config

PATCH = [1, 2, 2]
SHAPES = [(3, 1, 8, 8), (3, 1, 16, 16), (3, 3, 8, 8), (3, 5, 8, 8)]  # two image sizes, two clip lengths
WEIGHTS = [0.3, 0.2, 0.25, 0.25]


def _data(**kw) -> DataConfig:
    buckets = [BucketConfig(f"b{i}", list(s[1:]), w) for i, (s, w) in enumerate(zip(SHAPES, WEIGHTS))]
    return DataConfig(**{"buckets": buckets, "tokens_per_step": 512, **kw})


@pytest.fixture(scope="module")
def table() -> BucketTable:
    return BucketTable.from_config(_data(), PATCH)


def test_bucket_table_from_the_budget_or_the_explicit_samples(table):
    assert [(b.tokens, b.samples) for b in table.buckets] == [(16, 32), (64, 8), (48, 10), (80, 6)]
    d = _data()
    d.buckets[1].samples = 3
    assert BucketTable.from_config(d, PATCH).buckets[1].samples == 3
    assert BucketTable.from_config(d, PATCH).stride == 32


def test_realised_proportions_match_the_weights_within_a_binomial_bound(table):
    """N draws: each bucket's count is Binomial(N, p); 4 standard deviations bound it (a false failure would
    need a 4-sigma draw, probability ~6e-5 per bucket; the draws are seeded, so the test is deterministic)."""
    n = 4000
    counts = np.bincount([table.draw(7, s) for s in range(n)], minlength=len(WEIGHTS))
    p = table.probabilities
    assert np.allclose(p, np.asarray(WEIGHTS) / sum(WEIGHTS))
    for c, pi in zip(counts, p):
        assert abs(c / n - pi) <= 4 * math.sqrt(pi * (1 - pi) / n), (counts, p)
    assert [table.draw(7, s) for s in range(50)] != [table.draw(8, s) for s in range(50)]  # the seed matters


@pytest.mark.parametrize("grad_accum,dp", [(1, 1), (4, 1), (2, 3), (1, 2)])
def test_every_rank_draws_the_same_bucket_and_the_slots_tile_the_global_batch(table, grad_accum, dp):
    """The bucket of a step is a function of (seed, step) alone; the (micro-batch, rank) slots hold disjoint
    contiguous blocks that together are the step's global batch [step x stride, + samples)."""
    scheds = [BucketSchedule(table, 5, grad_accum, r, dp) for r in range(dp)]
    for step in range(40):
        got, shapes = [], set()
        for m in range(grad_accum):
            for s in scheds:
                mb = s.micro_batch(step * grad_accum + m)
                assert mb.bucket == table.draw(5, step) and mb.step == step
                shapes.add(mb.shape)
                got += mb.sample_index
        b = table.buckets[table.draw(5, step)]
        assert shapes == {b.shape} and got == list(range(step * table.stride, step * table.stride + b.samples))


def test_procedural_global_batch_is_the_same_under_any_micro_batching_and_dp(table):
    """The procedural data renders each sample from (seed, global index) at its bucket's shape, so the step's
    global batch -- slots concatenated in order -- equals one process's single micro-batch bit for bit."""
    def global_batch(grad_accum, dp, step):
        parts = []
        for m in range(grad_accum):
            for r in range(dp):
                sched = BucketSchedule(table, 2, grad_accum, r, dp)
                data = ProceduralShapes(8, 1, 16, 8, r, dp, seed=2, schedule=sched)
                b = data.batch(step * grad_accum + m)
                assert b["latents"].shape[2:] == table.buckets[table.draw(2, step)].shape
                assert len(b["sample_index"]) == b["latents"].shape[0]
                parts.append(b)
        return torch.cat([p["latents"] for p in parts]), sum((p["captions"] for p in parts), [])

    for step in range(3):
        ref = global_batch(1, 1, step)
        for ga, dp in [(4, 1), (2, 2)]:
            got = global_batch(ga, dp, step)
            assert torch.equal(got[0], ref[0]) and got[1] == ref[1]


def test_step_loss_scale_makes_the_micro_batch_mean_the_step_mean():
    """DeepSpeed averages micro-batch losses equally (1 / grad_accum, then the DP mean); scaled, an uneven
    split of a step still trains its mean over samples or tokens. With shapes mixed the two differ."""
    g = torch.Generator().manual_seed(0)
    sizes, tokens = [3, 3, 2, 2], [48, 48, 16, 16]  # per micro-batch: samples, tokens per sample
    per_sample = [torch.rand(n, generator=g, dtype=torch.float64) for n in sizes]
    S, T = sum(sizes), sum(n * t for n, t in zip(sizes, tokens))
    for red, want in [("sample", torch.cat(per_sample).mean()),
                      ("token", sum((x * t).sum() for x, t in zip(per_sample, tokens)) / T)]:
        scaled = [x.mean() * step_loss_scale(len(x), len(x) * t, S, T, len(sizes), red)
                  for x, t in zip(per_sample, tokens)]
        assert torch.allclose(sum(scaled) / len(sizes), want, rtol=1e-12, atol=0), red
    assert not torch.allclose(torch.cat(per_sample).mean(), want)
    with pytest.raises(ValueError, match="valid: sample, token"):
        step_loss_scale(1, 1, 1, 1, 1, "mean")


def test_same_bucket_check_catches_ranks_that_disagree(table):
    """The trainer's per-step all-reduce sums each rank's bucket number and its square; ranks on different
    buckets (here: one rank of four with another seed) have a non-zero variance and the run stops."""
    from megassm.train.loop import check_same_bucket

    def sums(seeds, step):
        b = [float(table.draw(seed, step) + 1) for seed in seeds]
        return sum(b), sum(x * x for x in b)

    for step in range(20):
        check_same_bucket(*sums([3] * 4, step), 4, step)
    check_same_bucket(0.0, 0.0, 4, 0)  # no buckets: every rank reports 0
    bad = [step for step in range(20) if table.draw(3, step) != table.draw(4, step)]
    assert bad
    for step in bad:
        with pytest.raises(RuntimeError, match="ranks trained different buckets"):
            check_same_bucket(*sums([3, 3, 4, 3], step), 4, step)


# -- config load ---------------------------------------------------------------------------------------

JOINT = "configs/stage3_video_joint.yaml"


def test_stage3_joint_config_loads_and_a_bucket_that_does_not_split_is_refused_by_name():
    cfg = load_config(JOINT)
    table = BucketTable.from_config(cfg.data, cfg.model.patch_size)
    assert {b.name for b in table.buckets} == {"img256", "img1k", "vid33", "vid65", "vid129"}
    assert all(b.tokens % (cfg.parallel.cp * cfg.parallel.tp) == 0 for b in table.buckets)
    bad = "data.buckets=[{name: odd, shape: [1, 30, 34], weight: 1}]"  # 15 x 17 = 255 tokens
    with pytest.raises(ConfigError, match=r"bucket 'odd' \(latent 1x30x34, 255 tokens.*cp x tp = 4.*"
                                          r"Valid cp x tp for this bucket: \[1, 3, 5, 15, 17, 51\]"):
        load_config(JOINT, [bad])
    with pytest.raises(ConfigError, match=r"data.buckets\[2\] \('vid33'\): 7,920 tokens per sample exceed "
                                          "data.tokens_per_step=5,000; raise the budget to at least 7,920"):
        load_config(JOINT, ["data.tokens_per_step=5000"])
    with pytest.raises(ConfigError, match=r"'vid129'.*8 samples per step cannot fill train.grad_accum x dp = 10 x 1"):
        load_config(JOINT, ["train.grad_accum=10"])
    with pytest.raises(ConfigError, match="train.loss_reduction='mean' is not valid"):
        load_config(JOINT, ["train.loss_reduction=mean"])
    with pytest.raises(ConfigError, match="data.tokens_per_step=512 without data.buckets"):
        load_config("configs/smoke.yaml", ["data.tokens_per_step=512"])
    with pytest.raises(ConfigError, match="procedural data renders square images"):
        load_config("configs/smoke.yaml", ["data.buckets=[{name: r, shape: [1, 8, 12]}]", "data.tokens_per_step=96"])


def test_shard_manifests_are_checked_at_load(tmp_path):
    """Against the shape histogram of a dataset written by the shard writer: a bucket whose shape no dataset
    holds is refused (the reader would wait for it forever), and without buckets every shape present must
    split over cp x tp."""
    d = tmp_path / "ds"
    write_synthetic_dataset(d, [(3, 1, 8, 8), (3, 3, 6, 6)], num_samples=8, samples_per_shard=4, text_dim=16)
    base = ["model.in_channels=3", "model.text_dim=16", "model.num_heads=2", "model.d_model=32", "model.headdim=16",
            f"data.paths=[{d}]", "data.weights=[1.0]", "parallel.cp=2", "init_from=null"]
    missing = "data.buckets=[{name: a, shape: [1, 8, 8]}, {name: b, shape: [5, 8, 8]}]"
    with pytest.raises(ConfigError, match=r"bucket 'b' \(latent 5x8x8.*appears in no dataset's shape histogram.*"
                                          r"present: 1x8x8, 3x6x6"):
        load_config(JOINT, [*base, missing])
    with pytest.raises(ConfigError, match=r"latent 3x6x6, 27 tokens.*do(es)? not split over parallel.cp x tp = 2"):
        load_config(JOINT, [*base, "data.buckets=[]", "data.tokens_per_step=null"])
    load_config(JOINT, [*base, "data.buckets=[{name: a, shape: [1, 8, 8]}]"])


# -- the shard reader ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("bucket_shards") / "mixed"
    write_synthetic_dataset(d, SHAPES, num_samples=160, samples_per_shard=20, text_dim=16, max_text=6)
    return d


def _shard_loader(path, table, grad_accum, dp_rank=0, dp=1, workers=0):
    cfg = DataConfig(kind="shards", paths=[str(path)], shuffle_buffer=16, num_workers=workers)
    return build_shard_loader(cfg, batch_size=1, dp_rank=dp_rank, dp_size=dp, seed=9, text_len=6, return_keys=True,
                              schedule=BucketSchedule(table, 9, grad_accum, dp_rank, dp))


def _take(loader, n):
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_reader_serves_the_schedule_and_resumes_exactly(shards, table, workers):
    """Real shards: batch k has micro-batch k's shape and size (the loader asserts the worker agrees), with
    one or two loader workers; a loader restored from ``state_dict()`` after 5 batches (pending samples
    per shape included) continues with the same samples as the uninterrupted one."""
    whole = _take(_shard_loader(shards, table, 2, workers=workers), 12)
    sched = BucketSchedule(table, 9, 2, 0, 1)
    for k, b in enumerate(whole):
        mb = sched.micro_batch(k)
        assert tuple(b["latents"].shape[2:]) == mb.shape and b["sample_index"] == mb.sample_index
    first = _shard_loader(shards, table, 2, workers=workers)
    _take(first, 5)
    again = _shard_loader(shards, table, 2, workers=workers)
    again.load_state_dict(first.state_dict())
    assert [b["keys"] for b in _take(again, 7)] == [b["keys"] for b in whole[5:]]


def test_shard_samples_of_a_step_do_not_depend_on_grad_accum(shards, table):
    """One logical worker: the step's micro-batches together take the same samples, in order, as one
    micro-batch holding the whole step (the read-ahead caps never drop the requested shape)."""
    one = _take(_shard_loader(shards, table, 1), 6)
    four = _take(_shard_loader(shards, table, 4), 24)
    for step in range(6):
        assert sum((b["keys"] for b in four[4 * step:4 * step + 4]), []) == one[step]["keys"], step
        assert torch.equal(torch.cat([b["latents"] for b in four[4 * step:4 * step + 4]]), one[step]["latents"])


def test_plan_sizes_the_largest_bucket_and_reports_the_step_time_spread(capsys):
    import json

    from megassm.cli import main

    assert main(["plan", JOINT, "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "buckets (one per step" in out and "step time over buckets" in out and "<- largest" in out
    assert main(["plan", JOINT, "--gpus", "8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in res["buckets"]["rows"]}
    big = max(rows.values(), key=lambda r: r["memory_gb"])
    assert res["buckets"]["largest"] == big["name"]
    assert math.isclose(res["configured"]["memory_gb"]["total"], big["memory_gb"], rel_tol=1e-9)
    assert res["configured"]["layout"]["micro_batch"] == big["micro_batch"]
    assert rows["vid129"]["micro_batch"] == 1 and rows["img256"]["micro_batch"] == 80  # 640 / (4 x dp 2)
    st = res["buckets"]["step_s"]
    assert st["min"] == min(r["step_s"] for r in rows.values()) < st["max"] == max(r["step_s"] for r in rows.values())
