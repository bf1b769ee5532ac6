"""The hand-off of loader batches to the trainer: a background thread converts them (``batches``), and the
trainer's wait for one is bounded: ``data.stall_timeout_s`` (``DataStallError`` naming the shards being read,
``megassm.data.watch``) and a wait hook through which a checkpoint signal ends the wait
(``megassm.train.loop.Trainer._on_data_wait``). Either way the loader's workers are killed, so the process
can exit."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader

from megassm.data.watch import ReadBoard

_OPENMP = "OpenMP" in torch.__config__.parallel_info()


class DataStallError(RuntimeError):
    """The trainer waited longer than ``data.stall_timeout_s`` for one batch."""


_POLL_S = 0.5  # how often a waiting trainer checks the stall limit and its wait hook (signals)


def batches(loader: DataLoader, convert: Callable[[Any], Any], depth: int = 2, *, board: ReadBoard | None = None,
            stall_timeout_s: float = float("inf"), wait_hook: Callable[[float, str], None] | None = None):
    """(convert(packed), position) of ``loader``'s items, converted in a background thread (torch ops release
    the GIL), ``depth`` ahead.

    The thread owns the DataLoader iterator and shuts its workers down when the consumer stops
    (generator closed, or interpreter exit via threading's atexit hook). The consumer waits in ticks of
    ``_POLL_S``: ``wait_hook(waited_s, reading)`` may raise (the trainer ends the run on a signal), and a
    wait beyond ``stall_timeout_s`` raises ``DataStallError`` naming what each worker was reading. Either
    way the workers are killed: a stalled one does not answer SIGTERM (it inherits the trainer's handler).
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    owned: list = []  # the DataLoader iterator, for killing its workers

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def run():
        # One intra-op thread for this thread only (OpenMP's thread count is per calling thread): the
        # copies here are memory-bound, and waking the process's OpenMP team for each one made idle
        # team threads spin -- 6x the CPU time per sample on a loaded 2-core machine (reader_bench).
        # Only with OpenMP: ATen's native thread pool would take the setting process-wide.
        if _OPENMP:
            torch.set_num_threads(1)
        it = iter(loader)
        owned.append(it)
        try:
            for packed, pos in it:
                if not put((convert(packed), pos)):
                    return
            put(None)
        except BaseException as e:  # hand worker errors (e.g. FormatError) to the consumer
            put(e)
        finally:
            owned.clear()
            del it  # shuts the DataLoader workers down

    if hasattr(threading, "_register_atexit"):  # stop before the interpreter joins threads at exit
        threading._register_atexit(stop.set)
    # a daemon: a thread stuck in a stalled read must not keep the process from exiting
    t = threading.Thread(target=run, name="megassm-batch-expand", daemon=True)
    t.start()
    normal = False
    try:
        while (item := _wait(q, board, stall_timeout_s, wait_hook)) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
        normal = True
    except GeneratorExit:  # the consumer closed the generator
        normal = True
        raise
    finally:
        stop.set()
        if not normal:
            _kill_workers(owned)
        t.join(timeout=30 if normal else 1)


def _wait(q: queue.Queue, board, stall_timeout_s: float, wait_hook):
    """The next item of ``q``, waiting in ticks (see ``_expanding``)."""
    t0 = time.monotonic()
    while True:
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            waited = time.monotonic() - t0
            reading = board.describe() if board is not None else "?"
            if wait_hook is not None:
                wait_hook(waited, reading)
            if waited > stall_timeout_s:
                raise DataStallError(
                    f"no batch from the data loader for {waited:.0f} s (data.stall_timeout_s={stall_timeout_s:g}); "
                    f"reading: {reading}. A hung pipe:/remote read or a shard the reader cannot get through; "
                    "check that shard, or raise data.stall_timeout_s if reads are legitimately this slow") from None


def _kill_workers(owned: list) -> None:
    """SIGKILL a DataLoader iterator's worker processes (after an error or an interrupt: a stalled worker
    ignores SIGTERM, having inherited the trainer's checkpoint-signal handler)."""
    for it in list(owned):
        workers = getattr(it, "_workers", None) or []
        try:  # torch's SIGCHLD check would report the kill as a worker failure in this thread
            if getattr(it, "_worker_pids_set", False):
                from torch.utils.data._utils import signal_handling

                signal_handling._remove_worker_pids(id(it))
                it._worker_pids_set = False
        except Exception:
            pass
        for w in workers:
            if w.is_alive():
                w.kill()
