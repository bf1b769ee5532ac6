"""A layout-independent order of shard samples (``data.order: global``, docs/shard_format.md §6).

Sample g of the run (g = 0, 1, 2, ...: the global sample index of docs/training.md) is a function of
(seed, g), the global batch G and the datasets alone, never of the data-parallel degree, the loader
workers or where a run was resumed:

1. **shape**: every global batch (G consecutive indices, counted from the cursor's ``origin``) has one
   latent shape, a counter-based draw keyed on (seed, batch) weighted by how much of the mix has that
   shape (sum over datasets of weight x its share of the shape); so a micro-batch never mixes shapes and
   every rank of a step trains the same one;
2. **dataset**: a counter-based draw u(seed, g) against the cumulative weights of the datasets holding
   that shape (weight x share), so that (dataset, shape) is drawn as often as a sample-by-sample mix
   would; no generator state, so any g is drawn directly. (One shape: the weights themselves.)
3. **stream-local index** k = how many earlier global indices chose the same (dataset, shape) stream. It
   depends on every earlier draw, so the loader's position carries the counts at its cursor
   (``GlobalCursor``) and advances them over each step's whole global batch (vectorised; a resume costs
   nothing extra);
4. **where k lives** (``StreamOrder``, over the stream's samples only: each shard's count of that shape):
   without resampling, epoch e = k // N visits the shards in a permutation keyed on (seed, stream, e), cut
   into windows of ``data.window_shards`` consecutive shards whose samples are permuted by (seed, stream,
   e, window): every sample exactly once per epoch. With resampling, block b = k // (W x L) (L = the mean
   shard count) is a window of a stream of whole shards drawn uniformly by (seed, stream, b), each visited
   in a fresh permutation of its samples, entered at a point uniform over the stream's N samples; the
   W x L slots permuted. Every slot is a uniform draw over the N samples, and a short shard's samples
   repeat only when the shard is drawn again (never L / n times from one draw).

With ``data.buckets`` (``BucketedMix``) step 1 is the bucket schedule's instead: step s trains the bucket
``BucketTable.draw(seed, s)`` (megassm/data/token_budget.py), its S_b samples at global indices
s x stride + j (j < S_b; the indices up to the next step's are unused and draw nothing); steps 2-4 are as
above over the datasets holding that bucket's shape, so the cursor (counts over every earlier step's whole
S_b samples) does not depend on dp or grad_accum either.

A rank then reads only its own samples, each by its byte offset (``ShardIndex``). A sample that cannot
be read is replaced by the next readable k of the same stream (a function of the data alone, so every
layout makes the same replacement) and counted.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import numpy as np

from megassm.data import remote
from megassm.data.format import FormatError
from megassm.data.stream import ShardFiles
from megassm.data.tario import RawSample, iter_members, iter_samples, split_key

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, element-wise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return z ^ (z >> np.uint64(31))


def _uniform(key: int, ids: np.ndarray) -> np.ndarray:
    """u(key, id) in [0, 1) for every id (uint64), counter-based."""
    k = _splitmix(np.asarray([key & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        return (_splitmix(ids.astype(np.uint64) ^ k) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _pick(u: np.ndarray, weights: np.ndarray) -> np.ndarray:
    cum = np.cumsum(weights)
    return np.minimum(np.searchsorted(cum / cum[-1], u, side="right"), len(weights) - 1)


def dataset_choices(seed: int, start: int, stop: int, weights: list[float]) -> np.ndarray:
    """The dataset of every global index in [start, stop): u(seed, g) against the cumulative weights."""
    if len(weights) == 1:
        return np.zeros(stop - start, dtype=np.int64)
    return _pick(_uniform(seed, np.arange(start, stop, dtype=np.uint64)), np.asarray(weights, np.float64))


@dataclass
class Stream:
    """The samples of one latent shape in one dataset: ``counts[i]`` of them in shard i."""

    dataset: int
    shape: tuple[int, int, int]
    counts: list[int]


class GlobalMix:
    """Global index -> stream (dataset, shape): the shape drawn per global batch, the dataset per sample."""

    def __init__(self, seed: int, weights: list[float], streams: list[Stream], global_batch: int, origin: int = 0):
        self.seed, self.streams, self.global_batch, self.origin = seed, streams, global_batch, origin
        totals = {}
        for s in streams:
            totals[s.dataset] = totals.get(s.dataset, 0) + sum(s.counts)
        mass = np.asarray([weights[s.dataset] * sum(s.counts) / max(1, totals[s.dataset]) for s in streams])
        self.shapes = sorted({s.shape for s in streams})
        self.shape_mass = np.asarray([mass[[s.shape == sh for s in streams]].sum() for sh in self.shapes])
        # per shape: its streams and their weights within the shape
        self.by_shape = [np.asarray([i for i, s in enumerate(streams) if s.shape == sh]) for sh in self.shapes]
        self.mass = mass

    def choices(self, start: int, stop: int) -> np.ndarray:
        """The stream of every global index in [start, stop)."""
        g = np.arange(start, stop, dtype=np.int64)
        out = np.empty(len(g), dtype=np.int64)
        if len(self.shapes) == 1:
            shape_of = np.zeros(len(g), dtype=np.int64)
        else:
            if start < self.origin:
                raise ValueError(f"global index {start} precedes the batch origin {self.origin}")
            blocks = (g - self.origin) // self.global_batch
            shape_of = _pick(_uniform(self.seed ^ 0x5EED5A3E, blocks.astype(np.uint64)), self.shape_mass)
        u = _uniform(self.seed, g.astype(np.uint64))
        for j, ids in enumerate(self.by_shape):
            m = shape_of == j
            if m.any():
                out[m] = ids[_pick(u[m], self.mass[ids])] if len(ids) > 1 else ids[0]
        return out


class BucketedMix(GlobalMix):
    """Global index -> stream with data.buckets: index g belongs to step g // stride, whose shape is the
    bucket drawn for that step; g mod stride >= the bucket's samples is unused (-1). ``table``: a
    ``BucketTable`` (stride, buckets, draw)."""

    def __init__(self, seed: int, weights: list[float], streams: list[Stream], table):
        super().__init__(seed, weights, streams, table.stride, 0)
        self.table = table
        missing = [b.describe() for b in table.buckets if b.weight > 0 and b.shape not in self.shapes]
        if missing:
            have = ", ".join("x".join(map(str, sh)) for sh in self.shapes)
            raise ValueError(f"{'; '.join(missing)}: no dataset holds this latent shape (shapes present: {have}); "
                             "give the bucket weight 0 or add a dataset of it")
        self._shape_of_bucket = np.asarray([self.shapes.index(b.shape) if b.shape in self.shapes else -1
                                            for b in table.buckets])

    def step_bucket(self, steps: np.ndarray) -> np.ndarray:
        return np.asarray([self.table.draw(self.seed, int(s)) for s in steps], dtype=np.int64)

    def choices(self, start: int, stop: int) -> np.ndarray:
        """The stream of every global index in [start, stop); -1 where the index is unused."""
        g = np.arange(start, stop, dtype=np.int64)
        out = np.full(len(g), -1, dtype=np.int64)
        if not len(g):
            return out
        stride = self.table.stride
        steps, j = g // stride, g % stride
        first = int(steps[0])
        buckets = self.step_bucket(np.arange(first, int(steps[-1]) + 1))[steps - first]
        samples = np.asarray([b.samples for b in self.table.buckets])[buckets]
        shape_of = self._shape_of_bucket[buckets]
        used = j < samples
        u = _uniform(self.seed, g.astype(np.uint64))
        for k, ids in enumerate(self.by_shape):
            m = used & (shape_of == k)
            if m.any():
                out[m] = ids[_pick(u[m], self.mass[ids])] if len(ids) > 1 else ids[0]
        return out


@dataclass
class GlobalCursor:
    """Global samples consumed (``index``) and how many of them each stream gave (``counts``)."""

    index: int
    counts: list[int]

    def advanced(self, stop: int, mix: GlobalMix, chunk: int = 1 << 20) -> GlobalCursor:
        """The cursor at global index ``stop`` (>= index): the draws of [index, stop) counted, in chunks."""
        if stop < self.index:
            raise ValueError(f"cannot move a data cursor back from {self.index} to {stop}")
        counts, g = np.asarray(self.counts, dtype=np.int64), self.index
        while g < stop:
            hi = min(stop, g + chunk)
            c = mix.choices(g, hi)
            counts += np.bincount(c[c >= 0], minlength=len(counts))  # -1: an unused index (BucketedMix)
            g = hi
        return GlobalCursor(stop, counts.tolist())

    def state(self) -> dict:
        return {"index": self.index, "counts": list(self.counts)}


class StreamOrder:
    """Stream-local index k -> (shard, sample number among the shard's samples of the stream's shape).

    ``index``: the stream's identity in the generator keys (dataset, shape number)."""

    def __init__(self, index: tuple[int, ...], counts: list[int], seed: int, resampled: bool, window: int):
        self.d, self.counts, self.seed, self.resampled = index, np.asarray(counts, dtype=np.int64), seed, resampled
        self.total = int(self.counts.sum())
        self.window = max(1, min(window, len(counts)))
        self.slots = max(1, round(self.total / max(1, int((self.counts > 0).sum()))))  # L (resampled)
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
        return np.random.default_rng([self.seed, *self.d, *ids])

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
        shards, samples = self._memo(("block", b), lambda: self._block(b, per))
        return int(shards[j]), int(samples[j])

    def _block(self, b: int, per: int) -> tuple[np.ndarray, np.ndarray]:
        """Block b's ``per`` slots as (shard, sample) arrays: a window of a stream of whole shards drawn
        uniformly (each visited in a fresh permutation of its samples), entered at a point that is uniform
        over all N samples (a shard drawn by sample count, at a uniform offset in it); the slots permuted.

        Every slot is then a uniform draw over the N samples, so each sample's expectation is per / N in
        every block, and a sample repeats only when its shard is drawn again (no L-slot bursts of a short
        shard)."""
        rng = self._rng(b, 23)
        live = np.flatnonzero(self.counts > 0)
        first = int(rng.choice(len(self.counts), p=self.counts / self.total))
        skip = int(rng.integers(self.counts[first]))
        drawn, have = [np.asarray([first])], int(self.counts[first]) - skip
        while have < per:  # enough uniform draws to fill the block (mean shard count: 1 / that many per draw)
            more = live[rng.integers(len(live), size=max(1, 2 * -(-(per - have) * len(live) // self.total)))]
            drawn.append(more)
            have += int(self.counts[more].sum())
        ids = np.concatenate(drawn)
        sizes = self.counts[ids]
        visit = np.repeat(np.arange(len(ids)), sizes)  # visit number of each position of the stream
        # a fresh permutation of each visited shard's samples: sort random keys within each visit
        within = np.empty(len(visit), dtype=np.int64)
        within[np.lexsort((rng.random(len(visit)), visit))] = np.arange(len(visit)) - np.repeat(
            np.cumsum(sizes) - sizes, sizes)
        # within[pos] is pos's rank within its visit after the sort; it serves as the sample number
        window = slice(skip, skip + per)
        order = rng.permutation(per)
        return ids[visit[window]][order], within[window][order]


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


def scan_shapes(where: str) -> list[tuple[int, tuple[int, int, int]]]:
    """(offset, latent (T, H, W)) of each readable sample of a shard: its JSON and safetensors header only
    (multi-shape shards of datasets written before the writer recorded ``sample_shapes``)."""
    out = []
    try:
        with remote.open_shard(where, 0) as f:
            for smp in iter_samples(f, 0, where, lazy=True):
                out.append((smp.offset, tuple(smp.shape[1:])))
    except (FormatError, OSError):
        pass
    return out


@dataclass
class ShardIndex:
    """Random access to one dataset's samples by (shard, shape, sample number among that shape's): the
    writer's recorded offsets and per-sample shapes (manifest ``shards[i].offsets`` / ``sample_shapes``)
    or, for datasets written before they were recorded, one scan per shard and process, cached: of the
    tar headers for a single-shape shard, of each sample's JSON + safetensors header for a mixed one."""

    paths: list[str]
    recorded: list[list[int] | None]
    sample_shapes: list[list[int] | None]  # per shard: index into ``shard_shapes[shard]`` per sample
    shard_shapes: list[list[tuple[int, int, int]]]  # per shard: its (T, H, W) shapes, the manifest's key order
    files: ShardFiles = field(init=False)

    def __post_init__(self):
        self.files = ShardFiles(self.paths)
        self._offsets: dict[tuple, list[int]] = {}

    def offsets(self, shard: int, shape: tuple[int, int, int]) -> list[int]:
        if (shard, shape) in self._offsets:
            return self._offsets[shard, shape]
        shapes = self.shard_shapes[shard] if shard < len(self.shard_shapes) else []
        rec = self.recorded[shard] if shard < len(self.recorded) else None
        if len(shapes) <= 1:
            offs = list(rec) if rec is not None else scan_offsets(self.paths[shard])
            self._offsets[shard, shapes[0] if shapes else shape] = offs
            self._offsets.setdefault((shard, shape), [])  # another shape: none in this shard
            return self._offsets[shard, shape]
        ids = self.sample_shapes[shard] if shard < len(self.sample_shapes) else None
        if rec is not None and ids is not None and len(ids) == len(rec):
            pairs = [(o, shapes[i]) for o, i in zip(rec, ids)]
        else:
            pairs = scan_shapes(self.paths[shard])
        for sh in shapes:
            self._offsets[shard, sh] = [o for o, x in pairs if x == sh]
        self._offsets.setdefault((shard, shape), [])
        return self._offsets[shard, shape]

    @property
    def streamed(self) -> bool:
        """Whether a shard can only be streamed from its start (pipe:), so reads are batched per shard."""
        return bool(self.paths) and remote.scheme(self.paths[0]) == "pipe"

    def offset(self, shard: int, shape: tuple[int, int, int], i: int) -> int:
        offs = self.offsets(shard, shape)
        if i >= len(offs):
            raise FormatError(f"{self.paths[shard]}: has {len(offs)} readable samples of latent {shape}, sample {i} "
                              "is missing (truncated or rewritten shard?)")
        return offs[i]

    def read(self, shard: int, shape: tuple[int, int, int], i: int) -> RawSample:
        return self.files.read(shard, self.offset(shard, shape, i))

    def read_many(self, shard: int, offsets: list[int]) -> dict[int, RawSample | Exception]:
        return self.files.read_many(shard, offsets)


class GlobalReader:
    """Reads stream-local index k of each stream, replacing an unreadable sample by the next readable k.

    pipe: datasets (a shard can only be streamed from its start): ``expect`` announces the (stream, k) of the
    coming batches; a read of a shard then streams it once for all of its announced samples, holding them
    until they are read, so a shard is streamed once per read-ahead horizon instead of once per sample."""

    def __init__(self, streams: list[Stream], orders: list[StreamOrder], indexes: list[ShardIndex]):
        self.streams, self.orders, self.indexes = streams, orders, indexes
        self.skipped: Counter[str] = Counter()
        self._pending: dict[tuple[int, int], Counter[int]] = {}  # (dataset, shard) -> announced offsets
        self._held: dict[tuple[int, int, int], RawSample] = {}  # (dataset, shard, offset) -> read ahead

    def _where(self, stream: int, k: int) -> tuple[int, int, int] | None:
        """(dataset, shard, offset) of stream-local index k of a pipe: dataset; None otherwise or if unknown."""
        st = self.streams[stream]
        index = self.indexes[st.dataset]
        if not index.streamed:
            return None
        shard, i = self.orders[stream].locate(k)
        offs = index.offsets(shard, st.shape)
        return (st.dataset, shard, offs[i]) if i < len(offs) else None

    def expect(self, items: list[tuple[int, int]]) -> None:
        """(stream, k) that will be read (each once per announcement), in the coming batches."""
        for q, k in items:
            w = self._where(q, k)
            if w is not None:
                self._pending.setdefault(w[:2], Counter())[w[2]] += 1

    def read(self, stream: int, k: int) -> RawSample:
        order, st = self.orders[stream], self.streams[stream]
        index = self.indexes[st.dataset]
        w = self._where(stream, k)
        if w is not None and self._pending.get(w[:2], {}).get(w[2], 0) > 0:
            self._pending[w[:2]][w[2]] -= 1  # consumed (even if unreadable and replaced below)
        for j in range(k, k + order.total):
            shard, i = order.locate(j)
            try:
                s = self._read(st, index, shard, i)
            except (FormatError, OSError):
                self.skipped["corrupt_sample"] += 1
                continue
            if tuple(s.shape[1:]) != st.shape:
                self.skipped["wrong_shape"] += 1
                continue
            return s
        raise FormatError(f"dataset {index.paths[0].rsplit('/', 1)[0]}: no readable sample of latent shape "
                          f"{st.shape} in a whole epoch of it ({order.total} tried)")

    def _read(self, st: Stream, index: ShardIndex, shard: int, i: int) -> RawSample:
        if not index.streamed:
            return index.read(shard, st.shape, i)
        off = index.offset(shard, st.shape, i)
        pending = self._pending.setdefault((st.dataset, shard), Counter())
        key = (st.dataset, shard, off)
        if key not in self._held:  # stream the shard once for this sample and every announced one
            wanted = sorted({off, *(o for o, n in pending.items() if n > 0)})
            for o, s in index.read_many(shard, wanted).items():
                if isinstance(s, RawSample):
                    self._held[(st.dataset, shard, o)] = s
                elif o == off:
                    raise s
        s = self._held[key] if pending.get(off, 0) > 0 else self._held.pop(key)
        for o in [o for o, n in pending.items() if n <= 0]:  # keep only what is still to be read
            del pending[o]
            if o != off:
                self._held.pop((st.dataset, shard, o), None)
        if not pending:
            del self._pending[st.dataset, shard]
        return s
