"""SIGTERM in data-loader workers: only their own trainer may end them with it.

srun passes a forwarded signal to every process of a task, loader workers included (docs/cluster.md).
torch's worker handler exits quietly on a SIGTERM from the parent (``DataLoader`` shutting its workers
down) and dies of any other; the trainer then fails on its next batch ("DataLoader worker ... is killed
by signal: Terminated") instead of writing the checkpoint the signal asks for. Here a worker takes
SIGTERM in a thread of its own (``sigwaitinfo`` sees the sender): from the parent it exits as before,
from anyone else it is ignored -- the trainer, which got the same signal, checkpoints and ends the loader.
"""

from __future__ import annotations

import os
import signal
import threading


def keep_workers_on_foreign_sigterm(worker_id: int) -> None:
    """``worker_init_fn`` of the training loaders (runs first in each worker, while it has one thread)."""
    parent = os.getppid()
    # blocked in this thread, so in every thread started from now on: only the waiter below receives it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_wait_for_sigterm, args=(parent,), name="sigterm-waiter", daemon=True).start()


def _wait_for_sigterm(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent or os.getppid() != parent:  # the loader's shutdown, or the trainer is gone
            os._exit(0)
