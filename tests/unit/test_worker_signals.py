"""A SIGTERM that srun delivers to a data-loader worker (megassm/data/worker_signals.py) leaves it running:
the trainer, which got the same signal, checkpoints and ends the loader; torch's own worker handler died of
it, and the trainer failed on its next batch."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from megassm.config.schema import DataConfig
from megassm.data.reader import build_shard_loader
from megassm.data.testing import write_synthetic_dataset


def _children() -> list[int]:
    me = os.getpid()
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                out.append(int(d.name))
        except (OSError, ValueError, IndexError):
            pass
    return out


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_a_loader_worker_survives_a_sigterm_from_another_process(tmp_path):
    write_synthetic_dataset(tmp_path / "d", [(4, 1, 8, 8)], num_samples=64, samples_per_shard=8)
    cfg = DataConfig(kind="shards", paths=[str(tmp_path / "d")], resampled=True, shuffle_buffer=4, num_workers=1)
    batches = iter(build_shard_loader(cfg, batch_size=2, dp_rank=0, dp_size=1, seed=0, text_len=4))
    before = set(_children())
    next(batches)
    workers = [p for p in _children() if p not in before]
    assert workers, "no loader worker process"
    for pid in workers:  # as srun passes a signal on: from a process that is not the worker's parent
        subprocess.run(["kill", "-TERM", str(pid)], check=True)
    time.sleep(0.5)  # let a worker that would die of it die
    for _ in range(8):
        assert next(batches)["latents"].shape[0] == 2
    assert all(_state(pid) not in ("Z", "gone") for pid in workers)
    batches.close()  # the loader's own shutdown still ends them
