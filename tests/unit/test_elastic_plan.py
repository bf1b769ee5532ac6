"""``plan_resume`` (megassm/train/elastic.py) on hand-written checkpoint records: what a dp change with
shard data needs (data.order=global on both sides), and that a bucketed
run's global batch is its bucket table's, not micro x grad_accum x dp. It reads the records (and checks the
files are whole); nothing runs."""

from __future__ import annotations

import json

import pytest
import torch

from megassm.config.load import to_dict
from megassm.data.testing import write_synthetic_dataset
from megassm.run_config import load_config
from megassm.train import checkpoint as ckpt
from megassm.train.elastic import ElasticResumeError, layout_of, plan_resume
from tests.conftest import SMOKE, TINY_OVERRIDES

TINY = [o for o in TINY_OVERRIDES if not o.startswith("train.micro_batch_size")]
BUCKETS = "data.buckets=[{name: a, shape: [1, 8, 8], weight: 1, samples: 8}]"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("d") / "lat"
    write_synthetic_dataset(d, [(3, 1, 8, 8)], num_samples=16, samples_per_shard=4, text_dim=16, max_text=8)
    return ["data.kind=shards", f"data.paths=[{d}]"]


def _checkpoint(root, cfg, world: int, step: int, data_state: dict):
    """A checkpoint directory whose rank-0 record says: this config, at ``world`` ranks, after ``step``."""
    tag = ckpt.tag_for(step)
    (root / tag / "trainer").mkdir(parents=True)
    (root / tag / ckpt.COMPLETE).write_text("")
    torch.save({}, root / tag / "mp_rank_00_model_states.pt")  # a whole file (resume checks them before it plans)
    (root / ckpt.LATEST).write_text(tag)
    state = {"step": step, "layout": layout_of(cfg, world), "model": to_dict(cfg.model), "data": data_state}
    (root / tag / "trainer" / "rank_00000.json").write_text(json.dumps(state))
    return root


def _cfg(*overrides, world: int):
    return load_config(SMOKE, [*TINY, *overrides], world=world)


def test_a_dp_change_with_shard_data_needs_the_global_cursor(data, tmp_path):
    old = _cfg(*data, "data.order=global", "train.micro_batch_size=4", world=2)  # global batch 8
    new = ("train.micro_batch_size=2",)  # dp 4
    cursor = {"version": 1, "order": "global", "index": 24, "counts": [24], "key": {}}
    d = _checkpoint(tmp_path / "ok", old, 2, 3, cursor)
    assert plan_resume(_cfg(*data, "data.order=global", *new, world=4), d, 4).elastic
    with pytest.raises(ElasticResumeError, match="written with data.order=global; this run has data.order=rank"):
        plan_resume(_cfg(*data, "data.order=rank", *new, world=4), d, 4)
    rank_old = _cfg(*data, "data.order=rank", "train.micro_batch_size=4", world=2)
    d = _checkpoint(tmp_path / "rank", rank_old, 2, 3, {"version": 1, "workers": {}})  # a data.order=rank record
    with pytest.raises(ElasticResumeError, match="written with data.order=rank; this run has data.order=global"):
        plan_resume(_cfg(*data, "data.order=global", *new, world=4), d, 4)
    with pytest.raises(ElasticResumeError, match="data.order=rank shard streams are per data-parallel rank"):
        plan_resume(_cfg(*data, "data.order=rank", *new, world=4), d, 4)
    assert not plan_resume(_cfg(*data, "data.order=rank", "train.micro_batch_size=4", world=2), d, 2).elastic


def test_a_bucketed_runs_global_batch_is_its_bucket_table(data, tmp_path):
    """dp 1 x grad_accum 2 and dp 4 x grad_accum 1 train the same bucket table: the same global batch (the
    old rule, micro x accum x dp, called them different). With shard data the dp change is still refused,
    saying why; with the procedural data it is bridged; another bucket table is another global batch."""
    at1 = _cfg("data.kind=procedural", BUCKETS, "train.grad_accum=2", world=1)
    at4 = _cfg("data.kind=procedural", BUCKETS, world=4)
    assert layout_of(at1, 1)["global_batch"] == layout_of(at4, 4)["global_batch"] == "buckets a:8"
    assert plan_resume(at4, _checkpoint(tmp_path / "proc", at1, 1, 2, {"position": 4}), 4).elastic
    d = _checkpoint(tmp_path / "shards", _cfg(*data, BUCKETS, "train.grad_accum=2", world=1), 1, 2,
                    {"version": 1, "workers": {}})  # a data.order=rank record
    with pytest.raises(ElasticResumeError, match="bucketed shard run .*data.order=rank shard streams"):
        plan_resume(_cfg(*data, BUCKETS, world=4), d, 4)
    other = _cfg("data.kind=procedural", "data.buckets=[{name: a, shape: [1, 8, 8], weight: 1, samples: 4}]",
                 world=4)
    with pytest.raises(ElasticResumeError, match="global batch of buckets a:8"):
        plan_resume(other, _checkpoint(tmp_path / "p2", at1, 1, 2, {"position": 4}), 4)


def test_a_bucketed_global_order_run_may_change_dp(data, tmp_path):
    """data.order=global with data.buckets: the cursor is layout-independent, so dp 1 x grad_accum 2 -> dp 4
    (the same bucket table) is bridged; the new layout's grad_accum x dp slots must still fit each bucket's
    samples (8 < 4 x 4 is refused, saying so); tp stays fixed; a rank-order bucketed run is still refused."""
    glob = ("data.order=global", BUCKETS)
    old = _cfg(*data, *glob, "train.grad_accum=2", world=1)
    cursor = {"version": 1, "order": "global", "index": 16, "counts": [16], "global_batch": 8, "key": {}}
    d = _checkpoint(tmp_path / "g", old, 1, 2, cursor)
    plan = plan_resume(_cfg(*data, *glob, world=4), d, 4)
    assert plan.elastic and plan.old["global_batch"] == plan.new["global_batch"] == "buckets a:8"
    with pytest.raises(ElasticResumeError, match="at dp 4: .*cannot fill train.grad_accum x dp = 4 x 4"):
        plan_resume(_cfg(*data, *glob, "train.grad_accum=4", world=4), d, 4)
    with pytest.raises(ElasticResumeError, match="parallel.tp=1; this run has parallel.tp=2"):
        plan_resume(_cfg(*data, *glob, "parallel.tp=2", world=4), d, 4)
    with pytest.raises(ElasticResumeError, match="written with data.order=global; this run has data.order=rank"):
        plan_resume(_cfg(*data, BUCKETS, world=4), d, 4)


def test_a_tp_run_resumes_only_at_its_own_layout(tmp_path):
    """tp 2: dp 1 -> dp 2 (world 2 -> 4) is refused before anything is read or written (DeepSpeed's universal
    checkpoint would cut the TP-sliced tensors at the wrong offsets, and the EMA would be cropped); the
    same layout resumes as before."""
    old = _cfg("data.kind=procedural", "parallel.tp=2", "train.micro_batch_size=4", world=2)
    d = _checkpoint(tmp_path / "tp", old, 2, 3, {"position": 3})
    with pytest.raises(ElasticResumeError, match=r"parallel.tp=2; a resume at another layout \(dp 1 -> 2, world 2 -> "
                                                 r"4\) is supported only at tp=1.*init_from="):
        plan_resume(_cfg("data.kind=procedural", "parallel.tp=2", "train.micro_batch_size=2", world=4), d, 4)
    assert not plan_resume(old, d, 2).elastic


def test_a_model_only_checkpoint_resumes_at_its_own_layout_only(tmp_path):
    """train.save_optimizer_state=false: no Adam moments for DeepSpeed's universal conversion, so a dp change
    is refused with the two ways out; at the saved layout the usual resume (a fresh optimizer) is planned."""
    old = _cfg("train.micro_batch_size=4", world=2)
    d = _checkpoint(tmp_path / "c", old, 2, 3, {"position": 3})
    f = d / "step_00000003" / "trainer" / "rank_00000.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "optimizer_state": False}))
    assert not plan_resume(old, d, 2).elastic
    want = (r"is model-only \(saved with train.save_optimizer_state=false\): a resume at another layout \(world 2 "
            r"-> 4, dp 2 -> 4, micro_batch_size 4 -> 2\) needs its optimizer state.*init_from=")
    with pytest.raises(ElasticResumeError, match=want):
        plan_resume(_cfg("train.micro_batch_size=2", world=4), d, 4)
