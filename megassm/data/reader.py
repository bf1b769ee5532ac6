"""Streaming reader of latent shards for training: ``build_shard_loader``, one loader per data.order.

    data.order=rank    ``rank_reader.py``: per data-parallel rank and worker streams (``stream.py``), mixed
                       and bucketed per worker; the position is each worker's stream state (layout-bound)
    data.order=global  ``global_reader.py``: the layout-independent order of ``global_order.py``; the
                       position is the global cursor (any dp / workers on resume)
    both               ``batches.py``: the datasets' manifests, decode + normalise (``pack``) in the
                       workers, text padding (``expand``) in the trainer's handoff thread, the DataLoader,
                       the position's common checks (``ShardLoader``)

Every batch's position is taken when the trainer *receives* it (prefetched batches do not count), so
``state_dict()`` after step N restores to exactly batch N+1. See docs/shard_format.md.
"""

from __future__ import annotations

from typing import Any

from megassm.config.schema import DataConfig
from megassm.data.batches import ShardLoader
from megassm.data.global_reader import GlobalOrderLoader
from megassm.data.handoff import DataStallError  # noqa: F401  (re-exported)
from megassm.data.rank_reader import RankOrderLoader


def build_shard_loader(cfg: DataConfig, *, batch_size: int, dp_rank: int, dp_size: int, seed: int,
                       text_len: int, **kwargs: Any) -> ShardLoader:
    """Training batches from latent shards, split by *data-parallel* rank.

    Yields {"latents": float32 (B, C, T, H, W) normalised as (x - shift) * scale,
            "text": (B, text_len, D) ``cfg.text_dtype`` (default bfloat16, as stored), zero beyond each caption,
            "text_mask": bool (B, text_len) True = token, "captions": list[str]},
    every batch one latent shape. Infinite unless ``epochs=`` is given (kwargs: epochs,
    drop_last, return_keys -- for evaluation/tests). Position: ``state_dict()`` /
    ``load_state_dict()``; corrupt-sample counts: ``stats()``. kwargs may hold schedule= (data.buckets:
    ``megassm.data.token_budget.BucketSchedule``) and global_batch= (data.order=global).
    """
    # an unknown data.order is refused by ShardLoader's checks, in their order
    cls = GlobalOrderLoader if getattr(cfg, "order", "rank") == "global" else RankOrderLoader
    return cls(cfg, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=seed, text_len=text_len, **kwargs)
