"""Signals to `megassm train` (CPU, gloo; megassm/train/signals.py): SIGUSR1 during start-up exits 0 without
training or a traceback (slurm/common.sh then requeues); Ctrl-C during training checkpoints and exits 130;
under torchrun a SIGUSR1 to the launcher, which torchrun does not pass on, still makes the workers checkpoint
and exit."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SMOKE, TINY_OVERRIDES, child_env, read_metrics, train_cmd

pytestmark = pytest.mark.slow
LONG = [*TINY_OVERRIDES, "train.steps=100000", "train.ckpt_every=100000"]


def _popen(run_dir, *overrides, nproc: int = 1) -> subprocess.Popen:
    return subprocess.Popen(train_cmd(SMOKE, *LONG, f"run_dir={run_dir}", *overrides, nproc=nproc), cwd=REPO,
                            text=True, env=child_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _read_until(proc: subprocess.Popen, text: str) -> str:
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"exited ({proc.wait()}) before {text!r}:\n{''.join(seen)[-4000:]}")


def _kill_leftovers(run_dir: Path) -> None:
    """Processes still running for ``run_dir`` (orphaned workers when the test fails): by pid."""
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and str(run_dir).encode() in (d / "cmdline").read_bytes():
                os.kill(int(d.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def test_sigusr1_during_start_up_exits_0_without_training(tmp_path):
    run = tmp_path / "run"
    proc = _popen(run)
    try:
        # during the start-up: after the build, DeepSpeed's engine, the EMA and the data loader come next
        head = _read_until(proc, "model built by partitions")
        proc.send_signal(signal.SIGUSR1)
        _, tail = proc.communicate(timeout=300)
    finally:
        proc.kill()
    log = head + tail
    assert proc.returncode == 0, log[-4000:]
    assert "SIGUSR1 came before training started (step 0); exiting without a checkpoint" in log, log[-4000:]
    assert "Traceback" not in log and not [r for r in read_metrics(run) if "loss" in r]
    assert not list((run / "checkpoints").glob("step_*"))


def test_ctrl_c_during_training_checkpoints_and_exits_130(tmp_path):
    run = tmp_path / "run"
    proc = _popen(run)
    try:
        _read_until(proc, "Hydra mixers:")  # logged after the first step
        proc.send_signal(signal.SIGINT)
        _, tail = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, tail[-4000:]
    assert "checkpoint written on signal at step" in tail and "Traceback" not in tail, tail[-4000:]
    tag = (run / "checkpoints" / "latest").read_text().strip()
    assert (run / "checkpoints" / tag / "COMPLETE").is_file()


@pytest.mark.distributed
def test_sigusr1_to_the_torchrun_launcher_reaches_the_workers(tmp_path):
    run = tmp_path / "run"
    proc = _popen(run, nproc=2)
    try:
        _read_until(proc, "Hydra mixers:")
        proc.send_signal(signal.SIGUSR1)  # torchrun does not pass it on: it dies of it
        assert proc.wait(timeout=60) == -signal.SIGUSR1
        _, tail = proc.communicate(timeout=180)  # the workers hold the pipe until they exit
    except subprocess.TimeoutExpired:
        raise AssertionError("the workers went on after their launcher died") from None
    finally:
        proc.kill()
        _kill_leftovers(run)
    assert tail.count("checkpoint written on signal at step") == 1, tail[-4000:]  # rank 0 logs it
    tag = (run / "checkpoints" / "latest").read_text().strip()
    assert (run / "checkpoints" / tag / "COMPLETE").is_file()
    assert {p.name for p in (run / "checkpoints" / tag / "trainer").glob("*.json")} == {"rank_00000.json",
                                                                                        "rank_00001.json"}


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
        except (OSError, ValueError, IndexError):
            pass
    return out


def _worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker of ``rank`` (a child of the launcher with RANK=rank)."""
    for pid in _children(launcher.pid):
        try:
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
        except OSError:
            pass
    raise AssertionError(f"no worker of rank {rank} under the launcher {launcher.pid}")


@pytest.mark.distributed
def test_a_signal_to_one_rank_during_start_up_stops_every_rank_before_training(tmp_path):
    """SIGUSR1 to rank 1 alone while the ranks start up: rank 0 never got it, yet both exit 0 where training
    would start (one all-reduce decides), so torchrun reports success; before, rank 1 died of it."""
    run = tmp_path / "run"
    proc = _popen(run, nproc=2)
    try:
        head = _read_until(proc, "model built by partitions")
        os.kill(_worker_pid(proc, 1), signal.SIGUSR1)
        _, tail = proc.communicate(timeout=300)
    finally:
        proc.kill()
        _kill_leftovers(run)
    log = head + tail
    assert proc.returncode == 0, log[-4000:]
    assert "SIGUSR1 came before training started (step 0)" in log and "Traceback" not in log, log[-4000:]
    assert not [r for r in read_metrics(run) if "loss" in r]


def test_sigterm_to_every_process_of_a_task_with_loader_workers_checkpoints(tmp_path):
    """What srun does with a forwarded SIGTERM: the trainer and its data-loader worker both get it (from
    another process); the worker keeps serving and the trainer checkpoints and exits 0. The worker's copy
    comes first here and the trainer's 8 steps later, past what the loader had prefetched: a worker that
    died of it fails the run."""
    from megassm.data.testing import write_synthetic_dataset

    data = tmp_path / "latents"
    write_synthetic_dataset(data, [(3, 1, 8, 8)], num_samples=32, samples_per_shard=4, text_dim=16, max_text=8)
    run = tmp_path / "run"
    proc = _popen(run, "data.kind=shards", f"data.paths=[{data}]", "data.num_workers=1")
    try:
        _read_until(proc, "Hydra mixers:")
        workers = _children(proc.pid)
        assert workers, "no loader worker"
        subprocess.run(["kill", "-TERM", *map(str, workers)], check=True)
        first, deadline = max(r["step"] for r in read_metrics(run) if "loss" in r), time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and \
                max(r["step"] for r in read_metrics(run) if "loss" in r) < first + 8:
            time.sleep(0.05)
        subprocess.run(["kill", "-TERM", str(proc.pid)], check=False)
        _, tail = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, tail[-4000:]
    assert "checkpoint written on signal at step" in tail and "Traceback" not in tail, tail[-4000:]
