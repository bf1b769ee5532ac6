"""data.order=rank: each data-parallel rank and loader worker reads its own streams (``RankOrderLoader``).

The chain, per DataLoader worker (one logical worker = one deterministic stream):

    SampleStream per dataset (shards split by DP rank and worker / resampled, tar, shuffle: ``stream.py``)
      -> weighted mix of the datasets (one RNG draw per sample)
      -> ShapeBucketer (same latent shape -> one batch tensor), or data.buckets' schedule
      -> pack / expand (``batches.py``): decode safetensors, normalise (x - shift) * scale, pad text to text_len

Every batch carries its worker's position; the loader keeps the position of the last batch the trainer
*received* from each worker (prefetched batches do not count), so ``state_dict()`` after step N restores
to exactly batch N+1. The position is tied to the layout (dp, workers, ...). See docs/shard_format.md.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from megassm.data.batches import STATE_VERSION, DatasetSpec, ShardLoader, pack
from megassm.data.buckets import ShapeBucketer
from megassm.data.format import shape_key
from megassm.data.stream import SampleStream, rng_from, rng_state
from megassm.data.token_budget import BucketSchedule, PendingByShape
from megassm.data.watch import attach

log = logging.getLogger("megassm.data")


class LatentBatchStream(IterableDataset):
    """The per-worker pipeline. Yields (batch, position) pairs; picklable for DataLoader workers."""

    def __init__(self, specs: list[DatasetSpec], weights: list[float], *, batch_size: int, text_len: int,
                 seed: int, dp_rank: int, dp_size: int, num_workers: int, resampled: bool,
                 shuffle_buffer: int, epochs: int | None, drop_last: bool, with_keys: bool,
                 restore: dict | None, rotation: int, generation: int, start_epoch: int,
                 text_dtype: torch.dtype = torch.float32, schedule: BucketSchedule | None = None):
        self.specs, self.weights, self.schedule = specs, weights, schedule
        self.kw = dict(seed=seed, dp_rank=dp_rank, dp_size=dp_size, resampled=resampled,
                       shuffle_buffer=shuffle_buffer, epochs=epochs, generation=generation,
                       start_epoch=start_epoch)
        self.batch_size, self.text_len, self.num_workers = batch_size, text_len, max(1, num_workers)
        self.seed, self.dp_rank, self.drop_last, self.with_keys = seed, dp_rank, drop_last, with_keys
        self.restore, self.rotation, self.generation = restore or {}, rotation, generation
        self.text_dtype = text_dtype

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info else 0
        attach(getattr(self, "board", None), physical)
        torch.set_num_threads(1)
        logical = (physical + self.rotation) % self.num_workers
        streams = [SampleStream(i, s.shards, s.counts, worker=logical, num_workers=self.num_workers, **self.kw)
                   for i, s in enumerate(self.specs)]
        mix_rng = np.random.default_rng([self.seed, self.dp_rank, logical, self.generation, 3])
        bucketer = ShapeBucketer(self.batch_size) if self.schedule is None else PendingByShape(self.schedule.caps())
        count = [0]  # batches this logical worker has yielded
        saved = self.restore.get(str(logical))
        if saved is not None:
            for st, ss in zip(streams, saved["streams"]):
                st.restore(ss)
            mix_rng, count[0] = rng_from(saved["mix_rng"]), saved["batches"]
            bucketer.restore(_read_pending(streams, saved["pending"]))
        live = [not s.finished for s in streams]
        w = np.asarray(self.weights, dtype=np.float64)

        def position() -> dict:
            return {"logical": logical, "batches": count[0], "mix_rng": rng_state(mix_rng),
                    "streams": [s.state() for s in streams],
                    "pending": [[list(shape), [[d, s.shard, s.offset] for d, s in items]]
                                for shape, items in bucketer.pending()]}

        if self.schedule is not None:
            yield from self._bucketed(streams, mix_rng, bucketer, live, logical, count, position)
            return
        while any(live):
            p = w * np.asarray(live)
            d = int(mix_rng.choice(len(streams), p=p / p.sum())) if len(streams) > 1 else 0
            s = streams[d].next()
            if s is None:
                live[d] = False
                continue
            full = bucketer.add((d, s), s.shape)
            if full is not None:
                count[0] += 1
                yield pack(full, self.specs, self.text_len, self.with_keys), position()
        if not self.drop_last:
            for items in list(bucketer.flush()):
                count[0] += 1
                yield pack(items, self.specs, self.text_len, self.with_keys), position()

    def _bucketed(self, streams, mix_rng, pending: PendingByShape, live, logical: int, count: list, position):
        """data.buckets: this worker's j-th batch is the schedule's micro-batch j x workers + logical (the
        loader takes workers round-robin); it reads from the datasets holding that bucket's shape until
        enough samples of it are pending, keeping other buckets' samples for later (up to the caps)."""
        table = self.schedule.table
        has = np.asarray([[s.shapes is None or b.shape in s.shapes for b in table.buckets] for s in self.specs],
                         dtype=np.float64)  # (datasets, buckets)
        w = np.asarray(self.weights, dtype=np.float64)
        while True:
            mb = self.schedule.micro_batch(count[0] * self.num_workers + logical)
            n = len(mb.sample_index)
            while pending.count(mb.shape) < n:
                p = w * np.asarray(live) * has[:, mb.bucket]
                if p.sum() <= 0:
                    return  # finite streams (epochs=) ran out of this bucket's shape
                d = int(mix_rng.choice(len(streams), p=p / p.sum())) if len(streams) > 1 else 0
                s = streams[d].next()
                if s is None:
                    live[d] = False
                    continue
                why = pending.add((d, s), s.shape[1:])
                if why is not None:
                    streams[d]._count(why, f"{s.key}: latent {shape_key(s.shape)}")
            count[0] += 1
            yield pack(pending.take(mb.shape, n), self.specs, self.text_len, self.with_keys), position()


def _read_pending(streams: list[SampleStream], pending: list) -> list[tuple[tuple, list]]:
    """A saved bucketer's pending samples [[shape, [[dataset, shard, offset], ...]], ...] read back, each
    dataset's in one ``read_each`` (a pipe: shard streamed once)."""
    addresses: dict[int, list[tuple[int, int]]] = {}
    for _, items in pending:
        for d, sh, off in items:
            addresses.setdefault(d, []).append((sh, off))
    got = {d: dict(zip(a, streams[d].files.read_each(a))) for d, a in addresses.items()}
    return [(tuple(shape), [(d, got[d][sh, off]) for d, sh, off in items]) for shape, items in pending]


class RankOrderLoader(ShardLoader):
    """data.order=rank: per-worker streams (``LatentBatchStream``); the position is each logical worker's."""

    order = "rank"

    def _init_order(self, global_batch: int | None) -> None:
        if not self.cfg.resampled:
            nw = max(1, self.num_workers)
            for s in self.specs:
                if len(s.shards) < self.dp_size * nw:
                    raise ValueError(f"dataset {s.path} has {len(s.shards)} shards, fewer than dp_size x workers = "
                                     f"{self.dp_size} x {nw}; without resampling each worker needs a shard. Use "
                                     "data.resampled=true, fewer data.num_workers, or more shards")
        self._workers: dict[str, dict] = {}
        self._next, self._generation, self._start_epoch = 0, 0, 0

    def _layout(self) -> dict[str, Any]:
        return {"dp_size": self.dp_size, "dp_rank": self.dp_rank, "num_workers": max(1, self.num_workers),
                "seed": self.seed, "batch_size": self.batch_size, "resampled": bool(self.cfg.resampled),
                "shuffle_buffer": int(self.cfg.shuffle_buffer), "weights": self.weights,
                "datasets": [[s.path, s.fingerprint] for s in self.specs],
                **({} if self.schedule is None else {"grad_accum": self.schedule.grad_accum, "buckets": [
                    [b.name, list(b.shape), b.weight, b.samples] for b in self.schedule.table.buckets]})}

    def __iter__(self):
        ds = LatentBatchStream(
            self.specs, self.weights, batch_size=self.batch_size, text_len=self.text_len, seed=self.seed,
            dp_rank=self.dp_rank, dp_size=self.dp_size, num_workers=self.num_workers,
            resampled=bool(self.cfg.resampled), shuffle_buffer=int(self.cfg.shuffle_buffer), epochs=self.epochs,
            drop_last=self.drop_last, with_keys=self.return_keys, restore=copy.deepcopy(self._workers),
            rotation=self._next, generation=self._generation, start_epoch=self._start_epoch,
            text_dtype=self.text_dtype, schedule=self.schedule)
        for batch, pos in self._batches(ds):
            self._workers[str(pos["logical"])] = pos
            self._next = (pos["logical"] + 1) % max(1, self.num_workers)
            if self.schedule is not None:
                self._mark_micro_batch(batch, (pos["batches"] - 1) * max(1, self.num_workers) + pos["logical"])
            yield batch

    def stats(self) -> dict[str, Any]:
        """Batches yielded and corrupt/skipped samples per reason (over all workers, this rank)."""
        skipped: Counter[str] = Counter()
        for pos in self._workers.values():
            for st in pos["streams"]:
                skipped.update(st["skipped"])
        return {"batches": sum(p["batches"] for p in self._workers.values()), "skipped": dict(skipped),
                "epochs": [max((p["streams"][i]["epoch"] for p in self._workers.values()), default=0)
                           for i in range(len(self.specs))]}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "layout": self._layout(), "workers": copy.deepcopy(self._workers),
                "next_worker": self._next, "generation": self._generation, "start_epoch": self._start_epoch}

    def _load(self, state: dict[str, Any]) -> None:
        if state["layout"] == self._layout():
            self._workers, self._next = copy.deepcopy(state["workers"]), int(state["next_worker"])
            self._generation, self._start_epoch = state["generation"], state["start_epoch"]
            return
        # A different layout (dp_size, workers, datasets...) cannot continue the same streams:
        # start fresh ones from the furthest epoch reached, with new resampling seeds.
        old = state["layout"]
        diff = sorted(k for k in old if old.get(k) != self._layout().get(k))
        epoch = max((st["epoch"] for p in state["workers"].values() for st in p["streams"]), default=0)
        log.warning("data position saved with a different layout (%s differ); not exact: restarting streams at "
                    "epoch %d with fresh shuffles", ", ".join(diff), epoch)
        self._workers, self._next = {}, 0
        self._generation, self._start_epoch = int(state.get("generation", 0)) + 1, epoch
