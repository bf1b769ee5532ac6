"""data.order=global: the layout-independent data cursor (megassm/data/global_order.py).

A run consumes global samples [step x G, (step + 1) x G) per step; these tests play the loader side of
that at dp 2, switch to dp 4 and dp 1 mid-epoch (the state of rank 0, restored on every new rank), and
compare with uninterrupted runs at the new layouts: the keys of one epoch, the batches themselves, and
the global index each sample arrived at.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from megassm.config.schema import BucketConfig, DataConfig
from megassm.data.global_order import StreamOrder, dataset_choices, scan_offsets, scan_shapes
from megassm.data.reader import build_shard_loader
from megassm.data.testing import write_synthetic_dataset
from megassm.data.token_budget import BucketSchedule, BucketTable

SHAPE = (4, 1, 8, 8)
N = 48  # one epoch = 6 steps of a global batch of 8


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("g") / "a"
    write_synthetic_dataset(d, [SHAPE], num_samples=N, samples_per_shard=5, seed=2)  # 10 shards, the last of 3
    return d


@pytest.fixture(scope="module")
def ds_b(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("g") / "b"
    write_synthetic_dataset(d, [SHAPE], num_samples=30, samples_per_shard=7, seed=5)
    return d


def _cfg(*paths, **kw) -> DataConfig:
    base = dict(kind="shards", paths=[str(p) for p in paths], resampled=False, order="global", window_shards=3,
                shuffle_buffer=8, num_workers=0)
    return DataConfig(**{**base, **kw})


def _loaders(cfg, dp: int, mb: int, state: dict | None = None, accum: int = 1):
    out = []
    for r in range(dp):
        ld = build_shard_loader(cfg, batch_size=mb, dp_rank=r, dp_size=dp, seed=7, text_len=6, return_keys=True,
                                global_batch=mb * dp * accum)
        if state is not None:
            ld.load_state_dict(json.loads(json.dumps(state)))  # through JSON, as a checkpoint stores it
        out.append(ld)
    return out


def _run(loaders, steps: int, accum: int, its=None):
    """``steps`` optimizer steps: every rank takes ``accum`` batches per step. Returns
    (the batches in (step, micro, rank) order, the iterators to continue with)."""
    its = its or [iter(ld) for ld in loaders]
    batches = []
    for _ in range(steps):
        for _m in range(accum):
            batches += [next(it) for it in its]
    return batches, its


def _by_index(batches) -> dict[int, str]:
    out = {}
    for b in batches:
        assert len(b["sample_index"]) == len(b["keys"]) == b["latents"].shape[0]
        for g, k in zip(b["sample_index"], b["keys"]):
            assert g not in out, g
            out[g] = k
    return out


def _switch(cfg, before, after, steps_before: int, steps_after: int):
    """dp/mb/accum ``before`` for ``steps_before`` steps, rank 0's state, then ``after``; also the
    uninterrupted run at ``after``. Returns (before batches, after batches, uninterrupted after batches)."""
    (dp0, mb0, acc0), (dp1, mb1, acc1) = before, after
    assert dp0 * mb0 * acc0 == dp1 * mb1 * acc1  # the same global batch
    old = _loaders(cfg, dp0, mb0, accum=acc0)
    first, _ = _run(old, steps_before, acc0)
    states = [ld.state_dict() for ld in old]
    assert all(s == states[0] for s in states), "the global cursor differs between ranks"
    assert states[0]["index"] == steps_before * dp0 * mb0 * acc0
    resumed, _ = _run(_loaders(cfg, dp1, mb1, states[0], accum=acc1), steps_after, acc1)
    straight, _ = _run(_loaders(cfg, dp1, mb1, accum=acc1), steps_before + steps_after, acc1)
    return first, resumed, straight[len(straight) - len(resumed):]


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"] and x["sample_index"] == y["sample_index"]
        assert torch.equal(x["latents"], y["latents"]) and torch.equal(x["text"], y["text"])


@pytest.mark.parametrize("after", [(4, 2, 1), (1, 2, 4)], ids=["dp2_to_dp4", "dp2_to_dp1"])
def test_dp_change_mid_epoch_consumes_the_epoch_exactly_once(ds, after):
    """Non-resampled: 2 steps at dp 2, 4 at the new dp = one epoch: every key exactly once, and the batches
    after the switch are the uninterrupted new-layout run's, sample for sample."""
    first, resumed, straight = _switch(_cfg(ds), (2, 2, 2), after, 2, 4)
    keys = Counter(k for b in first + resumed for k in b["keys"])
    assert sorted(keys) == [f"a/s{i:07d}" for i in range(N)] and set(keys.values()) == {1}
    _same_batches(resumed, straight)
    # every global index got the same sample at both layouts (the Trainer's sample_indices formula)
    assert sorted(_by_index(first + resumed)) == list(range(N))


def test_resampled_mixed_stream_after_the_switch_is_the_new_layouts(ds, ds_b):
    """Resampled, two datasets mixed 1:2: dp 2 -> dp 4 continues as an uninterrupted dp-4 run from that
    global index; and the sample at each global index is the same at dp 1, 2 and 4."""
    cfg = _cfg(ds, ds_b, resampled=True, weights=[1.0, 2.0])
    first, resumed, straight = _switch(cfg, (2, 2, 2), (4, 2, 1), 3, 3)
    _same_batches(resumed, straight)
    at_dp1, _ = _run(_loaders(cfg, 1, 4, accum=2), 6, 2)
    assert _by_index(first + resumed) == _by_index(at_dp1)
    names = Counter(k.split("/")[0] for b in at_dp1 for k in b["keys"])
    assert names["a"] > 0 and names["b"] > names["a"], names  # both datasets drawn, b about twice as often


def test_loader_workers_do_not_change_the_batches(ds):
    cfg = _cfg(ds)
    a, _ = _run(_loaders(cfg, 2, 2, accum=2), 3, 2)
    b, _ = _run(_loaders(_cfg(ds, num_workers=2), 2, 2, accum=2), 3, 2)
    _same_batches(a, b)


def test_orders_cover_each_epoch_and_draw_datasets_by_weight():
    """Without resampling, every epoch is a permutation of (shard, sample); different epochs differ.
    Dataset draws follow the weights (counter-based: any range is drawn directly)."""
    counts = [5, 5, 3, 7]
    order = StreamOrder((0, 0), counts, seed=1, resampled=False, window=2)
    every = {(s, i) for s, c in enumerate(counts) for i in range(c)}
    e0 = [order.locate(k) for k in range(20)]
    e1 = [order.locate(k) for k in range(20, 40)]
    assert set(e0) == every == set(e1) and e0 != e1
    d = dataset_choices(3, 0, 30000, [1.0, 3.0])
    assert abs(d.mean() - 0.75) < 0.01
    assert (dataset_choices(3, 1000, 1100, [1.0, 3.0]) == d[1000:1100]).all()


def test_recorded_offsets_equal_a_header_scan(ds):
    """The writer's recorded offsets (manifest) and the scan used for datasets without them agree."""
    m = json.loads((ds / "manifest.json").read_text())
    for s in m["shards"]:
        assert s["offsets"] == scan_offsets(str(ds / s["path"])) and len(s["offsets"]) == s["samples"]


def test_an_unreadable_sample_is_replaced_the_same_way_at_every_layout(ds, tmp_path):
    """A truncated shard: its lost samples are replaced by the next readable ones of the order, counted,
    and the replacement does not depend on dp (with recorded offsets and with a header scan)."""
    bad = tmp_path / "a"
    shutil.copytree(ds, bad)
    shard = bad / "shard-000004.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    m = json.loads((bad / "manifest.json").read_text())
    for drop_offsets in (False, True):
        if drop_offsets:
            for s in m["shards"]:
                s.pop("offsets")
            (bad / "manifest.json").write_text(json.dumps(m))
        cfg = _cfg(bad)
        one = _loaders(cfg, 1, 8)
        at_dp1, _ = _run(one, 6, 1)
        at_dp2, _ = _run(_loaders(cfg, 2, 2, accum=2), 6, 2)
        assert _by_index(at_dp1) == _by_index(at_dp2)
        keys = [k for b in at_dp1 for k in b["keys"]]
        lost = {f"a/s{i:07d}" for i in range(20, 25)} - set(keys)
        assert lost and len(keys) - len(set(keys)) == len(lost)  # each lost sample replaced by a repeat
        assert one[0].stats()["skipped"]["corrupt_sample"] >= len(lost)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Two latent shapes interleaved in every shard (a mixed shard records each sample's shape)."""
    d = tmp_path_factory.mktemp("g") / "m"
    write_synthetic_dataset(d, [SHAPE, (4, 1, 8, 12), SHAPE], num_samples=60, samples_per_shard=6, seed=3)
    return d


def test_a_multi_shape_dataset_draws_one_shape_per_global_batch(mixed):
    """Every step (global batch) is one latent shape, on every rank; both shapes occur about 2:1 as stored;
    dp 2 -> 4 continues as the uninterrupted dp-4 run; the same sample sits at each index at dp 1."""
    cfg = _cfg(mixed)
    first, resumed, straight = _switch(cfg, (2, 2, 2), (4, 2, 1), 4, 8)
    _same_batches(resumed, straight)
    at_dp1, _ = _run(_loaders(cfg, 1, 4, accum=2), 12, 2)
    assert _by_index(first + resumed) == _by_index(at_dp1)
    steps = [at_dp1[i:i + 2] for i in range(0, len(at_dp1), 2)]
    shapes = [{tuple(b["latents"].shape[2:]) for b in step} for step in steps]
    assert all(len(s) == 1 for s in shapes), shapes
    wide = sum(s == {(1, 8, 12)} for s in shapes)
    assert 0 < wide < len(shapes), shapes
    m = json.loads((mixed / "manifest.json").read_text())
    for s in m["shards"]:  # recorded per-sample shapes == the scan of each sample's header
        keys = sorted(s["shapes"])
        scanned = scan_shapes(str(mixed / s["path"]))
        assert [o for o, _ in scanned] == s["offsets"]
        assert [keys[i] for i in s["sample_shapes"]] == ["4x" + "x".join(map(str, x)) for _, x in scanned]


def test_what_global_order_cannot_take_fails_clearly(ds):
    from megassm.config.validate import ConfigError
    from megassm.run_config import load_config

    rank = build_shard_loader(_cfg(ds, order="rank"), batch_size=2, dp_rank=0, dp_size=1, seed=7, text_len=6)
    glob = _loaders(_cfg(ds), 1, 2)[0]
    with pytest.raises(ValueError, match="data.order=rank"):
        glob.load_state_dict(rank.state_dict())
    with pytest.raises(ValueError, match="data.order=global"):
        rank.load_state_dict(glob.state_dict())
    with pytest.raises(ConfigError, match="data.order"):
        load_config("configs/stage3_video_joint.yaml", ["data.order=sorted"])
    assert load_config("configs/stage3_video_joint.yaml").data.order == "global"  # with data.buckets


# -- data.buckets in global order: the step's shape and samples are the bucket schedule's --------------------

WIDE = (1, 8, 12)
BUCKET_CFG = [BucketConfig("sq", [1, 8, 8], 1.0, 6), BucketConfig("wide", list(WIDE), 1.0, 4)]
SEED = 7


def _bucket_loaders(cfg, dp: int, accum: int, state: dict | None = None):
    table = BucketTable.from_config(cfg, [1, 2, 2])
    out = []
    for r in range(dp):
        ld = build_shard_loader(cfg, batch_size=1, dp_rank=r, dp_size=dp, seed=SEED, text_len=6, return_keys=True,
                                schedule=BucketSchedule(table, SEED, accum, r, dp))
        if state is not None:
            ld.load_state_dict(json.loads(json.dumps(state)))
        out.append(ld)
    return out, table


def _bucket_switch(cfg, before, after, k: int, steps_after: int):
    (dp0, acc0), (dp1, acc1) = before, after
    old, table = _bucket_loaders(cfg, dp0, acc0)
    first, _ = _run(old, k, acc0)
    states = [ld.state_dict() for ld in old]
    assert all(s == states[0] for s in states), "the bucketed global cursor differs between ranks"
    assert states[0]["index"] == k * table.stride
    resumed, _ = _run(_bucket_loaders(cfg, dp1, acc1, states[0])[0], steps_after, acc1)
    straight, _ = _run(_bucket_loaders(cfg, dp1, acc1)[0], k + steps_after, acc1)
    return table, first, resumed, straight[len(straight) - len(resumed):]


def _check_steps(table, batches, per_step: int, first_step: int):
    """Each step is one bucket, draw(seed, step), on every rank; its micro-batches tile [s x stride, + S_b)."""
    for i in range(0, len(batches), per_step):
        step = first_step + i // per_step
        b = table.buckets[table.draw(SEED, step)]
        got = batches[i:i + per_step]
        assert {tuple(x["latents"].shape[2:]) for x in got} == {b.shape}
        assert all(x["step_samples"] == b.samples and x["bucket"] == table.draw(SEED, step) for x in got)
        idx = sorted(g for x in got for g in x["sample_index"])
        assert idx == list(range(step * table.stride, step * table.stride + b.samples))


@pytest.mark.parametrize("after", [(1, 4), (4, 1)], ids=["dp2_to_dp1", "dp2_to_dp4"])
def test_bucketed_dp_change_continues_as_the_new_layout(ds, mixed, after):
    """data.buckets at dp 2 x grad_accum 2 for 4 steps, rank 0's cursor, then dp 1 x accum 4 / dp 4 x accum 1
    (4 slots: every bucket's samples >= 4, the schedule's rule; 6 = 2+2+1+1 is split unevenly): the batches
    after the switch are the uninterrupted new-layout run's (keys, latents, indices), each step one bucket
    drawn by (seed, step); the sample at each global index is the same at every layout; and no key of a
    non-resampled stream repeats within one of its epochs (the wide stream, 20 samples, wraps)."""
    cfg = _cfg(ds, mixed, buckets=BUCKET_CFG, tokens_per_step=None)
    k, n = 4, 12  # steps 0-15 draw the wide bucket 7 times: 28 samples of its 20-sample stream
    table, first, resumed, straight = _bucket_switch(cfg, (2, 2), after, k, n)
    _same_batches(resumed, straight)
    _check_steps(table, first, 4, 0)
    _check_steps(table, resumed, 4, k)
    at_dp2, _ = _run(_bucket_loaders(cfg, 2, 2)[0], k + n, 2)
    assert _by_index(first + resumed) == _by_index(at_dp2)
    by_stream: dict[tuple, list[str]] = {}
    for _g, key in sorted(_by_index(first + resumed).items()):  # in global-index (= stream-local) order
        shape = WIDE if key.startswith("m/") and int(key[-7:]) % 3 == 1 else (1, 8, 8)
        by_stream.setdefault((key.split("/")[0], shape), []).append(key)
    totals = {("a", (1, 8, 8)): N, ("m", (1, 8, 8)): 40, ("m", WIDE): 20}
    assert set(by_stream) == set(totals), by_stream.keys()
    assert len(by_stream["m", WIDE]) > 20  # the wide stream crossed an epoch during the run
    for st, keys in by_stream.items():
        for e in range(0, len(keys), totals[st]):
            chunk = keys[e:e + totals[st]]
            assert len(set(chunk)) == len(chunk), (st, e)
        if len(keys) >= totals[st]:
            assert len(set(keys[:totals[st]])) == totals[st]  # a whole epoch: every sample once


def test_bucketed_cursor_rules(ds, mixed):
    """The cursor is saved at step boundaries only; another bucket table continues at the same step with its
    counts redrawn; a bucketed cursor does not load into a run without buckets; loader workers change
    nothing."""
    cfg = _cfg(ds, mixed, buckets=BUCKET_CFG, tokens_per_step=None)
    lds, table = _bucket_loaders(cfg, 1, 2)
    its = [iter(ld) for ld in lds]
    next(its[0])
    with pytest.raises(ValueError, match="step boundary"):
        lds[0].state_dict()
    next(its[0])
    state = lds[0].state_dict()
    other = _cfg(ds, mixed, buckets=[BucketConfig("sq", [1, 8, 8], 1.0, 8), BUCKET_CFG[1]], tokens_per_step=None)
    lo, t2 = _bucket_loaders(other, 1, 2, state)
    assert lo[0].global_cursor().index == t2.stride  # step 1 of the new table
    assert next(iter(lo[0]))["sample_index"][0] == t2.stride
    with pytest.raises(ValueError, match="bucketed run"):
        _loaders(_cfg(ds, mixed), 1, 2, state)
    # loader workers (round-robin micro-batches) do not change the bucketed batches
    a, _ = _run(_bucket_loaders(cfg, 2, 2)[0], 3, 2)
    b, _ = _run(_bucket_loaders(_cfg(ds, mixed, buckets=BUCKET_CFG, tokens_per_step=None, num_workers=2), 2, 2)[0],
                3, 2)
    _same_batches(a, b)


def test_resampled_short_shard_is_not_repeated_in_bursts():
    """Resampled: a 5-sample shard among 1,000-sample ones. Each sample's expectation per block is
    block / N (~0.2 here); a drawn short shard once filled L = 900 slots with its 5 samples (180 repeats of
    each in one block). Now a repeat within a block needs the shard drawn again, and the long-run
    frequency of the short shard's samples is that of every other sample."""
    counts = [1000] * 9 + [5]
    order = StreamOrder((0, 0), counts, seed=3, resampled=True, window=2)
    block, blocks = order.window * order.slots, 100
    seen = Counter()
    for b in range(blocks):
        one = Counter(order.locate(k) for k in range(b * block, (b + 1) * block))
        assert max((n for (s, _), n in one.items() if s == 9), default=0) <= 4, (b, one.most_common(3))
        seen += one
    expected = blocks * block / sum(counts)  # ~20 per sample
    short = [seen[9, i] for i in range(5)]
    assert all(abs(n / expected - 1) < 0.5 for n in short), (short, expected)
    assert len(seen) > 0.85 * sum(counts)  # the long shards' samples are drawn too, not one shard's
