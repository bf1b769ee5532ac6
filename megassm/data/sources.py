"""Preprocessing inputs: discovery, task split, and the DataLoader dataset that decodes them.

Inputs are one of
- a folder of images/videos with sidecar captions (``a/b.jpg`` + ``a/b.txt``),
- a CSV or JSONL manifest (columns ``path`` + ``caption``; paths relative to the manifest),
- WebDataset tar shards of images/videos with ``.txt`` / ``.caption`` / ``.json`` captions.

The work is cut into *tasks*, one per output shard: ``samples_per_shard`` consecutive files
(sorted by path) or one input tar. Task ``i`` always writes ``shard-{i:06d}.tar``, so output
names do not depend on the number of ranks, and resuming with another world size works.
"""

from __future__ import annotations

import csv
import hashlib
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from megassm.data.buckets import ResolutionBuckets
from megassm.data.format import make_key
from megassm.data.media import IMAGE_EXTS, VIDEO_EXTS, Frames, SkipSample
from megassm.data.sandbox import DecodeSandbox, decode_in_process
from megassm.data.tario import split_key

CAPTION_KEYS = ("caption", "text", "prompt")
PATH_KEYS = ("path", "file", "file_name", "filename", "image", "video")


class InputError(ValueError):
    """The input location or manifest is unusable; the message says where and what is valid."""


@dataclass
class InputItem:
    source: str  # relative path (folder/manifest) or "<tar name>/<key>" -- reported and stored
    path: str | None = None
    caption: str | None = None
    caption_path: str | None = None


@dataclass
class Task:
    index: int
    items: list[InputItem] = field(default_factory=list)  # folder / manifest mode
    tar: str | None = None  # tar mode

    @property
    def shard_name(self) -> str:
        return f"shard-{self.index:06d}.tar"


def _media_kind(name: str) -> str | None:
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return "image" if ext in IMAGE_EXTS else "video" if ext in VIDEO_EXTS else None


def _manifest_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{i}: not valid JSON ({e}); each line must be an object "
                                 '{"path": ..., "caption": ...}') from None
    return rows


def _from_manifest(path: Path) -> list[InputItem]:
    rows, items = _manifest_rows(path), []
    for i, row in enumerate(rows, 1):
        pkey = next((k for k in PATH_KEYS if row.get(k)), None)
        if pkey is None:
            raise InputError(f"{path}: row {i} has no media path column; columns found {sorted(row)}, "
                             f"valid path columns {list(PATH_KEYS)}")
        ckey = next((k for k in CAPTION_KEYS if k in row), None)
        media = (path.parent / row[pkey]).resolve()
        cap = row.get(ckey) if ckey else None
        items.append(InputItem(str(row[pkey]), str(media), None if cap is None else str(cap)))
    return items


def discover(inputs: list[str], samples_per_shard: int, caption_ext: str = "txt") -> list[Task]:
    """All tasks, in a fixed order (identical on every rank)."""
    files: list[InputItem] = []
    tars: list[str] = []
    for spec in inputs:
        p = Path(spec)
        if p.is_file() and p.suffix.lower() in (".csv", ".jsonl", ".json"):
            files += _from_manifest(p)
        elif p.is_file() and p.name.endswith(".tar"):
            tars.append(str(p.resolve()))
        elif p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
            tars += [str(q.resolve()) for q in found if q.name.endswith(".tar")]
            for q in found:
                if _media_kind(q.name):
                    files.append(InputItem(str(q.relative_to(p)), str(q.resolve()),
                                           caption_path=str(q.with_suffix("." + caption_ext))))
        else:
            raise InputError(f"input {spec!r} is not a directory, a .tar shard, or a .csv/.jsonl manifest")
    if files and tars:
        raise InputError(f"inputs mix media files ({len(files)}) and tar shards ({len(tars)}); "
                         "preprocess them into separate output directories")
    if not files and not tars:
        raise InputError(f"no images ({sorted(IMAGE_EXTS)}), videos ({sorted(VIDEO_EXTS)}) or .tar shards "
                         f"found in {inputs}")
    if tars:
        return [Task(i, tar=t) for i, t in enumerate(sorted(set(tars)))]
    n = max(1, samples_per_shard)
    return [Task(i, items=files[s:s + n]) for i, s in enumerate(range(0, len(files), n))]


def rank_tasks(tasks: list[Task], rank: int, world: int) -> list[Task]:
    """Round-robin: task i belongs to rank i % world."""
    return [t for t in tasks if t.index % world == rank]


# ----------------------------------------------------------------------- decoding (workers)

@dataclass
class Decoded:
    task: int
    key: str
    source: str
    caption: str
    frames: Frames


@dataclass
class Skipped:
    task: int
    source: str
    reason: str
    detail: str


@dataclass
class TaskPartDone:
    task: int
    parts: int  # how many TaskPartDone messages make the task complete


@dataclass
class DecodeSettings:
    buckets: ResolutionBuckets
    frames: int
    fps: float
    min_side: int
    video_vae: bool
    missing_caption: str  # skip | empty
    isolation: str = "process"  # process: decoders run in a child process (megassm/data/sandbox.py) | none
    timeout_s: float = 300.0  # per file, with isolation=process


def _key(source: str) -> str:
    return make_key(source.rsplit(".", 1)[0], hashlib.sha1(source.encode()).hexdigest())


def decode_item(task: int, source: str, kind: str, data: str | bytes, caption: str | None,
                s: DecodeSettings, decode=decode_in_process) -> Decoded | Skipped:
    """One input file -> Decoded, or Skipped with its reason; ``decode(kind, *args)`` runs the decoder."""
    try:
        if caption is None and s.missing_caption == "skip":
            raise SkipSample("missing_caption", "no caption found")
        caption = (caption or "").strip()
        if not caption and s.missing_caption == "skip":
            raise SkipSample("empty_caption", "caption is empty")
        if kind == "video":
            if not s.video_vae:
                raise SkipSample("video_needs_video_vae", "the VAE encodes images only; use a video VAE "
                                 "(e.g. AutoencoderKLWan) or preprocess videos separately")
            fr = decode("video", data, s.buckets, s.frames, s.fps, s.min_side)
        else:
            fr = decode("image", data, s.buckets, s.min_side)
        return Decoded(task, _key(source), source, caption, fr)
    except SkipSample as e:
        return Skipped(task, source, e.reason, e.detail)


def _read_caption(item: InputItem) -> str | None:
    if item.caption is not None:
        return item.caption
    try:
        return Path(item.caption_path).read_text(encoding="utf-8") if item.caption_path else None
    except (OSError, UnicodeDecodeError):
        return None


def _tar_caption(members: dict[str, bytes]) -> str | None:
    for ext in ("txt", "caption", "text"):
        if ext in members:
            return members[ext].decode("utf-8", "replace")
    if "json" in members:
        try:
            meta = json.loads(members["json"])
            return next((str(meta[k]) for k in CAPTION_KEYS if k in meta), None)
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError):
            return None
    return None


def iter_input_tar(path: str) -> Iterator[tuple[str, dict[str, bytes]] | tuple[None, str]]:
    """(key, {ext: bytes}) per sample of an input tar; (None, error) if it breaks off."""
    name, key, members = Path(path).name, None, {}
    try:
        with tarfile.open(path, "r|*") as tf:
            for m in tf:
                kx = split_key(m.name) if m.isfile() else None
                if kx is None:
                    continue
                if key is not None and kx[0] != key:
                    yield f"{name}/{key}", members
                    members = {}
                key = kx[0]
                members[kx[1].lower()] = tf.extractfile(m).read()
        if key is not None:
            yield f"{name}/{key}", members
    except (tarfile.TarError, OSError, EOFError) as e:
        yield None, f"{name}: {type(e).__name__}: {e} (after key {key!r})"


class DecodeDataset(IterableDataset):
    """Yields Decoded / Skipped / TaskPartDone for this rank's pending tasks.

    Folder tasks are split item-wise over the DataLoader workers (all workers help with
    every shard, ``parts`` = workers); tar tasks are read whole by one worker (``parts`` = 1).
    """

    def __init__(self, tasks: list[Task], settings: DecodeSettings):
        self.tasks, self.s = tasks, settings

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        torch.set_num_threads(1)
        sandbox = DecodeSandbox(self.s.timeout_s) if self.s.isolation == "process" else None
        decode = sandbox.decode if sandbox else decode_in_process
        try:
            for pos, t in enumerate(self.tasks):
                if t.tar is None:
                    for it in t.items[wid::nw]:
                        yield decode_item(t.index, it.source, _media_kind(it.source) or "image", it.path,
                                          _read_caption(it), self.s, decode)
                    yield TaskPartDone(t.index, nw)
                elif pos % nw == wid:
                    yield from self._tar_task(t, decode)
                    yield TaskPartDone(t.index, 1)
        finally:
            if sandbox:
                sandbox.close()

    def _tar_task(self, t: Task, decode):
        for source, members in iter_input_tar(t.tar):
            if source is None:
                yield Skipped(t.index, Path(t.tar).name, "corrupt_input_tar", members)
                return
            media = next(((ext, data) for ext, data in members.items() if _media_kind("x." + ext)), None)
            if media is None:
                yield Skipped(t.index, source, "unsupported_media", f"members {sorted(members)}")
                continue
            yield decode_item(t.index, source, _media_kind("x." + media[0]), media[1],
                              _tar_caption(members), self.s, decode)
