"""Stop signals (megassm/train/signals.py): recorded, not fatal; a second Ctrl-C ends the process at once;
a torchrun worker gets SIGTERM when its launcher dies. Each case in a child process, so that no handler
of the test process changes."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from tests.conftest import REPO, child_env

RECORD = """
import os, signal, sys, time
from megassm.train.signals import install_for_process
flag = install_for_process()
for name in sys.argv[1:]:
    os.kill(os.getpid(), getattr(signal, name))
    time.sleep(0.05)  # the handler runs between bytecodes of the main thread
print(flag.name(), flag.exit_status(), signal.getsignal(signal.SIGINT) is signal.SIG_DFL, flush=True)
"""


def _child(code: str, *args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, env=child_env(**(env or {})),
                          capture_output=True, text=True, timeout=60, **kw)


def test_signals_are_recorded_and_the_first_one_decides_the_exit_status():
    for sigs, expected in ((["SIGUSR1"], "SIGUSR1 0 False"), (["SIGTERM", "SIGUSR1"], "SIGTERM 0 False"),
                           (["SIGINT"], "SIGINT 130 True")):
        proc = _child(RECORD, *sigs)
        assert proc.returncode == 0 and proc.stdout.split("\n")[0] == expected, (sigs, proc.stdout, proc.stderr)
    assert "Ctrl-C again ends the process at once" in _child(RECORD, "SIGINT").stderr


def test_a_second_ctrl_c_ends_the_process_at_once():
    proc = _child(RECORD, "SIGINT", "SIGINT")
    assert proc.returncode == -signal.SIGINT and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)


LAUNCHER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
print(worker.pid, flush=True)
time.sleep(60)
"""
WORKER = """
import signal, sys, time
from megassm.train.signals import install_for_process
flag = install_for_process()
print("ready", flush=True)
deadline = time.time() + 30
while not flag.requested and time.time() < deadline:
    time.sleep(0.02)
print("worker got", flag.name(), flush=True)
"""


def test_a_torchrun_worker_gets_sigterm_when_its_launcher_dies():
    """torchrun does not pass SIGUSR1 on (unless --signals-to-handle lists it): the launcher dies of it, and
    its workers used to go on training as orphans."""
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, WORKER], cwd=REPO, text=True,
                                env=child_env(TORCHELASTIC_RUN_ID="test"), stdout=subprocess.PIPE)
    try:
        int(launcher.stdout.readline())
        assert launcher.stdout.readline().strip() == "ready"
        launcher.send_signal(signal.SIGUSR1)
        assert launcher.wait(timeout=30) == -signal.SIGUSR1
        line = launcher.stdout.readline().strip()  # the worker holds the pipe until it exits (30 s at most)
        assert line == "worker got SIGTERM", line
    finally:
        launcher.kill()
        launcher.stdout.close()


def test_a_returned_train_command_leaves_no_signal_behind(tmp_path, monkeypatch):
    """A signal recorded during one `megassm train` call that then returned (here: refused at start) must not stop
    a later Trainer of the same process before its first step (it did: a test of the suite then trained nothing)."""
    import os
    from pathlib import Path

    import megassm.runtime
    from megassm.cli import main
    from megassm.train import signals

    before = signal.getsignal(signal.SIGUSR1)

    def signalled_then_refused():
        os.kill(os.getpid(), signal.SIGUSR1)  # recorded by the handlers the command installed
        raise RuntimeError("DeepSpeed 0.0 is installed")

    monkeypatch.setattr(megassm.runtime, "check_deepspeed", signalled_then_refused)
    config = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
    assert main(["train", str(config), f"run_dir={tmp_path / 'run'}"]) == 2
    assert signals.process_signals() is None and signal.getsignal(signal.SIGUSR1) == before
