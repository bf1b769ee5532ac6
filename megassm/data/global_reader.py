"""data.order=global: the loader of the layout-independent order (``GlobalOrderLoader``).

Which sample is global index g is ``global_order.py``'s (the mix, the cursor, ``StreamOrder``, and the
reads by byte offset: ``ShardIndex`` / ``GlobalReader``); here each rank takes its batches of it: batch j of
data-parallel rank r holds global indices base + (j x dp + r) x B ... (data.buckets: the schedule's
micro-batch), read by the loader workers round-robin (``GlobalBatchStream``) and decoded by ``batches.py``.
The saved position is the global cursor, the same on every rank and for every layout (docs/shard_format.md §6).
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from megassm.data.batches import STATE_VERSION, DatasetSpec, ShardLoader, pack
from megassm.data.global_order import (
    BucketedMix,
    GlobalCursor,
    GlobalMix,
    GlobalReader,
    ShardIndex,
    Stream,
    StreamOrder,
)
from megassm.data.token_budget import BucketSchedule
from megassm.data.watch import attach

log = logging.getLogger("megassm.data")


def dataset_streams(spec: DatasetSpec, dataset: int) -> list[Stream]:
    """One ``Stream`` per latent shape of this dataset (data.order=global), from the shards' histograms."""
    if not spec.shard_shapes or any(not s for s in spec.shard_shapes):
        raise ValueError(f"dataset {spec.path}: its manifest records no per-shard shapes (shards[i].shapes); "
                         "data.order=global needs them: re-run `megassm preprocess`, or use data.order=rank")
    shapes = sorted({sh for s in spec.shard_shapes for sh in s})
    return [Stream(dataset, sh, [int(s.get(sh, 0)) for s in spec.shard_shapes]) for sh in shapes]


class GlobalBatchStream(IterableDataset):
    """data.order=global, per worker: this rank's batches j = first + worker, first + worker + workers, ...

    Batch j of data-parallel rank r holds global indices base + (j x dp + r) x B ... + B - 1 (the Trainer's
    ``sample_indices``: micro-batch m of step s is j = s x grad_accum + m), each sample the one
    ``megassm/data/global_order.py`` puts there. Yields (packed batch, {"batch": j, "skipped": {...}}).
    Stops before the first batch that would take a stream past ``epochs`` (finite streams; monotone in
    j, so the workers stop at the same batch)."""

    def __init__(self, specs: list[DatasetSpec], streams: list[Stream], mix: GlobalMix, *, batch_size: int,
                 text_len: int, seed: int, dp_rank: int, dp_size: int, num_workers: int, resampled: bool,
                 window: int, base: GlobalCursor, first: int, epochs: int | None, with_keys: bool,
                 schedule: BucketSchedule | None = None, read_ahead: int = 256):
        self.specs, self.streams, self.mix, self.batch_size, self.text_len = specs, streams, mix, batch_size, text_len
        self.schedule = schedule
        self.seed, self.dp_rank, self.dp_size, self.num_workers = seed, dp_rank, dp_size, max(1, num_workers)
        self.resampled, self.window, self.base, self.first = resampled, window, base, first
        self.epochs, self.with_keys, self.read_ahead = epochs, with_keys, read_ahead

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info else 0
        attach(getattr(self, "board", None), worker)
        torch.set_num_threads(1)
        shape_no = {}
        for st in self.streams:
            shape_no.setdefault(st.dataset, []).append(st.shape)
        orders = [StreamOrder((st.dataset, shape_no[st.dataset].index(st.shape)), st.counts, self.seed,
                              self.resampled, self.window) for st in self.streams]
        indexes = [ShardIndex(s.shards, s.offsets or [], s.sample_shapes or [], [list(x) for x in s.shard_shapes])
                   for s in self.specs]
        reader = GlobalReader(self.streams, orders, indexes)
        limits = None if self.epochs is None else [self.epochs * o.total for o in orders]
        plan = self._plan(worker, limits)
        # pipe: datasets: announce the samples of the batches up to read_ahead samples ahead, so that each
        # shard is streamed once for all of them (GlobalReader.expect); other sources read sample by sample
        horizon = max(1, self.read_ahead // max(1, self.batch_size)) if any(ix.streamed for ix in indexes) else 1
        ahead: deque = deque()
        while True:
            while len(ahead) < horizon and (nxt := next(plan, None)) is not None:
                ahead.append(nxt)
                reader.expect(nxt[1])
            if not ahead:
                return
            j, picks = ahead.popleft()
            items = [(self.streams[q].dataset, reader.read(q, k)) for q, k in picks]
            yield pack(items, self.specs, self.text_len, self.with_keys), {"batch": j, "skipped": dict(reader.skipped)}

    def _plan(self, worker: int, limits: list[int] | None):
        """(j, [(stream, k) of each sample]) of this worker's batches j in order; stops before the first batch
        that would take a stream past ``limits``."""
        cur, j = self.base, self.first + worker
        while True:
            a, n = self._slot(j)
            cur = cur.advanced(a, self.mix)
            picks = self.mix.choices(a, a + n)
            end = cur.advanced(a + n, self.mix)
            if limits is not None and any(c > lim for c, lim in zip(end.counts, limits)):
                return
            counts, items = list(cur.counts), []
            for q in picks.tolist():
                items.append((q, counts[q]))
                counts[q] += 1
            cur = end
            yield j, items
            j += self.num_workers

    def _slot(self, j: int) -> tuple[int, int]:
        """(first global index, size) of this rank's batch j: a contiguous block of one step's global batch."""
        if self.schedule is None:
            return self.base.index + (j * self.dp_size + self.dp_rank) * self.batch_size, self.batch_size
        mb = self.schedule.micro_batch(bucketed_micro(self.base.index, self.schedule, j))
        return mb.sample_index[0], len(mb.sample_index)


def bucketed_micro(base_index: int, schedule: BucketSchedule, j: int) -> int:
    """The schedule's micro-batch number of a rank's j-th batch after a (step-aligned) global cursor."""
    return base_index // schedule.table.stride * schedule.grad_accum + j


class GlobalOrderLoader(ShardLoader):
    """data.order=global: batches in the layout-independent order; the position is the global cursor."""

    order = "global"

    def _init_order(self, global_batch: int | None) -> None:
        schedule, batch_size, dp_size, dp_rank = self.schedule, self.batch_size, self.dp_size, self.dp_rank
        if schedule is not None and (schedule.dp_size, schedule.dp_rank) != (dp_size, dp_rank):
            raise ValueError(f"the bucket schedule is laid out for dp rank {schedule.dp_rank} of "
                             f"{schedule.dp_size}; this loader is rank {dp_rank} of {dp_size}")
        # the shape is drawn per global batch: G = micro-batch x grad_accum x dp (the Trainer passes it);
        # with data.buckets per step by the schedule, over the indices [step x stride, + S_b)
        self.global_batch = schedule.table.stride if schedule else int(global_batch or batch_size * dp_size)
        if schedule is None and self.global_batch % (batch_size * dp_size):
            raise ValueError(f"global_batch={self.global_batch} must be a multiple of batch_size x dp_size = "
                             f"{batch_size} x {dp_size}")
        self.streams = [st for d, spec in enumerate(self.specs) for st in dataset_streams(spec, d)]
        self._set_base(GlobalCursor(0, [0] * len(self.streams)), origin=0)

    def __iter__(self):
        """Batches in the layout-independent order; each carries its global "sample_index"."""
        ds = GlobalBatchStream(self.specs, self.streams, self.mix, batch_size=self.batch_size, text_len=self.text_len,
                               seed=self.seed, dp_rank=self.dp_rank, dp_size=self.dp_size, num_workers=self.num_workers,
                               resampled=bool(self.cfg.resampled), window=self.window, base=self._base,
                               first=self._received, epochs=self.epochs, with_keys=self.return_keys,
                               schedule=self.schedule, read_ahead=int(getattr(self.cfg, "read_ahead_samples", 256)))
        B, dp = self.batch_size, self.dp_size
        for batch, pos in self._batches(ds):
            j = pos["batch"]
            if j != self._received:  # a worker stopped (finite epochs): the batches must stay contiguous
                return
            self._received += 1
            self._skipped[j % max(1, self.num_workers)] = pos["skipped"]
            if self.schedule is not None:
                self._mark_micro_batch(batch, bucketed_micro(self._base.index, self.schedule, j))
            else:
                first = self._base.index + (j * dp + self.dp_rank) * B
                batch["sample_index"] = list(range(first, first + B))
            yield batch

    def _global_key(self) -> dict[str, Any]:
        """What the global order depends on (never the layout: dp, workers, micro-batch size)."""
        return {"seed": self.seed, "weights": self.weights, "resampled": bool(self.cfg.resampled),
                "window_shards": self.window, "datasets": [[s.path, s.fingerprint] for s in self.specs],
                "streams": [[st.dataset, list(st.shape)] for st in self.streams],
                **({} if self.schedule is None else {"buckets": [  # not grad_accum: the cursor is per step
                    [b.name, list(b.shape), b.weight, b.samples] for b in self.schedule.table.buckets]})}

    def _set_base(self, cursor: GlobalCursor, origin: int) -> None:
        self._base, self._origin, self._received, self._skipped = cursor, origin, 0, {}
        self._cursor = cursor  # the last global_cursor(): later ones count only the draws after it
        if self.schedule is not None:
            self.mix = BucketedMix(self.seed, self.weights, self.streams, self.schedule.table)
        else:
            self.mix = GlobalMix(self.seed, self.weights, self.streams, self.global_batch, origin)

    def global_cursor(self) -> GlobalCursor:
        """The cursor after every rank took as many batches as this one: samples [0, index) are consumed
        (data.buckets: global indices, the unused tail of each step's stride included)."""
        if self.schedule is not None:
            steps, micro = divmod(self._received, self.schedule.grad_accum)
            stop = (self._base.index // self.global_batch + steps) * self.global_batch
            if micro:  # mid-step: every rank's slots of the first ``micro`` micro-batches
                b = self.schedule.table.buckets[self.schedule.table.draw(self.seed, stop // self.global_batch)]
                slots = self.schedule.grad_accum * self.dp_size
                base, extra = divmod(b.samples, slots)
                q = micro * self.dp_size
                stop += q * base + min(q, extra)
        else:
            stop = self._base.index + self._received * self.dp_size * self.batch_size
        # incremental: the draws of [base, previous stop) are counted already (stop never decreases), so a
        # save late in a run costs the batches since the last one, not every batch since the resume
        self._cursor = self._cursor.advanced(stop, self.mix)
        return self._cursor

    def stats(self) -> dict[str, Any]:
        """Batches yielded and corrupt/skipped samples per reason (over all workers, this rank)."""
        skipped: Counter[str] = Counter()
        for v in self._skipped.values():
            skipped.update(v)
        cur = self.global_cursor()
        epochs = [0] * len(self.specs)
        for c, st in zip(cur.counts, self.streams):
            epochs[st.dataset] = max(epochs[st.dataset], c // max(1, sum(st.counts)))
        return {"batches": self._received, "skipped": dict(skipped), "epochs": epochs}

    def state_dict(self) -> dict[str, Any]:
        """The global cursor: identical on every rank (at a step boundary) and for every layout."""
        if self.schedule is not None and self._received % self.schedule.grad_accum:
            raise ValueError(f"data.buckets with data.order=global: the cursor is saved at a step boundary; "
                             f"{self._received} batches are {self._received % self.schedule.grad_accum} "
                             f"micro-batches into a step of grad_accum={self.schedule.grad_accum}")
        return {"version": STATE_VERSION, "order": "global", **self.global_cursor().state(),
                "global_batch": self.global_batch, "origin": self._origin, "key": self._global_key()}

    def _load(self, state: dict[str, Any]) -> None:
        cur = GlobalCursor(int(state["index"]), [int(c) for c in state["counts"]])
        origin = int(state.get("origin", 0))
        if self.schedule is not None:
            return self._load_bucketed(state, cur)
        if state["key"].get("buckets"):
            raise ValueError("data cursor saved by a bucketed run (data.buckets); this loader has none: its global "
                             "indices are per step of the bucket table. Resume with the same data.buckets")
        if int(state.get("global_batch", self.global_batch)) != self.global_batch:
            # another global batch (train.allow_batch_change): the shape draws go on in batches of the new size,
            # counted from the cursor
            log.info("global batch %s -> %d: shapes are drawn per batch from global sample %d on",
                     state.get("global_batch"), self.global_batch, cur.index)
            origin = cur.index
        if state["key"] != self._global_key() or len(cur.counts) != len(self.streams):
            old, new = state["key"], self._global_key()
            diff = sorted(k for k in new if old.get(k) != new.get(k))
            # the position stays (no sample index repeats); the per-stream counts are redrawn under the new mix
            log.warning("data cursor saved with other %s; continuing at global sample %d with the counts of the "
                        "new mix (samples of the old order may repeat or be left out)", ", ".join(diff), cur.index)
            redraw = GlobalMix(self.seed, self.weights, self.streams, self.global_batch, 0)
            cur = GlobalCursor(0, [0] * len(self.streams)).advanced(cur.index, redraw)
            origin = 0 if cur.index % self.global_batch == 0 else cur.index
        self._set_base(cur, origin)

    def _load_bucketed(self, state: dict[str, Any], cur: GlobalCursor) -> None:
        """data.buckets: the cursor is at a step boundary (index = steps x stride). Same bucket table, weights
        and datasets (any dp / grad_accum / workers): continue it exactly. Otherwise continue at the same
        step (sample indices never repeat) with the per-stream counts redrawn under this table and mix."""
        old_stride = int(state.get("global_batch") or 1)  # the saved run's indices per step
        steps = -(-cur.index // old_stride)
        old, new = state["key"], self._global_key()
        if old == new and cur.index % old_stride:
            raise ValueError(f"bucketed data cursor at global index {cur.index}, not a step boundary of the "
                             f"stride {old_stride}; it was not written by a step-boundary state_dict()")
        if old != new or len(cur.counts) != len(self.streams):
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            log.warning("data cursor saved with other %s; continuing at step %d with the counts of this bucket "
                        "table and mix (samples of the old order may repeat or be left out)", ", ".join(diff), steps)
            mix = BucketedMix(self.seed, self.weights, self.streams, self.schedule.table)
            cur = GlobalCursor(0, [0] * len(self.streams)).advanced(steps * self.global_batch, mix)
        self._set_base(cur, 0)
