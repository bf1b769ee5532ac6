"""A data loader that blocks mid-run (a pipe: download that hangs): SIGTERM ends ``megassm train`` promptly
with a log line that says no checkpoint was written, instead of waiting for a step boundary that never comes
(before: the run went on until SIGKILL). Unit level: tests/unit/test_data_hostile.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from megassm.data.testing import write_synthetic_dataset
from tests.conftest import REPO, TINY_OVERRIDES, child_env, read_metrics, train_cmd

pytestmark = pytest.mark.slow


def _wait_for(cond, what: str, timeout: float, proc) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"train exited {proc.returncode} before {what}:\n{proc.stderr.read()[-4000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.2)


def test_sigterm_while_the_loader_hangs_ends_the_run(tmp_path):
    data = tmp_path / "lat"
    write_synthetic_dataset(data, [(3, 1, 8, 8)], num_samples=64, samples_per_shard=4, text_dim=16, max_text=8,
                            dtype=torch.float32)
    stuck, hung = tmp_path / "STUCK", tmp_path / "HUNG"  # STUCK: every later shard read hangs
    pipe = (f"pipe:sh -c 'test -e {stuck} && {{ echo $$ >> {hung}; exec sleep 300; }}; exec cat {data}/\"$0\"' "
            "{path}")
    config = tmp_path / "stall.yaml"  # the pipe command as YAML (an override would parse its braces)
    config.write_text(json.dumps({"base": [str(REPO / "configs" / "smoke.yaml")],
                                  "data": {"kind": "shards", "paths": [pipe]}}))
    tiny = [o for o in TINY_OVERRIDES if o != "data.kind=procedural"]
    cmd = train_cmd(config, *tiny, f"run_dir={tmp_path / 'run'}", "data.num_workers=1", "data.shuffle_buffer=4",
                    "train.steps=1000", "train.ckpt_every=1000", "parallel.zero_stage=0")
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: len(read_metrics(tmp_path / "run")) >= 2, "two logged steps", 300, proc)
        stuck.touch()
        _wait_for(hung.exists, "a hung shard read", 120, proc)
        steps = -1
        while steps != len(read_metrics(tmp_path / "run")):  # the prefetched batches are used up
            steps = len(read_metrics(tmp_path / "run"))
            time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)  # before the fix: blocked until the 300 s sleeps ended
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in (hung.read_text().split() if hung.exists() else []):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == 0, err[-4000:]
    assert "signal 15 while waiting" in err and "no checkpoint written" in err and "shard-0000" in err, err[-4000:]
    assert not (tmp_path / "run" / "DONE").exists()
