"""Training checkpoints: DeepSpeed-native state + EMA shards + per-rank trainer state.

    run_dir/checkpoints/
        step_00000100/          DeepSpeed tag directory (model, optimizer, LR scheduler; without the Adam
                                moments with train.save_optimizer_state=false: megassm/checkpoint/model_only.py)
            ema/shard_*.safetensors
            trainer/rank_*.json + rank_*.safetensors   (step, data position, RNG states)
            COMPLETE            written last, after every rank finished
        latest                  "step_00000100", replaced atomically after COMPLETE

With ``train.async_save`` a periodic save is snapshotted to host memory and written by a background thread
(``checkpoint_writer.py``); COMPLETE and ``latest`` then follow every rank's durable files the same way.
A crash mid-save leaves a tag directory without COMPLETE and ``latest`` still naming the previous,
whole checkpoint; the next save or resume ignores and removes such leftovers. A resume first checks the
checkpoint's files (``resume_tag``; ``megassm/checkpoint/verify.py``) and falls back to the newest whole one
before a damaged ``latest``. COMPLETE records a commit number: pruning (``train.keep_last``) and the fallback
go by commit order, not by step. Nothing is pickled except DeepSpeed's own files, which it reads itself.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from megassm.checkpoint.snapshot import FileSink
from megassm.checkpoint.verify import damaged_files
from megassm.config.tags import (  # noqa: F401  (re-exported for the trainer)
    COMPLETE,
    LATEST,
    commit_number,
    complete_tags,
    tag_for,
)
from megassm.data.writer import atomic_write_bytes
from megassm.parallel.comm import barrier


def atomic_write_text(path: Path, text: str) -> None:
    """Temporary file + fsync + rename (shared with the shard writer)."""
    atomic_write_bytes(path, text.encode())


class ResumeError(ValueError):
    """The run's checkpoints cannot be resumed as asked; the message says which are whole."""


def resume_tag(ckpt_dir: Path, resume_from: str | None = None,
               check: Callable[[Path], list[str]] = damaged_files) -> tuple[str | None, list[str]]:
    """The checkpoint a run resumes from (None: there is none, a fresh start) and lines to log about the choice.

    ``resume_from`` (``train.resume_from``): that tag; it must be complete and whole, else ResumeError listing
    the complete tags. Otherwise the one ``latest`` names, once ``check`` (``checkpoint/verify.py``, the check
    of ``megassm inspect checkpoint``) found every file whole. If it is damaged, or ``latest`` is missing or
    names no complete checkpoint, the newest whole checkpoint committed before it; ResumeError if none is.
    """
    ckpt_dir = Path(ckpt_dir)
    complete = complete_tags(ckpt_dir)
    latest = (ckpt_dir / LATEST).read_text().strip() if (ckpt_dir / LATEST).is_file() else None
    if resume_from:
        return _chosen_tag(ckpt_dir, resume_from, complete, latest, check)
    if latest is None and not complete:
        return None, []
    notes = []
    if latest not in complete:
        notes.append(f"{ckpt_dir / LATEST} is missing" if latest is None else
                     f"{ckpt_dir / LATEST} names {latest}, which has no {COMPLETE} file (not a whole checkpoint)")
        candidates = complete[::-1]
    else:  # latest's, then those committed before it, newest first (not those of a line rolled back from)
        candidates = complete[complete.index(latest)::-1]
    for tag in candidates:
        problems = check(ckpt_dir / tag)
        if not problems:
            if notes:
                notes.append(f"resuming from {tag} instead, the newest whole checkpoint before it")
            return tag, notes
        notes.append(f"checkpoint {ckpt_dir / tag} is damaged: " + "; ".join(problems))
    raise ResumeError(f"no whole checkpoint to resume from in {ckpt_dir}: " + " | ".join(notes) + ". Restore "
                      "the damaged files, or move the directory aside to start afresh (`megassm inspect checkpoint "
                      "DIR` checks one)")


def _chosen_tag(ckpt_dir: Path, tag: str, complete: list[str], latest: str | None,
                check: Callable[[Path], list[str]]) -> tuple[str, list[str]]:
    """``train.resume_from=tag``: complete and whole, or ResumeError naming the valid tags."""
    if tag not in complete:
        raise ResumeError(f"train.resume_from={tag!r}: {ckpt_dir / tag} is not a complete checkpoint; the "
                          f"complete ones, oldest first: {', '.join(complete) or 'none'}")
    problems = check(ckpt_dir / tag)
    if problems:
        raise ResumeError(f"train.resume_from={tag}: the checkpoint is damaged: {'; '.join(problems)}. Choose "
                          f"another of {', '.join(t for t in complete if t != tag) or 'none'}")
    note = f"resuming from {tag} (train.resume_from)"
    if latest and latest != tag:
        note += (f", not from {latest}, which latest names. Drop train.resume_from once this run has saved: "
                 "a restart that still sets it goes back to it again")
    return tag, [note]


def read_latest(ckpt_dir: Path) -> str | None:
    """Tag named by ``latest`` if it exists and is complete, else None."""
    f = Path(ckpt_dir) / LATEST
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    if not (Path(ckpt_dir) / tag / COMPLETE).is_file():
        raise RuntimeError(
            f"{f} names {tag!r} but {Path(ckpt_dir) / tag} is not a complete checkpoint; "
            "restore the directory or point 'latest' at an older step_* directory that has a COMPLETE file"
        )
    return tag


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    meta = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], int(np_state[2]), int(np_state[3]),
                                                            float(np_state[4])]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


def save_trainer_state(tag_dir: Path, rank: int, state: dict, tensors: dict[str, torch.Tensor],
                       sink: FileSink | None = None) -> None:
    """This rank's counters, data position and RNG states, taken now; written now, or by the background
    writer when ``sink`` is deferred (the JSON is serialised and the tensors copied here)."""
    sink = sink or FileSink()
    d = tag_dir / "trainer"
    d.mkdir(parents=True, exist_ok=True)
    rng_t, rng_meta = _rng_state()
    tensors = {**{f"rng.{k}": v for k, v in rng_t.items()}, **tensors}
    text = json.dumps({**state, "rng": rng_meta})
    tf, jf = d / f"rank_{rank:05d}.safetensors", d / f"rank_{rank:05d}.json"
    sink.put_tensors(tf, tensors, lambda t: save_file(t, str(tf)))
    sink.put(jf, lambda: atomic_write_text(jf, text))


def load_trainer_state(tag_dir: Path, rank: int) -> tuple[dict, dict[str, torch.Tensor]]:
    d = tag_dir / "trainer"
    jf, tf = d / f"rank_{rank:05d}.json", d / f"rank_{rank:05d}.safetensors"
    if not jf.is_file() or not tf.is_file():
        raise FileNotFoundError(
            f"checkpoint {tag_dir} has no trainer state for rank {rank} ({jf.name}); it was written by a "
            "run with fewer ranks. Resume with the same world size, or warm-start with init_from=<dir>"
        )
    state = json.loads(jf.read_text())
    tensors = load_file(str(tf))
    _set_rng_state({k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}, state.pop("rng"))
    return state, {k: v for k, v in tensors.items() if not k.startswith("rng.")}


def finalize(ckpt_dir: Path, tag: str, keep_last: int, is_writer: bool) -> None:
    """After every rank wrote its files (the barrier): ``commit`` on the writer (the synchronous save)."""
    if dist.is_initialized():
        barrier()
    if is_writer:
        commit(ckpt_dir, tag, keep_last)
    if dist.is_initialized():
        barrier()


def commit(ckpt_dir: Path, tag: str, keep_last: int) -> None:
    """Mark ``tag`` complete, point ``latest`` at it, then prune old / partial checkpoints. No collective:
    the background writer of an asynchronous save calls it once every rank's files are durable
    (``checkpoint_writer.BackgroundSave``), so pruning never runs before COMPLETE. COMPLETE records the
    commit's number, one more than any earlier commit's: the order pruning and resume go by."""
    ckpt_dir = Path(ckpt_dir)
    number = 1 + max((commit_number(ckpt_dir / t) for t in complete_tags(ckpt_dir) if t != tag), default=0)
    atomic_write_text(ckpt_dir / tag / COMPLETE, json.dumps({"tag": tag, "commit": number}))
    atomic_write_text(ckpt_dir / LATEST, tag)
    prune(ckpt_dir, keep_last, keep=tag)


def prune(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    """Remove the complete checkpoints older than the newest ``keep_last`` in commit order (0 keeps them
    all) and every partial one except ``keep``; never ``keep`` nor what ``latest`` names."""
    if keep_last < 0:
        raise ValueError(f"train.keep_last={keep_last} must be >= 0 (0 keeps every checkpoint)")
    latest = Path(ckpt_dir) / LATEST
    protected = {keep, latest.read_text().strip() if latest.is_file() else keep}
    complete = complete_tags(ckpt_dir)
    for old in complete[: max(0, len(complete) - keep_last)] if keep_last else []:
        if old not in protected:
            shutil.rmtree(Path(ckpt_dir) / old, ignore_errors=True)
    for partial in Path(ckpt_dir).glob("step_*"):
        if partial.name not in protected and not (partial / COMPLETE).exists():
            shutil.rmtree(partial, ignore_errors=True)
