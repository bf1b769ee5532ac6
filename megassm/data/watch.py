"""Which shard each loader worker is reading, so that a stalled loader names it (``data.stall_timeout_s``).

A ``ReadBoard`` is a small shared-memory table, one slot per DataLoader worker (slot 0 without workers),
made by the trainer process before the workers start. A worker attaches its slot (``attach``, per thread:
in-process readers run in the loader's background thread); the readers (``remote.open_shard`` /
``open_random``, every tar header of ``tario.iter_members``) then call ``reading(where)``, which writes the
shard and the time into the slot when the shard changes. The trainer reads the slots while it waits.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import threading
import time

_WIDTH = 512  # bytes per slot: "<unix time> <location>", the location cut to fit
_local = threading.local()


class ReadBoard:
    def __init__(self, slots: int):
        self.slots = max(1, slots)
        self._buf = multiprocessing.RawArray(ctypes.c_char, self.slots * _WIDTH)

    def write(self, slot: int, where: str) -> None:
        text = f"{time.time():.0f} {where}".encode("utf-8", "replace")[:_WIDTH - 1]
        self._buf[slot * _WIDTH:(slot + 1) * _WIDTH] = text.ljust(_WIDTH, b"\0")

    def read(self, slot: int) -> tuple[float, str] | None:
        """(since when, location) of the slot's last shard, or None if it read none yet."""
        raw = bytes(self._buf[slot * _WIDTH:(slot + 1) * _WIDTH]).rstrip(b"\0").decode("utf-8", "replace")
        if not raw:
            return None
        t, _, where = raw.partition(" ")
        return float(t), where

    def describe(self) -> str:
        """"worker 0: s3://b/ds/shard-000003.tar (since 612 s ago), worker 1: ..." for an error message."""
        now, parts = time.time(), []
        for slot in range(self.slots):
            got = self.read(slot)
            parts.append(f"worker {slot}: " + ("no shard opened yet" if got is None else
                                               f"{got[1]} (its current shard for {now - got[0]:.0f} s)"))
        return "; ".join(parts)


def attach(board: ReadBoard | None, slot: int) -> None:
    """Reads by this thread are reported in ``board``'s ``slot`` (None: not reported)."""
    _local.board, _local.slot, _local.where = board, slot, None


def reading(where: str) -> None:
    """This thread is reading shard ``where`` (cheap when unchanged: called per tar header)."""
    board = getattr(_local, "board", None)
    if board is not None and where != _local.where:
        _local.where = where
        board.write(_local.slot, where)
