"""A layout-independent order of shard samples (``data.order: global``, docs/shard_format.md §6).

Sample g of the run (g = 0, 1, 2, ...: the global sample index of docs/training.md) is a function of
(seed, g) and the datasets alone, never of the data-parallel degree, the loader workers or where a run
was resumed:

1. **dataset**: a counter-based draw u(seed, g) in [0, 1) against the cumulative ``data.weights``
   picks dataset d; no generator state, so any g is drawn directly;
2. **dataset-local index** k = how many earlier global indices chose d. It depends on every earlier
   draw, so the loader's position carries the counts at its cursor (``GlobalCursor``) and advances them
   over each step's whole global batch (vectorised; a resume costs nothing extra);
3. **where k lives**: without resampling, epoch e = k // N_d visits the shards in a permutation keyed
   on (seed, d, e), cut into windows of ``data.window_shards`` consecutive shards whose samples are
   permuted by (seed, d, e, window): every sample exactly once per epoch. With resampling, block
   b = k // (W x L) draws W shards by (seed, d, b), weighted by their sample counts, L slots each
   (L = the mean shard size), the W x L slots permuted; slot j of a shard of n samples takes that
   shard's (seed, d, b, shard slot) permutation at j mod n -- every sample has expectation L / N_d
   per block, as when shards are drawn by sample count.

A rank then reads only its own samples, each by its byte offset (``ShardIndex``). A sample that cannot
be read is replaced by the next readable k of the same dataset (a function of the data alone, so
every layout makes the same replacement) and counted.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import numpy as np

from megassm.data import remote
from megassm.data.format import FormatError
from megassm.data.stream import ShardFiles
from megassm.data.tario import RawSample, iter_members, split_key

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, element-wise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return z ^ (z >> np.uint64(31))


def dataset_choices(seed: int, start: int, stop: int, weights: list[float]) -> np.ndarray:
    """The dataset of every global index in [start, stop): u(seed, g) against the cumulative weights."""
    if len(weights) == 1:
        return np.zeros(stop - start, dtype=np.int64)
    key = _splitmix(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    g = np.arange(start, stop, dtype=np.uint64)
    with np.errstate(over="ignore"):
        u = (_splitmix(g ^ key) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    cum = np.cumsum(np.asarray(weights, dtype=np.float64))
    d = np.searchsorted(cum / cum[-1], u, side="right")
    return np.minimum(d, len(weights) - 1).astype(np.int64)


@dataclass
class GlobalCursor:
    """Global samples consumed (``index``) and how many of them each dataset gave (``counts``)."""

    index: int
    counts: list[int]

    def advanced(self, stop: int, seed: int, weights: list[float], chunk: int = 1 << 20) -> GlobalCursor:
        """The cursor at global index ``stop`` (>= index): the draws of [index, stop) counted, in chunks."""
        if stop < self.index:
            raise ValueError(f"cannot move a data cursor back from {self.index} to {stop}")
        counts, g = np.asarray(self.counts, dtype=np.int64), self.index
        while g < stop:
            hi = min(stop, g + chunk)
            counts += np.bincount(dataset_choices(seed, g, hi, weights), minlength=len(weights))
            g = hi
        return GlobalCursor(stop, counts.tolist())

    def state(self) -> dict:
        return {"index": self.index, "counts": list(self.counts)}


class DatasetOrder:
    """Dataset-local index k -> (shard, sample number within the shard), for one dataset."""

    def __init__(self, index: int, counts: list[int], seed: int, resampled: bool, window: int):
        self.d, self.counts, self.seed, self.resampled = index, np.asarray(counts, dtype=np.int64), seed, resampled
        self.total = int(self.counts.sum())
        self.window = max(1, min(window, len(counts)))
        self.slots = max(1, round(self.total / len(counts)))  # L: slots per drawn shard (resampled)
        self._cache: OrderedDict[tuple, object] = OrderedDict()

    def _memo(self, key: tuple, make):
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        v = self._cache[key] = make()
        while len(self._cache) > 16:
            self._cache.popitem(last=False)
        return v

    def _rng(self, *ids: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.d, *ids])

    def locate(self, k: int) -> tuple[int, int]:
        return self._resampled(k) if self.resampled else self._epoch(k)

    def epoch_of(self, k: int) -> int:
        return k // self.total

    def _epoch(self, k: int) -> tuple[int, int]:
        e, p = divmod(k, self.total)

        def windows():  # the epoch's shard order and where each window starts
            perm = self._rng(e, 11).permutation(len(self.counts))
            sizes = [int(self.counts[perm[i:i + self.window]].sum()) for i in range(0, len(perm), self.window)]
            return perm, np.concatenate([[0], np.cumsum(sizes)])

        perm, starts = self._memo(("epoch", e), windows)
        w = int(np.searchsorted(starts, p, side="right")) - 1
        shards = perm[w * self.window:(w + 1) * self.window]

        def window_perm():
            return self._rng(e, w, 13).permutation(int(starts[w + 1] - starts[w])), np.cumsum(self.counts[shards])

        order, cum = self._memo(("window", e, w), window_perm)
        q = int(order[p - starts[w]])
        i = int(np.searchsorted(cum, q, side="right"))
        return int(shards[i]), q - (int(cum[i - 1]) if i else 0)

    def _resampled(self, k: int) -> tuple[int, int]:
        per = self.window * self.slots
        b, j = divmod(k, per)

        def block():
            rng = self._rng(b, 17)
            p = self.counts / self.total
            return rng.choice(len(self.counts), size=self.window, p=p), rng.permutation(per)

        shards, order = self._memo(("block", b), block)
        q = int(order[j])
        slot, r = divmod(q, self.slots)
        shard = int(shards[slot])
        within = self._memo(("slot", b, slot), lambda: self._rng(b, slot, 19).permutation(int(self.counts[shard])))
        return shard, int(within[r % len(within)])


def scan_offsets(where: str) -> list[int]:
    """Byte offsets of a shard's samples (first tar header of each key group), from its tar headers.

    Reads only the 512-byte headers (seeking over the data of a local or range-readable file); a tar
    that breaks off keeps the offsets before the break (the missing samples then read as unreadable)."""
    offsets, key = [], None
    try:
        with remote.open_shard(where, 0) as f:
            for m in iter_members(f, where):
                kx = split_key(m.name)
                if kx is None:
                    continue
                if kx[0] != key:
                    key = kx[0]
                    offsets.append(m.offset)
    except (FormatError, OSError):
        pass
    return offsets


@dataclass
class ShardIndex:
    """Random access to one dataset's samples by (shard, sample number): the writer's recorded offsets
    (manifest ``shards[i].offsets``) or, for datasets written before they were recorded, one header scan
    per shard and process, cached."""

    paths: list[str]
    recorded: list[list[int] | None]
    files: ShardFiles = field(init=False)

    def __post_init__(self):
        self.files = ShardFiles(self.paths)
        self._offsets: dict[int, list[int]] = {}

    def offsets(self, shard: int) -> list[int]:
        if shard not in self._offsets:
            rec = self.recorded[shard] if shard < len(self.recorded) else None
            self._offsets[shard] = list(rec) if rec is not None else scan_offsets(self.paths[shard])
        return self._offsets[shard]

    def read(self, shard: int, i: int) -> RawSample:
        offs = self.offsets(shard)
        if i >= len(offs):
            raise FormatError(f"{self.paths[shard]}: has {len(offs)} readable samples, sample {i} is missing "
                              "(truncated or rewritten shard?)")
        return self.files.read(shard, offs[i])


class GlobalReader:
    """Reads dataset-local index k of each dataset, replacing an unreadable sample by the next readable k."""

    def __init__(self, orders: list[DatasetOrder], indexes: list[ShardIndex], shapes: list[tuple]):
        self.orders, self.indexes, self.shapes = orders, indexes, shapes
        self.skipped: Counter[str] = Counter()

    def read(self, d: int, k: int) -> RawSample:
        order = self.orders[d]
        for j in range(k, k + order.total):
            shard, i = order.locate(j)
            try:
                s = self.indexes[d].read(shard, i)
            except (FormatError, OSError):
                self.skipped["corrupt_sample"] += 1
                continue
            if tuple(s.shape[1:]) != self.shapes[d]:
                self.skipped["wrong_shape"] += 1
                continue
            return s
        raise FormatError(f"dataset {self.indexes[d].paths[0].rsplit('/', 1)[0]}: no readable sample of latent "
                          f"shape {self.shapes[d]} in a whole epoch ({order.total} tried)")
