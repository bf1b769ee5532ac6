"""Streaming reader: DP/worker splitting, bucketing, normalisation, mixing, corrupt samples, exact resume."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from megassm.config.schema import DataConfig
from megassm.data.format import FormatError
from megassm.data.reader import build_shard_loader
from megassm.data.tario import iter_samples
from megassm.data.testing import write_synthetic_dataset

SHAPES = [(4, 1, 8, 8), (4, 1, 8, 12), (4, 1, 12, 8)]


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ds") / "a"
    write_synthetic_dataset(d, SHAPES, num_samples=60, samples_per_shard=6, latent_scale=0.5, latent_shift=0.25)
    return d


@pytest.fixture(scope="module")
def ds_b(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ds") / "b"
    write_synthetic_dataset(d, SHAPES[:1], num_samples=24, samples_per_shard=4, seed=1)
    return d


def _cfg(*paths, **kw) -> DataConfig:
    base = dict(kind="shards", paths=[str(p) for p in paths], resampled=False, shuffle_buffer=8, num_workers=0)
    return DataConfig(**{**base, **kw})


def _loader(cfg, bs=4, rank=0, size=1, **kw):
    return build_shard_loader(cfg, batch_size=bs, dp_rank=rank, dp_size=size, seed=3, text_len=6,
                              return_keys=True, **kw)


@pytest.mark.parametrize("workers", [0, 2])
def test_one_epoch_split_over_dp_ranks_and_workers_has_no_duplicates(ds, workers):
    keys = []
    for rank in range(2):
        for b in _loader(_cfg(ds, num_workers=workers), bs=1, rank=rank, size=2, epochs=1, drop_last=False):
            keys += b["keys"]
    assert len(keys) == 60 and len(set(keys)) == 60


def test_batches_are_uniform_normalised_and_text_padded(ds):
    raw = {}
    for shard in sorted(ds.glob("shard-*.tar")):
        with open(shard, "rb") as f:
            for s in iter_samples(f, 0, str(shard)):
                from safetensors.torch import load

                raw[f"a/{s.key}"] = load(bytes(s.st_bytes))
    n, t_dtype = 0, next(iter(raw.values()))["text"].dtype
    assert t_dtype == torch.bfloat16
    for b in _loader(_cfg(ds), bs=4, epochs=1):
        B = len(b["keys"])
        assert b["latents"].dtype == torch.float32 and b["latents"].shape[0] == B == 4
        assert b["text"].shape == (B, 6, 32) and b["text_mask"].dtype == torch.bool
        assert b["text"].dtype == t_dtype  # data.text_dtype defaults to bfloat16, the stored dtype
        for i, k in enumerate(b["keys"]):
            t = raw[k]
            torch.testing.assert_close(b["latents"][i], (t["latent"].float() - 0.25) * 0.5)  # manifest norm
            L = min(6, t["text"].shape[0])
            assert b["text_mask"][i].tolist() == [True] * L + [False] * (6 - L)
            assert torch.equal(b["text"][i, :L], t["text"][:L])  # bit-exact: no conversion
            assert (b["text"][i, L:] == 0).all()
        n += B
    assert n == 60  # 20 per shape, batch 4: nothing left over


def test_reader_leaves_the_trainers_thread_count_alone(ds):
    before = torch.get_num_threads()
    _take(_loader(_cfg(ds)), 3)  # the expand thread runs with one intra-op thread, for itself only
    assert torch.get_num_threads() == before


def test_config_normalisation_overrides_manifest(ds):
    cfg = _cfg(ds, latent_norm="config", latent_scale=2.0, latent_shift=0.0)
    b1 = next(iter(_loader(cfg)))
    b2 = next(iter(_loader(_cfg(ds))))
    assert b1["keys"] == b2["keys"]
    torch.testing.assert_close(b1["latents"], (b2["latents"] / 0.5 + 0.25) * 2.0)


def _take(loader, n):
    out = []
    for b in loader:
        out.append(b)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("resampled,workers", [(False, 0), (False, 2), (True, 2)])
def test_resume_is_exact(ds, ds_b, resampled, workers):
    """Stop after k batches, save, restore in a new loader: the next batches equal an uninterrupted run's."""
    cfg = _cfg(ds, ds_b, resampled=resampled, num_workers=workers, weights=[2.0, 1.0], shuffle_buffer=10)
    full = _take(_loader(cfg), 30)  # crosses epoch boundaries for the non-resampled case
    first = _loader(cfg)
    _take(first, 11)
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint may store it as JSON
    resumed = _loader(cfg)
    resumed.load_state_dict(state)
    rest = _take(resumed, 19)
    assert [b["keys"] for b in rest] == [b["keys"] for b in full[11:]]
    for a, b in zip(rest, full[11:]):
        assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["text"], b["text"])


def test_changed_layout_restarts_streams_from_saved_epoch(ds, caplog):
    a = _loader(_cfg(ds, num_workers=0))
    _take(a, 30)  # > 1 epoch of 15 batches
    b = _loader(_cfg(ds, num_workers=0), rank=0, size=2)
    b.load_state_dict(a.state_dict())
    assert "different layout" in caplog.text and "dp_size" in caplog.text
    assert len(_take(b, 3)) == 3 and b.stats()["epochs"] == [1]


def test_weighted_mixing(ds, ds_b):
    cfg = _cfg(ds, ds_b, resampled=True, weights=[3.0, 1.0], shuffle_buffer=4)
    counts = Counter(k.split("/")[0] for b in _take(_loader(cfg, bs=1), 800) for k in b["keys"])
    assert abs(counts["a"] / 800 - 0.75) < 0.05


def test_corrupt_samples_are_skipped_and_counted(ds, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ds, bad)
    shard = bad / "shard-000000.tar"
    with open(shard, "rb") as f:
        s = list(iter_samples(f, 0, str(shard)))[2]
    data = bytearray(shard.read_bytes())
    hdr = data.index(b'"latent_shape"', s.offset)  # JSON member of sample 2: break its shape
    data[hdr + 1:hdr + 7] = b"XXXXXX"
    shard.write_bytes(bytes(data))
    tail = bad / "shard-000001.tar"
    tail.write_bytes(tail.read_bytes()[:3000])  # truncated copy
    loader = _loader(_cfg(bad), bs=1, epochs=1, drop_last=False)
    keys = [k for b in loader for k in b["keys"]]
    st = loader.stats()["skipped"]
    assert st["corrupt_sample"] == 1 and st["truncated_shard"] == 1
    with open(tail, "rb") as f:
        kept = len(list(iter_samples(f, 1, str(tail))))  # complete samples before the cut
    assert len(keys) == 60 - 1 - (6 - kept) and f"bad/{s.key}" not in keys


def test_clear_errors(ds, ds_b, tmp_path):
    with pytest.raises(FormatError, match="no manifest.json"):
        _loader(_cfg(tmp_path))
    with pytest.raises(ValueError, match="fewer than dp_size x workers"):
        _loader(_cfg(ds_b, num_workers=4), rank=0, size=2)
    with pytest.raises(ValueError, match="data.weights"):
        _loader(_cfg(ds, ds_b, weights=[1.0]))
    with pytest.raises(ValueError, match="latent_norm"):
        _loader(_cfg(ds, latent_norm="auto"))
    import shutil

    dead = tmp_path / "dead"
    shutil.copytree(ds_b, dead)
    for shard in dead.glob("shard-*.tar"):
        shard.write_bytes(b"\0" * 100)
    with pytest.raises(FormatError, match="no readable sample"):  # raised in a worker, surfaced here
        next(iter(_loader(_cfg(dead, resampled=True, num_workers=1))))
    other = tmp_path / "c"
    write_synthetic_dataset(other, [(8, 1, 4, 4)], 4, 4)
    with pytest.raises(ValueError, match="latent channels"):
        _loader(_cfg(ds, other))


def test_shards_are_readable_by_plain_webdataset(ds):
    import webdataset as wds

    samples = list(wds.WebDataset(str(ds / "shard-000000.tar"), shardshuffle=False))
    assert len(samples) == 6 and {"__key__", "json", "safetensors"} <= set(samples[0])


def _write_split(d: Path, per_shard: int) -> None:
    """40 samples in 4 shards: 10/10/10/10 or 12/12/12/4 -- the same "{shards}:{samples}" (4:40)."""
    import shutil

    shutil.rmtree(d, ignore_errors=True)
    write_synthetic_dataset(d, SHAPES[:1], num_samples=40, samples_per_shard=per_shard, seed=3)


@pytest.mark.parametrize("order", ["global", "rank"])
def test_a_resplit_dataset_is_not_resumed_in_another_order(tmp_path, order, caplog):
    """The dataset is re-split with the same shard and sample totals between the save and the resume: the
    position counts in the old order, so the resume is refused, naming the dataset; with
    data.allow_dataset_change it continues, saying so. An unchanged dataset whose saved fingerprint is an
    older megassm's ("4:40") still resumes exactly."""
    d = tmp_path / "a"
    _write_split(d, 10)
    cfg = _cfg(d, order=order, resampled=False)
    first = _loader(cfg)
    _take(first, 3)
    state = json.loads(json.dumps(first.state_dict()))
    at = "key" if order == "global" else "layout"
    older = json.loads(json.dumps(state))
    older[at]["datasets"][0][1] = "4:40"
    full = _take(_loader(cfg), 6)
    again = _loader(cfg)
    again.load_state_dict(older)
    assert [b["keys"] for b in _take(again, 3)] == [b["keys"] for b in full[3:]]

    _write_split(d, 12)
    with pytest.raises(ValueError, match=rf"dataset {d} changed since the checkpoint: the same 4 shards / 40 "
                                         r"samples, but .*per-shard counts.*data.allow_dataset_change"):
        _loader(cfg).load_state_dict(state)
    allowed = _loader(_cfg(d, order=order, resampled=False, allow_dataset_change=True))
    allowed.load_state_dict(state)
    assert f"dataset {d} changed" in caplog.text
    assert len(_take(allowed, 2)) == 2


def test_resampled_rank_order_sees_every_sample_equally_often_whatever_its_shards_size(tmp_path):
    """data.order rank + resampled: a drawn shard is read whole, so shards must be drawn uniformly; drawn by
    sample count (as before), a sample's frequency grew with its shard's size (here 9x for the big shard's)."""
    from megassm.data.stream import SampleStream

    man = write_synthetic_dataset(tmp_path / "d", [(4, 1, 4, 4)], num_samples=10, samples_per_shard=9)
    paths = [str(tmp_path / "d" / s["path"]) for s in man["shards"]]
    counts = [s["samples"] for s in man["shards"]]
    assert counts == [9, 1]
    stream = SampleStream(0, paths, counts, seed=0, dp_rank=0, dp_size=1, worker=0, num_workers=1, resampled=True,
                          shuffle_buffer=1)
    samples = [stream.next() for _ in range(4000)]
    seen = Counter(x.key for x in samples)
    lone = {x.key for x in samples if x.shard == 1}
    assert len(seen) == 10 and len(lone) == 1
    others = [v for k, v in seen.items() if k not in lone]
    # each sample's expected share: 1/10 (400 of 4000); the lone shard's sample within 25 % of the others' mean
    assert seen[lone.pop()] == pytest.approx(sum(others) / 9, rel=0.25), seen
