"""What both data orders share (``reader.py`` picks one): the datasets, the decode and the DataLoader.

    load_datasets: the manifests of data.paths, checked to be mixable (``DatasetSpec``)
    pack (worker side): [(dataset, sample)] of one latent shape -> a compact batch: decode safetensors,
        normalise (x - shift) * scale, text unpadded
    expand (trainer side, in ``handoff``'s background thread): the text padded to text_len
    ShardLoader: what a loader of either order checks and holds, its DataLoader over the workers (a
        ``ReadBoard`` for a stall's message, the wait hook), data.buckets' micro-batch marks, and the
        checks of a saved position common to both; the orders are ``rank_reader.RankOrderLoader`` (per-rank
        streams) and ``global_reader.GlobalOrderLoader`` (the layout-independent order).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megassm.config.schema import DataConfig
from megassm.data import handoff, remote
from megassm.data.fingerprint import checked_position, dataset_fingerprint
from megassm.data.format import load_tensors, parse_shape_key
from megassm.data.manifest import load_manifest
from megassm.data.tario import RawSample
from megassm.data.token_budget import BucketSchedule
from megassm.data.watch import ReadBoard
from megassm.data.worker_signals import keep_workers_on_foreign_sigterm
from megassm.encoders.latent_norm import LatentNorm

STATE_VERSION = 1
TEXT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ORDERS = ("rank", "global")


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


class ShardLoader(ABC):
    """Iterable of training batches with a saveable position (the part both orders share).

    ``iter(loader)`` starts (or continues) from the current position; ``state_dict()`` is the
    position after the last batch yielded; ``load_state_dict()`` must come before ``iter``. A subclass
    per data.order: ``_init_order`` (its checks and start position), ``__iter__``, ``stats``,
    ``state_dict`` and ``_load`` (a checked saved position).
    """

    order = "rank"

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
        order = getattr(cfg, "order", "rank")
        if order not in ORDERS:
            raise ValueError(f"data.order={order!r}; valid: global (layout-independent), rank (per-rank streams)")
        self.window = int(getattr(cfg, "window_shards", 8))
        self.schedule = schedule
        self._init_order(global_batch)
        if schedule is not None:
            for b in schedule.table.buckets:
                if b.weight > 0 and not any(s.shapes is None or b.shape in s.shapes for s in self.specs):
                    raise ValueError(f"{b.describe()} appears in no dataset's shape histogram ("
                                     f"{', '.join(s.path for s in self.specs)}); the reader would wait for it forever")

    @abstractmethod
    def _init_order(self, global_batch: int | None) -> None:
        """This order's own checks and start position (after the common checks, before the buckets')."""

    @abstractmethod
    def __iter__(self):
        """Batches from the current position (module doc of ``reader.py``: the batch dict)."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Batches yielded and corrupt/skipped samples per reason (over all workers, this rank)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch the trainer received."""

    @abstractmethod
    def _load(self, state: dict[str, Any]) -> None:
        """Continue from a saved position (its version, order and datasets checked by ``load_state_dict``)."""

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
        self._load(state)

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
