"""Stop requests by signal, recorded from the start of ``megassm train`` to its end.

SIGUSR1 (SLURM's warning before the time limit), SIGTERM (preemption, ``scancel``, a launcher passing its
own on) and SIGINT (Ctrl-C) are only recorded by the handler; the trainer acts on them at a safe point:

- before training starts (config load, process group, the model build and the resume load: minutes for a
  5B model), at the start of ``Trainer.fit``: every rank exits with the signal's status (below) and writes
  nothing, so ``latest`` still names the last checkpoint and ``slurm/common.sh`` requeues after USR1 as it
  does after a checkpoint;
- during training, at the next step boundary: a checkpoint, then the same exit status.

Exit status: 0 for SIGUSR1 / SIGTERM (what ``slurm/common.sh`` requeues on), 130 for SIGINT (an
interrupted command, as a shell reports it: a ``megassm train ... && next`` chain stops). After the first
SIGINT the default action is back: a second Ctrl-C ends the process at once, without a checkpoint.

Under torchrun every worker asks the kernel for SIGTERM when its launcher dies (``PR_SET_PDEATHSIG``).
torchrun passes SIGTERM / SIGINT / SIGHUP / SIGQUIT on to its workers (then SIGKILL after
``--shutdown-timeout``, 30 s by default), but not SIGUSR1 unless ``--signals-to-handle`` lists it: a SIGUSR1
(or SIGKILL) to the launcher ended it and left the workers training as orphans. Now they checkpoint and exit.
The handlers are Python's: a rank blocked inside one long C call (a collective waiting for a dead peer, a
data loader) sees the request when the call returns.
"""

from __future__ import annotations

import os
import signal
import sys
import time

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
EXIT_STATUS = {signal.SIGUSR1: 0, signal.SIGTERM: 0, signal.SIGINT: 128 + signal.SIGINT}
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class StopSignals:
    """Records the first of ``STOP_SIGNALS`` (``signum``); ``install`` / ``restore`` the handlers."""

    def __init__(self):
        self.signum: int | None = None
        self.at = 0.0  # time.monotonic() of the first signal (a data wait that began before it ends at once)
        self._old: dict[int, object] = {}

    def install(self) -> StopSignals:
        for s in STOP_SIGNALS:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def exit_status(self) -> int:
        """The process's exit status after acting on the signal (0 without one)."""
        return EXIT_STATUS.get(self.signum, 0) if self.signum is not None else 0

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum, self.at = signum, time.monotonic()
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C ends the process at once
            if os.environ.get("RANK", "0") == "0":  # os.write: no lock a signal could find held
                os.write(2, b"megassm: Ctrl-C: a checkpoint at the next step boundary (none before training "
                            b"has started), then exit; Ctrl-C again ends the process at once, without one\n")


_process: StopSignals | None = None


def install_for_process() -> StopSignals:
    """At ``megassm train``'s entry, before anything slow: the handlers for the rest of the process (called
    again, the same object), and under torchrun the SIGTERM when the launcher dies."""
    global _process
    if _process is None:
        _process = StopSignals().install()
        _die_with_launcher()
    return _process


def uninstall_for_process() -> None:
    """When ``megassm train`` returns: the previous handlers back, and no recorded signal left over for a later
    Trainer in the same process (a test, a notebook) to act on before its first step."""
    global _process
    if _process is not None:
        _process.restore()
        _process = None


def process_signals() -> StopSignals | None:
    """The handlers ``install_for_process`` installed, if it ran."""
    return _process


def _die_with_launcher() -> None:
    """A torchrun worker (TORCHELASTIC_RUN_ID set): SIGTERM when the launcher exits, however it exits."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return  # not fatal: the launcher's own forwarding still works for the signals it handles
    if os.getppid() != parent:  # the launcher died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)
