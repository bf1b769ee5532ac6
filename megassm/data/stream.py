"""One dataset's sample stream for one (data-parallel rank, loader worker), with a resumable position.

Stages, as in a WebDataset chain: shard source (epoch permutation split by DP rank then by
worker, or weighted resampling) -> tar reading (``tario``) -> shuffle buffer.

Position = (epoch, shard cursor, byte offset of the last sample taken from the current
shard, RNG states, and the (shard, offset) addresses of the samples in the shuffle buffer).
A restore seeks to those addresses; nothing is replayed, so resuming costs one read per
buffered sample whatever the epoch size, and the continuation is exactly the stream an
uninterrupted run would have produced -- with or without resampling -- provided the layout
(dp_size, num_workers, datasets, seed) is unchanged.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from itertools import islice
from typing import Any

import numpy as np

from megassm.data import remote
from megassm.data.format import FormatError
from megassm.data.tario import RawSample, iter_samples, read_sample_at

log = logging.getLogger("megassm.data")
_READ_BUFFER = 1 << 16  # headers and JSON come from the buffer; tensor reads bypass it (readinto)


def rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def rng_from(state: dict) -> np.random.Generator:
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = state
    return rng


class ShardFiles:
    """A few open shard files for random reads (restoring buffered samples).

    Local files and offset-addressable URLs (range reads) stay open; a ``pipe:`` shard is
    streamed again from its start, skipping to the sample, for every ``read`` -- ``read_many`` /
    ``read_each`` stream it once for several samples.
    """

    def __init__(self, paths: list[str], capacity: int = 8):
        self.paths, self.capacity = paths, capacity
        self._open: OrderedDict[int, Any] = OrderedDict()

    def get(self, shard: int):
        f = self._open.pop(shard, None) or remote.open_random(self.paths[shard])
        self._open[shard] = f
        while len(self._open) > self.capacity:
            self._open.popitem(last=False)[1].close()
        return f

    def read(self, shard: int, offset: int, lazy: bool = False) -> RawSample:
        where = self.paths[shard]
        if remote.scheme(where) == "pipe":
            with remote.open_shard(where, offset) as f:
                return read_sample_at(f, shard, offset, where, lazy)
        return read_sample_at(self.get(shard), shard, offset, where, lazy)

    def read_many(self, shard: int, offsets: list[int]) -> dict[int, RawSample | Exception]:
        """The samples at ``offsets`` (ascending) of one shard, a pipe: shard in one pass of a single stream
        (skipped bytes are not kept); a sample that cannot be read maps to its error (a broken stream: that
        error for the rest)."""
        where, out = self.paths[shard], {}
        if remote.scheme(where) != "pipe":
            for off in offsets:
                try:
                    out[off] = self.read(shard, off)
                except (FormatError, OSError) as e:
                    out[off] = e
            return out
        try:
            with remote.open_shard(where, offsets[0]) as f:
                for off in offsets:
                    f.advance(off)
                    try:
                        out[off] = read_sample_at(f, shard, off, where)
                    except FormatError as e:
                        out[off] = e
        except OSError as e:
            out.update({off: e for off in offsets if off not in out})
        return out

    def read_each(self, addresses: list[tuple[int, int]]) -> list[RawSample]:
        """The samples at (shard, offset) ``addresses``, in order (a restore's buffer); raises the first
        error. pipe: each shard is streamed once for all of its addresses."""
        wanted: dict[int, set[int]] = {}
        for sh, off in addresses:
            wanted.setdefault(sh, set()).add(off)
        got = {(sh, off): s for sh, offs in wanted.items() for off, s in self.read_many(sh, sorted(offs)).items()}
        for a in addresses:
            if isinstance(got[a], Exception):
                raise got[a]
        return [got[a] for a in addresses]


class SampleStream:
    """Samples (``RawSample``) of one dataset for one (dp rank, logical worker).

    resampled=False: epoch e visits permutation(seed, dataset, e) of the shards, its
    ``dp_rank::dp_size`` slice, then that slice's ``worker::num_workers`` slice (what
    ``wds.split_by_node`` / ``wds.split_by_worker`` do, but with the *data-parallel* rank --
    under TP/CP several global ranks read the same data -- and a logical worker id that
    survives a resume). No sample is seen twice within an epoch across all ranks/workers.
    resampled=True: shards are drawn with replacement, uniformly over those with samples, from an
    RNG seeded per (dataset, dp rank, worker). A drawn shard is read whole, so every sample's
    expected frequency is the same whatever its shard's size (drawn by sample count, it grew with it).
    """

    def __init__(self, index: int, shards: list[str], counts: list[int], *, seed: int, dp_rank: int,
                 dp_size: int, worker: int, num_workers: int, resampled: bool, shuffle_buffer: int,
                 epochs: int | None = None, generation: int = 0, start_epoch: int = 0):
        self.index, self.paths, self.counts = index, shards, counts
        self.where = shards[0].rsplit("/", 1)[0] if shards else "?"  # the dataset, for messages
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.worker, self.num_workers = worker, num_workers
        self.resampled, self.bufsize, self.epochs = resampled, max(1, shuffle_buffer), epochs
        self.initial = min(self.bufsize, 100)  # start emitting before the buffer is full (as wds.shuffle)
        ids = [seed, index, dp_rank, worker, num_workers, generation]
        self.shard_rng = np.random.default_rng(ids + [1])
        self.shuffle_rng = np.random.default_rng(ids + [2])
        self.files = ShardFiles(shards)
        self.epoch, self.cursor, self.shard, self.last_offset = start_epoch, -1, -1, -1
        self.buffer: list[RawSample] = []
        self.exhausted = False  # current epoch's shards all read
        self.finished = False  # epochs done (finite streams only)
        self.skipped: Counter[str] = Counter()
        self._it = None
        self._epoch_samples = 0
        self._order = self._epoch_order(self.epoch) if not resampled else []

    # ------------------------------------------------------------------ shard source
    def _epoch_order(self, epoch: int) -> list[int]:
        perm = np.random.default_rng([self.seed, self.index, epoch, 7]).permutation(len(self.paths)).tolist()
        mine = perm[self.dp_rank::self.dp_size]
        return list(islice(mine, self.worker, None, self.num_workers))

    def _next_shard(self) -> bool:
        """Advance to the next shard of the epoch (or draw one); False at the end of the epoch."""
        if self.resampled:
            p = (np.asarray(self.counts) > 0).astype(np.float64)
            self.shard = int(self.shard_rng.choice(len(self.paths), p=p / p.sum()))
        else:
            self.cursor += 1
            if self.cursor >= len(self._order):
                return False
            self.shard = self._order[self.cursor]
        self.last_offset = -1
        self._open_shard()
        return True

    def _open_shard(self, after: int = -1) -> None:
        where = self.paths[self.shard]
        errors: list = []
        start = max(after, 0)
        try:
            f = remote.open_shard(where, start, buffering=_READ_BUFFER)
        except OSError as e:  # missing object, no permission, retries exhausted: the shard is skipped
            self._count("unreadable_shard", f"{where}: {e}")
            self._it = iter(())
            return

        def gen():
            with f:
                try:
                    for s in iter_samples(f, self.shard, where, start, errors=errors):
                        for reason, msg in errors:
                            self._count(reason, msg)
                        errors.clear()
                        if s.offset > after:
                            yield s
                except OSError as e:  # the connection broke for good mid-shard: keep what arrived
                    errors.append(("unreadable_shard", f"{where}: {e}"))
                for reason, msg in errors:
                    self._count(reason, msg)
        self._it = gen()

    def _count(self, reason: str, msg: str) -> None:
        self.skipped[reason] += 1
        n = self.skipped[reason]
        if n <= 5 or n % 1000 == 0:
            log.warning("skipping (%s #%d): %s", reason, n, msg)

    def _read(self) -> RawSample | None:
        """The next sample of the epoch from the shard source, None at the end of the epoch."""
        empty = 0
        while True:
            if self._it is not None:
                s = next(self._it, None)
                if s is not None:
                    self.last_offset = s.offset
                    self._epoch_samples += 1
                    return s
                self._it = None
                empty += 1
                if self.resampled and empty > max(100, 2 * len(self.paths)):
                    raise FormatError(f"dataset {self.where}: {empty} shards in a row had "
                                      f"no readable sample (skipped so far: {dict(self.skipped)})")
            if not self._next_shard():
                return None

    # ------------------------------------------------------------------ shuffle buffer
    def _pick(self) -> RawSample:
        j = int(self.shuffle_rng.integers(len(self.buffer)))
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()

    def next(self) -> RawSample | None:
        """The next shuffled sample; None only when a finite stream (``epochs``) is done."""
        while not self.finished:
            if not self.exhausted:
                for _ in range(2 if len(self.buffer) < self.bufsize else 1):
                    s = self._read()
                    if s is None:
                        self.exhausted = True
                        break
                    self.buffer.append(s)
                if self.buffer and (len(self.buffer) >= self.initial or self.exhausted):
                    return self._pick()
                continue
            if self.buffer:
                return self._pick()
            self._new_epoch()
        return None

    def _new_epoch(self) -> None:
        if not self.resampled and not self._order:
            raise FormatError(
                f"dataset {self.where}: {len(self.paths)} shards cannot feed dp rank "
                f"{self.dp_rank}/{self.dp_size} worker {self.worker}/{self.num_workers} without resampling; "
                "use data.resampled=true, fewer data.num_workers, or preprocess into more shards")
        if self._epoch_samples == 0 and self._order:
            raise FormatError(f"dataset {self.where}: a whole epoch of dp rank {self.dp_rank} "
                              f"worker {self.worker} had no readable sample (skipped: {dict(self.skipped)})")
        self.epoch += 1
        self._epoch_samples = 0
        if self.epochs is not None and self.epoch >= self.epochs:
            self.finished = True
            return
        self._order, self.cursor, self.exhausted = self._epoch_order(self.epoch), -1, False

    # ------------------------------------------------------------------ position
    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "shard": self.shard, "offset": self.last_offset,
                "exhausted": self.exhausted, "finished": self.finished, "shard_rng": rng_state(self.shard_rng),
                "shuffle_rng": rng_state(self.shuffle_rng), "buffer": [[s.shard, s.offset] for s in self.buffer],
                "skipped": dict(self.skipped)}

    def restore(self, st: dict[str, Any]) -> None:
        self.epoch, self.cursor, self.shard = st["epoch"], st["cursor"], st["shard"]
        self.exhausted, self.finished = st["exhausted"], st["finished"]
        self.shard_rng, self.shuffle_rng = rng_from(st["shard_rng"]), rng_from(st["shuffle_rng"])
        self.skipped = Counter(st["skipped"])
        self._order = self._epoch_order(self.epoch) if not self.resampled else []
        self.buffer = self.files.read_each([(sh, off) for sh, off in st["buffer"]])
        self.last_offset, self._it, self._epoch_samples = st["offset"], None, 1
        if self.shard >= 0 and not self.exhausted:
            self._open_shard(after=self.last_offset)
