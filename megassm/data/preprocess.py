"""``megassm preprocess``: images/videos + captions -> latent shards + manifest.

One process per rank (srun / torchrun / by hand with --rank/--world-size). Each rank:
1. lists every task (identically on all ranks) and takes task i iff i % world == rank;
2. skips tasks whose progress record exists (resume);
3. decodes + buckets media in DataLoader workers, encodes same-bucket batches with the VAE
   and the text encoder (GPU when present, fp16/bf16), writes each shard under a temporary
   name and renames it when complete, then writes the task's record;
4. when every task has a record (whichever rank sees it), writes manifest.json/skipped.json.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from megassm.config.schema import EncoderConfig
from megassm.data import remote
from megassm.data.buckets import DEFAULT_ASPECT_RATIOS, ResolutionBuckets
from megassm.data.format import STORE_DTYPES, LatentSample
from megassm.data.manifest import PROGRESS_DIR, RUN_INFO, load_record, record_path, try_finalize
from megassm.data.sources import (
    Decoded,
    DecodeDataset,
    DecodeSettings,
    Skipped,
    TaskPartDone,
    _media_kind,
    discover,
    rank_tasks,
)
from megassm.data.upload import RemoteOutput
from megassm.data.writer import LatentShardWriter, atomic_write_json
from megassm.encoders import DTYPES, TextEncoder, VAEEncoder, identity_summary, pick_device

log = logging.getLogger("megassm.preprocess")


@dataclass
class PreprocessOptions:
    inputs: list[str]
    output: str
    vae: str
    text_encoder: str
    tokenizer: str | None = None
    resolution: str = "256"
    aspect_ratios: str = DEFAULT_ASPECT_RATIOS
    bucket_multiple: int = 16
    frames: int = 1
    fps: float = 16.0
    min_side: int = 0
    text_max_length: int = 512
    keep_text_padding: bool = False
    missing_caption: str = "skip"
    caption_ext: str = "txt"
    samples_per_shard: int = 1000
    batch_size: int = 16
    video_batch_size: int = 1
    num_workers: int = 4
    decode_isolation: str = "process"  # process: PyAV/Pillow run in a child process per worker | none
    decode_timeout: float = 300.0  # seconds per file before a hung decoder is killed
    device: str = "auto"
    dtype: str = "auto"  # compute dtype: auto = bf16 on GPU, fp32 on CPU
    store_dtype: str = "bf16"
    latent_scale: float | None = None
    latent_shift: float | None = None
    vae_tiling: bool = False
    rank: int | None = None
    world_size: int | None = None
    staging: str | None = None  # local directory for shards before upload, when output is a URL
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def rank_and_world(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """Explicit values, else RANK/WORLD_SIZE (torchrun), else SLURM_PROCID/SLURM_NTASKS (srun), else 0/1."""
    env = os.environ
    if rank is None:
        rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    if world is None:
        world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, world size {world}) -- check --rank/--world-size "
                         "or RANK/WORLD_SIZE, SLURM_PROCID/SLURM_NTASKS")
    return rank, world


def _settings(o: PreprocessOptions, buckets: ResolutionBuckets) -> dict[str, Any]:
    return {"buckets": buckets.to_json(), "resolution": o.resolution, "aspect_ratios": o.aspect_ratios,
            "frames": o.frames, "fps": o.fps, "min_side": o.min_side, "text_max_length": o.text_max_length,
            "keep_text_padding": o.keep_text_padding, "missing_caption": o.missing_caption,
            "samples_per_shard": o.samples_per_shard}


def _changed(key: str, old: Any, new: Any) -> str:
    """'settings.resolution: was '256', now '512'' -- the entries of two settings that differ, not both dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        short = lambda v: repr(v) if len(repr(v)) <= 60 else f"{type(v).__name__} of {len(v)}"  # noqa: E731
        return "; ".join(f"{key}.{k}: was {short(old.get(k))}, now {short(new.get(k))}" for k in keys)
    what = "inputs (tasks)" if key == "num_tasks" else key
    return f"{what}: was {old!r}, now {new!r}"


def _check_run_info(out: Path, info: dict) -> None:
    """First run writes .progress/run.json; a resumed run must match it (else mixed shards)."""
    p = out / PROGRESS_DIR / RUN_INFO
    if p.is_file():
        old = json.loads(p.read_text())
        for k in ("num_tasks", "settings", "dtype", "latent_scale", "latent_shift"):
            if old.get(k) != info[k]:
                raise ValueError(f"{out} was started with other {_changed(k, old.get(k), info[k])}; resume with "
                                 "the same inputs and options, or write to a new --output directory")
        for k in ("vae", "text_encoder"):
            if old[k]["fingerprint"] != info[k]["fingerprint"]:
                raise ValueError(f"{out} was started with {k} {old[k]['path']} (fingerprint "
                                 f"{old[k]['fingerprint']}), now {info[k]['path']} ({info[k]['fingerprint']}); "
                                 "use the same encoder or a new --output directory")
        return
    atomic_write_json(p, info)


class ShardBuilder:
    """One task's output: pending same-bucket items, the open writer, the skip list."""

    def __init__(self, out: Path, task: int):
        self.task, self.out = task, out
        self.writer = LatentShardWriter(out / f"shard-{task:06d}.tar")
        self.pending: dict[tuple, list[Decoded]] = {}
        self.skipped: list[dict] = []
        self.items = self.parts_done = self.captions_truncated = 0

    def skip(self, source: str, reason: str, detail: str) -> None:
        self.skipped.append({"source": source, "reason": reason, "detail": detail[:500]})

    def finish(self, rank: int) -> dict:
        shard = self.writer.close() if self.writer.samples else None
        if shard is None:
            self.writer.abort()  # nothing valid in this task: no empty shard
        rec = {"task": self.task, "shard": shard, "items": self.items, "skipped": self.skipped,
               "captions_truncated": self.captions_truncated, "rank": rank}
        atomic_write_json(record_path(self.out, self.task), rec)
        return rec


class Preprocessor:
    def __init__(self, o: PreprocessOptions):
        self.o = o
        self.rank, self.world = rank_and_world(o.rank, o.world_size)
        # a URL output (s3://, gs://): shards are staged in a local directory and uploaded one by one
        self.remote = None if remote.is_local(o.output) else RemoteOutput(o.output, o.staging)
        self.out = self.remote.staging if self.remote else Path(remote.local_path(o.output))
        if o.missing_caption not in ("skip", "empty"):
            raise ValueError(f"--missing-caption={o.missing_caption!r}; valid: skip, empty")
        if o.decode_isolation not in ("process", "none"):
            raise ValueError(f"--decode-isolation={o.decode_isolation!r}; valid: process, none")
        if o.decode_timeout <= 0:
            raise ValueError(f"--decode-timeout={o.decode_timeout} must be > 0 seconds")
        if o.store_dtype not in STORE_DTYPES:
            raise ValueError(f"--store-dtype={o.store_dtype!r}; valid: {sorted(STORE_DTYPES)}")
        self.device = pick_device(o.device)
        dt = o.dtype if o.dtype != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        if dt not in DTYPES:
            raise ValueError(f"--dtype={o.dtype!r}; valid: auto, {', '.join(DTYPES)}")
        self.dtype, self.store = DTYPES[dt], STORE_DTYPES[o.store_dtype]
        self.buckets = ResolutionBuckets.build(o.resolution, o.aspect_ratios, o.bucket_multiple)
        self.tasks = discover(o.inputs, o.samples_per_shard, o.caption_ext)  # bad --input: before the encoders load
        self.vae = VAEEncoder(o.vae, self.device, self.dtype, o.latent_scale, o.latent_shift, o.vae_tiling)
        if self.vae.is_video and (o.frames - 1) % self.vae.temporal_stride:
            raise ValueError(f"--frames={o.frames}: this VAE compresses time by {self.vae.temporal_stride}, so "
                             f"frames must be 1 + k*{self.vae.temporal_stride} (e.g. "
                             f"{1 + 32 * self.vae.temporal_stride})")
        self._warn_single_frame_videos()
        self.text = TextEncoder(EncoderConfig(text_encoder=str(o.text_encoder), tokenizer=o.tokenizer), None,
                                self.device, self.dtype, max_length=o.text_max_length)
        self.sample_meta = {"vae": identity_summary(self.vae.identity),
                            "text_encoder": identity_summary(self.text.identity),
                            "latent_scale": self.vae.latent_scale, "latent_shift": self.vae.latent_shift}

    def _warn_single_frame_videos(self) -> None:
        """Videos under --frames 1 (the default) become one-frame images: said, not done silently."""
        videos = sum(_media_kind(it.path or it.source) == "video" for t in self.tasks for it in t.items)
        if videos and self.o.frames == 1 and self.rank == 0:
            s = self.vae.temporal_stride
            log.warning("%d inputs are videos and --frames is 1 (the default): each is encoded as a single-frame "
                        "image. To keep the motion give --frames 1 + k*%d (this VAE's temporal stride), e.g. "
                        "--frames %d; --frames counts frames of the video at --fps (as `megassm sample --frames`)",
                        videos, s, 1 + 32 * s if self.vae.is_video else 33)

    def run(self) -> dict[str, Any]:
        o = self.o
        tasks = self.tasks
        (self.out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
        if self.remote:
            self.remote.pull()
        info = {"num_tasks": len(tasks), "settings": _settings(o, self.buckets), "vae": self.vae.identity,
                "text_encoder": self.text.identity, "latent_scale": self.vae.latent_scale,
                "latent_shift": self.vae.latent_shift,
                "dtype": {"latent": o.store_dtype, "text": o.store_dtype, "compute": str(self.dtype)}}
        _check_run_info(self.out, info)
        exists = self.remote.exists if self.remote else None
        if self.remote:
            self.remote.push_run_info()
        mine = rank_tasks(tasks, self.rank, self.world)
        todo = [t for t in mine if load_record(self.out, t.index, exists) is None
                or (self.remote and not self.remote.exists(self.remote.record_rel(record_path(self.out, t.index))))]
        log.info("rank %d/%d: %d tasks total, %d mine, %d already done", self.rank, self.world, len(tasks),
                 len(mine), len(mine) - len(todo))
        for t in todo:  # temporary shards of a run that died (any rank, any pid): never trusted, removed
            for stale in self.out.glob(f".{t.shard_name}.tmp-*"):
                stale.unlink(missing_ok=True)
        stats = self._process(todo) if todo else Counter()
        if self.remote:
            self.remote.pull()  # other ranks' records
        manifest = try_finalize(self.out, exists)
        if manifest is not None and self.remote:
            self.remote.push_dataset_files()
        return {"rank": self.rank, "world_size": self.world, "tasks": len(tasks), "done_before": len(mine) - len(todo),
                "processed": len(todo), "skipped": dict(stats), "manifest_written": manifest is not None,
                "manifest": manifest}

    def _process(self, todo) -> Counter:
        o = self.o
        settings = DecodeSettings(self.buckets, o.frames, o.fps, o.min_side, self.vae.is_video, o.missing_caption,
                                  o.decode_isolation if hasattr(os, "fork") else "none", o.decode_timeout)
        loader = DataLoader(DecodeDataset(todo, settings), batch_size=None, num_workers=o.num_workers,
                            prefetch_factor=4 if o.num_workers else None, collate_fn=lambda x: x)
        known = all(t.tar is None for t in todo)
        total = sum(len(t.items) for t in todo) if known else None
        bar = tqdm(total=total, unit="sample", desc=f"preprocess r{self.rank}", dynamic_ncols=True,
                   disable=not o.progress or self.rank != 0, smoothing=0.05)
        builders: dict[int, ShardBuilder] = {}
        skipped: Counter = Counter()
        done = 0
        for msg in loader:
            b = builders.get(msg.task) or builders.setdefault(msg.task, ShardBuilder(self.out, msg.task))
            if isinstance(msg, TaskPartDone):
                b.parts_done += 1
                if b.parts_done == msg.parts:
                    for items in list(b.pending.values()):
                        self._encode(b, items)
                    rec = b.finish(self.rank)
                    if self.remote:
                        self.remote.push_task(rec, self.remote.record_rel(record_path(self.out, msg.task)))
                    del builders[msg.task]
                    done += 1
                    if total is None and done:  # tar inputs: estimate the total from finished tasks
                        bar.total = int(bar.n / done * len(todo))
                    bar.set_postfix(shards=f"{done}/{len(todo)}", skipped=sum(skipped.values()))
                continue
            b.items += 1
            bar.update(1)
            if isinstance(msg, Skipped):
                b.skip(msg.source, msg.reason, msg.detail)
                skipped[msg.reason] += 1
                continue
            shape = tuple(msg.frames.pixels.shape)
            group = b.pending.setdefault(shape, [])
            group.append(msg)
            limit = o.video_batch_size if shape[0] > 1 else o.batch_size
            if len(group) >= limit:
                self._encode(b, b.pending.pop(shape))
        bar.close()
        for b in builders.values():  # only reached if a worker died mid-task
            b.writer.abort()
        return skipped

    def _encode(self, b: ShardBuilder, items: list[Decoded]) -> None:
        """Encode one same-shape batch; on failure retry one by one so only bad samples are lost."""
        try:
            samples = self._encode_batch(items)
        except Exception as e:  # OOM, NaN guard, a broken caption...: isolate the culprit
            if len(items) == 1:
                b.skip(items[0].source, "encode_failed", f"{type(e).__name__}: {e}")
                return
            for it in items:
                self._encode(b, [it])
            return
        for it, s in zip(items, samples):
            if s is None:
                b.skip(it.source, "nonfinite_latent", "VAE output has NaN/Inf")
            else:
                b.captions_truncated += int(s.meta.pop("_truncated"))
                b.writer.write(s)

    def _encode_batch(self, items: list[Decoded]) -> list[LatentSample | None]:
        px = torch.stack([it.frames.pixels for it in items]).to(self.device)  # (B, T, 3, H, W) uint8: 1/4 the H2D
        px = px.permute(0, 2, 1, 3, 4).float().div_(127.5).sub_(1.0)  # (B, 3, T, H, W) in [-1, 1]
        lat = self.vae.encode(px).float().cpu()  # (B, C, T', H', W')
        hid, mask, trunc = self.text.encode([it.caption for it in items])
        hid, mask = hid.float().cpu(), mask.cpu()
        out: list[LatentSample | None] = []
        for i, it in enumerate(items):
            if not torch.isfinite(lat[i]).all():
                out.append(None)
                continue
            n = int(mask[i].sum())
            keep = mask.shape[1] if self.o.keep_text_padding else n
            fr = it.frames
            meta = {"caption": it.caption, "source": it.source, "height": fr.src_height, "width": fr.src_width,
                    "bucket": list(fr.pixels.shape[-2:]), "frames": int(fr.pixels.shape[0]),
                    "source_frames": fr.src_frames, "fps": fr.fps, **self.sample_meta, "_truncated": trunc[i]}
            out.append(LatentSample(it.key, lat[i].to(self.store), hid[i, :keep].to(self.store),
                                    mask[i, :keep].clone(), meta))
        return out


def run_preprocess(options: PreprocessOptions) -> dict[str, Any]:
    """Run (or resume) preprocessing for this rank; returns a summary (see ``Preprocessor.run``)."""
    return Preprocessor(options).run()


def options_dict(o: PreprocessOptions) -> dict[str, Any]:
    return asdict(o)
