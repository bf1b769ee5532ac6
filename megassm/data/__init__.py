"""Training data: the built-in procedural set and streamed latent shards (``megassm preprocess``)."""

from __future__ import annotations

from megassm.config.schema import DataConfig


def build_dataloader(cfg: DataConfig, *, batch_size: int, dp_rank: int, dp_size: int, seed: int,
                     text_dim: int, text_len: int, schedule=None, global_batch: int | None = None):
    """An iterable of batches {"latents" (B,C,T,H,W), "text" (B,Lt,Dt), "text_mask" (B,Lt), "captions"}
    with ``state_dict()`` / ``load_state_dict()`` for the data position.

    ``schedule`` (a ``megassm.data.token_budget.BucketSchedule``, for data.buckets): batch k is that
    schedule's micro-batch k and also carries "sample_index", "step_samples", "step_tokens" and "bucket".
    ``global_batch``: samples per optimizer step over all ranks (shards in data.order=global draw one latent
    shape per global batch)."""
    if cfg.kind == "procedural":
        from megassm.data.procedural import ProceduralShapes

        return ProceduralShapes(cfg.image_size, batch_size, text_dim, text_len, dp_rank, dp_size, seed, cfg.frames,
                                schedule=schedule)
    from megassm.data.reader import build_shard_loader

    return build_shard_loader(cfg, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=seed,
                              text_len=text_len, schedule=schedule,
                              **({"global_batch": global_batch} if cfg.order == "global" else {}))
