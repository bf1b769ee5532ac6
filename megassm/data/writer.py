"""Write latent shards: ``LatentShardWriter`` (one tar) and atomic file helpers.

A shard is written under a temporary name in the same directory and renamed to its final
name only when complete (after fsync; the directory is fsync'd after the rename), so a crash or
preemption never leaves a partial shard under a name the reader or a resumed preprocessing run would trust.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

from megassm.data.format import LatentSample, encode_sample, shape_key


def fsync_dir(path: str | Path) -> None:
    """fsync a directory: makes the names created, renamed or removed in it durable (a rename is only
    in the directory's own blocks until then, and a node failure can undo it)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file + fsync + rename + fsync of the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


class LatentShardWriter:
    """Writes samples to one WebDataset tar shard, atomically.

    >>> with LatentShardWriter("out/shard-000000.tar") as w:
    ...     w.write(sample)
    Members are ``<key>.json`` then ``<key>.safetensors`` with fixed ownership and mtime, so
    the same samples give byte-identical shards.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._file = open(self.tmp_path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self.samples = 0
        self.shapes: Counter[str] = Counter()
        self._keys: set[str] = set()
        self.offsets: list[int] = []  # byte offset of each sample's first tar header (data.order=global reads by them)
        self._sample_shapes: list[str] = []
        self.closed = False

    def write(self, sample: LatentSample) -> None:
        if sample.key in self._keys:
            raise ValueError(f"{self.path}: duplicate sample key {sample.key!r}")
        self._keys.add(sample.key)
        self.offsets.append(self._tar.offset)
        self._sample_shapes.append(shape_key(sample.latent.shape))
        for ext, data in encode_sample(sample).items():
            info = tarfile.TarInfo(f"{sample.key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1
        self.shapes[shape_key(sample.latent.shape)] += 1

    def close(self) -> dict[str, Any]:
        """Finish the tar, fsync, rename into place; returns the shard's manifest entry."""
        if not self.closed:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.tmp_path, self.path)
            fsync_dir(self.path.parent)
            self.closed = True
        entry = {"path": self.path.name, "samples": self.samples, "bytes": self.path.stat().st_size,
                 "shapes": dict(sorted(self.shapes.items())), "offsets": list(self.offsets)}
        if len(self.shapes) > 1:  # which of the sorted shapes each sample has (a mixed shard, data.order=global)
            ids = {k: i for i, k in enumerate(sorted(self.shapes))}
            entry["sample_shapes"] = [ids[k] for k in self._sample_shapes]
        return entry

    def abort(self) -> None:
        """Drop the partial shard (its temporary file)."""
        if not self.closed:
            self._tar.close()
            self._file.close()
            self.tmp_path.unlink(missing_ok=True)
            self.closed = True

    def __enter__(self) -> LatentShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
