"""Dataset manifests: per-shard progress records while preprocessing, ``manifest.json`` at the end.

While ``megassm preprocess`` runs, each finished shard gets a record
``.progress/shard-NNNNNN.json`` (written after the shard was renamed into place): a shard
counts as done iff its record exists. The first rank to see every task's record assembles
``manifest.json`` and ``skipped.json`` (idempotent; concurrent writers produce the same
content and rename atomically).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

from megassm import __version__
from megassm.data import remote
from megassm.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SKIP_REPORT_NAME,
    FormatError,
    parse_shape_key,
)
from megassm.data.writer import atomic_write_json

PROGRESS_DIR = ".progress"
RUN_INFO = "run.json"
# a shard path in a manifest: parts of letters, digits, '.', '_', '-' joined by '/' (no '..', not absolute) --
# it is joined to the dataset location and, for pipe: datasets, substituted into a shell command
_SHARD_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
SHARD_PATH_RULE = ("a plain relative name inside the dataset: parts of letters, digits, '.', '_', '-' joined by "
                   "'/', no part starting with '.' (so no '..'), not absolute, e.g. 'shard-000000.tar'")


def is_plain_shard_path(path: object) -> bool:
    """Whether ``path`` may name a shard in a manifest (``SHARD_PATH_RULE``)."""
    return isinstance(path, str) and all(_SHARD_PART.fullmatch(part) for part in path.split("/"))


def record_path(out: Path, task: int) -> Path:
    return Path(out) / PROGRESS_DIR / f"shard-{task:06d}.json"


def load_record(out: Path, task: int, exists=None) -> dict | None:
    """Task ``task``'s record if it and its shard exist (``exists(rel)``: at the destination; default: in ``out``)."""
    p = record_path(out, task)
    try:
        rec = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    shard = rec.get("shard")
    if shard and not (exists(shard["path"]) if exists else (Path(out) / shard["path"]).is_file()):
        return None  # record without its shard (deleted by hand): redo the task
    return rec


def build_manifest(out: Path, run: dict[str, Any], records: list[dict]) -> tuple[dict, dict]:
    """(manifest, skip report) from the run info and every task's record."""
    shards = [r["shard"] for r in sorted(records, key=lambda r: r["task"]) if r.get("shard")]
    hist: Counter[str] = Counter()
    for s in shards:
        hist.update(s["shapes"])
    skipped = [s for r in records for s in r["skipped"]]
    reasons = Counter(s["reason"] for s in skipped)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_by": f"megassm {__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_samples": sum(s["samples"] for s in shards),
        "num_shards": len(shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "shape_histogram": dict(sorted(hist.items(), key=lambda kv: -kv[1])),
        "shards": shards,
        "vae": run["vae"],
        "text_encoder": run["text_encoder"],
        "latent_scale": run["latent_scale"],
        "latent_shift": run["latent_shift"],
        "latent_channels": run["vae"]["latent_channels"],
        "text_dim": run["text_encoder"]["hidden_size"],
        "dtype": run["dtype"],
        "preprocess": run["settings"],
        "inputs": {"items_seen": sum(r["items"] for r in records), "skipped": dict(reasons),
                   "captions_truncated": sum(r.get("captions_truncated", 0) for r in records)},
        "skip_report": SKIP_REPORT_NAME,
    }
    report = {"total_skipped": len(skipped), "by_reason": dict(sorted(reasons.items())), "items": skipped}
    return manifest, report


def try_finalize(out: Path, exists=None) -> dict | None:
    """Write manifest.json + skipped.json if every task has a record; else return None."""
    out = Path(out)
    run = json.loads((out / PROGRESS_DIR / RUN_INFO).read_text())
    records = [load_record(out, i, exists) for i in range(run["num_tasks"])]
    if any(r is None for r in records):
        return None
    manifest, report = build_manifest(out, run, records)
    atomic_write_json(out / SKIP_REPORT_NAME, report)
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return manifest


def load_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    """Read and check a dataset's manifest.json (local, URL or pipe:); errors say what is wrong and how to fix it."""
    d = str(dataset_dir)
    remote.check_location(d, "dataset")
    p = remote.join(d, MANIFEST_NAME)
    try:
        raw = remote.read_bytes(p)
    except FileNotFoundError:
        raw = None
    except OSError as e:
        raise FormatError(f"dataset {d}: cannot read {MANIFEST_NAME} ({e}); check the URL, the network "
                          "and the filesystem's credentials") from None
    if raw is None or (remote.is_local(d) and not Path(p).is_file()):
        unfinished = (Path(d) / PROGRESS_DIR).is_dir() if remote.is_local(d) else False
        hint = (" Preprocessing has not finished (a .progress/ folder exists): re-run the same "
                "`megassm preprocess` command to complete it." if unfinished else
                " Write one with `megassm preprocess --input ... --output DIR`.")
        raise FormatError(f"dataset {d}: no {MANIFEST_NAME}.{hint}")
    try:
        m = json.loads(raw)
    except json.JSONDecodeError as e:
        raise FormatError(f"{p}: not valid JSON ({e})") from None
    if m.get("format") != FORMAT_NAME:
        raise FormatError(f"{p}: format={m.get('format')!r}, expected {FORMAT_NAME!r}")
    v = m.get("format_version")
    if not isinstance(v, int) or v > FORMAT_VERSION or v < 1:
        raise FormatError(f"{p}: format_version={v!r}; this megassm reads versions 1..{FORMAT_VERSION} "
                          "(upgrade megassm to read newer shards)")
    for k in ("shards", "latent_scale", "latent_shift", "vae", "text_encoder"):
        if k not in m:
            raise FormatError(f"{p}: missing key {k!r}")
    for i, s in enumerate(m["shards"]):
        if not isinstance(s, dict) or not {"path", "samples"} <= set(s):
            raise FormatError(f"{p}: shards[{i}] must have 'path' and 'samples', got {s!r}")
        if not is_plain_shard_path(s["path"]):
            raise FormatError(f"{p}: shards[{i}].path={s['path']!r} is not {SHARD_PATH_RULE}; a manifest may not "
                              "name files outside its dataset, nor shell syntax (pipe: datasets)")
    return m


def most_common_latent_shape(paths: list[str]) -> tuple[int, int, int] | None:
    """(T, h, w) of the most common latent in the datasets' manifests (their shape histograms); None if empty."""
    hist: Counter[str] = Counter()
    for path in paths:
        hist.update(load_manifest(path).get("shape_histogram", {}))
    if not hist:
        return None
    _, T, h, w = parse_shape_key(hist.most_common(1)[0][0])
    return T, h, w
