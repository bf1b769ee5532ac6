"""Streaming reader of latent shards for training: ``build_shard_loader``.

The chain, per DataLoader worker (one logical worker = one deterministic stream):

    SampleStream per dataset (shards split by DP rank and worker / resampled, tar, shuffle)
      -> weighted mix of the datasets (one RNG draw per sample)
      -> ShapeBucketer (same latent shape -> one batch tensor)
      -> collate: decode safetensors, normalise (x - shift) * scale, pad text to text_len

Every batch carries its worker's position; ``ShardLoader`` keeps the position of the last
batch the trainer *received* from each worker (prefetched batches do not count), so
``state_dict()`` after step N restores to exactly batch N+1. See docs/shard_format.md.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megassm.config.schema import DataConfig
from megassm.data import handoff, remote
from megassm.data.buckets import ShapeBucketer
from megassm.data.fingerprint import checked_position, dataset_fingerprint
from megassm.data.format import load_tensors, parse_shape_key, shape_key
from megassm.data.global_order import (
    BucketedMix,
    GlobalCursor,
    GlobalMix,
    GlobalReader,
    ShardIndex,
    Stream,
    StreamOrder,
)
from megassm.data.handoff import DataStallError  # noqa: F401  (re-exported)
from megassm.data.manifest import load_manifest
from megassm.data.stream import SampleStream, rng_from, rng_state
from megassm.data.tario import RawSample
from megassm.data.token_budget import BucketSchedule, PendingByShape
from megassm.data.watch import ReadBoard, attach
from megassm.data.worker_signals import keep_workers_on_foreign_sigterm
from megassm.encoders.latent_norm import LatentNorm

log = logging.getLogger("megassm.data")
STATE_VERSION = 1
TEXT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DatasetSpec:
    path: str
    shards: list[str]
    counts: list[int]
    norm: LatentNorm  # the dataset's (x - shift) * scale
    fingerprint: str
    shapes: frozenset | None = None  # latent (T, H, W) shapes of the manifest's histogram; None: not recorded
    offsets: list[list[int] | None] | None = None  # per shard, its samples' byte offsets if the writer recorded them
    sample_shapes: list[list[int] | None] | None = None  # per mixed shard: each sample's shape (index into its shapes)
    shard_shapes: list[dict[tuple, int]] | None = None  # per shard: latent (T, H, W) -> count, the manifest's order

    def streams(self, dataset: int) -> list[Stream]:
        """One ``Stream`` per latent shape of this dataset (data.order=global), from the shards' histograms."""
        if not self.shard_shapes or any(not s for s in self.shard_shapes):
            raise ValueError(f"dataset {self.path}: its manifest records no per-shard shapes (shards[i].shapes); "
                             "data.order=global needs them: re-run `megassm preprocess`, or use data.order=rank")
        shapes = sorted({sh for s in self.shard_shapes for sh in s})
        return [Stream(dataset, sh, [int(s.get(sh, 0)) for s in self.shard_shapes]) for sh in shapes]


def load_datasets(cfg: DataConfig) -> list[DatasetSpec]:
    """Manifests of ``cfg.paths``, checked to be mixable (same latent channels and text dim)."""
    if not cfg.paths:
        raise ValueError("data.paths is empty; list dataset directories written by `megassm preprocess`")
    norm = getattr(cfg, "latent_norm", "manifest")
    if norm not in ("manifest", "config"):
        raise ValueError(f"data.latent_norm={norm!r}; valid: manifest (each dataset's VAE scale/shift), "
                         "config (data.latent_scale / data.latent_shift for all)")
    specs, first = [], None
    for i, p in enumerate(cfg.paths):
        remote.check_location(str(p), f"data.paths[{i}]")
        m = load_manifest(p)
        if not m["shards"]:
            raise ValueError(f"dataset {p}: manifest lists no shards (every input was skipped? see "
                             f"{remote.join(p, m.get('skip_report', 'skipped.json'))})")
        dims = (m.get("latent_channels"), m.get("text_dim"))
        if first is None:
            first = (p, dims, m["vae"].get("fingerprint"))
        elif dims != first[1]:
            raise ValueError(f"datasets {first[0]} and {p} differ in (latent channels, text dim): {first[1]} vs "
                             f"{dims}; one model cannot train on both")
        elif m["vae"].get("fingerprint") != first[2]:
            warnings.warn(f"datasets {first[0]} and {p} were encoded with different VAEs", stacklevel=2)
        scale, shift = ((m["latent_scale"], m["latent_shift"]) if norm == "manifest"
                        else (cfg.latent_scale, cfg.latent_shift))
        shapes = frozenset(parse_shape_key(k)[1:] for k in m.get("shape_histogram", {})) or None
        specs.append(DatasetSpec(str(p), [remote.join(str(p), s["path"]) for s in m["shards"]],
                                 [int(s["samples"]) for s in m["shards"]], LatentNorm(scale, shift),
                                 dataset_fingerprint(m), shapes,
                                 [s.get("offsets") for s in m["shards"]], [s.get("sample_shapes") for s in m["shards"]],
                                 [_shard_shapes(s) for s in m["shards"]]))
    return specs


def _shard_shapes(entry: dict) -> dict[tuple, int]:
    """A manifest shard entry's {"CxTxHxW": n} as {(T, H, W): n}, in the writer's (sorted key) order."""
    return {parse_shape_key(k)[1:]: int(n) for k, n in sorted(entry.get("shapes", {}).items())}


def pack(items: list[tuple[int, RawSample]], specs: list[DatasetSpec], text_len: int,
         with_keys: bool) -> dict[str, Any]:
    """Worker side: [(dataset, sample)] of one latent shape -> a compact batch.

    latents: float32 (B, C, T, H, W), normalised; text stays in its stored dtype with only
    the stored tokens, concatenated: text (sum L_i, D), mask (sum L_i,), lengths [L_i] --
    4-8x fewer bytes through the worker->trainer shared memory than padded float32, which
    ``expand`` builds in the trainer process. Outputs go straight into shared memory.
    """
    tensors = [load_tensors(s.key, s.st_bytes, "") for _, s in items]
    lengths = [min(text_len, t["text"].shape[0]) for t in tensors]
    first = tensors[0]
    shared = get_worker_info() is not None
    lat = torch.empty((len(items), *first["latent"].shape), dtype=torch.float32)
    text = torch.empty(sum(lengths), first["text"].shape[1], dtype=first["text"].dtype)
    mask = torch.empty(sum(lengths), dtype=torch.bool)
    if shared:
        lat, text, mask = lat.share_memory_(), text.share_memory_(), mask.share_memory_()
    pos = 0
    for i, ((d, _), t, n) in enumerate(zip(items, tensors, lengths)):
        specs[d].norm.normalise_(lat[i].copy_(t["latent"]))  # (x - shift) * scale
        text[pos:pos + n].copy_(t["text"][:n])
        mask[pos:pos + n].copy_(t["text_mask"][:n])
        pos += n
    out = {"latents": lat, "text": text, "mask": mask, "lengths": lengths,
           "captions": [str(s.meta.get("caption", "")) for _, s in items]}
    if with_keys:
        out["keys"] = [f"{remote.dataset_name(specs[d].path)}/{s.key}" for d, s in items]
    return out


def expand(packed: dict[str, Any], text_len: int, text_dtype: torch.dtype, pin: bool) -> dict[str, Any]:
    """Trainer side: compact batch -> {"latents", "text" (B, text_len, D), "text_mask" (B, text_len), ...}."""
    lengths = packed["lengths"]
    B, D = len(lengths), packed["text"].shape[1]
    text = torch.empty(B, text_len, D, dtype=text_dtype, pin_memory=pin)
    mask = torch.empty(B, text_len, dtype=torch.bool, pin_memory=pin)
    pos = 0
    for i, n in enumerate(lengths):
        text[i, :n].copy_(packed["text"][pos:pos + n])  # every element written once (no zero-fill pass)
        text[i, n:].zero_()
        mask[i, :n].copy_(packed["mask"][pos:pos + n])
        mask[i, n:].zero_()
        pos += n
    lat = packed["latents"].pin_memory() if pin else packed["latents"]
    batch = {"latents": lat, "text": text, "text_mask": mask, "captions": packed["captions"]}
    if "keys" in packed:
        batch["keys"] = packed["keys"]
    return batch


def _expanding(loader: DataLoader, text_len: int, text_dtype: torch.dtype, pin: bool, **kw):
    """``handoff.batches`` of ``loader`` with the text expanded (``expand``) in the background thread."""
    return handoff.batches(loader, lambda packed: expand(packed, text_len, text_dtype, pin), **kw)


def collate(items: list[tuple[int, RawSample]], specs: list[DatasetSpec], text_len: int, with_keys: bool,
            text_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """[(dataset, sample)] -> trainer batch in one step (``pack`` then ``expand``)."""
    return expand(pack(items, specs, text_len, with_keys), text_len, text_dtype, False)


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


class ShardLoader:
    """Iterable of training batches with a saveable position.

    ``iter(loader)`` starts (or continues) from the current position; ``state_dict()`` is the
    position after the last batch yielded; ``load_state_dict()`` must come before ``iter``.
    """

    def __init__(self, cfg: DataConfig, *, batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 text_len: int, epochs: int | None = None, drop_last: bool = True, return_keys: bool = False,
                 schedule: BucketSchedule | None = None, global_batch: int | None = None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if batch_size < 1 or text_len < 1:
            raise ValueError(f"batch_size={batch_size} and text_len={text_len} must be >= 1")
        self.cfg, self.specs = cfg, load_datasets(cfg)
        weights = list(cfg.weights) or [1.0] * len(self.specs)
        if len(weights) != len(self.specs) or any(x < 0 for x in weights) or sum(weights) <= 0:
            raise ValueError(f"data.weights={list(cfg.weights)} must be {len(self.specs)} non-negative numbers "
                             "with a positive sum (one per data.paths entry)")
        self.weights = weights
        self.batch_size, self.dp_rank, self.dp_size, self.seed = batch_size, dp_rank, dp_size, seed
        self.text_len, self.epochs, self.drop_last, self.return_keys = text_len, epochs, drop_last, return_keys
        self.num_workers = int(cfg.num_workers)
        self.stall_timeout_s = float(getattr(cfg, "stall_timeout_s", 600.0))
        if not self.stall_timeout_s > 0:
            raise ValueError(f"data.stall_timeout_s={self.stall_timeout_s} must be > 0")
        # wait_hook(waited_s, reading): called while the trainer waits for a batch (each _POLL_S); may raise
        self.wait_hook = None
        tdt = getattr(cfg, "text_dtype", "bfloat16")
        if tdt not in TEXT_DTYPES:
            raise ValueError(f"data.text_dtype={tdt!r}; valid: {sorted(TEXT_DTYPES)}")
        self.text_dtype = TEXT_DTYPES[tdt]
        nw = max(1, self.num_workers)
        self.order = getattr(cfg, "order", "rank")
        self.window = int(getattr(cfg, "window_shards", 8))
        if self.order not in ("rank", "global"):
            raise ValueError(f"data.order={self.order!r}; valid: global (layout-independent), rank (per-rank streams)")
        self._received, self._skipped = 0, {}
        self.schedule = schedule
        if self.order == "global":
            if schedule is not None and (schedule.dp_size, schedule.dp_rank) != (dp_size, dp_rank):
                raise ValueError(f"the bucket schedule is laid out for dp rank {schedule.dp_rank} of "
                                 f"{schedule.dp_size}; this loader is rank {dp_rank} of {dp_size}")
            # the shape is drawn per global batch: G = micro-batch x grad_accum x dp (the Trainer passes it);
            # with data.buckets per step by the schedule, over the indices [step x stride, + S_b)
            self.global_batch = schedule.table.stride if schedule else int(global_batch or batch_size * dp_size)
            if schedule is None and self.global_batch % (batch_size * dp_size):
                raise ValueError(f"global_batch={self.global_batch} must be a multiple of batch_size x dp_size = "
                                 f"{batch_size} x {dp_size}")
            self.streams = [st for d, spec in enumerate(self.specs) for st in spec.streams(d)]
            self._set_base(GlobalCursor(0, [0] * len(self.streams)), origin=0)
        elif not cfg.resampled:
            for s in self.specs:
                if len(s.shards) < dp_size * nw:
                    raise ValueError(f"dataset {s.path} has {len(s.shards)} shards, fewer than dp_size x workers = "
                                     f"{dp_size} x {nw}; without resampling each worker needs a shard. Use "
                                     "data.resampled=true, fewer data.num_workers, or more shards")
        if schedule is not None:
            for b in schedule.table.buckets:
                if b.weight > 0 and not any(s.shapes is None or b.shape in s.shapes for s in self.specs):
                    raise ValueError(f"{b.describe()} appears in no dataset's shape histogram ("
                                     f"{', '.join(s.path for s in self.specs)}); the reader would wait for it forever")
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
        if self.order == "global":
            yield from self._iter_global()
            return
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

    def _batches(self, ds: IterableDataset):
        """(batch, position) pairs of ``ds`` over the loader workers, text expanded in a background thread."""
        kw = {}
        if self.num_workers > 0:
            kw = {"prefetch_factor": max(1, int(getattr(self.cfg, "prefetch", 2))), "persistent_workers": False,
                  "worker_init_fn": keep_workers_on_foreign_sigterm}  # srun's SIGTERM is the trainer's to act on
        ds.board = ReadBoard(self.num_workers)  # where each worker reads, for a stall's error message
        loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers, **kw)
        yield from _expanding(loader, self.text_len, self.text_dtype, torch.cuda.is_available(), board=ds.board,
                              stall_timeout_s=self.stall_timeout_s, wait_hook=self.wait_hook)

    def _mark_micro_batch(self, batch: dict, micro: int) -> None:
        """data.buckets: the schedule's micro-batch ``micro`` is what this batch is (its worker computed the
        same): its shape checked, its sample indices and the step's sample / token counts attached."""
        mb = self.schedule.micro_batch(micro)
        assert tuple(batch["latents"].shape[2:]) == mb.shape, (batch["latents"].shape, mb)
        batch.update(sample_index=mb.sample_index, step_samples=mb.step_samples, step_tokens=mb.step_tokens,
                     bucket=mb.bucket)

    # ---------------------------------------------------------------- data.order=global
    def _iter_global(self):
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
        if self.order == "global":
            skipped: Counter[str] = Counter()
            for v in self._skipped.values():
                skipped.update(v)
            cur = self.global_cursor()
            epochs = [0] * len(self.specs)
            for c, st in zip(cur.counts, self.streams):
                epochs[st.dataset] = max(epochs[st.dataset], c // max(1, sum(st.counts)))
            return {"batches": self._received, "skipped": dict(skipped), "epochs": epochs}
        skipped: Counter[str] = Counter()
        for pos in self._workers.values():
            for st in pos["streams"]:
                skipped.update(st["skipped"])
        return {"batches": sum(p["batches"] for p in self._workers.values()), "skipped": dict(skipped),
                "epochs": [max((p["streams"][i]["epoch"] for p in self._workers.values()), default=0)
                           for i in range(len(self.specs))]}

    def state_dict(self) -> dict[str, Any]:
        if self.order == "global":  # identical on every rank (at a step boundary) and for every layout
            if self.schedule is not None and self._received % self.schedule.grad_accum:
                raise ValueError(f"data.buckets with data.order=global: the cursor is saved at a step boundary; "
                                 f"{self._received} batches are {self._received % self.schedule.grad_accum} "
                                 f"micro-batches into a step of grad_accum={self.schedule.grad_accum}")
            return {"version": STATE_VERSION, "order": "global", **self.global_cursor().state(),
                    "global_batch": self.global_batch, "origin": self._origin, "key": self._global_key()}
        return {"version": STATE_VERSION, "layout": self._layout(), "workers": copy.deepcopy(self._workers),
                "next_worker": self._next, "generation": self._generation, "start_epoch": self._start_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data position has version {state.get('version')!r}; this reader writes "
                             f"{STATE_VERSION}")
        saved = state.get("order", "rank")
        if saved != self.order:
            raise ValueError(f"data position was saved with data.order={saved}, this loader has data.order="
                             f"{self.order}: per-rank stream positions and the global cursor do not convert into "
                             f"each other. Resume with data.order={saved}, or warm-start a new run with init_from")
        state = checked_position(state, [[s.path, s.fingerprint] for s in self.specs],
                                 getattr(self.cfg, "allow_dataset_change", False))
        if self.order == "global":
            return self._load_global(state)
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

    def _load_global(self, state: dict[str, Any]) -> None:
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


def build_shard_loader(cfg: DataConfig, *, batch_size: int, dp_rank: int, dp_size: int, seed: int,
                       text_len: int, **kwargs: Any) -> ShardLoader:
    # kwargs may hold schedule= (data.buckets: megassm.data.token_budget.BucketSchedule)
    """Training batches from latent shards, split by *data-parallel* rank.

    Yields {"latents": float32 (B, C, T, H, W) normalised as (x - shift) * scale,
            "text": (B, text_len, D) ``cfg.text_dtype`` (default bfloat16, as stored), zero beyond each caption,
            "text_mask": bool (B, text_len) True = token, "captions": list[str]},
    every batch one latent shape. Infinite unless ``epochs=`` is given (kwargs: epochs,
    drop_last, return_keys -- for evaluation/tests). Position: ``state_dict()`` /
    ``load_state_dict()``; corrupt-sample counts: ``stats()``.
    """
    return ShardLoader(cfg, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=seed,
                       text_len=text_len, **kwargs)
