"""Non-blocking checkpoints: snapshot to host memory on the training thread, write in the background.

A save with ``train.async_save`` (``Trainer.save(blocking=False)``) runs in two parts:

1. On the training thread, at a step boundary, everything the checkpoint holds is copied to host memory:
   DeepSpeed's state dicts (the backend routes its checkpoint engine's ``save`` calls into a ``FileSink``),
   the EMA shard, the LoRA adapters, the trainer state (counters, data position, RNG states, serialised
   here). The collectives a save needs (DeepSpeed's barriers, the EMA's fragment sum, the LoRA gathers)
   all happen here, so the background thread never calls a collective. This part costs a copy of the
   rank's checkpoint bytes (``snapshot_s`` in ``save_stats.json``).
2. A ``BackgroundSave`` thread writes the files (the same writers as a synchronous save: DeepSpeed's own
   checkpoint engine, safetensors), fsyncs each, then writes this rank's marker ``<tag>/written/rank_R``
   (temporary file + fsync + rename). Rank 0's thread waits for every rank's marker, removes the markers,
   then writes COMPLETE, the atomic ``latest`` and prunes (``checkpoint.commit``), and records the measured
   rate in ``checkpoints/save_stats.json``.

Invariants: at most one save is in flight (the next save, the final one and a signal wait for it); a
write error on any rank is written as ``rank_R.failed`` beside the markers, so rank 0 does not commit,
and is raised on the training thread at the next step boundary (``raise_if_failed``) or wait; until
COMPLETE, ``latest`` names the previous whole checkpoint, so a crash (SIGKILL) in the background write
leaves a partial directory that the next save or resume ignores and removes, as after a crash in a
synchronous save.

Test hooks (unset in real runs): ``MEGASSM_TEST_SAVE_HOLD_STEPS=k`` holds a background write until the
training thread has finished k more steps or waits for the save (a slow file system, deterministically:
``steps_during_write`` then shows whether training went on during the write);
``MEGASSM_FAULT_SIGKILL_IN_SAVE_AT_STEP=N`` SIGKILLs the process after the first file of the step-N
save is written (a node failure mid-write).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from megassm.checkpoint.snapshot import fsync_tree, release_snapshots, tree_bytes

log = logging.getLogger("megassm.train")

MARKERS = "written"  # <tag>/written/rank_R: this rank's files are durable (removed before COMPLETE)
STATS = "save_stats.json"  # under checkpoints/: the last save's size, seconds and rate


# -- the background writer -----------------------------------------------------------------------------


@dataclass
class PendingSave:
    """One checkpoint handed to the background thread."""

    ckpt_dir: Path
    tag: str
    step: int
    jobs: list[tuple[Path, Callable[[], None]]]
    started: float  # time.perf_counter() when the training thread entered save()
    snapshot_s: float  # how long the training thread was held
    step_s: float | None = None  # the last step's wall time (for the grace formula)

    @property
    def tag_dir(self) -> Path:
        return self.ckpt_dir / self.tag


class BackgroundSave:
    """Writes one ``PendingSave`` at a time on a daemon thread (module doc).

    ``commit(ckpt_dir, tag)``: rank 0's COMPLETE + ``latest`` + pruning (``checkpoint.commit``), called on the
    thread once every rank's marker is there; ``current_step()``: the training thread's step counter, read
    for the record (an int attribute: reading it from another thread is safe).
    """

    def __init__(self, rank: int, world: int, commit: Callable[[Path, str], None],
                 current_step: Callable[[], int], poll_s: float = 0.05):
        self.rank, self.world, self._commit, self._current_step, self.poll_s = rank, world, commit, current_step, poll_s
        self._thread: threading.Thread | None = None
        self._pending: PendingSave | None = None
        self._error: BaseException | None = None
        self._abandon = threading.Event()
        self._waited = threading.Event()  # the training thread waits for the save (ends a test hold)
        self.last_stats: dict | None = None

    # -- training thread ---------------------------------------------------------------------------
    @property
    def in_flight(self) -> PendingSave | None:
        return self._pending if self._thread is not None else None

    def start(self, save: PendingSave) -> None:
        self.wait()  # at most one in flight
        self._pending, self._error = save, None
        self._abandon.clear()
        self._waited.clear()
        self._thread = threading.Thread(target=self._run, args=(save,), name=f"megassm-save-{save.tag}", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def raise_if_failed(self) -> dict | None:
        """At a step boundary: if the save in flight has finished, reap it -- raise its error, or return its
        stats (rank 0; ``{}`` on other ranks) once. None while it is still writing or when none is in flight."""
        if self._thread is None or self._thread.is_alive():
            return None
        return self.wait()

    def wait(self) -> dict | None:
        """Block until the save in flight is written (rank 0: committed); raise its error. Returns its stats
        (rank 0; ``{}`` on other ranks), or None if none was in flight."""
        if self._thread is None:
            return None
        self._waited.set()
        self._thread.join()
        save, error = self._pending, self._error
        self._thread = self._pending = self._error = None
        if error is not None:
            raise RuntimeError(
                f"rank {self.rank}: the background write of checkpoint {save.tag_dir} failed: {error!r}. "
                f"{save.ckpt_dir / 'latest'} still names the previous complete checkpoint; fix the cause (disk "
                "space, permissions) and resume, or set train.async_save=false to write synchronously") from error
        return self.last_stats if self.rank == 0 else {}

    def abandon(self) -> None:
        """On the way out after an error: let this rank's own writes finish, but rank 0 stops waiting for
        markers that may never come (a rank died); the checkpoint then stays incomplete."""
        if self._thread is None:
            return
        self._abandon.set()
        self._waited.set()
        self._thread.join()
        if self._error is not None:
            log.warning(f"rank {self.rank}: background checkpoint write of {self._pending.tag_dir} did not "
                        f"finish: {self._error!r}")
        self._thread = self._pending = self._error = None

    # -- background thread -------------------------------------------------------------------------
    def _run(self, save: PendingSave) -> None:
        markers = save.tag_dir / MARKERS
        try:
            self._hold(save)
            kill_at = os.environ.get("MEGASSM_FAULT_SIGKILL_IN_SAVE_AT_STEP")
            written = 0
            for path, write in save.jobs:
                path.parent.mkdir(parents=True, exist_ok=True)
                write()
                written += fsync_tree(path)
                if kill_at and int(kill_at) == save.step:
                    os.kill(os.getpid(), signal.SIGKILL)  # simulated node failure mid-write (tests)
            markers.mkdir(parents=True, exist_ok=True)
            _atomic_text(markers / f"rank_{self.rank:05d}", str(written))
            if self.rank == 0:
                self._wait_for_ranks(markers, save)
                shutil.rmtree(markers)
                self._commit(save.ckpt_dir, save.tag)
                self.last_stats = save_stats(save, "async", tree_bytes(save.tag_dir), self._current_step())
                write_stats(save.ckpt_dir, self.last_stats)
                log.info(describe_stats(self.last_stats))
        except BaseException as e:  # noqa: BLE001  (surfaced on the training thread by wait())
            self._error = e
            try:
                markers.mkdir(parents=True, exist_ok=True)
                _atomic_text(markers / f"rank_{self.rank:05d}.failed", repr(e))
            except OSError:
                pass
        finally:
            release_snapshots()  # written (or failed): the next save's snapshot may reuse the buffers

    def _hold(self, save: PendingSave) -> None:
        hold = int(os.environ.get("MEGASSM_TEST_SAVE_HOLD_STEPS") or 0)
        while hold and self._current_step() < save.step + hold:
            if self._waited.wait(self.poll_s):
                return

    def _wait_for_ranks(self, markers: Path, save: PendingSave) -> None:
        want = [markers / f"rank_{r:05d}" for r in range(self.world)]
        while True:
            failed = sorted(markers.glob("rank_*.failed"))
            if failed:
                rank = int(failed[0].name.split("_")[1].split(".")[0])
                raise RuntimeError(f"rank {rank} could not write its part of {save.tag_dir}: {failed[0].read_text()}")
            if all(m.is_file() for m in want):
                return
            if self._abandon.wait(self.poll_s):
                if not all(m.is_file() for m in want):
                    missing = [m.name for m in want if not m.is_file()]
                    raise RuntimeError(f"abandoned waiting for {missing} of {save.tag_dir}")


def _atomic_text(path: Path, text: str) -> None:
    from megassm.data.writer import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


# -- the measured save rate ----------------------------------------------------------------------------


def save_stats(save: PendingSave, mode: str, nbytes: int, step_at_commit: int) -> dict:
    """What ``save_stats.json`` records: the checkpoint's bytes (all ranks' files), the seconds from the
    training thread entering ``save`` to COMPLETE, how long training was held (``snapshot_s``), the rate
    bytes / seconds, and (async) how many steps trained while the files were written."""
    seconds = time.perf_counter() - save.started
    return {"tag": save.tag, "step": save.step, "mode": mode, "bytes": nbytes, "seconds": round(seconds, 4),
            "snapshot_s": round(save.snapshot_s, 4), "write_gbps": nbytes / 1e9 / max(seconds, 1e-9),
            "step_s": save.step_s, "step_at_commit": step_at_commit, "steps_during_write": step_at_commit - save.step}


def write_stats(ckpt_dir: Path, stats: dict) -> None:
    _atomic_text(Path(ckpt_dir) / STATS, json.dumps(stats, indent=1) + "\n")


def describe_stats(s: dict) -> str:
    held = (f"training held {s['snapshot_s']:.2f} s (snapshot), {s['steps_during_write']} steps trained while "
            "it was written" if s["mode"] == "async" else "synchronous")
    return (f"checkpoint {s['tag']} complete: {s['bytes'] / 1e9:.3f} GB in {s['seconds']:.2f} s = "
            f"{s['write_gbps']:.3f} GB/s ({held})")
