"""data.order=global, the cost side: the saved cursor is kept incrementally (a save counts only the draws
since the last one), and a pipe: / remote shard is fetched once per window, not once per sample.
Counts of work (indices drawn, shard streams opened), never timings."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest
import torch

from megassm.config.schema import DataConfig
from megassm.data import remote
from megassm.data.global_order import GlobalCursor, StreamOrder
from megassm.data.reader import build_shard_loader
from megassm.data.testing import write_synthetic_dataset

SHAPE = (4, 1, 8, 8)


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gio")
    write_synthetic_dataset(root / "a", [SHAPE], num_samples=30, samples_per_shard=5, seed=2)
    write_synthetic_dataset(root / "b", [SHAPE], num_samples=21, samples_per_shard=7, seed=5)
    return root / "a", root / "b"


def _loader(*paths, batch: int = 2, limit: int | None = None, **kw):
    cfg = DataConfig(kind="shards", paths=[str(p) for p in paths], weights=[1.0, 2.0][:len(paths)],
                     resampled=kw.pop("resampled", False), order="global", window_shards=kw.pop("window", 3),
                     num_workers=0, **kw.pop("cfg", {}))
    ld = build_shard_loader(cfg, batch_size=batch, dp_rank=0, dp_size=1, seed=7, text_len=6, return_keys=True,
                            global_batch=batch, **kw)
    return ld if limit is None else itertools.islice(ld, limit)


class _CountingMix:
    """The loader's mix, counting the global indices whose streams are drawn on the training thread."""

    def __init__(self, mix):
        self.mix, self.drawn = mix, 0

    def choices(self, start: int, stop: int):
        self.drawn += stop - start
        return self.mix.choices(start, stop)

    def __getattr__(self, name):
        return getattr(self.mix, name)


def test_the_saved_cursor_is_incremental_and_equals_a_full_recount(two):
    loader = _loader(*two)
    it = iter(loader)
    next(it)  # the reading side has its own mix object from here on
    mix = loader.mix
    counting = loader.mix = _CountingMix(mix)
    taken, per_save = 1, []
    for k in (3, 5, 5, 9):
        list(itertools.islice(it, k))
        taken += k
        before = counting.drawn
        state = loader.state_dict()
        per_save.append(counting.drawn - before)
        full = GlobalCursor(0, [0, 0]).advanced(taken * 2, mix)  # the old way: every draw since the start
        assert state["index"] == full.index and state["counts"] == full.counts
    # each save draws the indices of the batches since the previous one (the first: since the start), 2 a batch
    assert per_save == [2 * 4, 2 * 5, 2 * 5, 2 * 9]


@pytest.mark.parametrize("resampled", [False, True])
def test_a_pipe_shard_is_streamed_once_per_window(two, monkeypatch, resampled):
    """A pipe: dataset (no seeking) in global order: each shard is streamed once for all of the window's samples
    this worker reads (was: once per sample, from byte 0), and the batches are those of the local dataset."""
    a, _ = two
    streamed = Counter()
    open_shard = remote.open_shard

    def counting(loc, start=0, **kw):
        if loc.endswith(".tar"):
            streamed[loc.rsplit("/", 1)[-1]] += 1
        return open_shard(loc, start, **kw)

    monkeypatch.setattr(remote, "open_shard", counting)
    # 30 samples, 6 shards of 5; windows of 3 shards (resampled: blocks of 3 drawn shards x 5 slots): two
    # windows in 15 batches of 2. A read-ahead of 16 samples covers a window (15) from its first batch on.
    local = list(_loader(a, resampled=resampled, epochs=1))
    assert len(local) == 15 and not streamed  # local shards are read in place, not streamed
    piped = list(_loader(f"pipe:cat {a}/{{path}}", resampled=resampled, epochs=1, cfg={"read_ahead_samples": 16}))
    assert [b["keys"] for b in piped] == [b["keys"] for b in local]
    assert all(torch.equal(x["latents"], y["latents"]) for x, y in zip(local, piped))
    order = StreamOrder((0, 0), [5] * 6, 7, resampled, 3)  # the stream's order, as the loader builds it
    windows = Counter(shard for _, shard in {(k // 15, order.locate(k)[0]) for k in range(30)})  # per window
    # at most once per window that reads it (a read-ahead that spans a window boundary may cover a shard of both
    # windows with one stream); the old reader streamed a shard once per sample (5 here)
    want = {f"shard-{s:06d}.tar": n for s, n in windows.items()}
    assert set(streamed) == set(want) and all(streamed[k] <= n for k, n in want.items()), (streamed, want)
