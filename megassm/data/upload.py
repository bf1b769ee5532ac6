"""Preprocessing into object storage: ``megassm preprocess --output s3://bucket/dataset``.

Shards are written into a local staging directory exactly as for a local ``--output``, then
each finished shard is uploaded (one atomic PUT per shard: an object store shows a whole
object or none), then its progress record -- so, as locally, a task counts as done iff its
record *and* its shard exist at the destination. A resumed run lists the destination once and
skips those tasks; ``manifest.json`` is uploaded last, when every task's record is there.
The local copy of a shard is removed after its upload.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from megassm.data import remote
from megassm.data.format import MANIFEST_NAME, SKIP_REPORT_NAME
from megassm.data.manifest import PROGRESS_DIR, RUN_INFO

log = logging.getLogger("megassm.preprocess")
WRITABLE = ("s3", "gs", "gcs")


def default_staging(url: str) -> Path:
    return Path(tempfile.gettempdir()) / f"megassm-staging-{hashlib.sha1(url.encode()).hexdigest()[:12]}"


class RemoteOutput:
    """The destination ``url`` of a preprocessing run and its local staging directory."""

    def __init__(self, url: str, staging: str | Path | None = None):
        s = remote.scheme(url)
        if s not in WRITABLE:
            raise ValueError(f"--output={url!r}: preprocessing writes to a local directory or "
                             f"{', '.join(x + '://' for x in WRITABLE)} (http(s) and pipe: are read-only)")
        remote.check_location(url, "--output")
        self.url = url.rstrip("/")
        self.staging = Path(staging) if staging else default_staging(self.url)
        (self.staging / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
        self.fs, self.root = remote._fs(self.url)
        self.present: set[str] = set()

    def pull(self) -> None:
        """List the destination; copy its progress records (and run.json) into staging."""
        self.present = set()
        for p in self.fs.find(self.root):
            rel = p[len(self.root.rstrip("/")) + 1:]
            self.present.add(rel)
        for rel in self.present:
            if rel.startswith(PROGRESS_DIR + "/") and rel.endswith(".json"):
                dst = self.staging / rel
                if not dst.is_file():
                    dst.write_bytes(remote.read_bytes(f"{self.url}/{rel}"))
        log.info("%s: %d files already there", self.url, len(self.present))

    def exists(self, rel: str) -> bool:
        return rel in self.present

    def push(self, rel: str, remove_local: bool = False) -> None:
        """Upload staging/rel to url/rel (atomically: one PUT)."""
        local = self.staging / rel
        remote.upload(str(local), f"{self.url}/{rel}")
        self.present.add(rel)
        if remove_local:
            local.unlink()

    def push_task(self, record: dict, record_rel: str) -> None:
        if record.get("shard"):
            self.push(record["shard"]["path"], remove_local=True)
        self.push(record_rel)

    def push_run_info(self) -> None:
        rel = f"{PROGRESS_DIR}/{RUN_INFO}"
        if not self.exists(rel):
            self.push(rel)

    def push_dataset_files(self) -> None:
        """skipped.json, then manifest.json (readers look for the manifest: it goes last)."""
        for name in (SKIP_REPORT_NAME, MANIFEST_NAME):
            self.push(name)

    def record_rel(self, path: Path) -> str:
        return os.path.relpath(path, self.staging)
