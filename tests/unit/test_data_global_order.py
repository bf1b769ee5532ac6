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

from megassm.config.schema import DataConfig
from megassm.data.global_order import StreamOrder, dataset_choices, scan_offsets, scan_shapes
from megassm.data.reader import build_shard_loader
from megassm.data.testing import write_synthetic_dataset

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
    from megassm.config.load import load_config
    from megassm.config.validate import ConfigError

    rank = build_shard_loader(_cfg(ds, order="rank"), batch_size=2, dp_rank=0, dp_size=1, seed=7, text_len=6)
    glob = _loaders(_cfg(ds), 1, 2)[0]
    with pytest.raises(ValueError, match="data.order=rank"):
        glob.load_state_dict(rank.state_dict())
    with pytest.raises(ValueError, match="data.order=global"):
        rank.load_state_dict(glob.state_dict())
    with pytest.raises(ConfigError, match="data.order=global with data.buckets"):
        load_config("configs/stage3_video_joint.yaml", ["data.order=global"])
