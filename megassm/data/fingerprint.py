"""What a saved data position was counted over: each dataset's fingerprint, checked on restore.

A position (``ShardLoader.state_dict``, either data.order) counts samples in an order that depends on each
dataset's shards -- their paths, sample counts and per-shape counts. Restored over a dataset that was
re-split or rewritten since (10/10/10/10 -> 12/12/12/4 has the same totals), the same counts would name
other samples: some repeated, others never seen in the epoch, and nothing said. So a changed dataset is
refused by name, unless ``data.allow_dataset_change`` (then logged).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

log = logging.getLogger("megassm.data")


def dataset_fingerprint(m: dict) -> str:
    """"{shards}:{samples}:{digest}" of a manifest: the digest covers each shard's path, sample count and
    per-shape counts, in the manifest's order."""
    rows = [[s["path"], int(s["samples"]), sorted(s.get("shapes", {}).items())] for s in m["shards"]]
    digest = hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()[:16]
    return f"{len(m['shards'])}:{m['num_samples']}:{digest}"


def changed_datasets(saved: list, current: list) -> list[str]:
    """Datasets ([path, fingerprint] pairs, matched by path) whose fingerprint differs, each described. An
    older megassm's fingerprint ("{shards}:{samples}", no digest) that matches the counts is taken as
    unchanged: it cannot tell a re-split with the same totals."""
    now = dict((p, fp) for p, fp in current)
    out = []
    for path, old in saved:
        new = now.get(path)
        if new is None or new == old or _older_same(old, new):
            continue  # a dataset added or removed is a change of the mix (the position's key check logs it)
        (n0, s0), (n1, s1) = old.split(":")[:2], new.split(":")[:2]
        what = (f"{n0} shards / {s0} samples then, {n1} / {s1} now" if (n0, s0) != (n1, s1) else
                f"the same {n1} shards / {s1} samples, but the shards' names or per-shard counts differ (re-split "
                "or rewritten)")
        out.append(f"dataset {path} changed since the checkpoint: {what}")
    return out


def checked_position(state: dict[str, Any], current: list, allow_change: bool) -> dict[str, Any]:
    """``state`` (a saved position) checked against this loader's datasets ``current``: raises ValueError
    naming each changed dataset unless ``allow_change`` (then a warning each); an older megassm's fingerprint
    that matches is replaced by the current one, so that the position's key compares equal."""
    at = "key" if state.get("order") == "global" else "layout"
    saved = state.get(at, {}).get("datasets", [])
    changed = changed_datasets(saved, current)
    if changed and not allow_change:
        raise ValueError("; ".join(changed) + ". Its sample order would differ from the one the data position "
                         "counts in. Resume with the dataset as it was, or set data.allow_dataset_change=true "
                         "to continue at the same position in the new order (samples may repeat or be left out)")
    for c in changed:
        log.warning("%s; data.allow_dataset_change: continuing in the new order", c)
    now = dict((p, fp) for p, fp in current)
    same = [[p, now[p] if _older_same(fp, now.get(p)) else fp] for p, fp in saved]
    return {**state, at: {**state[at], "datasets": same}} if saved else state


def _older_same(old: str, new: str | None) -> bool:
    """An older megassm's "{shards}:{samples}" fingerprint with the counts of ``new``."""
    return new is not None and old.count(":") == 1 and new.startswith(old + ":")
